//! The `tenants` table: one tenant by slug (the login path, through the directory's cache),
//! all of them, the tenant of a database, and the writes the lifecycle makes (insert, state,
//! plan and overrides, target database). This module stores and reads rows; it must not decide a lifecycle
//! step (`provision` does) nor cache (`directory` does).

use super::{Registry, RegistryError, TenantRecord, TenantSlug, TenantState};

/// A new tenant row.
#[derive(Debug, Clone)]
pub struct NewTenant<'a> {
    pub slug: &'a TenantSlug,
    pub display_name: Option<&'a str>,
    pub state: TenantState,
    pub plan: &'a str,
    pub server: &'a str,
    pub database: &'a str,
    pub backend_role: &'a str,
    pub backend_password_enc: &'a [u8],
    /// Adopted by REGISTER TENANT (tenantgate did not create its database and role).
    pub registered: bool,
}

const TENANT_COLUMNS: &str = "slug, display_name, state, plan, server, database_name, \
     backend_role, backend_password_enc, error_message, overrides::text, revision, registered";

impl Registry {
    /// One tenant by slug.
    pub async fn tenant(&self, slug: &TenantSlug) -> Result<Option<TenantRecord>, RegistryError> {
        let conn = self.conn().await?;
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE slug = $1");
        let row = conn.query_opt(&sql, &[&slug.as_str()]).await?;
        row.map(|r| tenant_from_row(&r)).transpose()
    }

    /// All tenants, by slug.
    pub async fn tenants(&self) -> Result<Vec<TenantRecord>, RegistryError> {
        let conn = self.conn().await?;
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY slug");
        let rows = conn.query(&sql, &[]).await?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// The tenant (not deleted) whose database on `server` is `database`, if any.
    pub async fn tenant_of_database(
        &self,
        server: &str,
        database: &str,
    ) -> Result<Option<TenantSlug>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT slug FROM tenants WHERE server = $1 AND database_name = $2 \
                 AND state <> 'deleted' ORDER BY slug LIMIT 1",
                &[&server, &database],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let slug: String = row.try_get(0)?;
        TenantSlug::parse(&slug)
            .map(Some)
            .ok_or(RegistryError::BadRow {
                slug,
                what: "slug".to_owned(),
            })
    }

    /// Inserts a tenant, or replaces one in state `failed`.
    pub async fn insert_tenant(&self, t: &NewTenant<'_>) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO tenants (slug, display_name, state, plan, server, database_name, \
             backend_role, backend_password_enc, registered) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (slug) DO UPDATE SET display_name = EXCLUDED.display_name, \
             state = EXCLUDED.state, plan = EXCLUDED.plan, server = EXCLUDED.server, \
             database_name = EXCLUDED.database_name, backend_role = EXCLUDED.backend_role, \
             backend_password_enc = EXCLUDED.backend_password_enc, error_message = NULL, \
             registered = EXCLUDED.registered, \
             updated_at = now() WHERE tenants.state = 'failed'",
            &[
                &t.slug.as_str(),
                &t.display_name,
                &t.state.as_str(),
                &t.plan,
                &t.server,
                &t.database,
                &t.backend_role,
                &t.backend_password_enc,
                &t.registered,
            ],
        )
        .await?;
        Ok(())
    }

    /// Sets a tenant's state (and error message). Returns false if there is no such tenant.
    pub async fn set_state(
        &self,
        slug: &TenantSlug,
        state: TenantState,
        error: Option<&str>,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE tenants SET state = $2, error_message = $3, updated_at = now() \
                 WHERE slug = $1",
                &[&slug.as_str(), &state.as_str(), &error],
            )
            .await?;
        Ok(n > 0)
    }

    /// Sets a tenant's plan and its per-tenant overrides (a JSON object of plan fields).
    pub async fn set_plan(
        &self,
        slug: &TenantSlug,
        plan: &str,
        overrides_json: &str,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE tenants SET plan = $2, overrides = $3::text::jsonb, updated_at = now() \
                 WHERE slug = $1",
                &[&slug.as_str(), &plan, &overrides_json],
            )
            .await?;
        Ok(n > 0)
    }

    /// Moves a tenant to another plan; its overrides stay. Returns false if there is no such
    /// tenant.
    pub async fn set_plan_name(
        &self,
        slug: &TenantSlug,
        plan: &str,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE tenants SET plan = $2, updated_at = now() WHERE slug = $1",
                &[&slug.as_str(), &plan],
            )
            .await?;
        Ok(n > 0)
    }

    /// Adds or replaces single overrides (`values_json`, a JSON object) after removing the
    /// keys in `replaced` (other spellings of the same settings), in one statement, so two
    /// admins changing different keys at once both keep theirs. Returns false if there is no
    /// such tenant.
    pub async fn merge_overrides(
        &self,
        slug: &TenantSlug,
        values_json: &str,
        replaced: &[&str],
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE tenants SET overrides = (overrides - $3::text[]) || $2::text::jsonb, \
                 updated_at = now() WHERE slug = $1",
                &[&slug.as_str(), &values_json, &replaced],
            )
            .await?;
        Ok(n > 0)
    }

    /// Removes the named overrides, or all of them (`keys` is `None`). Returns false if there
    /// is no such tenant.
    pub async fn remove_overrides(
        &self,
        slug: &TenantSlug,
        keys: Option<&[&str]>,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = match keys {
            Some(keys) => {
                conn.execute(
                    "UPDATE tenants SET overrides = overrides - $2::text[], updated_at = now() \
                     WHERE slug = $1",
                    &[&slug.as_str(), &keys],
                )
                .await?
            }
            None => {
                conn.execute(
                    "UPDATE tenants SET overrides = '{}'::jsonb, updated_at = now() WHERE slug = $1",
                    &[&slug.as_str()],
                )
                .await?
            }
        };
        Ok(n > 0)
    }

    /// How many tenants (not deleted) each plan has.
    pub async fn plan_counts(&self) -> Result<Vec<(String, i64)>, RegistryError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT plan, count(*) FROM tenants WHERE state <> 'deleted' GROUP BY plan",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Points a tenant at a database (and backend role and password).
    pub async fn set_target(
        &self,
        slug: &TenantSlug,
        database: &str,
        backend_role: &str,
        backend_password_enc: &[u8],
    ) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE tenants SET database_name = $2, backend_role = $3, \
                 backend_password_enc = $4, updated_at = now() WHERE slug = $1",
                &[
                    &slug.as_str(),
                    &database,
                    &backend_role,
                    &backend_password_enc,
                ],
            )
            .await?;
        Ok(n > 0)
    }
}

fn tenant_from_row(row: &tokio_postgres::Row) -> Result<TenantRecord, RegistryError> {
    let slug_text: String = row.try_get(0)?;
    let bad = |what: &str| RegistryError::BadRow {
        slug: slug_text.clone(),
        what: what.to_owned(),
    };
    let slug = TenantSlug::parse(&slug_text).ok_or_else(|| bad("slug"))?;
    let state_text: String = row.try_get(2)?;
    let state = TenantState::parse(&state_text).ok_or_else(|| bad("state"))?;
    Ok(TenantRecord {
        slug,
        display_name: row.try_get(1)?,
        state,
        plan: row.try_get(3)?,
        server: row.try_get(4)?,
        database: row.try_get(5)?,
        backend_role: row.try_get(6)?,
        backend_password_enc: row.try_get(7)?,
        error_message: row.try_get(8)?,
        overrides: row.try_get(9)?,
        revision: row.try_get(10)?,
        registered: row.try_get(11)?,
    })
}
