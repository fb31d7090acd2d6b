//! The per-tenant migration ledger (`tenant_migrations`) and the schema version it raises on
//! `tenants`: what `provision` reads before migrating a tenant's database and records after
//! each file. This module stores and reads; it must not run a migration (`provision` does).
//! The admin console's read-only view of the ledger is `listing`'s.

use super::{Registry, RegistryError, TenantSlug};

/// One row of a tenant's migration ledger (`tenant_migrations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i32,
    pub name: String,
    /// sha256 of the file, hex (as `migrate::checksum`).
    pub checksum: String,
}

impl Registry {
    /// The tenant migrations recorded for a tenant, by version.
    pub async fn tenant_migrations(
        &self,
        slug: &TenantSlug,
    ) -> Result<Vec<AppliedMigration>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT version, name, checksum FROM tenant_migrations WHERE tenant_slug = $1 \
                 ORDER BY version",
                &[&slug.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AppliedMigration {
                    version: r.try_get(0)?,
                    name: r.try_get(1)?,
                    checksum: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// Records one applied tenant migration and raises the tenant's `schema_version` to it, in
    /// one registry transaction.
    pub async fn record_tenant_migration(
        &self,
        slug: &TenantSlug,
        applied: &AppliedMigration,
        duration_ms: i64,
    ) -> Result<(), RegistryError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "INSERT INTO tenant_migrations (tenant_slug, version, name, checksum, duration_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &slug.as_str(),
                &applied.version,
                &applied.name,
                &applied.checksum,
                &duration_ms,
            ],
        )
        .await?;
        tx.execute(
            "UPDATE tenants SET schema_version = GREATEST(schema_version, $2), updated_at = now() \
             WHERE slug = $1",
            &[&slug.as_str(), &applied.version],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets a tenant's migration ledger and schema version (its database is gone).
    pub async fn clear_tenant_migrations(&self, slug: &TenantSlug) -> Result<(), RegistryError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "DELETE FROM tenant_migrations WHERE tenant_slug = $1",
            &[&slug.as_str()],
        )
        .await?;
        tx.execute(
            "UPDATE tenants SET schema_version = NULL WHERE slug = $1 AND schema_version IS NOT NULL",
            &[&slug.as_str()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A tenant's schema version: the highest tenant migration applied, if any.
    pub async fn schema_version(&self, slug: &TenantSlug) -> Result<Option<i32>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT schema_version FROM tenants WHERE slug = $1",
                &[&slug.as_str()],
            )
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.flatten())
    }
}
