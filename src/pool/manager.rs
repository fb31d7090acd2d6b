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
//!
//! Closing another tenant's idle connection is churn: that tenant will likely open one again
//! soon. So a connect closes one only for a checkout that is still waiting ([`Demand`]: never
//! more connects making room than checkouts waiting; a checkout served meanwhile by a
//! connection coming back leaves its connect waiting for a free permit only), and, when its pool
//! has other connections, only after `[pool] reclaim_grace_ms`, within which one of them
//! coming back serves the checkout instead (issue 12: on a spent budget, a pool growing for
//! every short burst closed other tenants' connections at 0.7 connects per transaction).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use moka::future::Cache;
use tokio::sync::Notify;

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
    /// Shared with the pool: its checkouts waiting, which bound the connects that may close
    /// another pool's idle connection.
    pub(super) demand: Arc<Demand>,
    /// `[pool] reclaim_grace_ms`.
    pub(super) reclaim_grace: Duration,
    /// The pool's size: `slots` in all.
    pub(super) pool_size: u32,
}

/// One pool's checkouts waiting for a connection (`wanted`), and its connects allowed to close
/// another pool's idle connection for them (`reclaiming`), never more than `wanted`.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    wanted: AtomicUsize,
    reclaiming: AtomicUsize,
    /// Connects of the pool under way (each holds a slot, as open connections do).
    connecting: AtomicUsize,
    /// Woken whenever `wanted` or `reclaiming` changes.
    changed: Notify,
}

impl Demand {
    /// A checkout waits for a connection until the guard drops.
    pub(super) fn want(&self) -> Wanting<'_> {
        if self.wanted.fetch_add(1, Ordering::SeqCst) == 0 {
            self.tell_connects();
        }
        Wanting(self)
    }

    /// Wakes the connects waiting on `changed` (only when `wanted` goes from 0 or to 0, or a
    /// turn is given back: what they act on). None can be unless one is under way: a connect
    /// counts itself in `connecting` before it reads `wanted`, so one that starts after this
    /// look sees the new count (every access is SeqCst). Checkouts served by an idle
    /// connection, the common case, take no lock here.
    fn tell_connects(&self) {
        if self.connecting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    fn wanted(&self) -> usize {
        self.wanted.load(Ordering::SeqCst)
    }

    /// The turn to close another pool's idle connection: one connect of the pool at a time
    /// (as PgBouncer opens one server connection at a time per pool), and only while a
    /// checkout waits.
    fn reclaim_turn(&self) -> Option<ReclaimTurn<'_>> {
        if self.wanted() == 0 {
            return None;
        }
        self.reclaiming
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| ReclaimTurn(self))
    }

    /// A connect is under way until the guard drops.
    fn connecting(&self) -> Connecting<'_> {
        self.connecting.fetch_add(1, Ordering::SeqCst);
        Connecting(self)
    }
}

/// A checkout waiting for a connection (see [`Demand::want`]).
pub(super) struct Wanting<'a>(&'a Demand);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        if self.0.wanted.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.tell_connects();
        }
    }
}

/// A connect under way (see [`Demand::connecting`]).
struct Connecting<'a>(&'a Demand);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.connecting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connect's turn to close another pool's idle connection, held until it has connected.
struct ReclaimTurn<'a>(&'a Demand);

impl Drop for ReclaimTurn<'_> {
    fn drop(&mut self) {
        self.0.reclaiming.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
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
                    .or_insert_with(|| (pool.slug.clone(), Weak::clone(&self.pool)));
            }
        }
        self.budget.connection_went_idle();
    }
}

impl BackendManager {
    /// A permit of the server's budget: a free one when there is one; when none is, and a
    /// checkout of this pool still waits with no other connect making room for it (after
    /// `reclaim_grace` when the pool has other connections, one of which may come back
    /// first), close an idle connection of the least recently used other pool on the server
    /// and wait in line, until `budget_wait` has passed. Returns the reclaim turn too: held
    /// until the connection is open, so no second connect makes room for the same checkout.
    async fn budget_permit(
        &self,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, Option<ReclaimTurn<'_>>), BackendError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.budget_wait;
        // Never so long that a short checkout timeout (a plan's) leaves no time to make room.
        let grace_end = started + self.reclaim_grace.min(self.budget_wait / 2);
        let mut turn: Option<ReclaimTurn<'_>> = None;
        // When this connect last closed another pool's connection, or last looked for one.
        let mut closed_at: Option<tokio::time::Instant> = None;
        let mut looked_at: Option<tokio::time::Instant> = None;
        let mut woke_for_idle = false;
        loop {
            // Armed before anything is read, so no change after the reads is missed.
            let changed = self.demand.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(permit) = self.budget.try_acquire() {
                return Ok((permit, turn));
            }
            if self.demand.wanted() == 0 {
                // Its checkout was served by a connection that came back (or it was started
                // by no checkout: a reclaim or the sweeper taking an idle connection that was
                // gone): nobody needs it, and waiting on would only hold a slot and take a
                // permit from another pool's client.
                return Err(BackendError::NotWanted);
            }
            let now = tokio::time::Instant::now();
            // Open connections of the pool: one may come back within the grace.
            let in_grace = now < grace_end && self.open_connections() > 0;
            if turn.is_none() && !in_grace {
                turn = self.demand.reclaim_turn();
                if turn.is_some() {
                    tracing::debug!(
                        waited_ms = (now - started).as_millis(),
                        "a checkout still waits: making room in the spent budget"
                    );
                }
            }
            // A turn closes one connection, then waits for its permit to come back (once the
            // server has closed it): closing one more at every wake-up meanwhile churned
            // several tenants' backends per connect. Another only if that permit has not come
            // within a tick (a connect ahead in line took it). Finding none, it looks again
            // when a connection goes idle on the server, or after a tick.
            let listen_for_idle = turn.is_some() && closed_at.is_none();
            let went_idle = self.budget.idle_connection();
            tokio::pin!(went_idle);
            if listen_for_idle {
                went_idle.as_mut().enable();
            }
            let due = turn.is_some()
                && match (closed_at, looked_at) {
                    (Some(at), _) => now.saturating_duration_since(at) >= RECLAIM_TICK,
                    (None, None) => true,
                    (None, Some(at)) => {
                        woke_for_idle || now.saturating_duration_since(at) >= RECLAIM_TICK
                    }
                };
            if due {
                looked_at = Some(now);
                if let (Some(idle), Some(pools)) = (self.idle.upgrade(), self.pools.upgrade()) {
                    if reclaim_idle(&idle, &pools, &self.target.server, Some(&self.slug)).await {
                        closed_at = Some(tokio::time::Instant::now());
                    }
                }
            }
            // Demand the shared budget hears of: a checkout that waits past the grace.
            let _waiting = (!in_grace).then(|| self.budget.waiting());
            let now = tokio::time::Instant::now();
            let left = deadline.saturating_duration_since(now);
            let mut wait = left.min(RECLAIM_TICK);
            if in_grace {
                wait = wait.min(grace_end.saturating_duration_since(now));
            }
            // A permit given back; a connection gone idle that may be closed to make room
            // (the slow tick covers one that went idle without a lease going back: bb8
            // finishing a connect after its waiter left); the checkouts waiting or the turns
            // taken changed; or the grace ended.
            woke_for_idle = false;
            tokio::select! {
                permit = self.budget.acquire(wait) => {
                    if let Some(permit) = permit {
                        return Ok((permit, turn));
                    }
                }
                () = &mut went_idle, if listen_for_idle => woke_for_idle = true,
                () = &mut changed => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::BudgetExhausted {
                    server: self.budget.server().to_owned(),
                    max: self.budget.share(),
                });
            }
        }
    }

    /// The pool's open connections: the slots held, less those of connects under way.
    fn open_connections(&self) -> usize {
        usize::try_from(self.pool_size)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.slots.available_permits())
            .saturating_sub(self.demand.connecting.load(Ordering::SeqCst))
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

/// Closes one idle connection of the first of `candidates` that has one: the pools with the
/// most idle connections first (a spare one there is missed least: taking the only connection
/// of a pool makes its next client connect again, which in a skewed load churned one cold
/// tenant after another), then the least recently used.
async fn close_one_idle(candidates: Vec<(u64, Arc<TenantPool>)>, server: &str) -> bool {
    let mut candidates: Vec<(u32, u64, Arc<TenantPool>)> = candidates
        .into_iter()
        .map(|(used, pool)| (pool.state().1, used, pool))
        .collect();
    candidates.sort_by_key(|(idle, used, _)| (std::cmp::Reverse(*idle), *used));
    let candidates = candidates.into_iter().map(|(_, used, pool)| (used, pool));
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
            let _connecting = self.demand.connecting();
            let (permit, reclaim_turn) = self.budget_permit().await?;
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
            drop(reclaim_turn);
            Ok(conn)
        }
        .await
        .inspect_err(|e: &BackendError| {
            // Giving up a connect nobody waits for is no failure.
            if !matches!(e, BackendError::NotWanted) {
                self.stats.backend_connect_failed();
            }
        })?;
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
        if matches!(error, BackendError::NotWanted) {
            return;
        }
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
