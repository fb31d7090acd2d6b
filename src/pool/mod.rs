//! Backend pools: a bb8 pool of [`BackendConn`]s per tenant, kept in a pool map keyed by slug.
//!
//! Moving parts: `backend` (one authenticated connection), [`BackendManager`] (bb8's
//! connection factory; a connection marked broken is dropped instead of reused), [`PoolMap`]
//! (moka cache slug → pool, created on first use with one creation per burst, evicted when
//! idle or least recently used; dropping a pool closes its idle connections with Terminate),
//! [`Lease`] (a checked-out connection; it returns to its pool on drop).
//! This module must not parse SQL.

mod backend;

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use moka::policy::EvictionPolicy;
use serde::{Deserialize, Serialize};

pub use backend::{BackendConn, BackendError, BackendTarget, ServerError, SetupOutcome};

use crate::crypto::{CryptoError, MasterKey, Secret};
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;
use crate::registry::{TenantRecord, TenantSlug};

/// `[pool]`: defaults for every tenant pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pooling mode: `"session"` (a client keeps its backend until it leaves) or
    /// `"transaction"` (a client holds a backend only while a transaction is open). Default
    /// "session".
    #[serde(default)]
    pub mode: PoolMode,
    /// Most backend connections one tenant's pool opens. Default 20.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Idle backend connections a tenant pool keeps open. Default 0 (thousands of tenants
    /// must not each hold connections).
    #[serde(default)]
    pub min_idle: u32,
    /// How long a client waits for a backend connection before failing with 53300, in
    /// milliseconds. Default 30000.
    #[serde(default = "default_checkout_timeout_ms")]
    pub checkout_timeout_ms: u64,
    /// Timeout for opening and authenticating one backend connection, in milliseconds.
    /// Default 5000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Timeout for resetting a backend (DISCARD ALL) or applying a client's startup
    /// parameters, in milliseconds. Default 5000.
    #[serde(default = "default_reset_timeout_ms")]
    pub reset_timeout_ms: u64,
    /// An idle backend connection is closed after this many seconds. Default 600.
    #[serde(default = "default_server_idle_timeout")]
    pub server_idle_timeout_seconds: u64,
    /// A backend connection is closed (when idle) after this many seconds. Default 3600.
    #[serde(default = "default_server_lifetime")]
    pub server_lifetime_seconds: u64,
    /// A tenant pool unused for this many seconds is dropped with its connections.
    /// Default 1800.
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout_seconds: u64,
    /// Most tenant pools kept at once; the least recently used goes first. Default 10000.
    #[serde(default = "default_max_pools")]
    pub max_pools: u64,
}

/// How long a client holds a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// The client keeps its backend until it disconnects.
    #[default]
    Session,
    /// The client holds a backend from the start of a transaction to the ReadyForQuery that
    /// reports it idle with nothing owed.
    Transaction,
}

fn default_pool_size() -> u32 {
    20
}
fn default_checkout_timeout_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    5000
}
fn default_reset_timeout_ms() -> u64 {
    5000
}
fn default_server_idle_timeout() -> u64 {
    600
}
fn default_server_lifetime() -> u64 {
    3600
}
fn default_pool_idle_timeout() -> u64 {
    1800
}
fn default_max_pools() -> u64 {
    10_000
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            pool_size: default_pool_size(),
            min_idle: 0,
            checkout_timeout_ms: default_checkout_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            reset_timeout_ms: default_reset_timeout_ms(),
            server_idle_timeout_seconds: default_server_idle_timeout(),
            server_lifetime_seconds: default_server_lifetime(),
            pool_idle_timeout_seconds: default_pool_idle_timeout(),
            max_pools: default_max_pools(),
        }
    }
}

impl PoolConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("pool.pool_size", u64::from(self.pool_size)),
            ("pool.checkout_timeout_ms", self.checkout_timeout_ms),
            ("pool.connect_timeout_ms", self.connect_timeout_ms),
            ("pool.reset_timeout_ms", self.reset_timeout_ms),
            (
                "pool.server_idle_timeout_seconds",
                self.server_idle_timeout_seconds,
            ),
            ("pool.server_lifetime_seconds", self.server_lifetime_seconds),
            (
                "pool.pool_idle_timeout_seconds",
                self.pool_idle_timeout_seconds,
            ),
            ("pool.max_pools", self.max_pools),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key.to_owned(), "must be greater than 0".to_owned()));
            }
        }
        if self.min_idle > self.pool_size {
            return Err((
                "pool.min_idle".to_owned(),
                "must not exceed pool.pool_size".to_owned(),
            ));
        }
        Ok(())
    }
}

/// `[[server]]`: a backend PostgreSQL server that holds tenant databases.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Name tenants refer to in the registry. Required, unique.
    pub name: String,
    /// Host name or address. Required.
    pub host: String,
    /// TCP port. Default 5432.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Role used to provision tenants (needs CREATEDB and CREATEROLE). Default "postgres".
    #[serde(default = "default_admin_user")]
    pub admin_user: String,
    /// Password of `admin_user`. Prefer `admin_password_env`. Default: none.
    #[serde(default)]
    pub admin_password: Option<Secret>,
    /// Environment variable that holds `admin_user`'s password; overrides `admin_password`.
    #[serde(default)]
    pub admin_password_env: Option<String>,
    /// Database `admin_user` connects to for provisioning. Default "postgres".
    #[serde(default = "default_admin_database")]
    pub admin_database: String,
}

fn default_port() -> u16 {
    5432
}
fn default_admin_user() -> String {
    "postgres".to_owned()
}
fn default_admin_database() -> String {
    "postgres".to_owned()
}

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
            PoolError::CheckoutTimeout { .. } => SqlState::TOO_MANY_CONNECTIONS,
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
            PoolError::Backend { source, .. } => source.client_message(),
            PoolError::Shared(inner) => inner.client_message(),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            PoolError::UnknownServer { .. } | PoolError::Secret { .. } => ErrorKind::Internal,
            PoolError::CheckoutTimeout { .. } => ErrorKind::Limit,
            PoolError::Backend { .. } => ErrorKind::Backend,
            PoolError::Shared(inner) => inner.kind(),
        }
    }
}

/// bb8's factory for one tenant's backend connections.
pub struct BackendManager {
    target: BackendTarget,
    connect_timeout: Duration,
}

impl bb8::ManageConnection for BackendManager {
    type Connection = BackendConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<BackendConn, BackendError> {
        let conn = BackendConn::connect(&self.target, self.connect_timeout).await?;
        tracing::debug!(backend_pid = conn.pid, target = ?self.target, "backend connected");
        Ok(conn)
    }

    /// Never called: `test_on_check_out` is off (it costs a round trip per checkout). A
    /// connection's health is known from the last ReadyForQuery instead.
    async fn is_valid(&self, _conn: &mut BackendConn) -> Result<(), BackendError> {
        Ok(())
    }

    fn has_broken(&self, conn: &mut BackendConn) -> bool {
        conn.broken
    }
}

/// bb8 never returns a connect error from `get` (it logs it and lets the caller wait out the
/// checkout timeout); this sink hands each one to the clients waiting on that pool, so they
/// fail at once with the backend's reason instead of a timeout.
#[derive(Debug, Clone)]
struct ConnectErrors(tokio::sync::broadcast::Sender<Arc<BackendError>>);

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

/// What a pool was built from, as the registry record says it: compared on every checkout
/// without decrypting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolSource {
    server: String,
    database: String,
    role: String,
    password_enc: Vec<u8>,
}

impl PoolSource {
    fn of(tenant: &TenantRecord) -> PoolSource {
        PoolSource {
            server: tenant.server.clone(),
            database: tenant.database.clone(),
            role: tenant.backend_role.clone(),
            password_enc: tenant.backend_password_enc.clone(),
        }
    }

    fn matches(&self, tenant: &TenantRecord) -> bool {
        self.server == tenant.server
            && self.database == tenant.database
            && self.role == tenant.backend_role
            && self.password_enc == tenant.backend_password_enc
    }
}

/// One tenant's pool and the target it connects to.
pub struct TenantPool {
    source: PoolSource,
    target: BackendTarget,
    pool: bb8::Pool<BackendManager>,
    /// One permit per connection the pool may open. tokio's semaphore serves waiters in
    /// order; bb8 alone lets a client that just gave a connection back take it again ahead of
    /// clients that were waiting, and in transaction pooling that starves them.
    queue: Arc<tokio::sync::Semaphore>,
    connect_errors: ConnectErrors,
}

impl TenantPool {
    pub fn target(&self) -> &BackendTarget {
        &self.target
    }

    /// (connections open, idle).
    pub fn state(&self) -> (u32, u32) {
        let s = self.pool.state();
        (s.connections, s.idle_connections)
    }
}

/// A checked-out backend connection. Dropping it returns the connection to its pool, or
/// closes it if it is marked broken, then lets the next waiting client in.
pub struct Lease {
    // Field order is drop order: the connection goes back before the permit.
    conn: bb8::PooledConnection<'static, BackendManager>,
    _turn: tokio::sync::OwnedSemaphorePermit,
}

impl Lease {
    pub fn conn(&mut self) -> &mut BackendConn {
        &mut self.conn
    }
}

/// slug → tenant pool.
#[derive(Clone)]
pub struct PoolMap {
    pools: Cache<TenantSlug, Arc<TenantPool>>,
    config: PoolConfig,
    servers: Arc<Vec<ServerConfig>>,
    key: MasterKey,
}

impl PoolMap {
    pub fn new(config: &PoolConfig, servers: &[ServerConfig], key: MasterKey) -> PoolMap {
        let pools = Cache::builder()
            .max_capacity(config.max_pools)
            .eviction_policy(EvictionPolicy::lru())
            .time_to_idle(Duration::from_secs(config.pool_idle_timeout_seconds))
            .eviction_listener(|slug: Arc<TenantSlug>, _pool, cause| {
                tracing::debug!(tenant = %slug, ?cause, "tenant pool dropped");
            })
            .build();
        PoolMap {
            pools,
            config: config.clone(),
            servers: Arc::new(servers.to_vec()),
            key,
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
        let password = self
            .key
            .decrypt(&tenant.backend_password_enc)
            .map_err(|source| PoolError::Secret {
                slug: tenant.slug.clone(),
                source,
            })?;
        Ok(BackendTarget {
            server: server.name.clone(),
            host: server.host.clone(),
            port: server.port,
            database: tenant.database.clone(),
            role: tenant.backend_role.clone(),
            password,
        })
    }

    /// The tenant's pool, created on first use. If the registry now points the tenant
    /// elsewhere (database, role, password, server), a new pool replaces the old one; the
    /// old one closes as its leases come back.
    pub async fn pool_for(&self, tenant: &TenantRecord) -> Result<Arc<TenantPool>, PoolError> {
        if let Some(existing) = self.pools.get(&tenant.slug).await {
            if existing.source.matches(tenant) {
                return Ok(existing);
            }
            tracing::info!(tenant = %tenant.slug, "tenant target changed; replacing its pool");
            let fresh = Arc::new(self.build_pool(tenant)?);
            self.pools
                .insert(tenant.slug.clone(), Arc::clone(&fresh))
                .await;
            return Ok(fresh);
        }
        // A burst of clients for a cold tenant builds one pool.
        self.pools
            .try_get_with_by_ref(&tenant.slug, async {
                self.build_pool(tenant).map(Arc::new)
            })
            .await
            .map_err(PoolError::Shared)
    }

    fn build_pool(&self, tenant: &TenantRecord) -> Result<TenantPool, PoolError> {
        let target = self.target_for(tenant)?;
        let source = PoolSource::of(tenant);
        let manager = BackendManager {
            target: target.clone(),
            connect_timeout: Duration::from_millis(self.config.connect_timeout_ms),
        };
        let (errors, _) = tokio::sync::broadcast::channel(4);
        let connect_errors = ConnectErrors(errors);
        let pool = bb8::Pool::builder()
            .error_sink(Box::new(connect_errors.clone()))
            .max_size(self.config.pool_size)
            .min_idle(Some(self.config.min_idle))
            .test_on_check_out(false)
            .retry_connection(false)
            .connection_timeout(Duration::from_millis(self.config.checkout_timeout_ms))
            .idle_timeout(Some(Duration::from_secs(
                self.config.server_idle_timeout_seconds,
            )))
            .max_lifetime(Some(Duration::from_secs(
                self.config.server_lifetime_seconds,
            )))
            .build_unchecked(manager);
        Ok(TenantPool {
            source,
            target,
            pool,
            queue: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(self.config.pool_size).unwrap_or(usize::MAX),
            )),
            connect_errors,
        })
    }

    /// Checks out a backend connection for the tenant.
    pub async fn checkout(&self, tenant: &TenantRecord) -> Result<Lease, PoolError> {
        let pool = self.pool_for(tenant).await?;
        let waited = Duration::from_millis(self.config.checkout_timeout_ms);
        let timed_out = || PoolError::CheckoutTimeout {
            slug: tenant.slug.clone(),
            waited,
        };
        let turn = tokio::time::timeout(waited, Arc::clone(&pool.queue).acquire_owned())
            .await
            .map_err(|_| timed_out())?
            // The semaphore is never closed.
            .map_err(|_| timed_out())?;
        // Subscribe before asking, so a failure of the connect our request starts is seen.
        let mut errors = pool.connect_errors.0.subscribe();
        let checkout = tokio::select! {
            biased;
            checkout = pool.pool.get_owned() => checkout,
            Ok(source) = errors.recv() => {
                return Err(PoolError::Backend { slug: tenant.slug.clone(), source });
            }
        };
        match checkout {
            Ok(conn) => Ok(Lease { conn, _turn: turn }),
            Err(bb8::RunError::TimedOut) => Err(PoolError::CheckoutTimeout {
                slug: tenant.slug.clone(),
                waited: Duration::from_millis(self.config.checkout_timeout_ms),
            }),
            Err(bb8::RunError::User(source)) => Err(PoolError::Backend {
                slug: tenant.slug.clone(),
                source: Arc::new(source),
            }),
        }
    }

    /// The pool of one tenant, if it exists.
    pub async fn get(&self, slug: &TenantSlug) -> Option<Arc<TenantPool>> {
        self.pools.get(slug).await
    }

    /// Number of live tenant pools.
    pub async fn pool_count(&self) -> u64 {
        self.pools.run_pending_tasks().await;
        self.pools.entry_count()
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }
}
