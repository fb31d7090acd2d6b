//! Backend pools: a bb8 pool of [`BackendConn`]s per tenant, kept in a pool map keyed by slug.
//!
//! Moving parts: `backend` (one authenticated connection), `backend_tls` (TLS to backend
//! servers: `[[server]] tls`, SSLRequest, the plain-or-TLS stream), `manager` ([`BackendManager`],
//! bb8's connection factory: a connection marked broken is dropped instead of reused, and
//! every connection holds a permit of its server's budget), `budget` (per-server connection
//! budgets), `config` (`[pool]`, `[[server]]`, `[plans]`), [`PoolMap`] (moka cache slug →
//! pool, created on first use with one creation per burst, evicted when idle or least recently
//! used but never away from its clients; a pool out of the map with no client left is
//! retired: its idle connections close with Terminate, and it keeps and opens no other),
//! [`Lease`] (a checked-out connection; it returns to its pool on drop, then lets the next
//! waiting client in, in order).
//!
//! Each pool and its factory hold their tenant's usage counters (`crate::stats`), taken from
//! the registry once when the pool is built: checkout wait, backend connects and their
//! errors, the pool's eviction and connections reclaimed from it are counted there, so they
//! outlive the pool.
//!
//! This module must not parse SQL.

mod backend;
mod backend_tls;
mod budget;
mod config;
mod manager;
mod pause;
mod statements;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use moka::future::Cache;
use moka::policy::EvictionPolicy;

pub use backend::{BackendConn, BackendError, BackendTarget, ServerError, Settings, SetupOutcome};
pub use backend_tls::{
    BackendStream, BackendTls, BackendTlsError, BackendTlsMode, BackendTlsSetupError,
};
pub use budget::ServerBudget;
pub use config::{PlanConfig, PoolConfig, PoolMode, ServerConfig, TenantLimits};
pub use manager::{BackendManager, StartupSettings};
use manager::{ConnectErrors, IdleMark, IdleSet, PoolCache, Standing};
pub use pause::{PauseGate, ResumeError};
pub use statements::{BackendStatements, DEFAULT_CACHE_SIZE};

use crate::crypto::{CryptoError, MasterKey};
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;
use crate::registry::{TenantRecord, TenantSlug};
use crate::stats::{Stats, TenantStats};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("tenant {slug} names server {server:?}, which is not in the config")]
    UnknownServer { slug: TenantSlug, server: String },
    #[error("tenant {slug}'s backend password cannot be decrypted")]
    Secret {
        slug: TenantSlug,
        #[source]
        source: CryptoError,
    },
    #[error("no backend connection for tenant {slug} within {waited:?}")]
    CheckoutTimeout { slug: TenantSlug, waited: Duration },
    #[error("tenant {slug} has its {limit} client connections already")]
    TooManyClients { slug: TenantSlug, limit: u32 },
    /// A pool-building error shared by every client that waited on the same build.
    #[error(transparent)]
    Shared(Arc<PoolError>),
    #[error("backend connection for tenant {slug} failed")]
    Backend {
        slug: TenantSlug,
        #[source]
        source: Arc<BackendError>,
    },
}

impl ClientFacing for PoolError {
    fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::UnknownServer { .. } | PoolError::Secret { .. } => {
                SqlState::CANNOT_CONNECT_NOW
            }
            PoolError::CheckoutTimeout { .. } | PoolError::TooManyClients { .. } => {
                SqlState::TOO_MANY_CONNECTIONS
            }
            PoolError::Backend { source, .. } => source.sqlstate(),
            PoolError::Shared(inner) => inner.sqlstate(),
        }
    }

    fn client_message(&self) -> String {
        match self {
            PoolError::UnknownServer { slug, .. } | PoolError::Secret { slug, .. } => {
                format!("tenant \"{slug}\" is misconfigured in tenantgate; ask the operator")
            }
            PoolError::CheckoutTimeout { slug, waited } => format!(
                "no backend connection for tenant \"{slug}\" became free within {} ms (pool is full)",
                waited.as_millis()
            ),
            PoolError::TooManyClients { slug, limit } => {
                format!("sorry, too many clients already for tenant \"{slug}\" (limit {limit})")
            }
            PoolError::Backend { source, .. } => source.client_message(),
            PoolError::Shared(inner) => inner.client_message(),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            PoolError::UnknownServer { .. } | PoolError::Secret { .. } => ErrorKind::Internal,
            PoolError::CheckoutTimeout { .. } | PoolError::TooManyClients { .. } => {
                ErrorKind::Limit
            }
            PoolError::Backend { .. } => ErrorKind::Backend,
            PoolError::Shared(inner) => inner.kind(),
        }
    }
}

/// What a pool was built from, as the registry record says it: compared on every checkout
/// without decrypting anything. The encrypted password is compared apart (see
/// [`TenantPool::same_password`]): a master-key rotation re-encrypts it without changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolSource {
    server: String,
    database: String,
    role: String,
    plan: String,
    overrides: String,
    /// The pool settings generation it was built under (RELOAD bumps it).
    generation: u64,
}

/// `[pool]` and the plans, with a generation number RELOAD bumps.
#[derive(Debug)]
struct PoolSettings {
    config: PoolConfig,
    plans: std::collections::BTreeMap<String, PlanConfig>,
    generation: u64,
}

impl PoolSource {
    fn of(tenant: &TenantRecord, generation: u64) -> PoolSource {
        PoolSource {
            server: tenant.server.clone(),
            database: tenant.database.clone(),
            role: tenant.backend_role.clone(),
            plan: tenant.plan.clone(),
            overrides: tenant.overrides.clone(),
            generation,
        }
    }

    fn matches(&self, tenant: &TenantRecord, generation: u64) -> bool {
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
    source: PoolSource,
    /// The newest revision of the tenant's registry row known to lead to this pool (its
    /// target, plan and overrides): the one it was built from or a later one that changed
    /// nothing the pool depends on (`TenantRecord::revision`).
    revision: std::sync::atomic::AtomicI64,
    /// The stored (encrypted) password the pool's target password was decrypted from, or a
    /// later re-encryption of the same password.
    password_enc: std::sync::RwLock<Vec<u8>>,
    target: BackendTarget,
    limits: TenantLimits,
    pool: bb8::Pool<BackendManager>,
    /// One permit per connection the pool may open. tokio's semaphore serves waiters in
    /// order; bb8 alone lets a client that just gave a connection back take it again ahead of
    /// clients that were waiting, and in transaction pooling that starves them.
    queue: Arc<tokio::sync::Semaphore>,
    connect_errors: ConnectErrors,
    /// Milliseconds since the pool map started, at the last checkout: reclaim takes idle
    /// connections from the least recently used pools first.
    last_used_ms: std::sync::atomic::AtomicU64,
    /// ParameterStatus values of a freshly logged-in backend, once one has been seen, and the
    /// startup settings it was opened with: enough to greet a transaction-pooling client
    /// without taking a backend (see `base_params`).
    base_params: std::sync::Mutex<Option<(Settings, Params)>>,
    /// Clients attached to this pool now (see `PoolMap::attach`).
    users: std::sync::atomic::AtomicUsize,
    /// Clients waiting for their turn (a backend) now.
    waiting: std::sync::atomic::AtomicUsize,
    /// The tenant's usage counters (shared with the stats registry; outlive this pool).
    stats: Arc<TenantStats>,
    /// The startup parameters its backends carry (shared with its connection factory).
    startup: Arc<StartupSettings>,
    /// In the map, parked or retired; shared with the pool's `BackendManager`.
    standing: Arc<Standing>,
}

impl TenantPool {
    /// Out of the map and nobody uses it: close its idle connections now (one that comes back
    /// later closes then, see `Standing`), in a task because eviction listeners and drops
    /// cannot wait.
    fn retire(self: &Arc<Self>) {
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

    /// Whether the record's stored password is the one this pool connects with. The same
    /// ciphertext is the common case (a read lock and a compare); a different one is
    /// decrypted once: if only the encryption changed (master-key rotation), it is remembered
    /// and the pool, with its backend connections, stays.
    /// Whether `tenant` (the newest row seen) leads to this pool: same target, plan and
    /// overrides under the current settings. If so the pool now stands for its revision.
    fn leads_from(&self, tenant: &TenantRecord, generation: u64, key: &MasterKey) -> bool {
        let leads = self.source.matches(tenant, generation) && self.same_password(tenant, key);
        if leads {
            self.revision.fetch_max(tenant.revision, Ordering::AcqRel);
        }
        leads
    }

    fn same_password(&self, tenant: &TenantRecord, key: &MasterKey) -> bool {
        let seen = self
            .password_enc
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if *seen == tenant.backend_password_enc {
            return true;
        }
        drop(seen);
        let same = key
            .decrypt(&tenant.backend_password_enc)
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

    /// A backend given back now goes straight to a waiting client: clients wait and every
    /// turn is taken (so no other backend sits idle for them).
    pub fn hands_over(&self) -> bool {
        self.waiting() > 0 && self.queue.available_permits() == 0
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
    fn remember_params(&self, conn: &BackendConn) {
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
async fn alive_connection(
    pool: &TenantPool,
    slug: &TenantSlug,
    reset_timeout: Duration,
) -> Result<Pooled, PoolError> {
    // Each dead connection found leaves the pool, so this ends; the bound only guards
    // against a server that closes every new connection at once.
    for _ in 0..=pool.limits.pool_size.saturating_add(1) {
        let mut conn = pooled_connection(pool, slug).await?;
        if let Err(e) = conn.finish_reset(reset_timeout).await {
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

/// One connection from bb8: an idle one, or a new one. A failed connect fails at once with
/// the backend's reason (bb8 alone would let the caller wait out the checkout timeout).
async fn pooled_connection(pool: &TenantPool, slug: &TenantSlug) -> Result<Pooled, PoolError> {
    // Subscribe before asking, so a failure of the connect our request starts is seen.
    let mut errors = pool.connect_errors.0.subscribe();
    let checkout = tokio::select! {
        biased;
        checkout = pool.pool.get_owned() => checkout,
        Ok(source) = errors.recv() => {
            return Err(PoolError::Backend { slug: slug.clone(), source });
        }
    };
    checkout.map_err(|e| match e {
        bb8::RunError::TimedOut => PoolError::CheckoutTimeout {
            slug: slug.clone(),
            waited: Duration::from_millis(pool.limits.checkout_timeout_ms),
        },
        bb8::RunError::User(source) => PoolError::Backend {
            slug: slug.clone(),
            source: Arc::new(source),
        },
    })
}

/// A checked-out backend connection. Dropping it closes the connection unless its holder
/// proved it reusable first ([`Lease::reusable`]): alive, clean and at a message boundary
/// (DESIGN §4a). An early return, a `?`, a cancelled future or a panic in the holder all
/// drop an unproven lease, so none of them can hand a dirty backend to the next client.
/// Then it lets the next waiting client in.
pub struct Lease {
    // Field order is drop order: the connection goes back before the permit, and the pool is
    // marked as holding an idle connection last.
    conn: bb8::PooledConnection<'static, BackendManager>,
    _turn: tokio::sync::OwnedSemaphorePermit,
    idle_mark: IdleMark,
    /// Set by `reusable`: the connection may go back to the pool.
    proven: bool,
}

impl Lease {
    pub fn conn(&mut self) -> &mut BackendConn {
        &mut self.conn
    }

    /// The pool this lease came from, while it exists.
    pub fn pool(&self) -> Option<Arc<TenantPool>> {
        self.idle_mark.pool.upgrade()
    }

    /// The holder has proven the connection alive, clean and between messages in both
    /// directions: it goes back to the pool when the lease drops (unless marked broken).
    /// Call it last, right before the lease drops.
    pub fn reusable(&mut self) {
        self.proven = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.proven || std::thread::panicking() {
            tracing::debug!(
                backend_pid = self.conn.pid,
                "backend lease not proven reusable; closing the connection"
            );
            // Not proven, or unwinding from a panic mid-relay: the backend may be inside a
            // transaction or a message. Close it without a goodbye (a Terminate could land
            // inside a half-sent message).
            self.conn.broken = true;
        }
    }
}

/// Adds the time since `started` to the tenant's wait time when dropped: also when the
/// checkout fails or its client goes away while waiting.
struct WaitTimer<'a> {
    stats: &'a TenantStats,
    started: tokio::time::Instant,
}

impl Drop for WaitTimer<'_> {
    fn drop(&mut self) {
        self.stats.add_wait(self.started.elapsed());
    }
}

/// A client's hold on its tenant's pool; see `PoolMap::attach`.
pub struct PoolUse {
    pool: Arc<TenantPool>,
}

impl PoolUse {
    /// The pool held.
    pub fn pool(&self) -> &Arc<TenantPool> {
        &self.pool
    }
}

impl Drop for PoolUse {
    fn drop(&mut self) {
        // The last client of a parked pool leaves: nobody will take it back for them.
        // SeqCst, with the listener's park-then-load: one of the two sees the other.
        if self.pool.users.fetch_sub(1, Ordering::SeqCst) == 1
            && self.pool.standing.retire_if_parked()
        {
            self.pool.retire();
        }
    }
}

/// One server's TLS settings, or why they could not be built.
type ServerTls = Result<Arc<BackendTls>, Arc<BackendTlsSetupError>>;

/// slug → tenant pool.
#[derive(Clone)]
pub struct PoolMap {
    pools: Arc<PoolCache>,
    /// `[pool]` and the plans, replaced by RELOAD.
    settings: Arc<std::sync::RwLock<Arc<PoolSettings>>>,
    /// Pools evicted while clients still used them, until those clients come back or leave.
    parked: Arc<Mutex<HashMap<TenantSlug, Weak<TenantPool>>>>,
    servers: Arc<Vec<ServerConfig>>,
    budgets: Arc<HashMap<String, Arc<ServerBudget>>>,
    /// Each server's TLS settings, built once (CA files read at start). A server whose
    /// settings failed to build (only possible when the config was not validated by
    /// `Config::load` or `Proxy::start`) keeps its error, which its connects report.
    tls: Arc<HashMap<String, ServerTls>>,
    key: MasterKey,
    started: tokio::time::Instant,
    pause: PauseGate,
    stats: Stats,
    /// Tenant pools built since start (first use, or again after an eviction).
    built: Arc<std::sync::atomic::AtomicU64>,
    /// Pools that may hold idle connections: where room is made when a budget is spent.
    idle: Arc<IdleSet>,
    /// The newest registry row seen of each tenant a pool was asked for, by revision: pools
    /// are built from it, never from an older row a long-lived client still holds (also
    /// after the pool was evicted or RELOAD rebuilt it). One small record per tenant served.
    newest: Arc<Mutex<HashMap<TenantSlug, Arc<TenantRecord>>>>,
}

impl PoolMap {
    pub fn new(
        config: &PoolConfig,
        servers: &[ServerConfig],
        plans: &std::collections::BTreeMap<String, PlanConfig>,
        key: MasterKey,
        stats: Stats,
    ) -> PoolMap {
        let parked: Arc<Mutex<HashMap<TenantSlug, Weak<TenantPool>>>> = Arc::default();
        let pools = Cache::builder()
            .max_capacity(config.max_pools)
            .eviction_policy(EvictionPolicy::lru())
            .time_to_idle(Duration::from_secs(config.pool_idle_timeout_seconds))
            .eviction_listener({
                let parked = Arc::clone(&parked);
                move |slug: Arc<TenantSlug>, pool: Arc<TenantPool>, cause| {
                    if pool.in_use() {
                        // Evicted while clients use it: park it, so the next client of this
                        // tenant finds the same pool (and its limits) instead of a second one.
                        // Its last client retires it (`PoolUse`).
                        pool.standing.park();
                        let mut parked = parked.lock().unwrap_or_else(PoisonError::into_inner);
                        parked.retain(|_, p: &mut Weak<TenantPool>| {
                            p.upgrade().is_some_and(|p| !p.standing.is_retired())
                        });
                        parked.insert((*slug).clone(), Arc::downgrade(&pool));
                        drop(parked);
                        tracing::debug!(tenant = %slug, ?cause, "tenant pool in use; parked");
                        // Its last client left meanwhile, or it was in use only by a connection
                        // taken out by another pool's reclaim: nobody would retire it.
                        if pool.users.load(Ordering::SeqCst) == 0
                            && pool.standing.retire_if_parked()
                        {
                            pool.retire();
                        }
                    } else {
                        if cause.was_evicted() {
                            pool.stats.pool_evicted();
                        }
                        // Not by dropping it: moka may keep the value long after (`Standing`).
                        pool.retire();
                        tracing::debug!(tenant = %slug, ?cause, "tenant pool retired");
                    }
                }
            })
            .build();
        let budgets = servers
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Arc::new(ServerBudget::new(&s.name, s.max_connections)),
                )
            })
            .collect();
        let tls = servers
            .iter()
            .map(|s| {
                let built = BackendTls::from_server(s).map(Arc::new).map_err(|e| {
                    tracing::error!(server = %s.name, error = %e, "backend TLS settings unusable");
                    Arc::new(e)
                });
                (s.name.clone(), built)
            })
            .collect();
        PoolMap {
            pools: Arc::new(pools),
            tls: Arc::new(tls),
            settings: Arc::new(std::sync::RwLock::new(Arc::new(PoolSettings {
                config: config.clone(),
                plans: plans.clone(),
                generation: 0,
            }))),
            parked,
            servers: Arc::new(servers.to_vec()),
            budgets: Arc::new(budgets),
            key,
            started: tokio::time::Instant::now(),
            pause: PauseGate::default(),
            stats,
            built: Arc::default(),
            idle: Arc::default(),
            newest: Arc::default(),
        }
    }

    /// Where a tenant's connections go, with its password decrypted.
    pub fn target_for(&self, tenant: &TenantRecord) -> Result<BackendTarget, PoolError> {
        let server = self
            .servers
            .iter()
            .find(|s| s.name == tenant.server)
            .ok_or_else(|| PoolError::UnknownServer {
                slug: tenant.slug.clone(),
                server: tenant.server.clone(),
            })?;
        let tls = match self.tls.get(&server.name) {
            Some(Ok(tls)) => Arc::clone(tls),
            Some(Err(e)) => {
                return Err(PoolError::Backend {
                    slug: tenant.slug.clone(),
                    source: Arc::new(BackendError::Tls(BackendTlsError::Setup {
                        server: server.name.clone(),
                        source: Arc::clone(e),
                    })),
                });
            }
            None => {
                return Err(PoolError::UnknownServer {
                    slug: tenant.slug.clone(),
                    server: tenant.server.clone(),
                });
            }
        };
        let password = self
            .key
            .decrypt(&tenant.backend_password_enc)
            .map_err(|source| PoolError::Secret {
                slug: tenant.slug.clone(),
                source,
            })?;
        Ok(BackendTarget {
            tls,
            server: server.name.clone(),
            host: server.host.clone(),
            port: server.port,
            database: tenant.database.clone(),
            role: tenant.backend_role.clone(),
            password,
        })
    }

    /// The tenant's pool, created on first use, always from the newest registry row seen of
    /// the tenant (the caller's or a newer one). If that row points the tenant elsewhere
    /// (database, role, password, server, plan), a new pool replaces the old one; the old one
    /// closes as its leases come back. A caller holding an older row than one already seen
    /// gets the newest row's pool, never its own row's.
    pub async fn pool_for(&self, tenant: &TenantRecord) -> Result<Arc<TenantPool>, PoolError> {
        let generation = self.settings().generation;
        let cached = self.pools.get(&tenant.slug).await;
        if let Some(existing) = &cached {
            if tenant.revision <= existing.revision.load(Ordering::Acquire)
                && existing.source.generation == generation
            {
                // The pool stands for this row or a newer one.
                return Ok(Arc::clone(existing));
            }
        }
        let tenant = self.newest_of(tenant);
        if let Some(existing) = cached {
            if existing.leads_from(&tenant, generation, &self.key) {
                return Ok(existing);
            }
            tracing::info!(tenant = %tenant.slug, "tenant target changed; replacing its pool");
            let fresh = Arc::new(self.build_pool(&tenant)?);
            self.pools
                .insert(tenant.slug.clone(), Arc::clone(&fresh))
                .await;
            return Ok(fresh);
        }
        // Not cached: maybe evicted while in use. Let pending evictions run (they park busy
        // pools), then take a parked pool back.
        self.pools.run_pending_tasks().await;
        let parked = {
            let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
            parked.remove(&tenant.slug).and_then(|p| p.upgrade())
        };
        if let Some(pool) = parked
            .filter(|p| p.leads_from(&tenant, generation, &self.key) && p.standing.take_back())
        {
            self.pools
                .insert(tenant.slug.clone(), Arc::clone(&pool))
                .await;
            return Ok(pool);
        }
        // A burst of clients for a cold tenant builds one pool.
        self.pools
            .try_get_with_by_ref(&tenant.slug, async {
                self.build_pool(&tenant).map(Arc::new)
            })
            .await
            .map_err(PoolError::Shared)
    }

    /// The newer of `tenant` and the newest row seen of its tenant, which it becomes.
    fn newest_of(&self, tenant: &TenantRecord) -> Arc<TenantRecord> {
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        match newest.get(&tenant.slug) {
            Some(seen) if seen.revision >= tenant.revision => Arc::clone(seen),
            _ => {
                let record = Arc::new(tenant.clone());
                newest.insert(tenant.slug.clone(), Arc::clone(&record));
                record
            }
        }
    }

    /// What a tenant gets: `[pool]`, then its plan, then its overrides. An unknown plan or
    /// malformed overrides are logged and skipped, never fatal for the tenant.
    pub fn limits_for(&self, tenant: &TenantRecord) -> TenantLimits {
        let settings = self.settings();
        let mut limits = TenantLimits::from_defaults(&settings.config);
        match settings.plans.get(&tenant.plan) {
            Some(plan) => limits.apply(plan),
            None if settings.plans.is_empty() || tenant.plan == "default" => {}
            None => {
                tracing::warn!(tenant = %tenant.slug, plan = %tenant.plan, "tenant names a plan that is not in the config; using [pool] defaults");
            }
        }
        match serde_json::from_str::<PlanConfig>(&tenant.overrides) {
            Ok(overrides) => limits.apply(&overrides),
            Err(e) => {
                tracing::warn!(tenant = %tenant.slug, error = %e, "tenant overrides are not valid; ignored");
            }
        }
        limits
    }

    fn build_pool(&self, tenant: &TenantRecord) -> Result<TenantPool, PoolError> {
        let target = self.target_for(tenant)?;
        let settings = self.settings();
        let limits = self.limits_for(tenant);
        let source = PoolSource::of(tenant, settings.generation);
        let budget =
            self.budgets
                .get(&target.server)
                .cloned()
                .ok_or_else(|| PoolError::UnknownServer {
                    slug: tenant.slug.clone(),
                    server: target.server.clone(),
                })?;
        let stats = self.stats.for_tenant(&tenant.slug);
        let startup = Arc::new(StartupSettings::default());
        let standing = Arc::new(Standing::default());
        let manager = BackendManager {
            startup: Arc::clone(&startup),
            standing: Arc::clone(&standing),
            stats: Arc::clone(&stats),
            slug: tenant.slug.clone(),
            idle: Arc::downgrade(&self.idle),
            pools: Arc::downgrade(&self.pools),
            target: target.clone(),
            connect_timeout: Duration::from_millis(settings.config.connect_timeout_ms),
            budget,
            budget_wait: Duration::from_millis(limits.checkout_timeout_ms),
        };
        let (errors, _) = tokio::sync::broadcast::channel(4);
        let connect_errors = ConnectErrors(errors);
        let pool = bb8::Pool::builder()
            .error_sink(Box::new(connect_errors.clone()))
            .max_size(limits.pool_size)
            .min_idle(Some(settings.config.min_idle.min(limits.pool_size)))
            .test_on_check_out(false)
            .retry_connection(false)
            .connection_timeout(Duration::from_millis(limits.checkout_timeout_ms))
            .idle_timeout(Some(Duration::from_secs(
                settings.config.server_idle_timeout_seconds,
            )))
            .max_lifetime(Some(Duration::from_secs(
                settings.config.server_lifetime_seconds,
            )))
            .build_unchecked(manager);
        self.built.fetch_add(1, Ordering::Relaxed);
        Ok(TenantPool {
            source,
            revision: std::sync::atomic::AtomicI64::new(tenant.revision),
            password_enc: std::sync::RwLock::new(tenant.backend_password_enc.clone()),
            target,
            pool,
            queue: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(limits.pool_size).unwrap_or(usize::MAX),
            )),
            limits,
            connect_errors,
            last_used_ms: std::sync::atomic::AtomicU64::new(self.now_ms()),
            base_params: std::sync::Mutex::new(None),
            users: std::sync::atomic::AtomicUsize::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            stats,
            startup,
            standing,
        })
    }

    /// Checks out a backend connection for the tenant. While the tenant is paused this waits
    /// at the gate first, without a timeout (PgBouncer's PAUSE). The time this takes after the
    /// gate (queueing, and connecting when the pool opens a connection) counts as the
    /// tenant's wait time.
    pub async fn checkout(&self, tenant: &TenantRecord) -> Result<Lease, PoolError> {
        self.pause.wait(&tenant.slug).await;
        let pool = self.pool_for(tenant).await?;
        let _timer = WaitTimer {
            stats: &pool.stats,
            started: tokio::time::Instant::now(),
        };
        let waited = Duration::from_millis(pool.limits.checkout_timeout_ms);
        let timed_out = || PoolError::CheckoutTimeout {
            slug: tenant.slug.clone(),
            waited,
        };
        pool.waiting.fetch_add(1, Ordering::Relaxed);
        let turn = tokio::time::timeout(waited, Arc::clone(&pool.queue).acquire_owned()).await;
        pool.waiting.fetch_sub(1, Ordering::Relaxed);
        // The semaphore is never closed.
        let turn = turn.map_err(|_| timed_out())?.map_err(|_| timed_out())?;
        pool.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        let reset_timeout = Duration::from_millis(self.settings().config.reset_timeout_ms);
        let conn = alive_connection(&pool, &tenant.slug, reset_timeout).await?;
        pool.remember_params(&conn);
        Ok(Lease {
            conn,
            _turn: turn,
            idle_mark: IdleMark {
                set: Arc::clone(&self.idle),
                slug: tenant.slug.clone(),
                pool: Arc::downgrade(&pool),
            },
            proven: false,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The budget of a server.
    pub fn budget(&self, server: &str) -> Option<&Arc<ServerBudget>> {
        self.budgets.get(server)
    }

    /// The pool of one tenant, if it exists.
    pub async fn get(&self, slug: &TenantSlug) -> Option<Arc<TenantPool>> {
        self.pools.get(slug).await
    }

    /// Every live pool, by slug, with whether it is parked (evicted while in use).
    pub async fn list(&self) -> Vec<(TenantSlug, Arc<TenantPool>, bool)> {
        self.pools.run_pending_tasks().await;
        let mut out: Vec<(TenantSlug, Arc<TenantPool>, bool)> = self
            .pools
            .iter()
            .map(|(slug, pool)| ((*slug).clone(), pool, false))
            .collect();
        let parked: Vec<(TenantSlug, Arc<TenantPool>)> = self
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(slug, pool)| Some((slug.clone(), pool.upgrade()?)))
            .filter(|(_, pool)| !pool.standing.is_retired())
            .collect();
        out.extend(parked.into_iter().map(|(slug, pool)| (slug, pool, true)));
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out
    }

    /// PAUSE and RESUME.
    pub fn pause_gate(&self) -> &PauseGate {
        &self.pause
    }

    /// The configured backend servers.
    pub fn servers(&self) -> &[ServerConfig] {
        &self.servers
    }

    /// Number of live tenant pools.
    pub async fn pool_count(&self) -> u64 {
        self.pools.run_pending_tasks().await;
        self.pools.entry_count()
    }

    /// Tenant pools built since start: first uses plus re-creations after an eviction or a
    /// target change.
    pub fn pools_built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// Marks a client as using the tenant's pool for as long as the guard lives: the pool is
    /// then never evicted away from it.
    pub async fn attach(&self, tenant: &TenantRecord) -> Result<PoolUse, PoolError> {
        let pool = self.pool_for(tenant).await?;
        let previous = pool.users.fetch_add(1, Ordering::Relaxed);
        let guard = PoolUse { pool };
        let limit = guard.pool.limits.max_clients;
        if limit > 0 && previous >= usize::try_from(limit).unwrap_or(usize::MAX) {
            return Err(PoolError::TooManyClients {
                slug: tenant.slug.clone(),
                limit,
            });
        }
        Ok(guard)
    }

    /// `[pool]` as it is now.
    pub fn config(&self) -> PoolConfig {
        self.settings().config.clone()
    }

    fn settings(&self) -> Arc<PoolSettings> {
        Arc::clone(&self.settings.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// RELOAD: new `[pool]` values and plans. Pools built before are replaced at their
    /// tenant's next checkout (the old ones drain); `max_pools` and `pool_idle_timeout_seconds`
    /// of the pool map itself keep their start-up values.
    pub fn reconfigure(
        &self,
        config: &PoolConfig,
        plans: &std::collections::BTreeMap<String, PlanConfig>,
    ) {
        let mut settings = self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let generation = settings.generation + 1;
        *settings = Arc::new(PoolSettings {
            config: config.clone(),
            plans: plans.clone(),
            generation,
        });
    }
}
