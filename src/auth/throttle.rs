//! Failed-login throttling: counts password failures per source address, per (source, target)
//! and per target (a tenant's database name, or the admin console), and before any SCRAM work
//! either lets a login attempt go, makes it wait (exponential delay, capped), or refuses it
//! during a lock-out.
//!
//! Why three counters, and why two sets of thresholds: one source guessing one tenant's
//! passwords is the common attack, and it hits the (source, target) counter at the base
//! thresholds (`auth_failures_before_delay`, `auth_failures_before_lockout`). A source that
//! sprays many tenants, and many sources against one tenant, are caught by the per-source and
//! per-target counters, whose thresholds are the base ones times `auth_failure_limit_factor`:
//! higher, because many honest clients share one address (NAT, an application server) and one
//! tenant has many users. So a brute-force loop against tenant A locks (source, A) long before
//! the same address's clients of tenant B notice anything. The per-target lock-out is a
//! deliberate trade-off: it protects the tenant's passwords at the price of its users waiting
//! out the cool-down when it is attacked from many addresses.
//!
//! A failure is counted when the exchange fails, not when it begins: a burst of honest
//! clients logging in at once (an application server starting 200 connections) must not look
//! like 200 failures. Parallel guesses can therefore run ahead of the count by at most the
//! logins in progress (`max_logins_in_progress`). Success resets the source's counters; a
//! client that leaves before proving anything counts for nothing.
//! Counters live in a bounded moka cache and are forgotten after a quiet period. Delays are
//! async sleeps in the client's own task: they hold no lock and block nobody else.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moka::future::Cache;
use tokio::time::Instant;

/// Most counters kept; past it the least useful are evicted (about 100 bytes each).
const MAX_COUNTERS: u64 = 100_000;
/// Counters with no attempt for this long are forgotten (or twice the lock-out, if longer).
const QUIET_PERIOD: Duration = Duration::from_secs(600);
/// The first delay; each further failure doubles it, up to `max_delay`.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest target name kept in a key: a tenant slug or database name is at most 63 bytes, so
/// a longer one cannot name a tenant, and truncating it bounds the cache's memory.
const MAX_TARGET_BYTES: usize = 64;

/// The thresholds, from `[proxy]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Failures of one (source, target) before attempts are delayed.
    pub failures_before_delay: u32,
    /// Failures of one (source, target) before attempts are refused for `lockout`.
    pub failures_before_lockout: u32,
    pub lockout: Duration,
    pub max_delay: Duration,
    /// The per-source and per-target counters use the thresholds times this.
    pub wide_factor: u32,
}

/// What the throttle counts against: a tenant (by the name the client asked for, which may
/// not exist) or the admin console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Tenant(&'a str),
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    SourceTarget(IpAddr, Arc<str>),
    Target(Arc<str>),
}

#[derive(Debug, Default)]
struct Counter {
    /// Failed (or still running) attempts in the current window.
    failures: u32,
    /// Attempts are refused until then.
    locked_until: Option<Instant>,
}

type Shared = Arc<Mutex<Counter>>;

/// A login refused because of earlier failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed logins ({scope}); locked for {retry_after:?} more")]
pub struct Throttled {
    /// Which counter refused: "source", "source and target" or "target".
    pub scope: &'static str,
    pub retry_after: Duration,
}

/// The failed-login counters of one proxy.
pub struct LoginThrottle {
    settings: ThrottleSettings,
    counters: Cache<Key, Shared>,
}

/// A login attempt that the throttle let through: report how it ended.
#[must_use = "report the attempt's outcome: succeeded, failed or refund"]
pub struct Attempt {
    counters: [(Key, Shared); 3],
    /// How long to wait before running the exchange.
    pub delay: Duration,
}

impl LoginThrottle {
    pub fn new(settings: ThrottleSettings) -> LoginThrottle {
        let quiet = QUIET_PERIOD.max(settings.lockout.saturating_mul(2));
        LoginThrottle {
            settings,
            counters: Cache::builder()
                .max_capacity(MAX_COUNTERS)
                .time_to_idle(quiet)
                .build(),
        }
    }

    pub fn settings(&self) -> ThrottleSettings {
        self.settings
    }

    /// Called before authentication: refuses during a lock-out, otherwise counts the attempt
    /// as a failure until told otherwise and says how long to delay it.
    pub async fn begin(&self, source: IpAddr, target: Target<'_>) -> Result<Attempt, Throttled> {
        let name: Arc<str> = match target {
            Target::Tenant(name) => Arc::from(truncate(name, MAX_TARGET_BYTES)),
            // Startup parameters are C strings: no tenant name contains NUL.
            Target::Admin => Arc::from("\0admin"),
        };
        let narrow = self
            .counter(Key::SourceTarget(source, Arc::clone(&name)))
            .await;
        let by_source = self.counter(Key::Source(source)).await;
        let by_target = self.counter(Key::Target(name)).await;
        let now = Instant::now();
        let base = (
            self.settings.failures_before_delay,
            self.settings.failures_before_lockout,
        );
        let wide = (
            base.0.saturating_mul(self.settings.wide_factor),
            base.1.saturating_mul(self.settings.wide_factor),
        );
        let plan = [
            (&narrow.1, base, "source and target"),
            (&by_source.1, wide, "source"),
            (&by_target.1, wide, "target"),
        ];
        // First pass: any lock-out refuses, and this attempt would start one past the limit.
        for (shared, (_, lockout_after), scope) in plan {
            let mut c = lock(shared);
            if let Some(until) = c.locked_until {
                if until > now {
                    return Err(Throttled {
                        scope,
                        retry_after: until - now,
                    });
                }
                // The cool-down is over: one more failure locks again, success resets.
                c.locked_until = None;
                c.failures = lockout_after.saturating_sub(1);
            }
            if c.failures >= lockout_after {
                c.locked_until = Some(now + self.settings.lockout);
                return Err(Throttled {
                    scope,
                    retry_after: self.settings.lockout,
                });
            }
        }
        // Second pass: the longest delay any counter asks for this attempt.
        let mut delay = Duration::ZERO;
        for (shared, (delay_after, _), _) in plan {
            let attempt = lock(shared).failures.saturating_add(1);
            delay = delay.max(self.delay_for(attempt, delay_after));
        }
        Ok(Attempt {
            counters: [narrow, by_source, by_target],
            delay,
        })
    }

    async fn counter(&self, key: Key) -> (Key, Shared) {
        let shared = self
            .counters
            .get_with(key.clone(), async { Shared::default() })
            .await;
        (key, shared)
    }

    /// The delay of the `attempt`th attempt (1-based) when `delay_after` go free.
    fn delay_for(&self, attempt: u32, delay_after: u32) -> Duration {
        if attempt <= delay_after {
            return Duration::ZERO;
        }
        let doublings = (attempt - delay_after - 1).min(20);
        FIRST_DELAY
            .saturating_mul(1 << doublings)
            .min(self.settings.max_delay)
    }

    /// The login succeeded: the source's counters start over (other sources' failures
    /// against the target still count).
    pub async fn succeeded(&self, attempt: Attempt) {
        let [(narrow, _), (by_source, _), _] = attempt.counters;
        self.counters.invalidate(&narrow).await;
        self.counters.invalidate(&by_source).await;
    }

    /// The client left before proving anything (no password was tried): nothing to count.
    pub fn refund(attempt: Attempt) {
        drop(attempt);
    }

    /// The password was wrong: one more failure on each counter.
    pub fn failed(attempt: Attempt) {
        for (_, shared) in attempt.counters {
            let mut c = lock(&shared);
            c.failures = c.failures.saturating_add(1);
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Counter> {
    // A panic elsewhere cannot leave a counter half-updated in a way that matters.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            failures_before_delay: 2,
            failures_before_lockout: 5,
            lockout: Duration::from_secs(60),
            max_delay: Duration::from_millis(300),
            wide_factor: 3,
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    async fn fail(
        t: &LoginThrottle,
        ip: IpAddr,
        target: Target<'_>,
    ) -> Result<Duration, Throttled> {
        let attempt = t.begin(ip, target).await?;
        let delay = attempt.delay;
        LoginThrottle::failed(attempt);
        Ok(delay)
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_then_lock_out_then_cool_down() {
        let t = LoginThrottle::new(settings());
        let x = Target::Tenant("x");
        let mut delays = Vec::new();
        for _ in 0..5 {
            delays.push(fail(&t, A, x).await.unwrap().as_millis());
        }
        assert_eq!(delays, [0, 0, 100, 200, 300]);
        let refused = fail(&t, A, x).await.unwrap_err();
        assert_eq!(refused.scope, "source and target");
        assert_eq!(refused.retry_after, Duration::from_secs(60));
        // Another tenant from the same source is untouched; so is the same tenant from elsewhere.
        assert_eq!(
            fail(&t, A, Target::Tenant("y")).await.unwrap(),
            Duration::ZERO
        );
        assert_eq!(fail(&t, B, x).await.unwrap(), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(fail(&t, A, x).await.is_err());
        tokio::time::advance(Duration::from_secs(31)).await;
        // After the cool-down one more try is allowed (delayed), and its failure locks again.
        assert_eq!(fail(&t, A, x).await.unwrap(), Duration::from_millis(300));
        assert!(fail(&t, A, x).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_source() {
        let t = LoginThrottle::new(settings());
        let x = Target::Tenant("x");
        for _ in 0..4 {
            fail(&t, A, x).await.unwrap();
        }
        let ok = t.begin(A, x).await.unwrap();
        t.succeeded(ok).await;
        assert_eq!(fail(&t, A, x).await.unwrap(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn refunds_do_not_count() {
        let t = LoginThrottle::new(settings());
        for _ in 0..20 {
            let attempt = t.begin(A, Target::Admin).await.unwrap();
            assert_eq!(attempt.delay, Duration::ZERO);
            LoginThrottle::refund(attempt);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn spraying_many_targets_hits_the_source_counter() {
        let t = LoginThrottle::new(settings());
        let names: Vec<String> = (0..15).map(|i| format!("t{i}")).collect();
        for name in &names {
            fail(&t, A, Target::Tenant(name)).await.unwrap();
        }
        let refused = fail(&t, A, Target::Tenant("fresh")).await.unwrap_err();
        assert_eq!(refused.scope, "source");
        // Many sources against one target hit the target counter.
        for i in 0..15u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i));
            fail(&t, ip, Target::Tenant("victim")).await.unwrap();
        }
        let refused = fail(&t, B, Target::Tenant("victim")).await.unwrap_err();
        assert_eq!(refused.scope, "target");
    }

    #[test]
    fn long_names_are_cut_at_a_boundary() {
        let long = "é".repeat(100);
        assert!(truncate(&long, MAX_TARGET_BYTES).len() <= MAX_TARGET_BYTES);
        assert_eq!(truncate("abc", 64), "abc");
    }
}
