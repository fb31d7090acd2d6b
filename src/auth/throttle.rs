//! Failed-login throttling: counts password failures per source address, per (source, target)
//! and per target (a tenant's database name, or the admin console), and before any SCRAM work
//! either lets a login attempt go, makes it wait (exponential delay, capped), or refuses it
//! during a lock-out. It also counts CancelRequests with keys nobody holds per source, and
//! drops that source's cancels during a lock-out (guessing a cancel secret is guessing a
//! password that cancels queries).
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
//! logins in progress (`max_logins_in_progress`). An exchange the client abandons once it is
//! running (it read the salt and hung up, or stalled into the login timeout) counts as a
//! failure: the `Attempt` is armed when the exchange starts and counts when dropped unreported.
//! A client that leaves before sending anything (psql does, to prompt for a password) is
//! refunded.
//!
//! Success resets only the (source, target) counter. The wide counters are not reset by
//! success, or one tenant's password would let its holder spray every other tenant from one
//! address with a login in between; they forget failures older than the quiet period instead.
//! The admin console has no per-target counter: many sources failing against it must not lock
//! its operators out (a spray is still stopped per source and per (source, console)).
//! Counters live in a bounded moka cache and are forgotten after a quiet period. Delays are
//! async sleeps in the client's own task: they hold no lock and block nobody else.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moka::future::Cache;
use tokio::time::Instant;

use super::shared_throttle::Outbox;

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

/// A counter's identity; shared with other instances by `shared_throttle`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Source(IpAddr),
    SourceTarget(IpAddr, Arc<str>),
    Target(Arc<str>),
    /// Cancel requests with keys nobody holds, from one source.
    UnknownCancelKeys(IpAddr),
}

#[derive(Debug, Default)]
struct Counter {
    /// Failed attempts since `since`.
    failures: u32,
    /// When the current window's first failure was counted.
    since: Option<Instant>,
    /// Attempts are refused until then.
    locked_until: Option<Instant>,
}

impl Counter {
    /// Forgets failures counted longer than `window` ago (outside a lock-out).
    fn expire(&mut self, now: Instant, window: Duration) {
        if self.locked_until.is_none() && self.since.is_some_and(|since| now - since > window) {
            self.failures = 0;
            self.since = None;
        }
    }

    fn count_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
    }
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
    /// Failures older than this are forgotten.
    window: Duration,
    counters: Cache<Key, Shared>,
    /// Lock-outs started since start-up (logins and cancel keys), for `/metrics`.
    lockouts: std::sync::atomic::AtomicU64,
    /// Where failures, resets and lock-outs wait to be told to the other instances; `None`
    /// when this instance counts alone.
    outbox: Option<Arc<Outbox>>,
}

/// A login attempt that the throttle let through: report how it ended. Once `arm`ed (the
/// exchange is running), dropping it unreported counts a failure.
#[must_use = "report the attempt's outcome: succeeded, failed or refund"]
pub struct Attempt {
    /// The (source, target) counter first, then the wide ones.
    counters: Vec<(Key, Shared)>,
    outbox: Option<Arc<Outbox>>,
    /// How long to wait before running the exchange.
    pub delay: Duration,
    armed: bool,
}

impl Attempt {
    /// The exchange starts: from now on, an attempt that ends without a report (the client
    /// stalled into the login timeout) is a failure.
    pub fn arm(&mut self) {
        self.armed = true;
    }

    fn count_failure(&mut self) {
        for (_, shared) in &self.counters {
            lock(shared).count_failure();
        }
        if let (Some(outbox), Some((Key::SourceTarget(source, name), _))) =
            (&self.outbox, self.counters.first())
        {
            outbox.failure(*source, name);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.armed {
            self.count_failure();
        }
    }
}

impl LoginThrottle {
    pub fn new(settings: ThrottleSettings) -> LoginThrottle {
        let quiet = QUIET_PERIOD.max(settings.lockout.saturating_mul(2));
        LoginThrottle {
            settings,
            window: quiet,
            counters: Cache::builder()
                .max_capacity(MAX_COUNTERS)
                .time_to_idle(quiet)
                .build(),
            lockouts: std::sync::atomic::AtomicU64::new(0),
            outbox: None,
        }
    }

    /// This throttle also tells `outbox` what it counts, for the other instances.
    #[must_use]
    pub fn sharing_through(mut self, outbox: Arc<Outbox>) -> LoginThrottle {
        self.outbox = Some(outbox);
        self
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
        let by_target = match target {
            Target::Tenant(_) => Some(self.counter(Key::Target(name)).await),
            Target::Admin => None,
        };
        let now = Instant::now();
        let base = (
            self.settings.failures_before_delay,
            self.settings.failures_before_lockout,
        );
        let wide = (
            base.0.saturating_mul(self.settings.wide_factor),
            base.1.saturating_mul(self.settings.wide_factor),
        );
        let mut plan = vec![
            (&narrow, base, "source and target"),
            (&by_source, wide, "source"),
        ];
        if let Some(counter) = &by_target {
            plan.push((counter, wide, "target"));
        }
        // First pass: any lock-out refuses, and this attempt would start one past the limit.
        for &((key, shared), (_, lockout_after), scope) in &plan {
            let mut c = lock(shared);
            c.expire(now, self.window);
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
                c.since = Some(now);
            }
            if c.failures >= lockout_after {
                c.locked_until = Some(now + self.settings.lockout);
                self.lockout_started();
                self.share_lockout(key, now + self.settings.lockout);
                return Err(Throttled {
                    scope,
                    retry_after: self.settings.lockout,
                });
            }
        }
        // Second pass: the longest delay any counter asks for this attempt.
        let mut delay = Duration::ZERO;
        for &((_, shared), (delay_after, _), _) in &plan {
            let attempt = lock(shared).failures.saturating_add(1);
            delay = delay.max(self.delay_for(attempt, delay_after));
        }
        let mut counters = vec![narrow, by_source];
        counters.extend(by_target);
        Ok(Attempt {
            counters,
            outbox: self.outbox.clone(),
            delay,
            armed: false,
        })
    }

    async fn counter(&self, key: Key) -> (Key, Shared) {
        let shared = self
            .counters
            .get_with(key.clone(), async { Shared::default() })
            .await;
        (key, shared)
    }

    /// Whether a CancelRequest from `source` may be looked up: not while the source is locked
    /// out for sending `failures_before_lockout` keys that nobody holds (guessing a 32-bit
    /// secret for a known backend pid). Its cancels are then dropped, silently, as PostgreSQL
    /// drops a cancel with a wrong key.
    pub async fn cancel_allowed(&self, source: IpAddr) -> bool {
        let (_, shared) = self.counter(Key::UnknownCancelKeys(source)).await;
        let mut c = lock(&shared);
        let now = Instant::now();
        match c.locked_until {
            Some(until) if until > now => false,
            Some(_) => {
                *c = Counter::default();
                true
            }
            None => {
                c.expire(now, self.window);
                true
            }
        }
    }

    fn share_lockout(&self, key: &Key, until: Instant) {
        if let Some(outbox) = &self.outbox {
            outbox.lockout(key.clone(), until);
        }
    }

    fn lockout_started(&self) {
        self.lockouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lock-outs started since start-up.
    pub fn lockouts(&self) -> u64 {
        self.lockouts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A CancelRequest from `source` named a key nobody holds.
    pub async fn unknown_cancel_key(&self, source: IpAddr) {
        let (_, shared) = self.counter(Key::UnknownCancelKeys(source)).await;
        let until = {
            let mut c = lock(&shared);
            c.count_failure();
            if c.failures < self.settings.failures_before_lockout {
                None
            } else {
                if c.locked_until.is_none_or(|until| until <= Instant::now()) {
                    self.lockout_started();
                }
                let until = Instant::now() + self.settings.lockout;
                c.locked_until = Some(until);
                Some(until)
            }
        };
        if let Some(outbox) = &self.outbox {
            outbox.unknown_cancel_key(source);
        }
        if let Some(until) = until {
            self.share_lockout(&Key::UnknownCancelKeys(source), until);
        }
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

    /// The login succeeded: the (source, target) counter starts over. The per-source and
    /// per-target counters keep their failures (see the module doc). The counter is reset
    /// where it is, not removed: the next login from there finds it (a cache read) instead
    /// of inserting it again, and a write to the cache per login cost more than the rest of
    /// the throttle (issue 12, logins).
    pub fn succeeded(&self, mut attempt: Attempt) {
        attempt.armed = false;
        if let Some((narrow, shared)) = attempt.counters.first() {
            *lock(shared) = Counter::default();
            if let (Some(outbox), Key::SourceTarget(source, name)) = (&self.outbox, narrow) {
                outbox.success(*source, name);
            }
        }
    }

    /// The client left before sending anything (no password was tried): nothing to count.
    pub fn refund(mut attempt: Attempt) {
        attempt.armed = false;
    }

    /// The password was wrong, or the client abandoned the exchange: one more failure on
    /// each counter.
    pub fn failed(mut attempt: Attempt) {
        attempt.armed = false;
        attempt.count_failure();
    }
}

/// What other instances counted, added to this one's counters (see `shared_throttle`). They
/// only count: the lock-out they may bring is decided by the next `begin`, as for local
/// failures, or arrives as a lock-out of its own.
impl LoginThrottle {
    /// `failures` failed logins of `source` against `target` (the name as `begin` keys it);
    /// `reset` first when a login of theirs succeeded, after which `since_reset` of those
    /// failures happened.
    pub(crate) async fn add_remote_failures(
        &self,
        source: IpAddr,
        target: &str,
        failures: u32,
        (reset, since_reset): (bool, u32),
    ) {
        let name: Arc<str> = Arc::from(truncate(target, MAX_TARGET_BYTES));
        let narrow = Key::SourceTarget(source, Arc::clone(&name));
        if reset {
            self.counters.invalidate(&narrow).await;
        }
        let mut keys = vec![(narrow, since_reset), (Key::Source(source), failures)];
        if !name.starts_with('\0') {
            keys.push((Key::Target(name), failures));
        }
        let now = Instant::now();
        for (key, n) in keys {
            if n == 0 {
                continue;
            }
            let (_, shared) = self.counter(key).await;
            let mut c = lock(&shared);
            c.expire(now, self.window);
            c.failures = c.failures.saturating_add(n);
            c.since.get_or_insert(now);
        }
    }

    /// `n` CancelRequests of `source` with keys nobody held.
    pub(crate) async fn add_remote_cancel_keys(&self, source: IpAddr, n: u32) {
        let (_, shared) = self.counter(Key::UnknownCancelKeys(source)).await;
        let mut c = lock(&shared);
        let now = Instant::now();
        c.expire(now, self.window);
        c.failures = c.failures.saturating_add(n);
        c.since.get_or_insert(now);
        if c.failures >= self.settings.failures_before_lockout {
            let until = now + self.settings.lockout;
            c.locked_until = Some(c.locked_until.map_or(until, |t| t.max(until)));
        }
    }

    /// Another instance locked `key` out for `remaining` more (at most our own lock-out).
    pub(crate) async fn add_remote_lockout(&self, key: Key, remaining: Duration) {
        let key = match key {
            Key::SourceTarget(source, name) => {
                Key::SourceTarget(source, Arc::from(truncate(&name, MAX_TARGET_BYTES)))
            }
            Key::Target(name) => Key::Target(Arc::from(truncate(&name, MAX_TARGET_BYTES))),
            other => other,
        };
        let (_, shared) = self.counter(key).await;
        let mut c = lock(&shared);
        let until = Instant::now() + remaining.min(self.settings.lockout);
        c.locked_until = Some(c.locked_until.map_or(until, |t| t.max(until)));
        c.since.get_or_insert_with(Instant::now);
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
    async fn success_resets_the_source_and_target_only() {
        let t = LoginThrottle::new(settings());
        let x = Target::Tenant("x");
        for _ in 0..4 {
            fail(&t, A, x).await.unwrap();
        }
        let ok = t.begin(A, x).await.unwrap();
        t.succeeded(ok);
        assert_eq!(fail(&t, A, x).await.unwrap(), Duration::ZERO);
        // A spray with a successful login of its own tenant between guesses: the per-source
        // counter is not reset, so the spray is refused all the same.
        let mut refused = None;
        for i in 0..30 {
            let name = format!("other{i}");
            if let Err(e) = fail(&t, A, Target::Tenant(&name)).await {
                refused = Some((i, e));
                break;
            }
            match t.begin(A, x).await {
                Ok(ok) => t.succeeded(ok),
                Err(e) => {
                    refused = Some((i + 1, e));
                    break;
                }
            }
        }
        // The wide lock-out comes at 15 failures: the 5 against x plus 10 guesses.
        let (guesses, e) = refused.unwrap();
        assert_eq!((guesses, e.scope), (10, "source"));
    }

    #[tokio::test(start_paused = true)]
    async fn wide_counters_forget_old_failures() {
        let t = LoginThrottle::new(settings());
        for i in 0..14 {
            fail(&t, A, Target::Tenant(&format!("t{i}"))).await.unwrap();
        }
        tokio::time::advance(QUIET_PERIOD + Duration::from_secs(1)).await;
        // 14 of 15 allowed, but all older than the window: the count starts again.
        for i in 0..14 {
            fail(&t, A, Target::Tenant(&format!("u{i}"))).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_armed_attempt_dropped_unreported_counts_as_a_failure() {
        let t = LoginThrottle::new(settings());
        let x = Target::Tenant("x");
        for _ in 0..5 {
            let mut attempt = t.begin(A, x).await.unwrap();
            attempt.arm();
            drop(attempt);
        }
        assert_eq!(fail(&t, A, x).await.unwrap_err().scope, "source and target");
    }

    #[tokio::test(start_paused = true)]
    async fn many_sources_never_lock_the_admin_console_for_others() {
        let t = LoginThrottle::new(settings());
        for i in 0..50u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, i));
            for _ in 0..4 {
                fail(&t, ip, Target::Admin).await.unwrap();
            }
        }
        assert_eq!(fail(&t, B, Target::Admin).await.unwrap(), Duration::ZERO);
        // One source is still stopped.
        let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 0));
        fail(&t, ip, Target::Admin).await.unwrap();
        assert!(fail(&t, ip, Target::Admin).await.is_err());
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

    #[tokio::test(start_paused = true)]
    async fn unknown_cancel_keys_lock_their_source_out_of_cancelling() {
        let t = LoginThrottle::new(settings());
        for _ in 0..5 {
            assert!(t.cancel_allowed(A).await);
            t.unknown_cancel_key(A).await;
        }
        assert!(!t.cancel_allowed(A).await, "locked after 5 unknown keys");
        assert!(t.cancel_allowed(B).await, "another source is not");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(t.cancel_allowed(A).await, "after the lock-out");
    }

    #[test]
    fn long_names_are_cut_at_a_boundary() {
        let long = "é".repeat(100);
        assert!(truncate(&long, MAX_TARGET_BYTES).len() <= MAX_TARGET_BYTES);
        assert_eq!(truncate("abc", 64), "abc");
    }
}
