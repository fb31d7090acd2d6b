//! Tenant schema migrations: a directory of `NNNN_name.sql` files ([`MigrationSet`]) applied to
//! every tenant's own database, each file in its own transaction, as the tenant's backend role,
//! with a per-tenant ledger in the registry (`tenant_migrations`, checksums as the registry's
//! own ledger computes them) and `tenants.schema_version`.
//!
//! Two tenantgate instances never migrate one tenant at once: the runner holds a session
//! advisory lock in the tenant's database and reads the ledger only once it has the lock.
//! A file already applied whose checksum changed stops that tenant before anything is applied.
//! A file is committed in the tenant's database before it is recorded in the registry; if the
//! registry write fails after that commit, the ledger misses a file the database has (the
//! error says so). Files must be able to run inside a transaction block (no `CREATE INDEX
//! CONCURRENTLY`, no `BEGIN`/`COMMIT` of their own).
//!
//! It must not change a tenant's lifecycle state (`provision` does) nor run on the hot path.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures_util::StreamExt as _;

use super::server::{self, BackendClient, Budgets};
use super::{ProvisionError, Setup, error_chain, parse_slug};
use crate::crypto::{Binding, MasterKey};
use crate::registry::migrate::checksum;
use crate::registry::{AppliedMigration, Registry, TenantRecord, TenantSlug, TenantState};

/// Advisory lock key for tenant migrations, taken in the tenant's own database ("tgtenmig").
const LOCK_KEY: i64 = 0x7467_7465_6e6d_6967;

/// Activity log actor for everything this module records.
const ACTOR: &str = "tenantgate";

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The number before the first underscore.
    pub version: i32,
    /// The part between the underscore and `.sql`.
    pub name: String,
    /// The file name, for messages.
    pub file: String,
    pub sql: String,
    /// sha256 of the file's bytes, hex.
    pub checksum: String,
}

/// The tenant migrations of a directory, in version order.
#[derive(Debug, Clone)]
pub struct MigrationSet {
    dir: PathBuf,
    migrations: Vec<Migration>,
}

impl MigrationSet {
    /// Reads every `NNNN_name.sql` file of `dir`. Other files (a README), hidden files (an
    /// editor's `.#0002_x.sql`) and subdirectories are ignored; a `.sql` file named otherwise,
    /// two files with one version, a file that is not UTF-8 and a missing directory are errors.
    pub fn load(dir: &Path) -> Result<MigrationSet, ProvisionError> {
        let shown = || dir.display().to_string();
        let entries = std::fs::read_dir(dir).map_err(|source| ProvisionError::MigrationsDir {
            dir: shown(),
            source,
        })?;
        let mut migrations: Vec<Migration> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ProvisionError::MigrationsDir {
                dir: shown(),
                source,
            })?;
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') || path.extension().is_none_or(|e| e != "sql") || path.is_dir()
            {
                continue;
            }
            let (version, name) = parse_file_name(&file)
                .ok_or_else(|| ProvisionError::BadMigrationName { file: file.clone() })?;
            if let Some(other) = migrations.iter().find(|m| m.version == version) {
                return Err(ProvisionError::DuplicateMigration {
                    version,
                    first: other.file.clone(),
                    second: file,
                });
            }
            let sql =
                std::fs::read_to_string(&path).map_err(|source| ProvisionError::MigrationFile {
                    path: path.display().to_string(),
                    source,
                })?;
            migrations.push(Migration {
                version,
                name: name.to_owned(),
                checksum: checksum(&sql),
                file,
                sql,
            });
        }
        migrations.sort_by_key(|m| m.version);
        Ok(MigrationSet {
            dir: dir.to_path_buf(),
            migrations,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files, in version order.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// The highest version, if there is any file.
    pub fn latest_version(&self) -> Option<i32> {
        self.migrations.last().map(|m| m.version)
    }
}

/// `0042_add_orders.sql` → (42, "add_orders"): digits, an underscore, a non-empty name.
fn parse_file_name(file: &str) -> Option<(i32, &str)> {
    let stem = file.strip_suffix(".sql")?;
    let (digits, name) = stem.split_once('_')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || name.is_empty() {
        return None;
    }
    let version: i32 = digits.parse().ok()?;
    (version > 0).then_some((version, name))
}

/// One file applied to one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFile {
    pub version: i32,
    pub file: String,
    pub duration_ms: i64,
}

/// What migrating one tenant did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOutcome {
    /// Files applied now, in order.
    pub applied: Vec<AppliedFile>,
    /// Files found already applied (and unchanged).
    pub already_applied: usize,
    /// The tenant's schema version afterwards (`None`: no file applied ever).
    pub schema_version: Option<i32>,
}

/// Progress of [`migrate_all`], reported after every tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateProgress {
    /// Tenants finished (either way).
    pub done: usize,
    /// Tenants to migrate.
    pub total: usize,
    /// Tenants finished with an error.
    pub failed: usize,
}

/// One tenant's result in [`migrate_all`]; the error is the whole cause chain as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantMigration {
    pub slug: TenantSlug,
    pub result: Result<MigrateOutcome, String>,
}

/// Options of [`migrate_all`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateAll<'a> {
    /// Tenants migrated at once; `None`: `provision.migrate_concurrency`.
    pub concurrency: Option<usize>,
    /// Connection budgets to count migration connections in (inside the proxy); `None` in the
    /// CLI.
    pub budgets: Option<&'a Budgets>,
}

/// What a migration run needs besides the files.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) setup: Setup<'a>,
    pub(super) registry: &'a Registry,
    pub(super) key: &'a MasterKey,
    pub(super) budgets: Option<&'a Budgets>,
}

/// Applies the pending migrations of `provision.migrations_dir` to one tenant (state `active`
/// or `suspended`). Waits while another instance migrates the same tenant. On a failed file,
/// the files before it stay applied and recorded; the error names the tenant, the file and
/// PostgreSQL's message. `budgets`: see [`Budgets`]; `None` from the CLI.
pub async fn migrate_tenant(
    setup: Setup<'_>,
    registry: &Registry,
    key: &MasterKey,
    slug: &str,
    budgets: Option<&Budgets>,
) -> Result<MigrateOutcome, ProvisionError> {
    let slug = parse_slug(slug)?;
    let set = MigrationSet::load(&setup.provision.migrations_dir)?;
    let tenant = registry
        .tenant(&slug)
        .await?
        .ok_or_else(|| ProvisionError::NoSuchTenant(slug.clone()))?;
    if !matches!(tenant.state, TenantState::Active | TenantState::Suspended) {
        return Err(ProvisionError::NotMigratable {
            slug,
            state: tenant.state,
        });
    }
    let ctx = Ctx {
        setup,
        registry,
        key,
        budgets,
    };
    migrate_record(ctx, &set, &tenant).await
}

/// Migrates every `active` and `suspended` tenant, at most `concurrency` at once. One tenant's
/// failure does not stop the others. `progress` is called after every tenant. Returns one
/// result per tenant, by slug; an error only when the files or the tenant list cannot be read.
pub async fn migrate_all(
    setup: Setup<'_>,
    registry: &Registry,
    key: &MasterKey,
    options: MigrateAll<'_>,
    progress: impl Fn(MigrateProgress) + Send + Sync,
) -> Result<Vec<TenantMigration>, ProvisionError> {
    let set = MigrationSet::load(&setup.provision.migrations_dir)?;
    let tenants: Vec<TenantRecord> = registry
        .tenants()
        .await?
        .into_iter()
        .filter(|t| matches!(t.state, TenantState::Active | TenantState::Suspended))
        .collect();
    let ctx = Ctx {
        setup,
        registry,
        key,
        budgets: options.budgets,
    };
    let concurrency = options
        .concurrency
        .unwrap_or(setup.provision.migrate_concurrency)
        .max(1);
    let total = tenants.len();
    let set = &set;
    let mut running = futures_util::stream::iter(tenants)
        .map(|tenant| async move {
            let result = migrate_record(ctx, set, &tenant).await;
            (tenant.slug, result)
        })
        .buffer_unordered(concurrency);
    let mut results = Vec::with_capacity(total);
    let mut failed = 0;
    while let Some((slug, result)) = running.next().await {
        let result = result.map_err(|e| {
            failed += 1;
            tracing::warn!(tenant = %slug, "migration failed: {}", error_chain(&e));
            error_chain(&e)
        });
        results.push(TenantMigration { slug, result });
        progress(MigrateProgress {
            done: results.len(),
            total,
            failed,
        });
    }
    results.sort_by(|a, b| a.slug.cmp(&b.slug));
    Ok(results)
}

/// Connects as the tenant, takes the lock, applies, and disconnects (releasing the lock).
/// Every failure is in the activity log as `migrate.failed`.
pub(super) async fn migrate_record(
    ctx: Ctx<'_>,
    set: &MigrationSet,
    tenant: &TenantRecord,
) -> Result<MigrateOutcome, ProvisionError> {
    let mut conn = match connect_locked(ctx, tenant).await {
        Ok(conn) => conn,
        Err(e) => {
            super::log_failure(ctx.registry, &tenant.slug, "migrate.failed", &e).await;
            return Err(e);
        }
    };
    let result = apply_pending(ctx, set, tenant, &mut conn).await;
    conn.close().await;
    result
}

/// A connection to the tenant's database as its backend role, holding the migration lock.
pub(super) async fn connect_locked(
    ctx: Ctx<'_>,
    tenant: &TenantRecord,
) -> Result<BackendClient, ProvisionError> {
    let server = ctx
        .setup
        .server(&tenant.server)
        .ok_or_else(|| ProvisionError::UnknownServer(tenant.server.clone()))?;
    let password = ctx
        .key
        .decrypt(
            &tenant.backend_password_enc,
            &Binding::backend_password(tenant.slug.as_str()),
        )
        .map_err(|source| ProvisionError::Decrypt {
            slug: tenant.slug.clone(),
            source,
        })?;
    let conn = server::connect_tenant(
        server,
        &tenant.database,
        &tenant.backend_role,
        &password,
        ctx.budgets,
    )
    .await?;
    if let Err(source) = take_lock(&conn, &tenant.slug).await {
        conn.close().await;
        return Err(ProvisionError::Backend {
            server: server.name.clone(),
            what: format!("taking the migration lock of tenant {}", tenant.slug),
            source,
        });
    }
    Ok(conn)
}

/// Session-level: held across the per-file transactions, released when the session ends.
/// Says so in the log when another runner has it.
async fn take_lock(conn: &BackendClient, slug: &TenantSlug) -> Result<(), tokio_postgres::Error> {
    let row = conn
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    if !row.try_get::<_, bool>(0)? {
        tracing::info!(tenant = %slug, "another runner is migrating this tenant; waiting for it");
        conn.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
            .await?;
    }
    Ok(())
}

/// Checks the ledger against the files, then applies and records each pending file in order.
/// The caller holds the migration lock on `conn`.
pub(super) async fn apply_pending(
    ctx: Ctx<'_>,
    set: &MigrationSet,
    tenant: &TenantRecord,
    conn: &mut BackendClient,
) -> Result<MigrateOutcome, ProvisionError> {
    let slug = &tenant.slug;
    let ledger = ctx.registry.tenant_migrations(slug).await?;
    if let Err(e) = check_ledger(slug, set, &ledger) {
        super::log_failure(ctx.registry, slug, "migrate.failed", &e).await;
        return Err(e);
    }
    let mut outcome = MigrateOutcome {
        applied: Vec::new(),
        already_applied: ledger.len(),
        schema_version: ledger.iter().map(|m| m.version).max(),
    };
    let pending = set
        .migrations()
        .iter()
        .filter(|m| !ledger.iter().any(|l| l.version == m.version));
    for migration in pending {
        let started = Instant::now();
        if let Err(e) = apply_one(conn, &migration.sql).await {
            let failure = ProvisionError::MigrationFailed {
                slug: slug.clone(),
                file: migration.file.clone(),
                message: postgres_message(&e),
            };
            super::log_failure(ctx.registry, slug, "migrate.failed", &failure).await;
            return Err(failure);
        }
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let record = AppliedMigration {
            version: migration.version,
            name: migration.name.clone(),
            checksum: migration.checksum.clone(),
        };
        ctx.registry
            .record_tenant_migration(slug, &record, duration_ms)
            .await
            .map_err(|source| ProvisionError::NotRecorded {
                slug: slug.clone(),
                file: migration.file.clone(),
                source,
            })?;
        ctx.registry
            .log_activity(
                Some(slug),
                ACTOR,
                "migrate.apply",
                Some(&format!("{} ({duration_ms} ms)", migration.file)),
            )
            .await?;
        tracing::info!(tenant = %slug, file = %migration.file, duration_ms, "migration applied");
        outcome.applied.push(AppliedFile {
            version: migration.version,
            file: migration.file.clone(),
            duration_ms,
        });
        outcome.schema_version = outcome.schema_version.max(Some(migration.version));
    }
    Ok(outcome)
}

/// Every recorded file must still be there, unchanged.
fn check_ledger(
    slug: &TenantSlug,
    set: &MigrationSet,
    ledger: &[AppliedMigration],
) -> Result<(), ProvisionError> {
    for row in ledger {
        match set.migrations().iter().find(|m| m.version == row.version) {
            Some(m) if m.checksum == row.checksum => {}
            Some(m) => {
                return Err(ProvisionError::ChecksumMismatch {
                    slug: slug.clone(),
                    file: m.file.clone(),
                    recorded: row.checksum.clone(),
                    current: m.checksum.clone(),
                });
            }
            None => {
                return Err(ProvisionError::MigrationMissing {
                    slug: slug.clone(),
                    version: row.version,
                    name: row.name.clone(),
                    dir: set.dir().display().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// One file, one transaction.
async fn apply_one(conn: &mut BackendClient, sql: &str) -> Result<(), tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    tx.batch_execute(sql).await?;
    tx.commit().await
}

/// PostgreSQL's own words for a failed statement (message, detail, SQLSTATE), else the
/// driver's.
pub(super) fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_owned();
            if let Some(detail) = db.detail() {
                text.push_str(" (");
                text.push_str(detail);
                text.push(')');
            }
            text.push_str(" [SQLSTATE ");
            text.push_str(db.code().code());
            text.push(']');
            text
        }
        None => error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(parse_file_name("0001_init.sql"), Some((1, "init")));
        assert_eq!(
            parse_file_name("0042_add_orders.sql"),
            Some((42, "add_orders"))
        );
        for bad in [
            "init.sql",
            "_init.sql",
            "0001_.sql",
            "0001.sql",
            "00a1_x.sql",
            "0000_zero.sql",
            "99999999999_big.sql",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    fn dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tenantgate-unit-{}-{name}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn load_sorts_and_checksums() {
        let d = dir(
            "sorted",
            &[
                ("0002_b.sql", "SELECT 2;"),
                ("0001_a.sql", "SELECT 1;"),
                ("README.md", "not a migration"),
                (".#0003_editing.sql", "an editor's lock file"),
            ],
        );
        let set = MigrationSet::load(&d).unwrap();
        let versions: Vec<i32> = set.migrations().iter().map(|m| m.version).collect();
        assert_eq!(versions, [1, 2]);
        assert_eq!(set.migrations()[0].checksum, checksum("SELECT 1;"));
        assert_eq!(set.latest_version(), Some(2));
        drop(std::fs::remove_dir_all(d));
    }

    #[test]
    fn load_refuses_duplicates_bad_names_and_missing_dirs() {
        let d = dir("dup", &[("0001_a.sql", ""), ("01_b.sql", "")]);
        let err = MigrationSet::load(&d).unwrap_err().to_string();
        assert!(
            err.contains("0001_a.sql") && err.contains("01_b.sql"),
            "{err}"
        );
        drop(std::fs::remove_dir_all(d));

        let d = dir("badname", &[("create_things.sql", "")]);
        let err = MigrationSet::load(&d).unwrap_err().to_string();
        assert!(err.contains("create_things.sql"), "{err}");
        drop(std::fs::remove_dir_all(d));

        let missing = std::env::temp_dir().join("tenantgate-no-such-migrations-dir");
        let err = MigrationSet::load(&missing).unwrap_err().to_string();
        assert!(err.contains("tenantgate-no-such-migrations-dir"), "{err}");
    }
}
