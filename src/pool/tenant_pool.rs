//! One tenant's pool: the bb8 pool of its backend connections, the queue that serves its
//! clients in order, its limits, target and counters, and the checkout of a connection the
//! server has not closed. It does not know other tenants' pools (the map does) and never
//! parses SQL.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::FutureExt as _;

use super::lease::WaitTimer;
use super::manager::{ConnectErrors, Demand, Standing};
use super::{
    BackendConn, BackendError, BackendManager, BackendTarget, PoolError, ServerBudget, Settings,
    StartupSettings, TenantLimits,
};
use crate::crypto::{Binding, MasterKey};
use crate::registry::{TenantRecord, TenantSlug};
use crate::stats::TenantStats;

/// What a pool was built from, as the registry record says it: compared on every checkout
/// without decrypting anything. The encrypted password is compared apart (see
/// [`TenantPool::same_password`]): a master-key rotation re-encrypts it without changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PoolSource {
    pub(super) server: String,
    pub(super) database: String,
    pub(super) role: String,
    pub(super) plan: String,
    pub(super) overrides: String,
    /// The pool settings generation it was built under (RELOAD bumps it).
    pub(super) generation: u64,
}

impl PoolSource {
    pub(super) fn of(tenant: &TenantRecord, generation: u64) -> PoolSource {
        PoolSource {
            server: tenant.server.clone(),
            database: tenant.database.clone(),
            role: tenant.backend_role.clone(),
            plan: tenant.plan.clone(),
            overrides: tenant.overrides.clone(),
            generation,
        }
    }

    pub(super) fn matches(&self, tenant: &TenantRecord, generation: u64) -> bool {
        self.server == tenant.server
            && self.database == tenant.database
            && self.role == tenant.backend_role
            && self.plan == tenant.plan
            && self.overrides == tenant.overrides
            && self.generation == generation
    }
}

/// ParameterStatus name/value pairs, shared.
pub type Params = Arc<Vec<(String, String)>>;

/// One tenant's pool and the target it connects to.
pub struct TenantPool {
    /// The tenant it serves.
    pub(super) slug: TenantSlug,
    pub(super) source: PoolSource,
    /// The newest revision of the tenant's registry row known to lead to this pool (its
    /// target, plan and overrides): the one it was built from or a later one that changed
    /// nothing the pool depends on (`TenantRecord::revision`).
    pub(super) revision: std::sync::atomic::AtomicI64,
    /// The stored (encrypted) password the pool's target password was decrypted from, or a
    /// later re-encryption of the same password.
    pub(super) password_enc: std::sync::RwLock<Vec<u8>>,
    pub(super) target: BackendTarget,
    pub(super) limits: TenantLimits,
    pub(super) pool: bb8::Pool<BackendManager>,
    /// Its server's connection budget (shared with every pool on that server).
    pub(super) budget: Arc<ServerBudget>,
    /// One permit per connection the pool may open. tokio's semaphore serves waiters in
    /// order; bb8 alone lets a client that just gave a connection back take it again ahead of
    /// clients that were waiting, and in transaction pooling that starves them.
    pub(super) queue: Arc<tokio::sync::Semaphore>,
    pub(super) connect_errors: ConnectErrors,
    /// Its checkouts waiting for a connection, which bound the connects that may close
    /// another pool's idle connection (shared with its connection factory).
    pub(super) demand: Arc<Demand>,
    /// Milliseconds since the pool map started, at the last checkout: reclaim takes idle
    /// connections from the least recently used pools first.
    pub(super) last_used_ms: std::sync::atomic::AtomicU64,
    /// Milliseconds since the pool map started, when a checkout for an attached client last
    /// looked the tenant up in the map (`PoolMap::checkout_attached`).
    pub(super) last_routed_ms: std::sync::atomic::AtomicU64,
    /// `[pool] reset_timeout_ms` when the pool was built (RELOAD builds new pools).
    pub(super) reset_timeout: Duration,
    /// ParameterStatus values of a freshly logged-in backend, once one has been seen, and the
    /// startup settings it was opened with: enough to greet a transaction-pooling client
    /// without taking a backend (see `base_params`).
    pub(super) base_params: std::sync::Mutex<Option<(Settings, Params)>>,
    /// Clients attached to this pool now (see `PoolMap::attach`).
    pub(super) users: std::sync::atomic::AtomicUsize,
    /// Clients waiting for their turn (a backend) now.
    pub(super) waiting: std::sync::atomic::AtomicUsize,
    /// The tenant's usage counters (shared with the stats registry; outlive this pool).
    pub(super) stats: Arc<TenantStats>,
    /// The startup parameters its backends carry (shared with its connection factory).
    pub(super) startup: Arc<StartupSettings>,
    /// In the map, parked or retired; shared with the pool's `BackendManager`.
    pub(super) standing: Arc<Standing>,
    /// A connection went back without its reset since the sweeper last looked (see
    /// [`TenantPool::sweep`]).
    pub(super) left_unreset: std::sync::atomic::AtomicBool,
    /// In the pool map's set of pools that may hold idle connections (`IdleSet`).
    pub(super) in_idle_set: std::sync::atomic::AtomicBool,
}

impl TenantPool {
    /// Out of the map and nobody uses it: close its idle connections now (one that comes back
    /// later closes then, see `Standing`), in a task because eviction listeners and drops
    /// cannot wait.
    pub(super) fn retire(self: &Arc<Self>) {
        self.standing.retire();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::clone(self);
        runtime.spawn(async move {
            let (_, idle) = pool.state();
            for _ in 0..idle {
                // An idle connection comes back at once; when none is left, the connect bb8
                // would start is refused (retired).
                let Ok(Ok(mut conn)) =
                    tokio::time::timeout(Duration::from_millis(20), pool.pool.get()).await
                else {
                    break;
                };
                conn.terminate();
                conn.broken = true;
            }
            tracing::debug!(database = %pool.target.database, "retired tenant pool closed its idle connections");
        });
    }

    /// Sends the reset to every idle connection whose last client left it unreset
    /// (`Lease::reusable_unreset`), so what that client left (a session advisory lock, temp
    /// tables) goes within about [`SWEEP_EVERY`](super::SWEEP_EVERY) when no other client takes the connection
    /// (which would reset it ahead of its own first messages). Each one is taken like a
    /// client would, with a turn: a pool whose turns are all taken is busy, its idle
    /// connections go to clients now, and it is left alone. Sending does not wait for the
    /// answer: the next checkout reads it. Never opens a connection.
    pub(super) async fn sweep(&self) {
        let (_, idle) = self.state();
        for _ in 0..idle {
            if self.standing.is_retired() {
                return;
            }
            let Ok(turn) = Arc::clone(&self.queue).try_acquire_owned() else {
                self.left_unreset.store(true, Ordering::Release);
                return;
            };
            // With no idle connection left, bb8 would open one.
            if self.state().1 == 0 {
                return;
            }
            // An idle connection comes back at the first poll.
            let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::ZERO, self.pool.get()).await
            else {
                return;
            };
            if conn.needs_reset && !conn.reset_pending {
                if let Err(e) = conn.start_reset().await {
                    tracing::debug!(backend_pid = conn.pid, error = %e, "sending the reset to an idle backend failed; closing it");
                }
            }
            drop(conn);
            drop(turn);
        }
    }

    /// Whether the record's stored password is the one this pool connects with. The same
    /// ciphertext is the common case (a read lock and a compare); a different one is
    /// decrypted once: if only the encryption changed (master-key rotation), it is remembered
    /// and the pool, with its backend connections, stays.
    /// Whether `tenant` (the newest row seen) leads to this pool: same target, plan and
    /// overrides under the current settings. If so the pool now stands for its revision.
    pub(super) fn leads_from(
        &self,
        tenant: &TenantRecord,
        generation: u64,
        key: &MasterKey,
    ) -> bool {
        let leads = self.source.matches(tenant, generation) && self.same_password(tenant, key);
        if leads {
            self.revision.fetch_max(tenant.revision, Ordering::AcqRel);
        }
        leads
    }

    pub(super) fn same_password(&self, tenant: &TenantRecord, key: &MasterKey) -> bool {
        let seen = self
            .password_enc
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if *seen == tenant.backend_password_enc {
            return true;
        }
        drop(seen);
        let same = key
            .decrypt(
                &tenant.backend_password_enc,
                &Binding::backend_password(tenant.slug.as_str()),
            )
            .is_ok_and(|p| p == self.target.password);
        if same {
            tenant.backend_password_enc.clone_into(
                &mut self
                    .password_enc
                    .write()
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
        same
    }

    pub fn target(&self) -> &BackendTarget {
        &self.target
    }

    /// (connections open, idle).
    pub fn state(&self) -> (u32, u32) {
        let s = self.pool.state();
        (s.connections, s.idle_connections)
    }

    /// What this tenant gets (pool size, mode, ...), from its plan and overrides.
    pub fn limits(&self) -> &TenantLimits {
        &self.limits
    }

    /// Clients attached now.
    pub fn clients(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Clients holding a backend (or connecting one) now.
    pub fn active(&self) -> u32 {
        let free = u32::try_from(self.queue.available_permits()).unwrap_or(u32::MAX);
        self.limits.pool_size.saturating_sub(free)
    }

    /// Clients waiting for a backend now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// True while a client is attached or a backend is checked out.
    pub fn in_use(&self) -> bool {
        let (open, idle) = self.state();
        self.users.load(Ordering::Relaxed) > 0 || open > idle
    }

    /// The parameters a fresh backend of this pool reports, if one has been seen whose
    /// startup settings a client with `settings` overrides all of (so that its own values
    /// replace every one they changed): the client's greeting is these with its settings.
    pub fn base_params(&self, settings: &[(String, String)]) -> Option<Params> {
        let slot = self
            .base_params
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (opened_with, params) = slot.as_ref()?;
        let covered = opened_with
            .iter()
            .all(|(name, _)| settings.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)));
        covered.then(|| Arc::clone(params))
    }

    /// A client with `settings` attached: see [`StartupSettings::expect`].
    pub fn expect_settings(&self, settings: &[(String, String)]) {
        self.startup.expect(settings);
    }

    /// A backend accepted a client's settings: new backends may carry them from now on
    /// (see [`StartupSettings`]).
    pub fn settings_accepted(&self, settings: &[(String, String)]) {
        if self.startup.accepted(settings) {
            // Clients differ: greet from the parameters of a backend without settings.
            *self
                .base_params
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    /// Whether new backends of this pool carry exactly `settings` in their startup packet.
    pub fn opens_with(&self, settings: &[(String, String)]) -> bool {
        self.startup.opens_with(settings)
    }

    /// Keeps a fresh backend's parameters for greetings: the first seen, replaced by the first
    /// from a backend opened without settings (whose parameters suit every client).
    pub(super) fn remember_params(&self, conn: &BackendConn) {
        let mut slot = self
            .base_params
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let better = match slot.as_ref() {
            None => true,
            Some((opened_with, _)) => !opened_with.is_empty() && conn.startup_settings.is_empty(),
        };
        if better {
            *slot = Some((
                Arc::clone(&conn.startup_settings),
                Arc::clone(&conn.base_params),
            ));
        }
    }
}

type Pooled = bb8::PooledConnection<'static, BackendManager>;

/// A connection of `pool` the server has not closed. A connection the server closed while it
/// sat idle (pg_terminate_backend, a restart, an idle timeout on the server) is closed here
/// and another taken; the client never sees it. Checking costs no round trip: an idle
/// PostgreSQL backend sends nothing, so any byte or EOF on an idle socket means it is gone.
///
/// A connection whose last client released it was sent a reset then (transaction pooling):
/// its answer is read here instead, and a reset that failed (a statement_timeout the last
/// client left, say) closes the connection too.
pub(super) async fn alive_connection(
    pool: &TenantPool,
    slug: &TenantSlug,
    reset_timeout: Duration,
    timer: &mut WaitTimer<'_>,
) -> Result<Pooled, PoolError> {
    // Each dead connection found leaves the pool, so this ends; the bound only guards
    // against a server that closes every new connection at once.
    for _ in 0..=pool.limits.pool_size.saturating_add(1) {
        let mut conn = pooled_connection(pool, slug, timer).await?;
        // Boxed, and only when a reset is owed: most checkouts read none (issue 12).
        let reset = if conn.reset_pending {
            Box::pin(conn.finish_reset(reset_timeout)).await
        } else {
            Ok(())
        };
        if let Err(e) = reset {
            tracing::debug!(tenant = %slug, backend_pid = conn.pid, error = %e, "the reset sent at release failed; closing the connection");
            continue;
        }
        // After the reset's answer, nothing more may have come.
        if !conn.peer_gone() {
            return Ok(conn);
        }
        tracing::debug!(tenant = %slug, backend_pid = conn.pid, "idle backend connection was closed by the server; taking another");
        conn.broken = true;
    }
    Err(PoolError::Backend {
        slug: slug.clone(),
        source: Arc::new(BackendError::Closed),
    })
}

/// How often a checkout waiting in bb8 asks again: a connect that gave up because nobody
/// wanted it any more (`BackendError::NotWanted`) may have kept bb8 from starting one for a
/// checkout that came meanwhile, and bb8 tells nobody when a connect fails.
const ASK_AGAIN: Duration = Duration::from_millis(100);

/// One connection from bb8: an idle one, or a new one. A failed connect fails at once with
/// the backend's reason (bb8 alone would let the caller wait out the checkout timeout).
/// `timer` starts when the connection does not come at once.
///
/// An idle connection comes at the first poll: no timer, no clock read, no subscription, and
/// nothing of the waiting below in this future, which every transaction's checkout carries
/// (issue 12: bb8's request alone is most of a kilobyte, copied into each enclosing future).
async fn pooled_connection(
    pool: &TenantPool,
    slug: &TenantSlug,
    timer: &mut WaitTimer<'_>,
) -> Result<Pooled, PoolError> {
    let _wanting = pool.demand.want();
    match pool.pool.get_owned().now_or_never() {
        Some(checkout) => checkout.map_err(|e| checkout_error(e, pool, slug)),
        // The request dropped unanswered leaves any connect it started under way, for the
        // request made next (or for the idle list).
        None => Box::pin(wait_for_connection(pool, slug, timer)).await,
    }
}

/// The rest of [`pooled_connection`] when no idle connection was there: asks bb8 until a
/// connection comes, a connect fails or the checkout timeout passes.
async fn wait_for_connection(
    pool: &TenantPool,
    slug: &TenantSlug,
    timer: &mut WaitTimer<'_>,
) -> Result<Pooled, PoolError> {
    timer.start();
    // Subscribed before asking again: a connect the first request started that fails from
    // here on is seen; one that failed before is missed, and asked again within `ASK_AGAIN`
    // (whose failure is then seen).
    let mut errors = pool.connect_errors.0.subscribe();
    // The first request's connect may have failed already: asking again would start another
    // for nobody.
    if let Ok(source) = errors.try_recv() {
        return Err(PoolError::Backend {
            slug: slug.clone(),
            source,
        });
    }
    let asking = pool.pool.get_owned();
    tokio::pin!(asking);
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(pool.limits.checkout_timeout_ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            biased;
            checkout = &mut asking => return checkout.map_err(|e| checkout_error(e, pool, slug)),
            Ok(source) = errors.recv() => {
                return Err(PoolError::Backend { slug: slug.clone(), source });
            }
            () = tokio::time::sleep(left.min(ASK_AGAIN)) => {
                if left <= ASK_AGAIN {
                    return Err(checkout_error(bb8::RunError::TimedOut, pool, slug));
                }
                // Asking again: bb8 starts a connect if none is under way for us.
                asking.set(pool.pool.get_owned());
            }
        }
    }
}

fn checkout_error(
    e: bb8::RunError<BackendError>,
    pool: &TenantPool,
    slug: &TenantSlug,
) -> PoolError {
    match e {
        bb8::RunError::TimedOut => PoolError::CheckoutTimeout {
            slug: slug.clone(),
            waited: Duration::from_millis(pool.limits.checkout_timeout_ms),
        },
        bb8::RunError::User(source) => PoolError::Backend {
            slug: slug.clone(),
            source: Arc::new(source),
        },
    }
}
