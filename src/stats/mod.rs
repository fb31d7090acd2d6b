//! Per-tenant usage counters: what each tenant's clients did through this tenantgate process
//! (connections, transactions, queries, bytes, time waited for a backend) and what its pool
//! did for it (backend connects, evictions). They feed the admin console's SHOW STATS and are
//! the basis for usage-based billing.
//!
//! Moving parts: [`TenantStats`] (one tenant's counters: relaxed `AtomicU64`s, nothing else),
//! [`ClientGuard`] (a connected client; it gives its `clients_now` back on drop, also when the
//! session fails or panics), [`Stats`] (the registry slug → counters, kept apart from the pool
//! map so a pool's eviction loses nothing), [`Counters`] and [`TenantStatsRow`] (plain
//! snapshots for readers), [`spawn_flusher`] (the one background loop here: every
//! `[stats] flush_interval_seconds` it adds each tenant's growth since the last flush to the
//! registry's `tenant_usage`, hour by hour, and once more at shutdown).
//!
//! This module must not take a lock on the hot path. The relay, the pool checkout and the
//! backend factory hold an `Arc<TenantStats>` and only ever do relaxed atomic adds on it; the
//! relay adds once per wakeup, not per message (see `session::relay`). The registry's lock is
//! taken when a client logs in, when a tenant pool is built, and by readers (SHOW STATS);
//! never per message or per transaction.
//!
//! Process-wide counters (logins by outcome, admin commands, the checkout-wait histogram)
//! are in `process`; every tenant's counters point at the one [`ProcessCounters`] of their
//! [`Stats`], so a checkout counts both without a lookup.
//!
//! Counters only grow (except the `clients_now` gauge) and live as long as the process: they
//! are totals since start-up. A snapshot reads each counter on its own, so it is not a
//! consistent cut across counters (a transaction may show in `queries` before it shows in
//! `transactions`); every counter is exact once the traffic it counts has stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::registry::{Registry, TenantSlug, UsageDelta};

mod process;

pub use process::{LoginOutcome, ProcessCounters, WAIT_BUCKETS_US, WaitHistogram, WaitSnapshot};

/// `[stats]`: usage counters.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    /// Every this many seconds, add each tenant's usage since the last flush to the registry's
    /// `tenant_usage` table (one row per tenant and hour, summed over instances); also once at
    /// shutdown. 0 (the default) keeps the counters in memory only. Restart to change.
    #[serde(default)]
    pub flush_interval_seconds: u64,
}

/// One tenant's usage counters. See [`Counters`] for what each one counts.
#[derive(Debug, Default)]
pub struct TenantStats {
    clients_now: AtomicU64,
    clients_total: AtomicU64,
    transactions: AtomicU64,
    queries: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    wait_us: AtomicU64,
    backend_connects: AtomicU64,
    backend_connect_errors: AtomicU64,
    pool_evictions: AtomicU64,
    reclaimed_connections: AtomicU64,
    /// The process's counters (the checkout-wait histogram); `None` for counters made
    /// outside a [`Stats`].
    process: Option<Arc<ProcessCounters>>,
}

/// Adds `n` unless it is zero (a relay wakeup that moved nothing writes nothing).
fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl TenantStats {
    /// A client of this tenant logged in: counted in `clients_now` until the guard drops.
    pub fn client_connected(self: &Arc<Self>) -> ClientGuard {
        self.clients_now.fetch_add(1, Ordering::Relaxed);
        self.clients_total.fetch_add(1, Ordering::Relaxed);
        ClientGuard(Arc::clone(self))
    }

    /// Traffic the relay moved since its last report.
    pub fn add_traffic(&self, bytes_in: u64, bytes_out: u64) {
        add(&self.bytes_in, bytes_in);
        add(&self.bytes_out, bytes_out);
    }

    /// Queries and completed transactions the relay saw since its last report.
    pub fn add_work(&self, queries: u64, transactions: u64) {
        add(&self.queries, queries);
        add(&self.transactions, transactions);
    }

    /// A client waited `waited` for a backend checkout (whether it got one or not).
    pub fn add_wait(&self, waited: Duration) {
        if let Some(process) = &self.process {
            process.checkout_wait.record(waited);
        }
        add(
            &self.wait_us,
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// A backend connection was opened (connected and authenticated) for this tenant.
    pub fn backend_connected(&self) {
        self.backend_connects.fetch_add(1, Ordering::Relaxed);
    }

    /// Opening a backend connection for this tenant failed.
    pub fn backend_connect_failed(&self) {
        self.backend_connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// This tenant's pool left the pool map (idle TTL or capacity) and was closed.
    pub fn pool_evicted(&self) {
        self.pool_evictions.fetch_add(1, Ordering::Relaxed);
    }

    /// An idle backend connection of this tenant was closed to make room for another tenant's
    /// pool under the server's connection budget.
    pub fn connection_reclaimed(&self) {
        self.reclaimed_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        // Acquire, paired with the guard's Release: a snapshot that sees a client gone also
        // sees everything that client's session counted.
        let clients_now = self.clients_now.load(Ordering::Acquire);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            clients_now,
            clients_total: get(&self.clients_total),
            transactions: get(&self.transactions),
            queries: get(&self.queries),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            wait_us: get(&self.wait_us),
            backend_connects: get(&self.backend_connects),
            backend_connect_errors: get(&self.backend_connect_errors),
            pool_evictions: get(&self.pool_evictions),
            reclaimed_connections: get(&self.reclaimed_connections),
        }
    }
}

/// A logged-in client, counted in its tenant's `clients_now` while this lives. Held by the
/// client's task for its whole session, so an error or a panic still gives the count back.
#[derive(Debug)]
pub struct ClientGuard(Arc<TenantStats>);

impl ClientGuard {
    /// The tenant's counters, for the session to count into.
    pub fn stats(&self) -> &TenantStats {
        &self.0
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients_now.fetch_sub(1, Ordering::Release);
    }
}

/// A snapshot of one tenant's counters (or of their sum), as plain numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Clients logged in now (authenticated, tenant active, session started or starting).
    pub clients_now: u64,
    /// Clients that logged in since start-up: authenticated, for a tenant in state `active`.
    /// A client refused after that (the tenant's client limit, no backend) is counted; failed
    /// logins and cancel requests are not. Only known tenants get counters, so a client
    /// probing made-up slugs creates nothing here.
    pub clients_total: u64,
    /// Completed transactions: ReadyForQuery messages with status `I` (idle) that a backend
    /// sent through the relay, as PgBouncer counts a transaction each time the server returns
    /// to idle. Each simple Query outside a transaction block (an implicit transaction, even of
    /// several statements), each Sync outside one, and each COMMIT or ROLLBACK of an explicit
    /// transaction counts one; statements inside a block (ReadyForQuery `T` or `E`) do not.
    /// tenantgate's own setup and reset queries, and ReadyForQuery messages it makes up (a
    /// DEALLOCATE answered without a backend), are not counted.
    pub transactions: u64,
    /// Queries the clients sent: simple Query (`Q`) messages plus extended-protocol Execute
    /// (`E`) messages. A Query message with several statements is one; Parse, Bind, Describe
    /// and Sync are not queries. tenantgate's own setup and reset queries are not counted.
    pub queries: u64,
    /// Bytes received from clients by the relay (client → backend traffic), after login:
    /// startup and authentication are not counted.
    pub bytes_in: u64,
    /// Bytes received from backends by the relay (backend → client traffic), after the
    /// client's greeting: tenantgate's own setup and reset queries are not counted.
    pub bytes_out: u64,
    /// Microseconds clients spent waiting for a backend checkout (queueing for a free
    /// connection, and opening one when needed), summed over all checkouts, including those
    /// that timed out or failed.
    pub wait_us: u64,
    /// Backend connections opened (connected and authenticated) for the tenant.
    pub backend_connects: u64,
    /// Backend connection attempts that failed (server unreachable, authentication refused,
    /// server budget exhausted, timeout).
    pub backend_connect_errors: u64,
    /// Times the tenant's pool was evicted from the pool map (idle TTL or capacity) and
    /// closed. A pool evicted while clients still use it is kept for them, not counted.
    pub pool_evictions: u64,
    /// Idle backend connections of the tenant closed to make room for another tenant's pool
    /// under the backend server's connection budget.
    pub reclaimed_connections: u64,
}

impl Counters {
    /// Column names, in the order of [`Counters::values`]: a SHOW STATS table can be built
    /// from these two without naming each field.
    pub const COLUMNS: [&'static str; 11] = [
        "clients_now",
        "clients_total",
        "transactions",
        "queries",
        "bytes_in",
        "bytes_out",
        "wait_us",
        "backend_connects",
        "backend_connect_errors",
        "pool_evictions",
        "reclaimed_connections",
    ];

    /// The values, in the order of [`Counters::COLUMNS`].
    pub fn values(&self) -> [u64; 11] {
        [
            self.clients_now,
            self.clients_total,
            self.transactions,
            self.queries,
            self.bytes_in,
            self.bytes_out,
            self.wait_us,
            self.backend_connects,
            self.backend_connect_errors,
            self.pool_evictions,
            self.reclaimed_connections,
        ]
    }

    /// What grew from `earlier` to `self`, as the registry stores it (`clients_now`, a gauge,
    /// is not stored).
    fn growth_since(&self, earlier: &Counters) -> UsageDelta {
        let grew =
            |now: u64, then: u64| i64::try_from(now.saturating_sub(then)).unwrap_or(i64::MAX);
        UsageDelta {
            clients: grew(self.clients_total, earlier.clients_total),
            transactions: grew(self.transactions, earlier.transactions),
            queries: grew(self.queries, earlier.queries),
            bytes_in: grew(self.bytes_in, earlier.bytes_in),
            bytes_out: grew(self.bytes_out, earlier.bytes_out),
            wait_us: grew(self.wait_us, earlier.wait_us),
            backend_connects: grew(self.backend_connects, earlier.backend_connects),
            backend_connect_errors: grew(
                self.backend_connect_errors,
                earlier.backend_connect_errors,
            ),
            pool_evictions: grew(self.pool_evictions, earlier.pool_evictions),
            reclaimed_connections: grew(self.reclaimed_connections, earlier.reclaimed_connections),
        }
    }

    /// Adds `other` into `self`, saturating.
    pub fn accumulate(&mut self, other: &Counters) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.clients_now, other.clients_now);
        add(&mut self.clients_total, other.clients_total);
        add(&mut self.transactions, other.transactions);
        add(&mut self.queries, other.queries);
        add(&mut self.bytes_in, other.bytes_in);
        add(&mut self.bytes_out, other.bytes_out);
        add(&mut self.wait_us, other.wait_us);
        add(&mut self.backend_connects, other.backend_connects);
        add(
            &mut self.backend_connect_errors,
            other.backend_connect_errors,
        );
        add(&mut self.pool_evictions, other.pool_evictions);
        add(&mut self.reclaimed_connections, other.reclaimed_connections);
    }
}

/// One row of SHOW STATS: a tenant and its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatsRow {
    pub slug: TenantSlug,
    pub counters: Counters,
}

/// Every tenant's counters, by slug, for the life of the process.
///
/// A `std::sync::RwLock<HashMap>` rather than a moka cache: entries are never evicted (an
/// evicted entry would lose usage that is still to be billed), lookups happen once per login
/// and per pool build, and writes only the first time a tenant is seen, so the lock is
/// neither hot nor held across an await. Memory grows by one small entry (about 250 bytes) per
/// tenant that has connected since start-up.
///
/// Cloning is cheap and shares the registry.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    tenants: Arc<RwLock<HashMap<TenantSlug, Arc<TenantStats>>>>,
    process: Arc<ProcessCounters>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats::default()
    }

    /// The counters of `slug`, created at zero on first use. Takes the registry's lock: call
    /// it once (at login, at pool build) and keep the `Arc`.
    pub fn for_tenant(&self, slug: &TenantSlug) -> Arc<TenantStats> {
        if let Some(found) = self
            .tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(slug)
        {
            return Arc::clone(found);
        }
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(tenants.entry(slug.clone()).or_insert_with(|| {
            Arc::new(TenantStats {
                process: Some(Arc::clone(&self.process)),
                ..TenantStats::default()
            })
        }))
    }

    /// The counters of the whole process.
    pub fn process(&self) -> &Arc<ProcessCounters> {
        &self.process
    }

    /// Every tenant seen since start-up with its counters, sorted by slug.
    pub fn snapshot(&self) -> Vec<TenantStatsRow> {
        let mut rows: Vec<TenantStatsRow> = self
            .tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(slug, stats)| TenantStatsRow {
                slug: slug.clone(),
                counters: stats.counters(),
            })
            .collect();
        rows.sort_unstable_by(|a, b| a.slug.cmp(&b.slug));
        rows
    }

    /// One tenant's counters, if it has been seen since start-up.
    pub fn tenant(&self, slug: &TenantSlug) -> Option<TenantStatsRow> {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        tenants.get(slug).map(|stats| TenantStatsRow {
            slug: slug.clone(),
            counters: stats.counters(),
        })
    }

    /// The sum over all tenants.
    pub fn totals(&self) -> Counters {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        let mut sum = Counters::default();
        for stats in tenants.values() {
            sum.accumulate(&stats.counters());
        }
        sum
    }

    /// Number of tenants with counters.
    pub fn tenant_count(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Writes the counters' growth to the registry. Remembers what it wrote: a failed write is
/// retried, with whatever came since, at the next flush. (A write that succeeds but whose
/// answer is lost is counted twice: the registry keeps no flush ids.)
struct Flusher {
    stats: Stats,
    registry: Registry,
    flushed: HashMap<TenantSlug, Counters>,
}

impl Flusher {
    async fn flush(&mut self) {
        let rows = self.stats.snapshot();
        let usage: Vec<(TenantSlug, UsageDelta)> = rows
            .iter()
            .filter_map(|row| {
                let earlier = self.flushed.get(&row.slug).copied().unwrap_or_default();
                let delta = row.counters.growth_since(&earlier);
                (delta != UsageDelta::default()).then(|| (row.slug.clone(), delta))
            })
            .collect();
        if usage.is_empty() {
            return;
        }
        match self.registry.add_usage(&usage).await {
            Ok(()) => {
                for row in rows {
                    self.flushed.insert(row.slug, row.counters);
                }
                tracing::debug!(tenants = usage.len(), "usage flushed to the registry");
            }
            Err(e) => {
                tracing::warn!(error = %e, "usage not flushed to the registry; retrying at the next flush");
            }
        }
    }
}

/// Starts the usage flusher (when `interval` is not zero): every `interval`, and once more
/// when `stop` is cancelled, the growth of every tenant's counters goes to the registry.
/// Cancel `stop` after the sessions have ended, then await the handle, so their last counts
/// are written.
pub fn spawn_flusher(
    stats: Stats,
    registry: Registry,
    interval: Duration,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    let mut flusher = Flusher {
        stats,
        registry,
        flushed: HashMap::new(),
    };
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => flusher.flush().await,
            }
        }
        flusher.flush().await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(s: &str) -> TenantSlug {
        TenantSlug::parse(s).unwrap()
    }

    #[test]
    fn one_entry_per_tenant_shared_by_every_holder() {
        let stats = Stats::new();
        let a = stats.for_tenant(&slug("acme"));
        let again = stats.for_tenant(&slug("acme"));
        assert!(Arc::ptr_eq(&a, &again));
        a.add_work(3, 1);
        again.add_traffic(10, 20);
        let row = stats.tenant(&slug("acme")).unwrap();
        assert_eq!(row.counters.queries, 3);
        assert_eq!(row.counters.transactions, 1);
        assert_eq!((row.counters.bytes_in, row.counters.bytes_out), (10, 20));
        assert!(stats.tenant(&slug("other")).is_none());
        assert_eq!(stats.tenant_count(), 1);
    }

    #[test]
    fn client_guard_gives_clients_now_back_even_on_panic() {
        let stats = Stats::new();
        let t = stats.for_tenant(&slug("acme"));
        let first = t.client_connected();
        let held = Arc::clone(&t);
        let panicked = std::thread::spawn(move || {
            let _guard = held.client_connected();
            panic!("session bug");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(t.counters().clients_now, 1);
        drop(first);
        let c = t.counters();
        assert_eq!((c.clients_now, c.clients_total), (0, 2));
    }

    #[test]
    fn snapshot_is_sorted_and_totals_add_up() {
        let stats = Stats::new();
        for (name, queries) in [("zeta", 1), ("alpha", 2), ("mid", 4)] {
            let t = stats.for_tenant(&slug(name));
            t.add_work(queries, 0);
            t.add_wait(Duration::from_millis(1));
            t.backend_connected();
        }
        stats.for_tenant(&slug("mid")).pool_evicted();
        stats.for_tenant(&slug("zeta")).connection_reclaimed();
        stats.for_tenant(&slug("zeta")).backend_connect_failed();
        let names: Vec<String> = stats
            .snapshot()
            .iter()
            .map(|r| r.slug.to_string())
            .collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        let sum = stats.totals();
        assert_eq!(sum.queries, 7);
        assert_eq!(sum.wait_us, 3000);
        assert_eq!(sum.backend_connects, 3);
        assert_eq!(sum.backend_connect_errors, 1);
        assert_eq!(sum.pool_evictions, 1);
        assert_eq!(sum.reclaimed_connections, 1);
    }

    #[test]
    fn growth_since_a_flush_leaves_out_the_gauge() {
        let earlier = Counters {
            clients_now: 5,
            clients_total: 5,
            queries: 10,
            ..Counters::default()
        };
        let now = Counters {
            clients_now: 1,
            clients_total: 7,
            queries: 15,
            bytes_in: u64::MAX,
            ..Counters::default()
        };
        let delta = now.growth_since(&earlier);
        assert_eq!(delta.clients, 2);
        assert_eq!(delta.queries, 5);
        assert_eq!(delta.bytes_in, i64::MAX);
        assert_eq!(delta.transactions, 0);
        assert_eq!(earlier.growth_since(&now), UsageDelta::default());
    }

    #[test]
    fn columns_match_values() {
        let c = Counters {
            clients_now: 1,
            clients_total: 2,
            transactions: 3,
            queries: 4,
            bytes_in: 5,
            bytes_out: 6,
            wait_us: 7,
            backend_connects: 8,
            backend_connect_errors: 9,
            pool_evictions: 10,
            reclaimed_connections: 11,
        };
        assert_eq!(c.values(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(Counters::COLUMNS.len(), c.values().len());
        assert_eq!(Counters::COLUMNS[2], "transactions");
        assert_eq!(Counters::COLUMNS[10], "reclaimed_connections");
    }
}
