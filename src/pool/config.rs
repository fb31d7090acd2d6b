//! Pool configuration: `[pool]` (defaults for every tenant pool) and `[[server]]` (the backend
//! servers tenant databases live on, each with its connection budget and TLS setting).

use serde::{Deserialize, Serialize};

use super::backend_tls::BackendTlsMode;
use crate::crypto::Secret;

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
    /// PgBouncer's name for it, `query_wait_timeout_ms`, is accepted too.
    #[serde(
        default = "default_checkout_timeout_ms",
        alias = "query_wait_timeout_ms"
    )]
    pub checkout_timeout_ms: u64,
    /// When the server's budget is spent, how long a client whose pool has other backends
    /// (all busy) waits for one of them to come back before another tenant's idle backend is
    /// closed to open one more for it, in milliseconds. Default 25. A backend coming back
    /// within it serves the client with no connect and no churn of another tenant's pool;
    /// 0 closes another tenant's backend at once (PgBouncer's behaviour).
    #[serde(default = "default_reclaim_grace_ms")]
    pub reclaim_grace_ms: u64,
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
    /// Most client connections one tenant may have open at once; past it a client gets
    /// 53300. 0 means no per-tenant limit (only `proxy.max_client_connections`). Default 0.
    #[serde(default)]
    pub max_clients_per_tenant: u32,
    /// Transaction pooling: named prepared statements each backend connection keeps; past
    /// it the least recently used is closed on the backend (and prepared again if used).
    /// Default 200.
    #[serde(default = "default_prepared_statement_cache_size")]
    pub prepared_statement_cache_size: usize,
    /// Transaction pooling: named prepared statements one client may keep; a client that
    /// prepares one more is closed with 54000. 0: no limit. Default 10000.
    #[serde(default = "default_max_prepared_statements_per_client")]
    pub max_prepared_statements_per_client: usize,
    /// Transaction pooling: bytes (names and statement text) of one client's prepared
    /// statements; past it the client is closed with 54000. 0: no limit. Default 16 MiB.
    #[serde(default = "default_max_prepared_statement_bytes_per_client")]
    pub max_prepared_statement_bytes_per_client: usize,
}

fn default_max_prepared_statements_per_client() -> usize {
    10_000
}

fn default_max_prepared_statement_bytes_per_client() -> usize {
    16 << 20
}

fn default_prepared_statement_cache_size() -> usize {
    super::statements::DEFAULT_CACHE_SIZE
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

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

fn default_pool_size() -> u32 {
    20
}
fn default_checkout_timeout_ms() -> u64 {
    30_000
}
fn default_reclaim_grace_ms() -> u64 {
    25
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
            reclaim_grace_ms: default_reclaim_grace_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            reset_timeout_ms: default_reset_timeout_ms(),
            server_idle_timeout_seconds: default_server_idle_timeout(),
            server_lifetime_seconds: default_server_lifetime(),
            pool_idle_timeout_seconds: default_pool_idle_timeout(),
            max_pools: default_max_pools(),
            max_clients_per_tenant: 0,
            prepared_statement_cache_size: default_prepared_statement_cache_size(),
            max_prepared_statements_per_client: default_max_prepared_statements_per_client(),
            max_prepared_statement_bytes_per_client:
                default_max_prepared_statement_bytes_per_client(),
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
    /// Role used to provision tenants (needs CREATEDB and CREATEROLE). `user import
    /// --from-server` reads `pg_authid` as this role (a superuser may). Default "postgres".
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
    /// The server's connection budget: most backend connections tenantgate opens to it, over
    /// all tenant pools together. Keep it below the server's `max_connections`, leaving room
    /// for provisioning and maintenance. Default 80.
    #[serde(default = "default_max_server_connections")]
    pub max_connections: u32,
    /// TLS to this server, with libpq's sslmode meanings: `"disable"`, `"prefer"` (TLS when the
    /// server offers it, no certificate check), `"require"` (TLS or fail, no certificate
    /// check), `"verify-ca"` (chain verified against `ca_file`), `"verify-full"` (chain and
    /// `host` verified). Applies to tenant pools and provisioning. Default "prefer". Restart
    /// to change.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PEM file with the CA certificates that sign the server's certificate; required for
    /// `verify-ca` and `verify-full`. Relative to the config file. Default: none.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_max_server_connections() -> u32 {
    80
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

/// `[plans.NAME]`: a named plan. Every field is optional and falls back to `[pool]`; a tenant's
/// registry row names its plan and may override single fields (`overrides`, a JSON object with
/// the same keys). Changes to a tenant's plan or overrides take effect for its new clients
/// without a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Most backend connections of one tenant's pool.
    pub pool_size: Option<u32>,
    /// Most client connections of one tenant (0: no per-tenant limit).
    pub max_clients: Option<u32>,
    /// Pooling mode.
    pub mode: Option<PoolMode>,
    /// statement_timeout applied to the tenant's clients unless they set their own, in
    /// milliseconds.
    pub statement_timeout_ms: Option<u64>,
    /// How long a client waits for a backend connection, in milliseconds.
    #[serde(alias = "query_wait_timeout_ms")]
    pub checkout_timeout_ms: Option<u64>,
    /// Ceiling on one statement, in milliseconds: tenantgate cancels it (57014), whatever
    /// statement_timeout the client set. 0: none.
    pub max_statement_ms: Option<u64>,
    /// Ceiling on idle time inside a transaction, in milliseconds: the client is closed
    /// (25P03) and its backend with it. 0: none.
    pub max_idle_in_transaction_ms: Option<u64>,
    /// Ceiling on idle time between transactions, in milliseconds: the client is closed
    /// (57P05). 0: none.
    pub max_client_idle_ms: Option<u64>,
}

/// What one tenant gets: `[pool]`, then its plan, then its overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimits {
    pub pool_size: u32,
    pub max_clients: u32,
    pub mode: PoolMode,
    pub statement_timeout_ms: Option<u64>,
    pub checkout_timeout_ms: u64,
    pub max_statement_ms: Option<u64>,
    pub max_idle_in_transaction_ms: Option<u64>,
    pub max_client_idle_ms: Option<u64>,
}

impl TenantLimits {
    pub fn from_defaults(pool: &PoolConfig) -> TenantLimits {
        TenantLimits {
            pool_size: pool.pool_size,
            max_clients: pool.max_clients_per_tenant,
            mode: pool.mode,
            statement_timeout_ms: None,
            checkout_timeout_ms: pool.checkout_timeout_ms,
            max_statement_ms: None,
            max_idle_in_transaction_ms: None,
            max_client_idle_ms: None,
        }
    }

    /// Applies the fields a plan (or an override) sets. Zero sizes and timeouts are ignored.
    pub fn apply(&mut self, plan: &PlanConfig) {
        if let Some(n) = plan.pool_size.filter(|n| *n > 0) {
            self.pool_size = n;
        }
        if let Some(n) = plan.max_clients {
            self.max_clients = n;
        }
        if let Some(mode) = plan.mode {
            self.mode = mode;
        }
        if let Some(ms) = plan.statement_timeout_ms {
            self.statement_timeout_ms = Some(ms);
        }
        if let Some(ms) = plan.checkout_timeout_ms.filter(|ms| *ms > 0) {
            self.checkout_timeout_ms = ms;
        }
        // 0 in an override lifts a plan's ceiling.
        for (field, set) in [
            (&mut self.max_statement_ms, plan.max_statement_ms),
            (
                &mut self.max_idle_in_transaction_ms,
                plan.max_idle_in_transaction_ms,
            ),
            (&mut self.max_client_idle_ms, plan.max_client_idle_ms),
        ] {
            if let Some(ms) = set {
                *field = (ms > 0).then_some(ms);
            }
        }
    }
}
