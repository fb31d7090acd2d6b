//! Backend pools: a bb8 pool of [`BackendConn`]s per tenant, kept in a pool map keyed by slug.
//!
//! Moving parts: `backend` (one authenticated connection), `backend_tls` (TLS to backend
//! servers: `[[server]] tls`, SSLRequest, the plain-or-TLS stream), `manager` ([`BackendManager`],
//! bb8's connection factory: a connection marked broken is dropped instead of reused, and
//! every connection holds a permit of its server's budget), `budget` (per-server connection
//! budgets), `config` (`[pool]`, `[[server]]`, `[plans]`), `overrides` (the plan keys a tenant
//! may override and the values each takes), `map` ([`PoolMap`]: moka cache slug →
//! pool, created on first use with one creation per burst, evicted when idle or least recently
//! used but never away from its clients; a pool out of the map with no client left is
//! retired: its idle connections close with Terminate, and it keeps and opens no other),
//! `tenant_pool` ([`TenantPool`]: one tenant's connections, queue, limits and the checkout of
//! a live one), `lease` ([`Lease`]: a checked-out connection; it returns to its pool on drop,
//! then lets the next waiting client in, in order; [`PoolUse`]), `statements` (the shared
//! statements a connection holds), `pause` (PAUSE/RESUME), `error` ([`PoolError`]).
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
mod error;
mod lease;
mod manager;
mod map;
mod overrides;
mod pause;
mod statements;
mod tenant_pool;

pub use backend::{BackendConn, BackendError, BackendTarget, ServerError, Settings, SetupOutcome};
pub use backend_tls::{
    BackendStream, BackendTls, BackendTlsError, BackendTlsMode, BackendTlsSetupError,
};
pub use budget::ServerBudget;
pub use config::{PlanConfig, PoolConfig, PoolMode, ServerConfig, TenantLimits};
pub use manager::{BackendManager, StartupSettings};
pub use pause::{PauseGate, ResumeError};
pub use statements::{BackendStatements, DEFAULT_CACHE_SIZE};

pub use error::PoolError;
pub use lease::{Lease, PoolUse};
pub use map::{PoolMap, SWEEP_EVERY};
pub use overrides::{OverrideError, known_keys, override_key, override_value, spellings};
pub use tenant_pool::{Params, TenantPool};
