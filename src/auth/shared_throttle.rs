//! The failed-login throttle across instances: several tenantgate processes behind one load
//! balancer count one password spray together, because a spray split over instances is still
//! a spray (issue 15).
//!
//! How: each instance keeps deciding from its own [`LoginThrottle`] counters, in memory, as
//! alone; the login path never waits on the registry. What it counts (failed logins per
//! (source, target), successes that reset a (source, target) counter, unknown cancel keys per
//! source, and lock-outs it starts) also goes into an [`Outbox`], aggregated per key. One
//! background task per instance (`spawn`) flushes the outbox every `[proxy]
//! auth_failure_share_ms` as NOTIFYs on the registry channel [`CHANNEL`], and LISTENs on the
//! same connection: every other instance's events are added to the local counters (an
//! instance ignores its own). So after N failures in total, split any way over the instances,
//! each instance's next decision sees N, give or take one flush interval and the attempts in
//! flight during it. A lock-out one instance starts is sent too, so the cool-down (and the
//! "one more failure locks again" after it) applies everywhere.
//!
//! Why NOTIFY and not a table: nothing grows in the registry, there is nothing to purge, and a
//! spray costs one NOTIFY per flush however many attempts it makes. The price: an instance
//! that starts later does not learn earlier failures (it starts counting from zero, as a
//! restarted one did before), and events sent while an instance's listener is disconnected are
//! lost to it.
//!
//! Registry outage: logins go on being throttled by the local counters; the outbox keeps at
//! most [`MAX_PENDING`] keys (further new keys are dropped, counted locally all the same) and
//! is sent when the registry is back; lock-outs carry their remaining time as of the flush.
//!
//! Bounds: a payload is at most [`MAX_PAYLOAD_BYTES`] (PostgreSQL's limit is 8000), a flush
//! sends at most `MAX_PENDING` keys, and what a peer sends is capped on the way in (target
//! names cut to the throttle's 64 bytes, lock-outs to our own `auth_lockout_seconds`).
//!
//! This module must not decide a login (only `LoginThrottle::begin` does, from memory), must
//! not block a client on the registry, and touches no registry table: only its channel.
//!
//! Background loop: `spawn` (one task: connect, LISTEN, flush on a timer, apply what peers
//! send; reconnects with a back-off up to 5 s until `shutdown`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::throttle::{Key, LoginThrottle};

/// The registry channel the instances share failed logins on.
pub const CHANNEL: &str = "tenantgate_auth";
/// Most distinct keys waiting in the outbox; past it new keys are not shared (a spray from
/// that many sources in one flush interval still meets each instance's local counters).
pub const MAX_PENDING: usize = 1024;
/// Largest NOTIFY payload we send; PostgreSQL refuses 8000 bytes and more.
pub const MAX_PAYLOAD_BYTES: usize = 7000;
/// The first wait before reconnecting; it doubles up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Failures of one (source, target) since the last flush.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// All of them: the per-source and per-target counters never reset on success.
    failures: u32,
    /// A login succeeded meanwhile: receivers reset their (source, target) counter...
    reset: bool,
    /// ...and then add these, the failures since the last success.
    since_reset: u32,
}

#[derive(Debug, Default)]
struct Pending {
    logins: HashMap<(IpAddr, Arc<str>), Tally>,
    cancel_keys: HashMap<IpAddr, u32>,
    lockouts: HashMap<Key, Instant>,
    /// Events not kept because the outbox was full, since the last flush.
    dropped: u64,
}

impl Pending {
    fn len(&self) -> usize {
        self.logins.len() + self.cancel_keys.len() + self.lockouts.len()
    }
}

/// What this instance counted and has not told the others yet. Filled by the throttle under
/// a short lock; emptied by the flush.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Pending>,
}

impl Outbox {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tally of `(source, target)`, if there is one or room for one.
    fn with_tally(&self, source: IpAddr, target: &Arc<str>, change: impl FnOnce(&mut Tally)) {
        let mut pending = self.pending();
        let full = pending.len() >= MAX_PENDING;
        let key = (source, Arc::clone(target));
        match pending.logins.get_mut(&key) {
            Some(tally) => change(tally),
            None if full => pending.dropped += 1,
            None => change(pending.logins.entry(key).or_default()),
        }
    }

    pub(crate) fn failure(&self, source: IpAddr, target: &Arc<str>) {
        self.with_tally(source, target, |t| {
            t.failures = t.failures.saturating_add(1);
            t.since_reset = t.since_reset.saturating_add(1);
        });
    }

    pub(crate) fn success(&self, source: IpAddr, target: &Arc<str>) {
        self.with_tally(source, target, |t| {
            t.reset = true;
            t.since_reset = 0;
        });
    }

    pub(crate) fn unknown_cancel_key(&self, source: IpAddr) {
        let mut pending = self.pending();
        let full = pending.len() >= MAX_PENDING;
        match pending.cancel_keys.get_mut(&source) {
            Some(n) => *n = n.saturating_add(1),
            None if full => pending.dropped += 1,
            None => {
                pending.cancel_keys.insert(source, 1);
            }
        }
    }

    pub(crate) fn lockout(&self, key: Key, until: Instant) {
        let mut pending = self.pending();
        let full = pending.len() >= MAX_PENDING;
        match pending.lockouts.get_mut(&key) {
            Some(t) => *t = (*t).max(until),
            None if full => pending.dropped += 1,
            None => {
                pending.lockouts.insert(key, until);
            }
        }
    }

    /// Everything pending, as payloads of at most `MAX_PAYLOAD_BYTES` from `instance`.
    fn drain(&self, instance: &str) -> Vec<String> {
        let taken = std::mem::take(&mut *self.pending());
        if taken.dropped > 0 {
            tracing::warn!(
                dropped = taken.dropped,
                "failed-login events not shared with other instances: outbox full"
            );
        }
        let now = Instant::now();
        let mut events: Vec<Event> = Vec::with_capacity(taken.len());
        events.extend(
            taken
                .logins
                .into_iter()
                .map(|((source, target), t)| Event::Failures {
                    s: source,
                    t: target.to_string(),
                    n: t.failures,
                    r: t.reset,
                    k: t.since_reset,
                }),
        );
        events.extend(
            taken
                .cancel_keys
                .into_iter()
                .map(|(s, n)| Event::CancelKeys { s, n }),
        );
        events.extend(taken.lockouts.into_iter().filter_map(|(key, until)| {
            let ms = until.checked_duration_since(now)?.as_millis();
            Some(Event::Lockout {
                key: WireKey::from(key),
                ms: u64::try_from(ms).unwrap_or(u64::MAX),
            })
        }));
        encode(instance, &events)
    }
}

/// One thing an instance tells the others. Short field names: payloads are bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Event {
    /// `n` failed logins of source `s` against target `t` (`"\0admin"`: the console); `r`: a
    /// login succeeded among them, and `k` failed after it.
    #[serde(rename = "f")]
    Failures {
        s: IpAddr,
        t: String,
        n: u32,
        r: bool,
        k: u32,
    },
    /// `n` unknown cancel keys from source `s`.
    #[serde(rename = "c")]
    CancelKeys { s: IpAddr, n: u32 },
    /// `key` is locked out for `ms` more milliseconds.
    #[serde(rename = "l")]
    Lockout { key: WireKey, ms: u64 },
}

/// A throttle counter's identity on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum WireKey {
    #[serde(rename = "s")]
    Source(IpAddr),
    #[serde(rename = "st")]
    SourceTarget(IpAddr, String),
    #[serde(rename = "t")]
    Target(String),
    #[serde(rename = "c")]
    CancelKeys(IpAddr),
}

impl From<Key> for WireKey {
    fn from(key: Key) -> WireKey {
        match key {
            Key::Source(s) => WireKey::Source(s),
            Key::SourceTarget(s, t) => WireKey::SourceTarget(s, t.to_string()),
            Key::Target(t) => WireKey::Target(t.to_string()),
            Key::UnknownCancelKeys(s) => WireKey::CancelKeys(s),
        }
    }
}

impl From<WireKey> for Key {
    fn from(key: WireKey) -> Key {
        match key {
            WireKey::Source(s) => Key::Source(s),
            WireKey::SourceTarget(s, t) => Key::SourceTarget(s, Arc::from(t)),
            WireKey::Target(t) => Key::Target(Arc::from(t)),
            WireKey::CancelKeys(s) => Key::UnknownCancelKeys(s),
        }
    }
}

/// One NOTIFY payload: the sender's instance id and its events.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    i: String,
    e: Vec<Event>,
}

/// `events` as JSON payloads of at most `MAX_PAYLOAD_BYTES` each (an event too large on its
/// own, which a 64-byte target cannot make, is left out).
fn encode(instance: &str, events: &[Event]) -> Vec<String> {
    let head = match serde_json::to_string(instance) {
        Ok(id) => format!("{{\"i\":{id},\"e\":["),
        Err(_) => return Vec::new(),
    };
    let mut payloads = Vec::new();
    let mut current = head.clone();
    let mut count = 0usize;
    for event in events {
        let Ok(text) = serde_json::to_string(event) else {
            continue;
        };
        if head.len() + text.len() + 2 > MAX_PAYLOAD_BYTES {
            continue;
        }
        if current.len() + text.len() + 3 > MAX_PAYLOAD_BYTES {
            current.push_str("]}");
            payloads.push(std::mem::replace(&mut current, head.clone()));
            count = 0;
        }
        if count > 0 {
            current.push(',');
        }
        current.push_str(&text);
        count += 1;
    }
    if count > 0 {
        current.push_str("]}");
        payloads.push(current);
    }
    payloads
}

/// Adds what another instance counted to `throttle`; our own payloads and malformed ones are
/// ignored.
async fn apply(throttle: &LoginThrottle, own_id: &str, payload: &str) {
    let payload: Payload = match serde_json::from_str(payload) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring a malformed failed-login notification");
            return;
        }
    };
    if payload.i == own_id {
        return;
    }
    for event in payload.e {
        match event {
            Event::Failures { s, t, n, r, k } => {
                throttle.add_remote_failures(s, &t, n, (r, k)).await;
            }
            Event::CancelKeys { s, n } => throttle.add_remote_cancel_keys(s, n).await,
            Event::Lockout { key, ms } => {
                throttle
                    .add_remote_lockout(key.into(), Duration::from_millis(ms))
                    .await;
            }
        }
    }
}

/// What the sharing task needs.
pub struct Sharing {
    /// The registry's connection string.
    pub url: String,
    /// This instance's id: its own notifications come back to it and are skipped.
    pub instance: String,
    pub throttle: Arc<LoginThrottle>,
    pub outbox: Arc<Outbox>,
    /// How often the outbox is sent.
    pub every: Duration,
    /// Bound on connecting and on each NOTIFY.
    pub timeout: Duration,
}

/// Starts the sharing loop; it runs until `shutdown` is cancelled.
pub fn spawn(sharing: Sharing, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = FIRST_RETRY;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = share_once(&sharing, &mut backoff) => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "failed-login sharing lost its registry connection; counting locally, retrying");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    })
}

#[derive(Debug, thiserror::Error)]
enum ShareError {
    #[error(transparent)]
    Registry(#[from] tokio_postgres::Error),
    #[error("the registry did not answer in time")]
    Timeout,
}

/// One connection's life: LISTEN, then flush on the timer and apply what arrives, until the
/// connection fails.
async fn share_once(sharing: &Sharing, backoff: &mut Duration) -> Result<(), ShareError> {
    let mut config = tokio_postgres::Config::from_str(&sharing.url)?;
    config.connect_timeout(sharing.timeout);
    config.application_name("tenantgate-auth-share");
    let (client, mut connection) = tokio::time::timeout(sharing.timeout, config.connect(NoTls))
        .await
        .map_err(|_| ShareError::Timeout)??;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let result = async {
        tokio::time::timeout(
            sharing.timeout,
            client.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await
        .map_err(|_| ShareError::Timeout)??;
        *backoff = FIRST_RETRY;
        tracing::debug!("sharing failed logins with other instances");
        let mut tick = tokio::time::interval(sharing.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => flush(sharing, &client).await?,
                payload = rx.recv() => match payload {
                    Some(payload) => apply(&sharing.throttle, &sharing.instance, &payload).await,
                    None => return Ok(()),
                },
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// Sends the outbox. Payloads that could not be sent are lost (the local counters have them).
async fn flush(sharing: &Sharing, client: &tokio_postgres::Client) -> Result<(), ShareError> {
    for payload in sharing.outbox.drain(&sharing.instance) {
        tokio::time::timeout(
            sharing.timeout,
            client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]),
        )
        .await
        .map_err(|_| ShareError::Timeout)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::throttle::{Target, ThrottleSettings};

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            failures_before_delay: 2,
            failures_before_lockout: 4,
            lockout: Duration::from_secs(60),
            max_delay: Duration::from_millis(1),
            wide_factor: 3,
        }
    }

    fn pair() -> (Arc<Outbox>, LoginThrottle, LoginThrottle) {
        let outbox = Arc::new(Outbox::default());
        let a = LoginThrottle::new(settings()).sharing_through(Arc::clone(&outbox));
        (outbox, a, LoginThrottle::new(settings()))
    }

    async fn fail(t: &LoginThrottle, target: Target<'_>) -> bool {
        match t.begin(A, target).await {
            Ok(attempt) => {
                LoginThrottle::failed(attempt);
                true
            }
            Err(_) => false,
        }
    }

    async fn relay(outbox: &Outbox, to: &LoginThrottle) {
        for payload in outbox.drain("a") {
            assert!(payload.len() <= MAX_PAYLOAD_BYTES);
            apply(to, "b", &payload).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_elsewhere_count_here() {
        let (outbox, a, b) = pair();
        let x = Target::Tenant("x");
        for _ in 0..4 {
            assert!(fail(&a, x).await);
        }
        relay(&outbox, &b).await;
        assert_eq!(
            b.begin(A, x).await.err().map(|e| e.scope),
            Some("source and target")
        );
        // Its own payloads are skipped.
        let own = encode("b", &[Event::CancelKeys { s: A, n: u32::MAX }]);
        apply(&b, "b", &own[0]).await;
        assert!(b.cancel_allowed(A).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_elsewhere_resets_the_narrow_counter_only() {
        let (outbox, a, b) = pair();
        let x = Target::Tenant("x");
        for _ in 0..3 {
            assert!(fail(&b, x).await);
        }
        let ok = a.begin(A, x).await.unwrap();
        a.succeeded(ok);
        relay(&outbox, &b).await;
        // b's 3 failures are forgotten for (A, x): 3 more go, the 4th after them locks.
        for _ in 0..3 {
            assert!(fail(&b, x).await);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lockouts_travel_and_are_capped() {
        let (outbox, a, b) = pair();
        for _ in 0..4 {
            a.unknown_cancel_key(A).await;
        }
        assert!(!a.cancel_allowed(A).await);
        relay(&outbox, &b).await;
        assert!(!b.cancel_allowed(A).await);
        // A peer's lock-out longer than ours is cut to ours.
        let c = LoginThrottle::new(settings());
        let long = encode(
            "z",
            &[Event::Lockout {
                key: WireKey::Source(A),
                ms: u64::MAX,
            }],
        );
        apply(&c, "c", &long[0]).await;
        let refused = c.begin(A, Target::Admin).await.err().unwrap();
        assert_eq!(refused.retry_after, Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn the_outbox_and_payloads_are_bounded() {
        let outbox = Outbox::default();
        let name: Arc<str> = Arc::from("é".repeat(32));
        for i in 0..(MAX_PENDING + 10) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(u32::try_from(i).unwrap()));
            outbox.failure(ip, &name);
        }
        assert_eq!(outbox.pending().len(), MAX_PENDING);
        assert_eq!(outbox.pending().dropped, 10);
        let payloads = outbox.drain("abc");
        assert!(payloads.len() > 1);
        let mut seen = 0;
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD_BYTES, "{}", p.len());
            let decoded: Payload = serde_json::from_str(p).unwrap();
            seen += decoded.e.len();
        }
        assert_eq!(seen, MAX_PENDING);
        assert!(outbox.drain("abc").is_empty());
        // Many failures of one key are one event.
        for _ in 0..1000 {
            outbox.failure(A, &name);
        }
        assert_eq!(outbox.drain("abc").len(), 1);
    }
}
