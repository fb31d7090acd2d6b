//! bb8's side of a tenant pool: the connection factory (which takes a permit of the server's
//! budget for every connection, closing another tenant's idle connection to make room when
//! the budget is spent), and the sink that turns bb8's swallowed connect errors into fast
//! failures for the clients waiting.
//!
//! Making room looks first at the pools a lease was returned to ([`IdleSet`]), and scans
//! every pool only when that finds nothing: with 10,000 pools known, scanning them all on every
//! wait for a permit took the proxy's CPU and made cold connects seconds long (issue 4). A
//! waiter looks again when a connection on its server goes back idle (the budget wakes it:
//! `ServerBudget::connection_went_idle`), not on a timer, so room made by a lease returned
//! elsewhere is taken at once (issue 12); a slow tick covers the rare idle connection no lease
//! reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use moka::future::Cache;

use super::backend::Settings;
use super::{BackendConn, BackendError, BackendTarget, ServerBudget, TenantPool};
use crate::registry::TenantSlug;
use crate::stats::TenantStats;

/// Where a tenant pool stands. Once retired (out of the pool map with no client left) it
/// keeps no connection and opens none: a connection coming back to it is closed, a connect
/// is refused. Dropping the pool is not enough to close its connections: moka frees a value
/// it removed only when crossbeam-epoch collects it, which may be much later or never
/// (moka-rs/moka#383), so the pool and its idle backends outlived their eviction (defect 9).
#[derive(Debug, Default)]
pub(super) struct Standing(AtomicU8);

impl Standing {
    const IN_MAP: u8 = 0;
    /// Evicted while clients used it; kept for them (`PoolMap`'s parked pools).
    const PARKED: u8 = 1;
    const RETIRED: u8 = 2;

    /// Only the eviction listener parks, a pool that just left the map.
    pub(super) fn park(&self) {
        self.0.store(Self::PARKED, Ordering::SeqCst);
    }

    /// A parked pool goes back into the map, unless it was retired meanwhile.
    pub(super) fn take_back(&self) -> bool {
        self.0
            .compare_exchange(
                Self::PARKED,
                Self::IN_MAP,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Retires a parked pool (its last client left); false if it was not parked.
    pub(super) fn retire_if_parked(&self) -> bool {
        self.0
            .compare_exchange(
                Self::PARKED,
                Self::RETIRED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    pub(super) fn retire(&self) {
        self.0.store(Self::RETIRED, Ordering::SeqCst);
    }

    pub(super) fn is_retired(&self) -> bool {
        self.0.load(Ordering::SeqCst) == Self::RETIRED
    }
}

/// bb8's factory for one tenant's backend connections. Each connection first takes a permit
/// of its server's budget.
pub struct BackendManager {
    pub(super) slug: TenantSlug,
    pub(super) target: BackendTarget,
    pub(super) connect_timeout: Duration,
    pub(super) budget: Arc<ServerBudget>,
    pub(super) budget_wait: Duration,
    /// Pools that may hold idle connections, to close one when the budget is spent. Weak:
    /// the pool map owns it.
    pub(super) idle: Weak<IdleSet>,
    /// The pool map, scanned in full only when the idle set offers nothing. Weak: the map
    /// owns this manager.
    pub(super) pools: Weak<PoolCache>,
    /// The tenant's usage counters: connects and connect errors.
    pub(super) stats: Arc<TenantStats>,
    /// The startup parameters new connections carry (shared with the pool).
    pub(super) startup: Arc<StartupSettings>,
    /// Shared with the pool: a retired pool's connections close and it opens none.
    pub(super) standing: Arc<Standing>,
    /// `pool_size` places, each held by a connection until the server has closed it: bb8
    /// replaces a dropped connection at once, and the replacement must not run beside the
    /// old backend while it exits.
    pub(super) slots: Arc<tokio::sync::Semaphore>,
}

/// How often a connect waiting for room in a spent budget looks for idle connections when
/// none is reported going idle (see `BackendManager::budget_permit`).
const RECLAIM_TICK: Duration = Duration::from_millis(250);

/// The startup parameters a pool opens its backends with. While every client of the pool
/// whose settings a backend accepted used the same settings, new backends carry them in
/// their startup packet: the reset between two clients (DISCARD ALL, which brings a session
/// back to its startup values) then leaves the next client's settings in place, and a switch
/// costs one statement instead of two. Once clients differ, new backends carry none, and a
/// backend carrying other settings than its next client's is closed rather than used (a
/// reset cannot take a startup value away).
#[derive(Debug, Default)]
pub struct StartupSettings(Mutex<StartupState>);

#[derive(Debug, Default, Clone)]
enum StartupState {
    /// No client's settings were accepted yet.
    #[default]
    Unknown,
    /// No client's settings were accepted yet, but the first client that came uses these:
    /// new backends carry them (one the server refuses them from goes back to `Unknown`).
    Tentative(Settings),
    /// Every accepted client used these.
    Uniform(Settings),
    /// Clients differ: new backends carry no settings.
    Mixed,
}

impl StartupSettings {
    /// What a new connection carries.
    pub(super) fn for_new_connection(&self) -> Settings {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            StartupState::Uniform(settings) | StartupState::Tentative(settings) => {
                Arc::clone(settings)
            }
            StartupState::Unknown | StartupState::Mixed => Settings::default(),
        }
    }

    /// Whether new connections carry exactly `settings`.
    pub(super) fn opens_with(&self, settings: &[(String, String)]) -> bool {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            StartupState::Uniform(uniform) | StartupState::Tentative(uniform) => {
                uniform.as_slice() == settings
            }
            StartupState::Unknown | StartupState::Mixed => false,
        }
    }

    /// A client with `settings` attached: while nothing is known, the pool's first backends
    /// carry them (so they need not be replaced once the settings are accepted).
    pub(super) fn expect(&self, settings: &[(String, String)]) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*state, StartupState::Unknown) && !settings.is_empty() {
            *state = StartupState::Tentative(Arc::new(settings.to_vec()));
        }
    }

    /// The server refused the settings new backends carry: none from now on (or, for
    /// settings only expected, until a client's are accepted).
    pub(super) fn give_up(&self) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *state = match *state {
            StartupState::Tentative(_) => StartupState::Unknown,
            _ => StartupState::Mixed,
        };
    }

    /// A backend accepted a client's settings. Returns true when this made the pool's
    /// clients differ (the first time only).
    pub(super) fn accepted(&self, settings: &[(String, String)]) -> bool {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &*state {
            StartupState::Unknown => {
                *state = StartupState::Uniform(Arc::new(settings.to_vec()));
                false
            }
            StartupState::Tentative(expected) if expected.as_slice() == settings => {
                *state = StartupState::Uniform(Arc::clone(expected));
                false
            }
            StartupState::Uniform(uniform) if uniform.as_slice() == settings => false,
            StartupState::Tentative(_) | StartupState::Uniform(_) => {
                *state = StartupState::Mixed;
                true
            }
            StartupState::Mixed => false,
        }
    }
}

pub(super) type PoolCache = Cache<TenantSlug, Arc<TenantPool>>;

/// Pools that may hold idle connections: a pool enters when a lease goes back to it
/// ([`IdleMark`]) and leaves when a scan finds it without idle connections or gone. Its size
/// follows the connections open (at most the budgets), not the pools known. Keyed by the
/// pool's address, which stays unique while the entry's `Weak` keeps the allocation (a
/// replaced pool and its successor, same slug, are two entries).
pub(super) type IdleSet = Mutex<HashMap<usize, (TenantSlug, Weak<TenantPool>)>>;

/// The last field of a `Lease`: dropped after the connection went back to its pool, it puts
/// the pool in the [`IdleSet`] (after, so a scan cannot drop the pool from the set between
/// the return and the mark).
pub(super) struct IdleMark {
    pub(super) set: Arc<IdleSet>,
    /// The pool's server budget: told when the connection went back, for connects waiting
    /// for room.
    pub(super) budget: Arc<ServerBudget>,
    pub(super) slug: TenantSlug,
    pub(super) pool: Weak<TenantPool>,
    /// The connection went back without its reset: the pool's sweeper looks at it.
    pub(super) unreset: bool,
}

impl Drop for IdleMark {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            if self.unreset {
                pool.left_unreset.store(true, Ordering::Release);
            }
            // The set's lock only when the pool is not in it already: not once per
            // transaction from every client.
            if !pool.in_idle_set.swap(true, Ordering::SeqCst) {
                let key = self.pool.as_ptr() as usize;
                self.set
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(key)
                    .or_insert_with(|| (self.slug.clone(), Weak::clone(&self.pool)));
            }
        }
        self.budget.connection_went_idle();
    }
}

impl BackendManager {
    /// A permit of the server's budget: free ones first; when none is free, close an idle
    /// connection of the least recently used other pool on the server and wait in line,
    /// until `budget_wait` has passed.
    async fn budget_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, BackendError> {
        let deadline = tokio::time::Instant::now() + self.budget_wait;
        loop {
            if let Some(permit) = self.budget.try_acquire() {
                return Ok(permit);
            }
            let _waiting = self.budget.waiting();
            // Armed before looking, so a connection going idle meanwhile wakes this wait.
            let went_idle = self.budget.idle_connection();
            tokio::pin!(went_idle);
            went_idle.as_mut().enable();
            if let (Some(idle), Some(pools)) = (self.idle.upgrade(), self.pools.upgrade()) {
                reclaim_idle(&idle, &pools, &self.target.server, Some(&self.slug)).await;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A permit given back, or a connection gone idle that may be closed to make room;
            // the slow tick only covers one that went idle without a lease going back (bb8
            // finishing a connect after its waiter left).
            let permit = tokio::select! {
                permit = self.budget.acquire(left.min(RECLAIM_TICK)) => permit,
                () = &mut went_idle => None,
            };
            if let Some(permit) = permit {
                return Ok(permit);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::BudgetExhausted {
                    server: self.budget.server().to_owned(),
                    max: self.budget.share(),
                });
            }
        }
    }
}

/// Closes one idle connection of the least recently used pool on `server` other than
/// `except`'s (any pool's when `None`). Best effort: returns whether one was closed.
///
/// The idle set is asked first. Only when it offers nothing is the whole pool map scanned
/// (pools found with idle connections go back into the set): a connection can go idle with no
/// lease returned, when bb8 finishes a connect after its waiter left (the short `get` below).
pub(super) async fn reclaim_idle(
    idle: &IdleSet,
    pools: &PoolCache,
    server: &str,
    except: Option<&TenantSlug>,
) -> bool {
    let other = |slug: &TenantSlug| except.is_none_or(|except| slug != except);
    let mut candidates: Vec<(u64, Arc<TenantPool>)> = Vec::new();
    idle.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|_, (slug, pool)| {
            let Some(pool) = pool.upgrade() else {
                return false;
            };
            // Cleared before looking: a lease going back after the look finds it clear and
            // puts the pool back in (see `IdleMark`).
            pool.in_idle_set.store(false, Ordering::SeqCst);
            if pool.state().1 == 0 {
                return false;
            }
            pool.in_idle_set.store(true, Ordering::SeqCst);
            if other(slug) && pool.target.server == server {
                candidates.push((pool.last_used_ms.load(Ordering::Relaxed), pool));
            }
            true
        });
    if close_one_idle(candidates, server).await {
        return true;
    }
    let found: Vec<(Arc<TenantSlug>, Arc<TenantPool>)> = pools
        .iter()
        .filter(|(slug, p)| other(slug) && p.target.server == server && p.state().1 > 0)
        .collect();
    let candidates = {
        let mut set = idle.lock().unwrap_or_else(PoisonError::into_inner);
        found
            .into_iter()
            .map(|(slug, pool)| {
                set.entry(Arc::as_ptr(&pool) as usize)
                    .or_insert_with(|| ((*slug).clone(), Arc::downgrade(&pool)));
                pool.in_idle_set.store(true, Ordering::SeqCst);
                (pool.last_used_ms.load(Ordering::Relaxed), pool)
            })
            .collect()
    };
    close_one_idle(candidates, server).await
}

/// Closes one idle connection of the first of `candidates` (by last use) that has one.
async fn close_one_idle(mut candidates: Vec<(u64, Arc<TenantPool>)>, server: &str) -> bool {
    candidates.sort_by_key(|(used, _)| *used);
    for (_, pool) in candidates {
        // An idle connection comes back at once; a pool that has none left by now would try
        // to open one, which the short timeout abandons.
        if let Ok(Ok(mut conn)) =
            tokio::time::timeout(Duration::from_millis(20), pool.pool.get()).await
        {
            conn.terminate();
            conn.broken = true;
            pool.stats.connection_reclaimed();
            tracing::debug!(
                server,
                "closed an idle backend of another tenant to make room"
            );
            return true;
        }
    }
    false
}

impl bb8::ManageConnection for BackendManager {
    type Connection = BackendConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<BackendConn, BackendError> {
        if self.standing.is_retired() {
            // bb8 keeping `min_idle`, or a checkout that raced the retirement.
            return Err(BackendError::Closed);
        }
        let conn = async {
            let slot = tokio::time::timeout(
                self.budget_wait,
                Arc::clone(&self.slots).acquire_owned(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(BackendError::Timeout(self.budget_wait))?;
            let permit = self.budget_permit().await?;
            let startup = self.startup.for_new_connection();
            let with_settings = !startup.is_empty();
            let connected =
                BackendConn::connect_with(&self.target, self.connect_timeout, startup).await;
            let mut conn = match connected {
                // The server refused the clients' settings at startup although it took them
                // with set_config(): open backends without settings from now on.
                Err(BackendError::Refused(e)) if with_settings => {
                    tracing::warn!(code = %e.code, message = %e.message, "backend refused the clients' settings at startup; opening backends without them");
                    self.startup.give_up();
                    BackendConn::connect(&self.target, self.connect_timeout).await?
                }
                other => other?,
            };
            conn.budget_permit = Some(permit);
            conn.pool_slot = Some(slot);
            Ok(conn)
        }
        .await
        .inspect_err(|_: &BackendError| self.stats.backend_connect_failed())?;
        self.stats.backend_connected();
        tracing::debug!(backend_pid = conn.pid, target = ?self.target, "backend connected");
        if self.standing.is_retired() {
            // Retired while connecting: bb8 would keep it idle; dropping it closes it.
            return Err(BackendError::Closed);
        }
        Ok(conn)
    }

    /// Never called: `test_on_check_out` is off (it costs a round trip per checkout). A
    /// connection's health is known from the last ReadyForQuery instead.
    async fn is_valid(&self, _conn: &mut BackendConn) -> Result<(), BackendError> {
        Ok(())
    }

    fn has_broken(&self, conn: &mut BackendConn) -> bool {
        conn.broken || self.standing.is_retired()
    }
}

/// bb8 never returns a connect error from `get` (it logs it and lets the caller wait out the
/// checkout timeout); this sink hands each one to the clients waiting on that pool, so they
/// fail at once with the backend's reason instead of a timeout.
#[derive(Debug, Clone)]
pub(super) struct ConnectErrors(pub(super) tokio::sync::broadcast::Sender<Arc<BackendError>>);

impl bb8::ErrorSink<BackendError> for ConnectErrors {
    fn sink(&self, error: BackendError) {
        tracing::warn!(error = %error, "backend connection failed");
        // No receiver means nobody is waiting: nothing to tell.
        drop(self.0.send(Arc::new(error)));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<BackendError>> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(app: &str) -> Vec<(String, String)> {
        vec![("application_name".to_owned(), app.to_owned())]
    }

    #[test]
    fn expected_settings_open_backends_until_the_server_refuses_them_or_clients_differ() {
        let startup = StartupSettings::default();
        assert!(startup.for_new_connection().is_empty());
        startup.expect(&settings("a"));
        assert_eq!(startup.for_new_connection().as_slice(), settings("a"));
        assert!(startup.opens_with(&settings("a")));
        // Refused at startup: back to not knowing, not to giving up for good.
        startup.give_up();
        assert!(startup.for_new_connection().is_empty());
        startup.expect(&settings("b"));
        assert!(!startup.accepted(&settings("b")));
        assert!(startup.opens_with(&settings("b")));
        // A later expectation changes nothing once settings were accepted.
        startup.expect(&settings("c"));
        assert!(startup.opens_with(&settings("b")));
        assert!(startup.accepted(&settings("c")));
        assert!(startup.for_new_connection().is_empty());
        // Expected, then another client's accepted first: clients differ.
        let startup = StartupSettings::default();
        startup.expect(&settings("a"));
        assert!(startup.accepted(&settings("b")));
        assert!(startup.for_new_connection().is_empty());
    }
}
