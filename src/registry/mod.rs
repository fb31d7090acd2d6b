//! The registry: the PostgreSQL database that holds tenants, their users' SCRAM verifiers, state,
//! plan and encrypted backend credentials.
//!
//! Moving parts: [`Registry`] (the queries, over `connections`: a small bb8 pool of
//! tokio-postgres connections that replaces the ones the registry closed),
//! `migrate` (our own schema, applied at start-up), `directory` (the moka cache in front of it, and
//! the background LISTEN loop that invalidates it when the registry changes). It also stores the
//! usage each instance flushes (`tenant_usage`, [`UsageDelta`]).
//! It must not forward client traffic.

mod connections;
mod credentials;
mod directory;
mod domains;
mod listing;
pub mod migrate;
mod types;

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use connections::{RegistryConn, RegistryPool, SharedError};
pub use credentials::{AuthMethod, UserLogin};
pub use directory::{CHANGES_CHANNEL, TenantDirectory, spawn_change_listener};
pub use domains::{DomainError, normalize_domain};
pub use listing::{ACTIVITY_LIMIT, ActivityEntry, MigrationEntry, TenantListing};
pub use types::{MAX_NAME_BYTES, TenantRecord, TenantSlug, TenantState};

use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;

/// `[registry]`: where the registry lives and how its records are cached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Connection string of the registry database (URI or `key=value` form). The environment
    /// variable `TENANTGATE_REGISTRY_URL` overrides it. Required. Restart to change.
    pub url: String,
    /// Connections tenantgate keeps to the registry. Default 4.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Give up on a registry query after this many milliseconds. Default 5000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a tenant record stays cached, in seconds. Changes are also pushed by
    /// LISTEN/NOTIFY, so this is only the safety net. Default 60.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_seconds: u64,
    /// How long a cached tenant record or verifier may keep serving, in seconds, when the
    /// registry cannot be reached to refresh it; cached tenants stay up through a registry
    /// outage this long. Default 3600.
    #[serde(default = "default_stale_ttl")]
    pub stale_ttl_seconds: u64,
    /// How long an unknown slug is remembered as unknown, in seconds. Default 2.
    #[serde(default = "default_negative_ttl")]
    pub negative_cache_ttl_seconds: u64,
    /// Most tenant records kept in the cache. Default 100000.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
}

fn default_pool_size() -> u32 {
    4
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_cache_ttl() -> u64 {
    60
}
fn default_stale_ttl() -> u64 {
    3600
}
fn default_negative_ttl() -> u64 {
    2
}
fn default_cache_capacity() -> u64 {
    100_000
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry connection string is invalid")]
    BadUrl(#[source] tokio_postgres::Error),
    #[error("registry query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("registry unavailable")]
    Unavailable(#[source] bb8::RunError<SharedError>),
    #[error("connecting to the registry failed")]
    ConnectFailed(#[source] SharedError),
    #[error("registry row for tenant {slug} is invalid: {what}")]
    BadRow { slug: String, what: String },
    #[error("registry migration {version} ({name}) was changed after it was applied")]
    MigrationChanged { version: i32, name: String },
    /// Internal to the cache: the slug is not in the registry. Never shown to a client.
    #[error("no such tenant")]
    NoSuchTenant,
    /// A lookup error shared by every caller that waited on the same cache load.
    #[error(transparent)]
    Shared(std::sync::Arc<RegistryError>),
}

impl ClientFacing for RegistryError {
    fn sqlstate(&self) -> SqlState {
        match self {
            RegistryError::BadUrl(_)
            | RegistryError::Query(_)
            | RegistryError::Unavailable(_)
            | RegistryError::ConnectFailed(_)
            | RegistryError::BadRow { .. }
            | RegistryError::MigrationChanged { .. }
            | RegistryError::NoSuchTenant
            | RegistryError::Shared(_) => SqlState::CANNOT_CONNECT_NOW,
        }
    }

    fn client_message(&self) -> String {
        match self {
            RegistryError::BadUrl(_)
            | RegistryError::Query(_)
            | RegistryError::Unavailable(_)
            | RegistryError::ConnectFailed(_)
            | RegistryError::BadRow { .. }
            | RegistryError::MigrationChanged { .. }
            | RegistryError::NoSuchTenant
            | RegistryError::Shared(_) => {
                "the tenant registry is not available; try again shortly".to_owned()
            }
        }
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::Registry
    }
}

impl From<bb8::RunError<SharedError>> for RegistryError {
    fn from(e: bb8::RunError<SharedError>) -> Self {
        RegistryError::Unavailable(e)
    }
}

/// One stored secret: the tenant it belongs to and its ciphertext (`crate::crypto` format).
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub slug: TenantSlug,
    pub blob: Vec<u8>,
}

/// The advisory lock key that serializes secret rewrites (key rotation) across instances.
const SECRETS_LOCK: i64 = 0x7465_6e61_6e74_6b72; // "tenantkr"

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

/// One row of a tenant's migration ledger (`tenant_migrations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i32,
    pub name: String,
    /// sha256 of the file, hex (as `migrate::checksum`).
    pub checksum: String,
}

/// Usage one tenantgate instance adds to a tenant's current hour in `tenant_usage`: the
/// growth of the tenant's counters (`crate::stats`) since the instance's last flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// Client logins.
    pub clients: i64,
    pub transactions: i64,
    pub queries: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub wait_us: i64,
    pub backend_connects: i64,
    pub backend_connect_errors: i64,
    pub pool_evictions: i64,
    pub reclaimed_connections: i64,
}

/// Handle to the registry database.
#[derive(Clone)]
pub struct Registry {
    pool: RegistryPool,
}

const TENANT_COLUMNS: &str = "slug, display_name, state, plan, server, database_name, \
     backend_role, backend_password_enc, error_message, overrides::text, revision, registered";

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

    /// Applies pending registry migrations.
    pub async fn migrate(&self) -> Result<migrate::Applied, RegistryError> {
        let mut conn = self.conn().await?;
        migrate::apply(&mut conn).await
    }

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

    /// The stored SCRAM verifier of a tenant's user.
    pub async fn user_verifier(
        &self,
        slug: &TenantSlug,
        user: &str,
    ) -> Result<Option<String>, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT scram_verifier FROM tenant_users WHERE tenant_slug = $1 AND username = $2",
                &[&slug.as_str(), &user],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// How many stored secrets are not bound to their row yet (formats v1 and v2; bound ones
    /// start with the byte 3).
    pub async fn unbound_secrets(&self) -> Result<i64, RegistryError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT count(*) FROM tenants \
                 WHERE substring(backend_password_enc FROM 1 FOR 1) IS DISTINCT FROM '\\x03'::bytea",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
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

    /// Creates or replaces a tenant user's verifier.
    pub async fn set_user(
        &self,
        slug: &TenantSlug,
        user: &str,
        verifier: &str,
    ) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO tenant_users (tenant_slug, username, scram_verifier) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_slug, username) DO UPDATE \
             SET scram_verifier = EXCLUDED.scram_verifier, updated_at = now()",
            &[&slug.as_str(), &user, &verifier],
        )
        .await?;
        Ok(())
    }

    /// Removes a tenant user. Returns false if there was no such user.
    pub async fn delete_user(&self, slug: &TenantSlug, user: &str) -> Result<bool, RegistryError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM tenant_users WHERE tenant_slug = $1 AND username = $2",
                &[&slug.as_str(), &user],
            )
            .await?;
        Ok(n > 0)
    }

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

    /// Adds usage to each tenant's row of the current hour (UTC, registry clock), in one
    /// statement: all of it is recorded or none.
    pub async fn add_usage(&self, usage: &[(TenantSlug, UsageDelta)]) -> Result<(), RegistryError> {
        if usage.is_empty() {
            return Ok(());
        }
        let column =
            |f: fn(&UsageDelta) -> i64| usage.iter().map(|(_, d)| f(d)).collect::<Vec<i64>>();
        let slugs: Vec<&str> = usage.iter().map(|(slug, _)| slug.as_str()).collect();
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO tenant_usage AS u (tenant_slug, period_start, clients, transactions, \
             queries, bytes_in, bytes_out, wait_us, backend_connects, backend_connect_errors, \
             pool_evictions, reclaimed_connections) \
             SELECT d.slug, date_trunc('hour', now(), 'UTC'), d.clients, d.transactions, \
             d.queries, d.bytes_in, d.bytes_out, d.wait_us, d.backend_connects, \
             d.backend_connect_errors, d.pool_evictions, d.reclaimed_connections \
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], \
             $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[]) \
             AS d(slug, clients, transactions, queries, bytes_in, bytes_out, wait_us, \
             backend_connects, backend_connect_errors, pool_evictions, reclaimed_connections) \
             ON CONFLICT (tenant_slug, period_start) DO UPDATE SET \
             clients = u.clients + EXCLUDED.clients, \
             transactions = u.transactions + EXCLUDED.transactions, \
             queries = u.queries + EXCLUDED.queries, \
             bytes_in = u.bytes_in + EXCLUDED.bytes_in, \
             bytes_out = u.bytes_out + EXCLUDED.bytes_out, \
             wait_us = u.wait_us + EXCLUDED.wait_us, \
             backend_connects = u.backend_connects + EXCLUDED.backend_connects, \
             backend_connect_errors = u.backend_connect_errors + EXCLUDED.backend_connect_errors, \
             pool_evictions = u.pool_evictions + EXCLUDED.pool_evictions, \
             reclaimed_connections = u.reclaimed_connections + EXCLUDED.reclaimed_connections, \
             updated_at = now()",
            &[
                &slugs,
                &column(|d| d.clients),
                &column(|d| d.transactions),
                &column(|d| d.queries),
                &column(|d| d.bytes_in),
                &column(|d| d.bytes_out),
                &column(|d| d.wait_us),
                &column(|d| d.backend_connects),
                &column(|d| d.backend_connect_errors),
                &column(|d| d.pool_evictions),
                &column(|d| d.reclaimed_connections),
            ],
        )
        .await?;
        Ok(())
    }

    /// Rewrites every stored secret (today: `tenants.backend_password_enc`) in one
    /// transaction: every tenant row is locked (`FOR UPDATE`), `rewrite` sees each secret
    /// and returns the ones to replace, and those are written before the commit. An
    /// advisory lock makes two rewrites (two instances rotating at once) take turns. If
    /// `rewrite` fails, nothing changes. Returns how many secrets were replaced.
    pub async fn rewrite_secrets<F, E>(&self, rewrite: F) -> Result<usize, E>
    where
        F: FnOnce(Vec<StoredSecret>) -> Result<Vec<StoredSecret>, E>,
        E: From<RegistryError>,
    {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(RegistryError::from)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SECRETS_LOCK])
            .await
            .map_err(RegistryError::from)?;
        let rows = tx
            .query(
                "SELECT slug, backend_password_enc FROM tenants ORDER BY slug FOR UPDATE",
                &[],
            )
            .await
            .map_err(RegistryError::from)?;
        let mut secrets = Vec::with_capacity(rows.len());
        for row in &rows {
            let slug: String = row.try_get(0).map_err(RegistryError::from)?;
            let slug = TenantSlug::parse(&slug).ok_or_else(|| RegistryError::BadRow {
                slug: slug.clone(),
                what: "slug".to_owned(),
            })?;
            secrets.push(StoredSecret {
                slug,
                blob: row.try_get(1).map_err(RegistryError::from)?,
            });
        }
        let replaced = rewrite(secrets)?;
        if !replaced.is_empty() {
            let slugs: Vec<&str> = replaced.iter().map(|s| s.slug.as_str()).collect();
            let blobs: Vec<&[u8]> = replaced.iter().map(|s| s.blob.as_slice()).collect();
            tx.execute(
                "UPDATE tenants AS t SET backend_password_enc = d.enc \
                 FROM unnest($1::text[], $2::bytea[]) AS d(slug, enc) WHERE t.slug = d.slug",
                &[&slugs, &blobs],
            )
            .await
            .map_err(RegistryError::from)?;
        }
        tx.commit().await.map_err(RegistryError::from)?;
        Ok(replaced.len())
    }

    /// Appends to the activity log.
    pub async fn log_activity(
        &self,
        slug: Option<&TenantSlug>,
        actor: &str,
        action: &str,
        detail: Option<&str>,
    ) -> Result<(), RegistryError> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO activity_log (tenant_slug, actor, action, detail) VALUES ($1, $2, $3, $4)",
            &[&slug.map(TenantSlug::as_str), &actor, &action, &detail],
        )
        .await?;
        Ok(())
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
