//! Read-only listings and admin-user records for the admin console: every tenant with its
//! timestamps, the activity log, the per-tenant migration ledger, and admin users' SCRAM
//! verifiers. Nothing here runs on the connection path of a tenant client.

use chrono::{DateTime, Utc};

use super::{Registry, RegistryError, TenantSlug};

/// One tenant as the admin console shows it (no secrets).
#[derive(Debug, Clone)]
pub struct TenantListing {
    pub slug: String,
    pub display_name: Option<String>,
    pub state: String,
    pub plan: String,
    pub server: String,
    pub database: String,
    pub backend_role: String,
    pub overrides: String,
    pub error_message: Option<String>,
    pub schema_version: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One activity-log entry.
#[derive(Debug, Clone)]
pub struct ActivityEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub tenant: Option<String>,
    pub actor: String,
    pub action: String,
    pub detail: Option<String>,
}

/// One applied tenant migration.
#[derive(Debug, Clone)]
pub struct MigrationEntry {
    pub tenant: String,
    pub version: i32,
    pub name: String,
    pub checksum: String,
    pub applied_at: DateTime<Utc>,
    pub duration_ms: i64,
}

/// Newest activity entries the console lists at most.
pub const ACTIVITY_LIMIT: i64 = 1000;

impl Registry {
    /// Every tenant (deleted ones included), by slug; or the one named.
    pub async fn tenant_listing(
        &self,
        slug: Option<&str>,
    ) -> Result<Vec<TenantListing>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT slug, display_name, state, plan, server, database_name, backend_role, \
                 overrides::text, error_message, schema_version, created_at, updated_at \
                 FROM tenants WHERE $1::text IS NULL OR slug = $1 ORDER BY slug",
                &[&slug],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(TenantListing {
                    slug: r.try_get(0)?,
                    display_name: r.try_get(1)?,
                    state: r.try_get(2)?,
                    plan: r.try_get(3)?,
                    server: r.try_get(4)?,
                    database: r.try_get(5)?,
                    backend_role: r.try_get(6)?,
                    overrides: r.try_get(7)?,
                    error_message: r.try_get(8)?,
                    schema_version: r.try_get(9)?,
                    created_at: r.try_get(10)?,
                    updated_at: r.try_get(11)?,
                })
            })
            .collect()
    }

    /// The newest activity entries (at most [`ACTIVITY_LIMIT`]), newest first.
    pub async fn activity(&self, slug: Option<&str>) -> Result<Vec<ActivityEntry>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, at, tenant_slug, actor, action, detail FROM activity_log \
                 WHERE $1::text IS NULL OR tenant_slug = $1 ORDER BY id DESC LIMIT $2",
                &[&slug, &ACTIVITY_LIMIT],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ActivityEntry {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    action: r.try_get(4)?,
                    detail: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Applied tenant migrations, by tenant and version.
    pub async fn migration_ledger(
        &self,
        slug: Option<&str>,
    ) -> Result<Vec<MigrationEntry>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT tenant_slug, version, name, checksum, applied_at, duration_ms \
                 FROM tenant_migrations WHERE $1::text IS NULL OR tenant_slug = $1 \
                 ORDER BY tenant_slug, version",
                &[&slug],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(MigrationEntry {
                    tenant: r.try_get(0)?,
                    version: r.try_get(1)?,
                    name: r.try_get(2)?,
                    checksum: r.try_get(3)?,
                    applied_at: r.try_get(4)?,
                    duration_ms: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// An admin user's stored SCRAM verifier.
    pub async fn admin_verifier(&self, user: &str) -> Result<Option<String>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT scram_verifier FROM admin_users WHERE username = $1",
                &[&user],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Creates an admin user, or changes its verifier when `replace` is set. Returns false
    /// when the user exists and `replace` is not set.
    pub async fn set_admin_user(
        &self,
        user: &str,
        verifier: &str,
        replace: bool,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let sql = if replace {
            "INSERT INTO admin_users (username, scram_verifier) VALUES ($1, $2) \
             ON CONFLICT (username) DO UPDATE SET scram_verifier = EXCLUDED.scram_verifier"
        } else {
            "INSERT INTO admin_users (username, scram_verifier) VALUES ($1, $2) \
             ON CONFLICT (username) DO NOTHING"
        };
        Ok(conn.execute(sql, &[&user, &verifier]).await? > 0)
    }

    /// Tenants that are not deleted, per server name.
    pub async fn tenant_counts_by_server(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT server, count(*) FROM tenants WHERE state <> 'deleted' GROUP BY server",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let n: i64 = r.try_get(1)?;
                Ok((r.try_get(0)?, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    /// Whether a tenant user exists.
    pub async fn user_exists(&self, slug: &TenantSlug, user: &str) -> Result<bool, RegistryError> {
        Ok(self.user_verifier(slug, user).await?.is_some())
    }
}
