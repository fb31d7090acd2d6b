//! The pool map: slug → tenant pool (a moka cache), built on first use from the newest registry
//! row seen, evicted when idle or least recently used but never away from its clients, and
//! rebuilt when the registry or RELOAD changes what it was built from. Also the checkout
//! entry point, the budgets and the PAUSE gate.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use moka::future::Cache;
use moka::policy::EvictionPolicy;

use super::lease::WaitTimer;
use super::manager::{ConnectErrors, Demand, IdleMark, IdleSet, PoolCache, Standing};
use super::tenant_pool::{PoolSource, alive_connection};
use super::{
    BackendError, BackendManager, BackendTarget, BackendTls, BackendTlsError, BackendTlsSetupError,
    Lease, PauseGate, PlanConfig, PoolConfig, PoolError, PoolUse, ServerBudget, ServerConfig,
    StartupSettings, TenantLimits, TenantPool,
};
use crate::crypto::{Binding, MasterKey};
use crate::registry::{TenantRecord, TenantSlug};
use crate::stats::Stats;

/// `[pool]` and the plans, with a generation number RELOAD bumps.
#[derive(Debug)]
struct PoolSettings {
    config: PoolConfig,
    plans: std::collections::BTreeMap<String, PlanConfig>,
    generation: u64,
}

/// One server's TLS settings, or why they could not be built.
type ServerTls = Result<Arc<BackendTls>, Arc<BackendTlsSetupError>>;

/// slug → tenant pool.
#[derive(Clone)]
pub struct PoolMap {
    pools: Arc<PoolCache>,
    /// `[pool]` and the plans, replaced by RELOAD.
    settings: Arc<std::sync::RwLock<Arc<PoolSettings>>>,
    /// `settings`' generation, readable without its lock (every checkout compares it).
    generation: Arc<std::sync::atomic::AtomicU64>,
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
        let map = PoolMap {
            pools: Arc::new(pools),
            tls: Arc::new(tls),
            settings: Arc::new(std::sync::RwLock::new(Arc::new(PoolSettings {
                config: config.clone(),
                plans: plans.clone(),
                generation: 0,
            }))),
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
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
        };
        spawn_sweeper(&map.idle);
        map
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
            .decrypt(
                &tenant.backend_password_enc,
                &Binding::backend_password(tenant.slug.as_str()),
            )
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
        let generation = self.generation.load(Ordering::Acquire);
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
        let demand = Arc::new(Demand::default());
        let manager = BackendManager {
            startup: Arc::clone(&startup),
            standing: Arc::clone(&standing),
            stats: Arc::clone(&stats),
            slug: tenant.slug.clone(),
            idle: Arc::downgrade(&self.idle),
            pools: Arc::downgrade(&self.pools),
            target: target.clone(),
            connect_timeout: Duration::from_millis(settings.config.connect_timeout_ms),
            budget: Arc::clone(&budget),
            budget_wait: Duration::from_millis(limits.checkout_timeout_ms),
            reclaim_grace: Duration::from_millis(settings.config.reclaim_grace_ms),
            pool_size: limits.pool_size,
            demand: Arc::clone(&demand),
            slots: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(limits.pool_size).unwrap_or(usize::MAX),
            )),
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
            slug: tenant.slug.clone(),
            source,
            revision: std::sync::atomic::AtomicI64::new(tenant.revision),
            password_enc: std::sync::RwLock::new(tenant.backend_password_enc.clone()),
            target,
            pool,
            budget,
            queue: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(limits.pool_size).unwrap_or(usize::MAX),
            )),
            limits,
            connect_errors,
            demand,
            last_used_ms: std::sync::atomic::AtomicU64::new(self.now_ms()),
            last_routed_ms: std::sync::atomic::AtomicU64::new(self.now_ms()),
            reset_timeout: Duration::from_millis(settings.config.reset_timeout_ms),
            base_params: std::sync::Mutex::new(None),
            users: std::sync::atomic::AtomicUsize::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            stats,
            startup,
            standing,
            left_unreset: std::sync::atomic::AtomicBool::new(false),
            in_idle_set: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Checks out a backend connection for the tenant. While the tenant is paused this waits
    /// at the gate first, without a timeout (PgBouncer's PAUSE). The time this takes after the
    /// gate (queueing, and connecting when the pool opens a connection) counts as the
    /// tenant's wait time.
    pub async fn checkout(&self, tenant: &TenantRecord) -> Result<Lease, PoolError> {
        self.pause.wait(&tenant.slug).await;
        let pool = self.pool_for(tenant).await?;
        self.checkout_from(&pool, tenant).await
    }

    /// [`PoolMap::checkout`] for a client attached to `attached` (`PoolMap::attach`): while
    /// that pool still stands for `tenant` (same row or newer, same settings generation, not
    /// retired), it is used without looking the tenant up in the map. The lookup (a hash of
    /// the slug and the map's read bookkeeping, slower the more tenants are cached) then runs
    /// at most once per `ROUTE_REFRESH_MS` (1 s) per pool, which keeps the pool's recency (idle TTL,
    /// LRU) current in the map. Otherwise it routes as `checkout` does.
    pub async fn checkout_attached(
        &self,
        attached: &Arc<TenantPool>,
        tenant: &TenantRecord,
    ) -> Result<Lease, PoolError> {
        // Paused or routed anew: boxed, so that the waiting and routing are not in the future
        // of every transaction's checkout (issue 12).
        if self.pause.is_paused(&tenant.slug) || !self.still_routes_to(attached, tenant) {
            return Box::pin(self.checkout(tenant)).await;
        }
        self.checkout_from(attached, tenant).await
    }

    /// Whether `pool` is where `tenant`'s checkouts go, without a map lookup; false also
    /// when the lookup is due for the pool's recency in the map.
    pub fn still_routes_to(&self, pool: &TenantPool, tenant: &TenantRecord) -> bool {
        let current = tenant.revision <= pool.revision.load(Ordering::Acquire)
            && pool.source.generation == self.generation.load(Ordering::Acquire)
            && !pool.standing.is_retired();
        if !current {
            return false;
        }
        let now = self.now_ms();
        let last = pool.last_routed_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < ROUTE_REFRESH_MS {
            return true;
        }
        pool.last_routed_ms.store(now, Ordering::Relaxed);
        false
    }

    /// A checkout from `pool`, which routing chose for `tenant`.
    async fn checkout_from(
        &self,
        pool: &Arc<TenantPool>,
        tenant: &TenantRecord,
    ) -> Result<Lease, PoolError> {
        let mut timer = WaitTimer {
            stats: &pool.stats,
            started: None,
        };
        // A free turn (the common case) is taken without a timer or a clock read.
        let turn = if let Ok(turn) = Arc::clone(&pool.queue).try_acquire_owned() {
            turn
        } else {
            timer.start();
            Box::pin(wait_for_turn(pool, &tenant.slug)).await?
        };
        pool.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        let conn = alive_connection(pool, &tenant.slug, pool.reset_timeout, &mut timer).await?;
        pool.remember_params(&conn);
        Ok(Lease {
            conn,
            _turn: turn,
            idle_mark: IdleMark {
                set: Arc::clone(&self.idle),
                budget: Arc::clone(&pool.budget),
                pool: Arc::downgrade(pool),
                unreset: false,
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

    /// What this instance wants of `server`'s budget (its demand, for the shared budget):
    /// connections busy with a client now plus the most connects waiting for room at once
    /// since the last call. Idle connections do not count: they may be closed to give room.
    /// Walks the pools (once per heartbeat, never per checkout).
    pub fn server_demand(&self, server: &str) -> u32 {
        let Some(budget) = self.budgets.get(server) else {
            return 0;
        };
        let idle: u32 = self
            .pools
            .iter()
            .filter(|(_, pool)| pool.target.server == server)
            .map(|(_, pool)| pool.state().1)
            .fold(0, u32::saturating_add);
        budget
            .in_use()
            .saturating_sub(idle)
            .saturating_add(budget.take_peak_waiting())
    }

    /// Closes one idle connection on `server`, of the least recently used pool that has one
    /// (to shrink this instance's share of its budget). Whether one was closed.
    pub async fn close_idle(&self, server: &str) -> bool {
        super::manager::reclaim_idle(&self.idle, &self.pools, server, None).await
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
        self.generation.store(generation, Ordering::Release);
        *settings = Arc::new(PoolSettings {
            config: config.clone(),
            plans: plans.clone(),
            generation,
        });
    }
}

/// A turn in `pool`'s queue for a checkout that found none free: clients are served in the
/// order they came, until the pool's checkout timeout.
async fn wait_for_turn(
    pool: &TenantPool,
    slug: &TenantSlug,
) -> Result<tokio::sync::OwnedSemaphorePermit, PoolError> {
    let waited = Duration::from_millis(pool.limits.checkout_timeout_ms);
    pool.waiting.fetch_add(1, Ordering::Relaxed);
    let turn = tokio::time::timeout(waited, Arc::clone(&pool.queue).acquire_owned()).await;
    pool.waiting.fetch_sub(1, Ordering::Relaxed);
    // The semaphore is never closed.
    turn.ok()
        .and_then(Result::ok)
        .ok_or_else(|| PoolError::CheckoutTimeout {
            slug: slug.clone(),
            waited,
        })
}

/// How often a client attached to its pool has its checkout looked up in the pool map anyway
/// (see [`PoolMap::checkout_attached`]): often enough to keep a busy pool's recency current
/// for an idle TTL of seconds or more, rare enough to cost nothing per transaction.
const ROUTE_REFRESH_MS: u64 = 1_000;

/// How often idle connections left unreset by their last client are reset (see
/// [`TenantPool::sweep`]): the longest a transaction-pooling client's session advisory lock
/// or temp tables outlast its transaction when no other client takes its backend, give or
/// take one sweep.
pub const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Starts the sweeper of the pools in `idle` (the pools that may hold idle connections),
/// when a runtime runs this; it ends with the pool map.
fn spawn_sweeper(idle: &Arc<IdleSet>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let idle = Arc::downgrade(idle);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(set) = idle.upgrade() else {
                return;
            };
            let due: Vec<Arc<TenantPool>> = set
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .filter_map(|(_, pool)| pool.upgrade())
                .filter(|pool| pool.left_unreset.swap(false, Ordering::AcqRel))
                .collect();
            drop(set);
            for pool in due {
                pool.sweep().await;
            }
        }
    });
}
