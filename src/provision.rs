//! Tenant lifecycle on the backend servers and in the registry: provision a new tenant (an
//! isolated LOGIN role with a generated password and a database it owns, CONNECT revoked from
//! PUBLIC), register a tenant for a database that already exists, add users, suspend and
//! resume. The CLI calls this today; the admin console will call the same functions.
//!
//! Every identifier and literal that reaches SQL goes through postgres-protocol's escaping.
//! The generated backend password is sent to the server only as a SCRAM verifier and stored
//! only encrypted. This module must not run on the connection hot path.

use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use crate::config::Config;
use crate::crypto::{MasterKey, Secret, generate_password};
use crate::pool::ServerConfig;
use crate::registry::{NewTenant, Registry, RegistryError, TenantRecord, TenantSlug, TenantState};

/// `[provision]`: how new tenants are laid out on a backend server.
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
}

fn default_database_pattern() -> String {
    "tenant_{slug}".to_owned()
}
fn default_plan() -> String {
    "default".to_owned()
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            database_pattern: default_database_pattern(),
            default_plan: default_plan(),
        }
    }
}

impl ProvisionConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        if !self.database_pattern.contains("{slug}") {
            return Err((
                "provision.database_pattern".to_owned(),
                "must contain {slug}".to_owned(),
            ));
        }
        Ok(())
    }
}

/// The database (and role) name for a slug.
pub fn database_name(pattern: &str, slug: &str) -> String {
    pattern.replace("{slug}", &slug.replace('-', "_"))
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "{0:?} is not a valid tenant slug: use 1 to 63 lowercase letters, digits and hyphens, not starting with a hyphen"
    )]
    BadSlug(String),
    #[error(
        "database name {0:?} is longer than PostgreSQL's 63 bytes: use a shorter slug or database_pattern"
    )]
    NameTooLong(String),
    #[error("tenant {0} already exists")]
    Exists(TenantSlug),
    #[error("tenant {0} does not exist")]
    NoSuchTenant(TenantSlug),
    #[error("server {0:?} is not in the config")]
    UnknownServer(String),
    #[error("no password for server {0:?}: set admin_password or admin_password_env")]
    NoServerPassword(String),
    #[error("backend server {server}: {what}")]
    Backend {
        server: String,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the tenant's database cannot be reached with the given role and password")]
    CannotConnect(#[source] tokio_postgres::Error),
    #[error("user name must not be empty")]
    EmptyUser,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Options for a new tenant.
#[derive(Debug, Default, Clone)]
pub struct CreateTenant {
    pub display_name: Option<String>,
    pub server: Option<String>,
    pub plan: Option<String>,
}

fn parse_slug(slug: &str) -> Result<TenantSlug, ProvisionError> {
    TenantSlug::parse(slug).ok_or_else(|| ProvisionError::BadSlug(slug.to_owned()))
}

/// Opens an admin connection to a backend server.
pub async fn connect_admin(
    server: &ServerConfig,
    database: &str,
) -> Result<tokio_postgres::Client, ProvisionError> {
    let password = server
        .admin_password
        .as_ref()
        .ok_or_else(|| ProvisionError::NoServerPassword(server.name.clone()))?;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&server.host)
        .port(server.port)
        .user(&server.admin_user)
        .password(password.expose())
        .dbname(database)
        .application_name("tenantgate-provision")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) =
        pg.connect(NoTls)
            .await
            .map_err(|source| ProvisionError::Backend {
                server: server.name.clone(),
                what: format!("connecting as {}", server.admin_user),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "provisioning connection ended");
        }
    });
    Ok(client)
}

/// Provisions a new tenant: registry row (`provisioning`), role and database on the server,
/// then `active`. On failure, whatever was created on the server is removed and the row is
/// marked `failed` with the error. Re-running for a `failed` tenant retries.
pub async fn create_tenant(
    config: &Config,
    registry: &Registry,
    key: &MasterKey,
    slug: &str,
    options: &CreateTenant,
) -> Result<TenantRecord, ProvisionError> {
    let slug = parse_slug(slug)?;
    if let Some(existing) = registry.tenant(&slug).await? {
        if existing.state != TenantState::Failed {
            return Err(ProvisionError::Exists(slug));
        }
    }
    let server = match &options.server {
        Some(name) => config.server(name),
        None => config.default_server(),
    }
    .ok_or_else(|| ProvisionError::UnknownServer(options.server.clone().unwrap_or_default()))?;
    let database = database_name(&config.provision.database_pattern, slug.as_str());
    if database.len() > 63 {
        return Err(ProvisionError::NameTooLong(database));
    }
    let role = database.clone();
    let password = generate_password(32);
    let plan = options
        .plan
        .clone()
        .unwrap_or_else(|| config.provision.default_plan.clone());
    let encrypted = key.encrypt(&password);
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
        })
        .await?;
    // The upsert only replaces failed rows: make sure the row is ours now.
    match registry.tenant(&slug).await? {
        Some(r) if r.state == TenantState::Provisioning && r.backend_password_enc == encrypted => {}
        _ => return Err(ProvisionError::Exists(slug)),
    }
    registry
        .log_activity(
            Some(&slug),
            "tenantgate",
            "provision.start",
            Some(&server.name),
        )
        .await?;

    match create_on_server(server, &database, &role, &password).await {
        Ok(()) => {
            registry.set_state(&slug, TenantState::Active, None).await?;
            registry
                .log_activity(Some(&slug), "tenantgate", "provision.done", Some(&database))
                .await?;
            registry
                .tenant(&slug)
                .await?
                .ok_or(ProvisionError::NoSuchTenant(slug))
        }
        Err(e) => {
            let message = e.to_string();
            registry
                .set_state(&slug, TenantState::Failed, Some(&message))
                .await?;
            registry
                .log_activity(
                    Some(&slug),
                    "tenantgate",
                    "provision.failed",
                    Some(&message),
                )
                .await?;
            Err(e)
        }
    }
}

/// Creates the role and the database; on failure removes what it created.
async fn create_on_server(
    server: &ServerConfig,
    database: &str,
    role: &str,
    password: &Secret,
) -> Result<(), ProvisionError> {
    let admin = connect_admin(server, &server.admin_database).await?;
    let backend = |what: String| {
        let name = server.name.clone();
        move |source| ProvisionError::Backend {
            server: name,
            what,
            source,
        }
    };
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    let role_sql = format!(
        "CREATE ROLE {} LOGIN PASSWORD {}",
        escape_identifier(role),
        escape_literal(&verifier)
    );
    admin
        .batch_execute(&role_sql)
        .await
        .map_err(backend(format!("creating role {role}")))?;
    // CREATE DATABASE cannot run inside a transaction block: send it alone.
    let db_sql = format!(
        "CREATE DATABASE {} OWNER {}",
        escape_identifier(database),
        escape_identifier(role)
    );
    if let Err(e) = admin.batch_execute(&db_sql).await {
        drop_quietly(
            &admin,
            &format!("DROP ROLE IF EXISTS {}", escape_identifier(role)),
        )
        .await;
        return Err(backend(format!("creating database {database}"))(e));
    }
    let revoke = format!(
        "REVOKE ALL ON DATABASE {} FROM PUBLIC",
        escape_identifier(database)
    );
    if let Err(e) = admin.batch_execute(&revoke).await {
        drop_quietly(
            &admin,
            &format!("DROP DATABASE IF EXISTS {}", escape_identifier(database)),
        )
        .await;
        drop_quietly(
            &admin,
            &format!("DROP ROLE IF EXISTS {}", escape_identifier(role)),
        )
        .await;
        return Err(backend(format!("revoking PUBLIC access to {database}"))(e));
    }
    Ok(())
}

async fn drop_quietly(admin: &tokio_postgres::Client, sql: &str) {
    if let Err(e) = admin.batch_execute(sql).await {
        tracing::warn!(error = %e, sql, "cleanup after a failed provisioning step failed");
    }
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
    config: &Config,
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
    let slug = parse_slug(slug)?;
    if registry
        .tenant(&slug)
        .await?
        .is_some_and(|t| t.state != TenantState::Failed)
    {
        return Err(ProvisionError::Exists(slug));
    }
    let server = match server {
        Some(name) => config.server(name),
        None => config.default_server(),
    }
    .ok_or_else(|| ProvisionError::UnknownServer(server.unwrap_or_default().to_owned()))?;
    check_login(server, database, role, password).await?;
    registry
        .insert_tenant(&NewTenant {
            slug: &slug,
            display_name: None,
            state: TenantState::Active,
            plan: &config.provision.default_plan,
            server: &server.name,
            database,
            backend_role: role,
            backend_password_enc: &key.encrypt(password),
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

async fn check_login(
    server: &ServerConfig,
    database: &str,
    role: &str,
    password: &Secret,
) -> Result<(), ProvisionError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&server.host)
        .port(server.port)
        .user(role)
        .password(password.expose())
        .dbname(database)
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = pg
        .connect(NoTls)
        .await
        .map_err(ProvisionError::CannotConnect)?;
    drop(client);
    drop(connection.await);
    Ok(())
}

/// Adds a user to a tenant, or changes its password. Only a SCRAM verifier is stored.
pub async fn add_user(
    registry: &Registry,
    slug: &str,
    user: &str,
    password: &Secret,
) -> Result<(), ProvisionError> {
    let slug = parse_slug(slug)?;
    if user.is_empty() {
        return Err(ProvisionError::EmptyUser);
    }
    if registry.tenant(&slug).await?.is_none() {
        return Err(ProvisionError::NoSuchTenant(slug));
    }
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    registry.set_user(&slug, user, &verifier).await?;
    registry
        .log_activity(Some(&slug), "tenantgate", "user.set", Some(user))
        .await?;
    Ok(())
}

/// Suspends or resumes a tenant.
pub async fn set_state(
    registry: &Registry,
    slug: &str,
    state: TenantState,
) -> Result<(), ProvisionError> {
    let slug = parse_slug(slug)?;
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
}
