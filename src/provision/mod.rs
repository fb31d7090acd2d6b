//! Tenant lifecycle on the backend servers and in the registry: provision a new tenant (an
//! isolated LOGIN role with a generated password and a database it owns, CONNECT revoked from
//! PUBLIC, then the tenant migrations and an optional seed file), register a tenant for a
//! database that already exists, drop a tenant, add and remove users, suspend and resume. The
//! CLI calls this today; the admin console will call the same functions.
//!
//! Moving parts: this file (the lifecycle steps, each recorded in the activity log),
//! `import` (users copied with their SCRAM verifiers from a server's `pg_authid`), `migrations` (tenant schema migrations and their ledger), `server` (connections to backend
//! servers under their connection budgets, CREATE/DROP of roles and databases), `error`
//! ([`ProvisionError`] and how it reaches an admin client).
//!
//! Every identifier and literal that reaches SQL goes through postgres-protocol's escaping.
//! The generated backend password is sent to the server only as a SCRAM verifier and stored
//! only encrypted. This module must not run on the connection hot path. It reads the config
//! through [`Setup`] (its own section, the servers, the console's database name), never the
//! whole `Config`: `config` gathers this module's section, so the arrow points one way.

mod error;
mod import;
mod migrations;
mod no_plain_password;
mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use error::{ProvisionError, error_chain};
pub use import::{ImportProblem, ImportProblems, ImportUsers, import_users};
pub use migrations::{
    AppliedFile, MigrateAll, MigrateOutcome, MigrateProgress, Migration, MigrationSet,
    TenantMigration, migrate_all, migrate_tenant,
};
pub use server::Budgets;

use crate::crypto::{Binding, MasterKey, Secret, generate_password};
use crate::pool::ServerConfig;
use crate::registry::{MAX_NAME_BYTES, NewTenant, Registry, TenantRecord, TenantSlug, TenantState};
use migrations::Ctx;

/// Activity log actor for the lifecycle steps.
const ACTOR: &str = "tenantgate";

/// `[provision]`: how new tenants are laid out on a backend server and migrated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionConfig {
    /// Name of a new tenant's database; `{slug}` is replaced by the slug with hyphens turned
    /// into underscores (slugs have no underscores, so names cannot collide). The tenant's
    /// backend role gets the same name. Default "tenant_{slug}".
    #[serde(default = "default_database_pattern")]
    pub database_pattern: String,
    /// Plan recorded for new tenants when none is given. Default "default".
    #[serde(default = "default_plan")]
    pub default_plan: String,
    /// Directory of tenant migrations (`NNNN_name.sql`), applied to every new tenant and by
    /// `tenant migrate`. A relative path is relative to the process's working directory. Read
    /// at each use (no restart needed). Default "migrations/tenant".
    #[serde(default = "default_migrations_dir")]
    pub migrations_dir: PathBuf,
    /// SQL file run once in a new tenant's database after its migrations, in one transaction,
    /// as the tenant's role. Relative to the working directory. Default: none.
    #[serde(default)]
    pub seed_file: Option<PathBuf>,
    /// Tenants `tenant migrate --all` migrates at once. Default 4.
    #[serde(default = "default_migrate_concurrency")]
    pub migrate_concurrency: usize,
}

fn default_database_pattern() -> String {
    "tenant_{slug}".to_owned()
}
fn default_plan() -> String {
    "default".to_owned()
}
fn default_migrations_dir() -> PathBuf {
    PathBuf::from("migrations/tenant")
}
fn default_migrate_concurrency() -> usize {
    4
}

/// Most tenants migrated at once: each holds a backend connection.
const MAX_MIGRATE_CONCURRENCY: usize = 256;

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            database_pattern: default_database_pattern(),
            default_plan: default_plan(),
            migrations_dir: default_migrations_dir(),
            seed_file: None,
            migrate_concurrency: default_migrate_concurrency(),
        }
    }
}

impl ProvisionConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((format!("provision.{key}"), message.to_owned()));
        if !self.database_pattern.contains("{slug}") {
            return bad("database_pattern", "must contain {slug}");
        }
        if self.migrations_dir.as_os_str().is_empty() {
            return bad("migrations_dir", "must not be empty");
        }
        if self
            .seed_file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            return bad("seed_file", "must not be empty (leave it out for no seed)");
        }
        if !(1..=MAX_MIGRATE_CONCURRENCY).contains(&self.migrate_concurrency) {
            return bad(
                "migrate_concurrency",
                &format!("must be between 1 and {MAX_MIGRATE_CONCURRENCY}"),
            );
        }
        Ok(())
    }
}

/// What provisioning reads from the running config (`Config::provisioning` gathers it):
/// `[provision]`, the backend servers tenants go to, and the admin console's database name,
/// which no tenant may take. Borrowed for one call, so a RELOAD between calls is seen.
#[derive(Debug, Clone, Copy)]
pub struct Setup<'a> {
    pub provision: &'a ProvisionConfig,
    /// The `[[server]]` sections, in file order: the first is the default.
    pub servers: &'a [ServerConfig],
    /// `admin.database`: that name routes to the console, so it is no tenant's slug.
    pub admin_database: &'a str,
}

impl<'a> Setup<'a> {
    /// The server a new tenant goes to when none is named: the first one.
    pub fn default_server(self) -> Option<&'a ServerConfig> {
        self.servers.first()
    }

    pub fn server(self, name: &str) -> Option<&'a ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }
}

/// The database (and role) name for a slug.
pub fn database_name(pattern: &str, slug: &str) -> String {
    pattern.replace("{slug}", &slug.replace('-', "_"))
}

/// Options for a new tenant.
#[derive(Debug, Default, Clone)]
pub struct CreateTenant {
    pub display_name: Option<String>,
    pub server: Option<String>,
    pub plan: Option<String>,
    /// Connection budgets the provisioning connections count in (inside the proxy: the pool
    /// map's); `None` from the CLI. See [`Budgets`].
    pub budgets: Option<Budgets>,
}

fn parse_slug(slug: &str) -> Result<TenantSlug, ProvisionError> {
    TenantSlug::parse(slug).ok_or_else(|| ProvisionError::BadSlug(slug.to_owned()))
}

/// The slug of a tenant being created or registered: valid, and not the admin console's
/// database name (a tenant by that name could never be reached: the name routes to the
/// console).
fn new_slug(setup: Setup<'_>, slug: &str) -> Result<TenantSlug, ProvisionError> {
    if slug == setup.admin_database {
        return Err(ProvisionError::ReservedSlug(slug.to_owned()));
    }
    parse_slug(slug)
}

/// Provisions a new tenant: registry row (`provisioning`), role and database on the server,
/// `migrating` while the tenant migrations (`provision.migrations_dir`) and the seed file
/// (`provision.seed_file`) run as the tenant's role, then `active`. Every step is written to
/// the activity log. On any failure once the row exists, the database and role it created are
/// dropped, the row is marked `failed` with the error, and the error is returned.
/// Re-running for a `failed` tenant retries from the start.
pub async fn create_tenant(
    setup: Setup<'_>,
    registry: &Registry,
    key: &MasterKey,
    slug: &str,
    options: &CreateTenant,
) -> Result<TenantRecord, ProvisionError> {
    let slug = new_slug(setup, slug)?;
    if let Some(existing) = registry.tenant(&slug).await? {
        if existing.state != TenantState::Failed {
            return Err(ProvisionError::Exists(slug));
        }
    }
    let server = match &options.server {
        Some(name) => setup.server(name),
        None => least_loaded_server(setup, registry).await?,
    }
    .ok_or_else(|| ProvisionError::UnknownServer(options.server.clone().unwrap_or_default()))?;
    let database = database_name(&setup.provision.database_pattern, slug.as_str());
    if database.len() > 63 {
        return Err(ProvisionError::NameTooLong(database));
    }
    // Files are read before anything exists, so a missing directory creates nothing.
    let set = MigrationSet::load(&setup.provision.migrations_dir)?;
    let seed = match &setup.provision.seed_file {
        Some(path) => Some(Seed {
            file: path.display().to_string(),
            sql: std::fs::read_to_string(path).map_err(|source| ProvisionError::SeedFile {
                path: path.display().to_string(),
                source,
            })?,
        }),
        None => None,
    };
    let role = database.clone();
    let password = generate_password(32);
    let plan = options
        .plan
        .clone()
        .unwrap_or_else(|| setup.provision.default_plan.clone());
    let encrypted = key.encrypt(&password, &Binding::backend_password(slug.as_str()));
    registry
        .insert_tenant(&NewTenant {
            slug: &slug,
            display_name: options.display_name.as_deref(),
            state: TenantState::Provisioning,
            plan: &plan,
            server: &server.name,
            database: &database,
            backend_role: &role,
            backend_password_enc: &encrypted,
            registered: false,
        })
        .await?;
    // The upsert only replaces failed rows: make sure the row is ours now.
    let tenant = match registry.tenant(&slug).await? {
        Some(r) if r.state == TenantState::Provisioning && r.backend_password_enc == encrypted => r,
        _ => return Err(ProvisionError::Exists(slug)),
    };
    let ctx = Ctx {
        setup,
        registry,
        key,
        budgets: options.budgets.as_ref(),
    };
    let mut created = false;
    let attempt = Attempt {
        server,
        tenant: &tenant,
        password: &password,
        set: &set,
        seed: seed.as_ref(),
    };
    let result = provision_steps(ctx, &attempt, &mut created).await;
    match result {
        Ok(()) => registry
            .tenant(&slug)
            .await?
            .ok_or(ProvisionError::NoSuchTenant(slug)),
        Err(e) => {
            undo_provisioning(ctx, server, &tenant, created, &e).await;
            Err(e)
        }
    }
}

/// A seed file, read before provisioning starts.
struct Seed {
    file: String,
    sql: String,
}

/// One provisioning attempt's inputs, once the registry row exists.
struct Attempt<'a> {
    server: &'a ServerConfig,
    /// The row as inserted (`provisioning`).
    tenant: &'a TenantRecord,
    /// The new backend role's password (sent to the server as a SCRAM verifier only).
    password: &'a Secret,
    set: &'a MigrationSet,
    seed: Option<&'a Seed>,
}

/// The steps after the registry row exists. `created` turns true once the role and database
/// exist on the server (so a failure drops only what this attempt created).
async fn provision_steps(
    ctx: Ctx<'_>,
    attempt: &Attempt<'_>,
    created: &mut bool,
) -> Result<(), ProvisionError> {
    let Attempt {
        server,
        tenant,
        password,
        set,
        seed,
    } = *attempt;
    let registry = ctx.registry;
    let slug = &tenant.slug;
    // Rows left by an earlier failed attempt describe a database that is gone.
    registry.clear_tenant_migrations(slug).await?;
    registry
        .log_activity(Some(slug), ACTOR, "provision.start", Some(&server.name))
        .await?;
    server::create_role_and_database(
        server,
        &tenant.database,
        &tenant.backend_role,
        password,
        ctx.budgets,
    )
    .await?;
    *created = true;
    registry
        .log_activity(
            Some(slug),
            ACTOR,
            "provision.database",
            Some(&tenant.database),
        )
        .await?;
    registry
        .set_state(slug, TenantState::Migrating, None)
        .await?;
    registry
        .log_activity(
            Some(slug),
            ACTOR,
            "provision.migrating",
            Some(&set.dir().display().to_string()),
        )
        .await?;
    let mut conn = migrations::connect_locked(ctx, tenant).await?;
    let mut result = migrations::apply_pending(ctx, set, tenant, &mut conn)
        .await
        .map(|_| ());
    if let (Ok(()), Some(seed)) = (&result, seed) {
        result = run_seed(ctx, tenant, &mut conn, seed).await;
    }
    conn.close().await;
    result?;
    registry.set_state(slug, TenantState::Active, None).await?;
    registry
        .log_activity(Some(slug), ACTOR, "provision.done", Some(&tenant.database))
        .await?;
    Ok(())
}

async fn run_seed(
    ctx: Ctx<'_>,
    tenant: &TenantRecord,
    conn: &mut server::BackendClient,
    seed: &Seed,
) -> Result<(), ProvisionError> {
    let failed = |e: &tokio_postgres::Error| ProvisionError::SeedFailed {
        slug: tenant.slug.clone(),
        file: seed.file.clone(),
        message: migrations::postgres_message(e),
    };
    let tx = conn.transaction().await.map_err(|e| failed(&e))?;
    tx.batch_execute(&seed.sql).await.map_err(|e| failed(&e))?;
    tx.commit().await.map_err(|e| failed(&e))?;
    ctx.registry
        .log_activity(
            Some(&tenant.slug),
            ACTOR,
            "provision.seed",
            Some(&seed.file),
        )
        .await?;
    Ok(())
}

/// After a failed provisioning: drop what this attempt created, forget its ledger, mark the row
/// `failed` with the error and log it. Best effort: a failure here is logged, and the caller
/// returns the original error.
async fn undo_provisioning(
    ctx: Ctx<'_>,
    server: &ServerConfig,
    tenant: &TenantRecord,
    created: bool,
    error: &ProvisionError,
) {
    let slug = &tenant.slug;
    let message = error_chain(error);
    tracing::warn!(tenant = %slug, "provisioning failed: {message}");
    if created {
        if let Err(e) = server::drop_database_and_role(
            server,
            &tenant.database,
            &tenant.backend_role,
            ctx.budgets,
        )
        .await
        {
            tracing::error!(
                tenant = %slug,
                database = %tenant.database,
                role = %tenant.backend_role,
                "could not drop what a failed provisioning created: {}",
                error_chain(&e)
            );
        }
    }
    let registry = ctx.registry;
    let steps = async {
        registry.clear_tenant_migrations(slug).await?;
        registry
            .set_state(slug, TenantState::Failed, Some(&message))
            .await?;
        registry
            .log_activity(Some(slug), ACTOR, "provision.failed", Some(&message))
            .await
    };
    if let Err(e) = steps.await {
        tracing::error!(tenant = %slug, "could not mark the tenant failed: {}", error_chain(&e));
    }
}

/// What DROP TENANT does with the tenant's database and backend role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatabaseOnDrop {
    /// Drop them if tenantgate created them; keep a registered tenant's (REGISTER TENANT
    /// adopted a database someone else made).
    #[default]
    ByOrigin,
    Keep,
    /// Drop them, registered or not.
    Drop,
}

/// Drops a tenant: marks it `deleted` first (running proxies disconnect its clients when the
/// registry's NOTIFY reaches them), then, as `on_drop` says, drops its database (`WITH
/// (FORCE)`, disconnecting what is left) and its backend role, and forgets its migration
/// ledger. Returns whether the database was dropped. Unknown and already deleted tenants are
/// errors. `budgets`: see [`Budgets`]; `None` from the CLI.
pub async fn drop_tenant(
    setup: Setup<'_>,
    registry: &Registry,
    slug: &str,
    on_drop: DatabaseOnDrop,
    budgets: Option<&Budgets>,
) -> Result<bool, ProvisionError> {
    let slug = parse_slug(slug)?;
    let tenant = registry
        .tenant(&slug)
        .await?
        .ok_or_else(|| ProvisionError::NoSuchTenant(slug.clone()))?;
    if tenant.state == TenantState::Deleted {
        return Err(ProvisionError::AlreadyDeleted(slug));
    }
    let keep_database = match on_drop {
        DatabaseOnDrop::ByOrigin => tenant.registered,
        DatabaseOnDrop::Keep => true,
        DatabaseOnDrop::Drop => false,
    };
    registry
        .set_state(&slug, TenantState::Deleted, None)
        .await?;
    let detail = if keep_database {
        format!("database {} kept", tenant.database)
    } else {
        format!("database {} to be dropped", tenant.database)
    };
    registry
        .log_activity(Some(&slug), ACTOR, "drop", Some(&detail))
        .await?;
    if keep_database {
        return Ok(false);
    }
    let dropped = match setup.server(&tenant.server) {
        Some(server) => {
            server::drop_database_and_role(server, &tenant.database, &tenant.backend_role, budgets)
                .await
        }
        None => Err(ProvisionError::UnknownServer(tenant.server.clone())),
    };
    if let Err(e) = dropped {
        let failure = ProvisionError::DropFailed {
            slug: slug.clone(),
            database: tenant.database.clone(),
            role: tenant.backend_role.clone(),
            source: Box::new(e),
        };
        log_failure(registry, &slug, "drop.failed", &failure).await;
        return Err(failure);
    }
    registry.clear_tenant_migrations(&slug).await?;
    registry
        .log_activity(Some(&slug), ACTOR, "drop.database", Some(&tenant.database))
        .await?;
    Ok(true)
}

/// Records a failure in the activity log. Best effort: the failure is what the caller returns,
/// so a registry that cannot take the row only gets a log line.
async fn log_failure(registry: &Registry, slug: &TenantSlug, action: &str, error: &ProvisionError) {
    let detail = error_chain(error);
    if let Err(e) = registry
        .log_activity(Some(slug), ACTOR, action, Some(&detail))
        .await
    {
        tracing::warn!(tenant = %slug, action, "activity log not written: {}", error_chain(&e));
    }
}

/// Removes a user from a tenant; an unknown user is an error.
pub async fn remove_user(
    registry: &Registry,
    slug: &str,
    user: &str,
) -> Result<(), ProvisionError> {
    let slug = parse_slug(slug)?;
    if user.is_empty() {
        return Err(ProvisionError::EmptyUser);
    }
    if !registry.delete_user(&slug, user).await? {
        return Err(ProvisionError::NoSuchUser {
            slug,
            user: user.to_owned(),
        });
    }
    registry
        .log_activity(Some(&slug), ACTOR, "user.remove", Some(user))
        .await?;
    Ok(())
}

/// The server with the fewest tenants (not deleted) per connection of its budget; the first
/// one on a tie.
async fn least_loaded_server<'c>(
    setup: Setup<'c>,
    registry: &Registry,
) -> Result<Option<&'c ServerConfig>, ProvisionError> {
    if setup.servers.len() < 2 {
        return Ok(setup.default_server());
    }
    let counts = registry.tenant_counts_by_server().await?;
    Ok(setup.servers.iter().min_by(|a, b| {
        let load = |s: &ServerConfig| {
            let tenants = counts.get(&s.name).copied().unwrap_or(0);
            // Compare tenants/max_connections without floats: a.t * b.max vs b.t * a.max.
            (tenants, u64::from(s.max_connections.max(1)))
        };
        let ((ta, ma), (tb, mb)) = (load(a), load(b));
        (ta * mb).cmp(&(tb * ma))
    }))
}

/// An existing database to adopt as a tenant.
#[derive(Debug, Clone)]
pub struct RegisterTenant<'a> {
    pub slug: &'a str,
    /// Server name from the config; the first server when `None`.
    pub server: Option<&'a str>,
    pub database: &'a str,
    pub role: &'a str,
    pub password: &'a Secret,
}

/// Registers a tenant for a database that already exists, after checking that the role and
/// password can log in to it.
pub async fn register_tenant(
    setup: Setup<'_>,
    registry: &Registry,
    key: &MasterKey,
    existing: &RegisterTenant<'_>,
) -> Result<TenantRecord, ProvisionError> {
    let RegisterTenant {
        slug,
        server,
        database,
        role,
        password,
    } = *existing;
    let slug = new_slug(setup, slug)?;
    if registry
        .tenant(&slug)
        .await?
        .is_some_and(|t| t.state != TenantState::Failed)
    {
        return Err(ProvisionError::Exists(slug));
    }
    let server = match server {
        Some(name) => setup.server(name),
        None => setup.default_server(),
    }
    .ok_or_else(|| ProvisionError::UnknownServer(server.unwrap_or_default().to_owned()))?;
    if let Some(owner) = registry
        .tenant_of_database(&server.name, database)
        .await?
        .filter(|owner| *owner != slug)
    {
        return Err(ProvisionError::DatabaseTaken {
            database: database.to_owned(),
            server: server.name.clone(),
            owner,
        });
    }
    server::check_login(server, database, role, password).await?;
    registry
        .insert_tenant(&NewTenant {
            slug: &slug,
            display_name: None,
            state: TenantState::Active,
            plan: &setup.provision.default_plan,
            server: &server.name,
            database,
            backend_role: role,
            backend_password_enc: &key.encrypt(password, &Binding::backend_password(slug.as_str())),
            registered: true,
        })
        .await?;
    registry
        .log_activity(Some(&slug), "tenantgate", "register", Some(database))
        .await?;
    registry
        .tenant(&slug)
        .await?
        .ok_or(ProvisionError::NoSuchTenant(slug))
}

/// Adds a user to a tenant, or changes its password. Only a SCRAM verifier is stored.
pub async fn add_user(
    registry: &Registry,
    slug: &str,
    user: &str,
    password: &Secret,
) -> Result<(), ProvisionError> {
    check_user(registry, slug, user).await?;
    let verifier = crate::auth::scram_verifier(password).await;
    set_user_verifier(registry, slug, user, &verifier).await
}

/// Adds a user to a tenant, or replaces its verifier, with a SCRAM-SHA-256 verifier made
/// elsewhere (PostgreSQL's `pg_authid.rolpassword`, or another tenantgate): the user keeps the
/// password nobody here knows. The verifier is checked before it is stored.
pub async fn set_user_verifier(
    registry: &Registry,
    slug: &str,
    user: &str,
    verifier: &str,
) -> Result<(), ProvisionError> {
    let tenant = check_user(registry, slug, user).await?;
    crate::auth::ScramSecret::from_verifier(verifier).map_err(|reason| {
        ProvisionError::BadVerifier {
            user: user.to_owned(),
            reason,
        }
    })?;
    registry.set_user(&tenant, user, verifier).await?;
    registry
        .log_activity(Some(&tenant), "tenantgate", "user.set", Some(user))
        .await?;
    Ok(())
}

/// A user name that fits PostgreSQL's limits, of a tenant that exists.
async fn check_user(
    registry: &Registry,
    slug: &str,
    user: &str,
) -> Result<TenantSlug, ProvisionError> {
    let slug = parse_slug(slug)?;
    if user.is_empty() {
        return Err(ProvisionError::EmptyUser);
    }
    if user.len() > MAX_NAME_BYTES {
        return Err(ProvisionError::UserNameTooLong(user.to_owned()));
    }
    if registry.tenant(&slug).await?.is_none() {
        return Err(ProvisionError::NoSuchTenant(slug));
    }
    Ok(slug)
}

/// Suspends or resumes a tenant: moves it between `active` and `suspended` only (a deleted,
/// failed or half-provisioned tenant is not brought back this way).
pub async fn set_state(
    registry: &Registry,
    slug: &str,
    state: TenantState,
) -> Result<(), ProvisionError> {
    let slug = parse_slug(slug)?;
    let tenant = registry
        .tenant(&slug)
        .await?
        .ok_or_else(|| ProvisionError::NoSuchTenant(slug.clone()))?;
    let movable = |s| matches!(s, TenantState::Active | TenantState::Suspended);
    if !movable(tenant.state) || !movable(state) {
        return Err(ProvisionError::StateChange {
            slug,
            from: tenant.state,
            to: state,
        });
    }
    if !registry.set_state(&slug, state, None).await? {
        return Err(ProvisionError::NoSuchTenant(slug));
    }
    registry
        .log_activity(Some(&slug), "tenantgate", "state", Some(state.as_str()))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_map_hyphens() {
        assert_eq!(database_name("tenant_{slug}", "acme-co"), "tenant_acme_co");
    }

    #[test]
    fn pattern_must_hold_slug_and_fit() {
        let mut c = ProvisionConfig::default();
        assert!(c.validate().is_ok());
        c.database_pattern = "tenant".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn migration_keys_are_validated() {
        let key = |c: &ProvisionConfig| c.validate().err().map(|(k, _)| k);
        let mut c = ProvisionConfig::default();
        assert_eq!(c.migrations_dir, PathBuf::from("migrations/tenant"));
        assert_eq!(c.migrate_concurrency, 4);
        c.migrate_concurrency = 0;
        assert_eq!(key(&c).as_deref(), Some("provision.migrate_concurrency"));
        c = ProvisionConfig {
            migrations_dir: PathBuf::new(),
            ..ProvisionConfig::default()
        };
        assert_eq!(key(&c).as_deref(), Some("provision.migrations_dir"));
        c = ProvisionConfig {
            seed_file: Some(PathBuf::new()),
            ..ProvisionConfig::default()
        };
        assert_eq!(key(&c).as_deref(), Some("provision.seed_file"));
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let inner = std::io::Error::other("disk on fire");
        let e = ProvisionError::MigrationsDir {
            dir: "m".into(),
            source: inner,
        };
        assert_eq!(
            error_chain(&e),
            "cannot read the tenant migrations directory m: disk on fire"
        );
    }
}
