//! The registry: the PostgreSQL database that holds tenants, their users' SCRAM verifiers, state,
//! plan and encrypted backend credentials.
//!
//! Moving parts: [`Registry`] (the handle, here, over `connections`: a small bb8 pool of
//! tokio-postgres connections that replaces the ones the registry closed), its queries grouped
//! by what they touch (`tenants`, `credentials` for tenant and admin users' logins, `domains`,
//! `tenant_migrations`, `secrets` for key rotation, `usage`, `activity`, `instances` for the
//! tenantgate instances sharing the registry, `budget_shares` for their leases on the servers'
//! budgets, `peers` for the admin commands they send each other by NOTIFY, and `listing` for
//! the admin console), `migrate`
//! (our own schema, applied at start-up), `directory` (the moka cache
//! in front of it, and the background LISTEN loop that invalidates it when the registry
//! changes), `config` ([`RegistryConfig`]) and `error` ([`RegistryError`]). It also stores the
//! usage each instance flushes (`tenant_usage`, [`UsageDelta`]).
//! It must not forward client traffic.

mod activity;
mod budget_shares;
mod config;
mod connections;
mod credentials;
mod directory;
mod domains;
mod error;
mod instances;
mod listing;
pub mod migrate;
mod peers;
mod secrets;
mod tenant_migrations;
mod tenants;
mod types;
mod usage;

use std::str::FromStr;
use std::time::Duration;

pub use budget_shares::{ShareRecord, ShareRow};
pub use config::RegistryConfig;
use connections::{RegistryConn, RegistryPool};
pub use credentials::{AuthMethod, UserLogin};
pub use directory::{CHANGES_CHANNEL, TenantDirectory, spawn_change_listener};
pub use domains::{DomainError, normalize_domain};
pub use error::RegistryError;
pub use instances::{InstanceReport, InstanceRow};
pub use listing::{ACTIVITY_LIMIT, ActivityEntry, MigrationEntry, TenantListing};
pub use peers::{ANSWERS_CHANNEL, BUDGET_CHANNEL, COMMANDS_CHANNEL, PeerMessage};
pub use secrets::StoredSecret;
pub use tenant_migrations::AppliedMigration;
pub use tenants::NewTenant;
pub use types::{MAX_NAME_BYTES, TenantRecord, TenantSlug, TenantState};
pub use usage::UsageDelta;

/// Handle to the registry database.
#[derive(Clone)]
pub struct Registry {
    pool: RegistryPool,
}

impl Registry {
    /// Connects (lazily) to the registry.
    pub async fn connect(config: &RegistryConfig) -> Result<Registry, RegistryError> {
        let mut pg =
            tokio_postgres::Config::from_str(&config.url).map_err(RegistryError::BadUrl)?;
        let timeout = Duration::from_millis(config.timeout_ms);
        pg.connect_timeout(timeout);
        if pg.get_application_name().is_none() {
            pg.application_name("tenantgate");
        }
        let pool = RegistryPool::new(pg, config.pool_size, timeout).await?;
        Ok(Registry { pool })
    }

    /// A registry connection, or the reason none can be opened.
    async fn conn(&self) -> Result<RegistryConn<'_>, RegistryError> {
        self.pool.get().await
    }

    /// Whether the registry answers a trivial query (readiness probes).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        self.conn().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Applies pending registry migrations.
    pub async fn migrate(&self) -> Result<migrate::Applied, RegistryError> {
        let mut conn = self.conn().await?;
        migrate::apply(&mut conn).await
    }
}
