//! Process-wide counters that belong to no tenant: logins by outcome, admin console commands,
//! and the distribution of backend checkout waits. They feed `/metrics` (`crate::metrics`).
//!
//! Like the tenant counters, they are relaxed atomics only: no lock, no allocation when
//! counted. The checkout-wait histogram is counted on every checkout (through the tenant's
//! `TenantStats::add_wait`), so it is a fixed array of buckets, never a map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a login ended, as `tenantgate_logins_total{outcome}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Authenticated, tenant active (or an admin user): the session starts.
    Ok,
    /// Wrong password, unknown user or tenant, refused certificate, not an admin user.
    AuthFailed,
    /// The client went away during the login.
    Abandoned,
    /// Refused before authentication by a failed-login lock-out.
    Throttled,
    /// The tenant exists but is not active (suspended, ...).
    TenantUnavailable,
    /// No login slot was free (`max_logins_in_progress`).
    TooManyLogins,
    /// The login did not finish within `login_timeout_ms`.
    Timeout,
    /// Anything else: a malformed startup packet, a refused setting, the registry down.
    Refused,
}

impl LoginOutcome {
    pub const ALL: [LoginOutcome; 8] = [
        LoginOutcome::Ok,
        LoginOutcome::AuthFailed,
        LoginOutcome::Abandoned,
        LoginOutcome::Throttled,
        LoginOutcome::TenantUnavailable,
        LoginOutcome::TooManyLogins,
        LoginOutcome::Timeout,
        LoginOutcome::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginOutcome::Ok => "ok",
            LoginOutcome::AuthFailed => "auth_failed",
            LoginOutcome::Abandoned => "abandoned",
            LoginOutcome::Throttled => "throttled",
            LoginOutcome::TenantUnavailable => "tenant_unavailable",
            LoginOutcome::TooManyLogins => "too_many_logins",
            LoginOutcome::Timeout => "timeout",
            LoginOutcome::Refused => "refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the checkout-wait buckets, in microseconds (100 µs to 5 s); one more
/// bucket counts what is above the last.
pub const WAIT_BUCKETS_US: [u64; 10] = [
    100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000,
];

/// The time clients waited for a backend checkout, by bucket. A lock-free histogram: one
/// relaxed add per bucket hit, one to the sum.
#[derive(Debug, Default)]
pub struct WaitHistogram {
    /// Checkouts per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; WAIT_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A snapshot of a [`WaitHistogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct WaitSnapshot {
    /// (upper bound in seconds, checkouts in this bucket, not cumulative), without the
    /// bucket above the last bound; `count` includes it.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl WaitHistogram {
    pub fn record(&self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let at = WAIT_BUCKETS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(WAIT_BUCKETS_US.len());
        if let Some(bucket) = self.buckets.get(at) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> WaitSnapshot {
        let mut count = 0u64;
        let mut buckets = Vec::with_capacity(WAIT_BUCKETS_US.len());
        for (at, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            count = count.saturating_add(n);
            if let Some(bound) = WAIT_BUCKETS_US.get(at) {
                #[allow(clippy::cast_precision_loss, reason = "bounds are small")]
                buckets.push((*bound as f64 / 1e6, n));
            }
        }
        #[allow(
            clippy::cast_precision_loss,
            reason = "a sum in seconds needs no exactness"
        )]
        let sum_seconds = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        WaitSnapshot {
            buckets,
            count,
            sum_seconds,
        }
    }
}

/// Counters of the whole process (shared by every tenant's [`super::TenantStats`]).
#[derive(Debug, Default)]
pub struct ProcessCounters {
    logins: [AtomicU64; LoginOutcome::ALL.len()],
    admin_commands_ok: AtomicU64,
    admin_commands_failed: AtomicU64,
    /// Clients handed to a newer process, clients whose handover failed, and clients taken
    /// over from an older one (SIGUSR2 upgrades).
    handed_over: AtomicU64,
    handover_failed: AtomicU64,
    taken_over: AtomicU64,
    pub checkout_wait: WaitHistogram,
}

impl ProcessCounters {
    pub fn login(&self, outcome: LoginOutcome) {
        if let Some(c) = self.logins.get(outcome.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn logins(&self, outcome: LoginOutcome) -> u64 {
        self.logins
            .get(outcome.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// An admin console command ran (`ok`) or was answered with an error.
    pub fn admin_command(&self, ok: bool) {
        let counter = if ok {
            &self.admin_commands_ok
        } else {
            &self.admin_commands_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A client left for a newer process (`Ok`), or its handover failed (`Err`).
    pub fn handed_over(&self, ok: bool) {
        let counter = if ok {
            &self.handed_over
        } else {
            &self.handover_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A client came from an older process.
    pub fn taken_over(&self) {
        self.taken_over.fetch_add(1, Ordering::Relaxed);
    }

    /// (clients handed over, handovers that failed, clients taken over).
    pub fn handovers(&self) -> (u64, u64, u64) {
        (
            self.handed_over.load(Ordering::Relaxed),
            self.handover_failed.load(Ordering::Relaxed),
            self.taken_over.load(Ordering::Relaxed),
        )
    }

    /// (commands that ran, commands answered with an error).
    pub fn admin_commands(&self) -> (u64, u64) {
        (
            self.admin_commands_ok.load(Ordering::Relaxed),
            self.admin_commands_failed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_land_in_their_buckets() {
        let h = WaitHistogram::default();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.first(), Some(&(0.0001, 2)));
        assert_eq!(s.buckets.get(3), Some(&(0.005, 1)));
        assert_eq!(s.buckets.last(), Some(&(5.0, 0)));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        assert!((s.sum_seconds - 60.00315).abs() < 1e-9);
    }

    #[test]
    fn logins_count_by_outcome() {
        let c = ProcessCounters::default();
        c.login(LoginOutcome::Ok);
        c.login(LoginOutcome::Ok);
        c.login(LoginOutcome::Refused);
        assert_eq!(c.logins(LoginOutcome::Ok), 2);
        assert_eq!(c.logins(LoginOutcome::Refused), 1);
        assert_eq!(c.logins(LoginOutcome::Throttled), 0);
    }
}
