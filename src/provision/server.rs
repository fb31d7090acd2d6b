//! What provisioning does on a backend server: open connections (as the server's admin role, or
//! as a tenant's own backend role), each holding a permit of the server's connection budget
//! while it lives when the caller gives budgets, and create or drop a tenant's role and database.
//!
//! Connections honour the server's `tls` setting (`pool::BackendTls`: same modes and CA file
//! as tenant pools, with channel binding when the server offers it).
//!
//! Every identifier and literal that reaches SQL goes through postgres-protocol's escaping.
//! It must not decide lifecycle states or touch the registry: `provision` does that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio::sync::OwnedSemaphorePermit;

use super::ProvisionError;
use super::no_plain_password::NoPlainPassword;
use crate::crypto::Secret;
use crate::pool::{BackendTls, ServerBudget, ServerConfig};

/// Timeout for opening one provisioning connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection budgets of backend servers, by server name. Inside the proxy, build it from
/// the pool map's budgets so provisioning and migration connections count against the same
/// limit as tenant pools:
///
/// ```ignore
/// let budgets = Budgets::new(
///     config.servers.iter().filter_map(|s| pools.budget(&s.name).cloned()),
///     Duration::from_millis(config.pool.checkout_timeout_ms),
/// );
/// ```
///
/// The CLI passes `None` wherever an `Option<&Budgets>` is asked for. A server with no budget
/// here is not limited. Each backend connection provisioning opens holds one permit until it
/// is closed (create: one admin connection, then one tenant connection, never both at once;
/// migrate: one tenant connection per tenant in flight). Unlike a tenant pool, provisioning
/// only waits in line for a permit; it does not close other tenants' idle connections to
/// make room.
#[derive(Debug, Clone, Default)]
pub struct Budgets {
    by_server: HashMap<String, Arc<ServerBudget>>,
    /// How long to wait for a permit before giving up.
    wait: Duration,
}

impl Budgets {
    /// Budgets that wait up to `wait` for a permit (the proxy uses `pool.checkout_timeout_ms`).
    pub fn new(budgets: impl IntoIterator<Item = Arc<ServerBudget>>, wait: Duration) -> Budgets {
        Budgets {
            by_server: budgets
                .into_iter()
                .map(|b| (b.server().to_owned(), b))
                .collect(),
            wait,
        }
    }

    /// A permit of `server`'s budget, or `None` when that server has no budget here.
    async fn permit(&self, server: &str) -> Result<Option<OwnedSemaphorePermit>, ProvisionError> {
        let Some(budget) = self.by_server.get(server) else {
            return Ok(None);
        };
        match budget.acquire(self.wait).await {
            Some(permit) => Ok(Some(permit)),
            None => Err(ProvisionError::BudgetExhausted {
                server: server.to_owned(),
                max: budget.max_connections(),
                waited_ms: u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// A provisioning connection; its budget permit (if any) lives in the connection task and is
/// given back when the connection ends. `close` waits for that.
pub(super) struct BackendClient {
    client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for BackendClient {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl std::ops::DerefMut for BackendClient {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Client {
        &mut self.client
    }
}

impl BackendClient {
    /// Ends the session (Terminate) and waits until the socket is closed, so the server's
    /// backend is gone (and the budget permit back) when this returns.
    pub(super) async fn close(self) {
        drop(self.client);
        drop(self.task.await);
    }
}

/// Takes the budget permit first (so a spent budget is its own error), then connects with the
/// server's TLS setting.
async fn connect_budgeted(
    pg: &mut tokio_postgres::Config,
    server: &ServerConfig,
    budgets: Option<&Budgets>,
) -> Result<Result<BackendClient, tokio_postgres::Error>, ProvisionError> {
    let tls = BackendTls::from_server(server).map_err(|source| ProvisionError::BackendTls {
        server: server.name.clone(),
        source,
    })?;
    let (ssl_mode, connector) = tls.postgres_tls();
    pg.ssl_mode(ssl_mode);
    let permit = match budgets {
        Some(b) => b.permit(&server.name).await?,
        None => None,
    };
    let connected = pg.connect(connector).await;
    // libpq's prefer, as tenant pools do it: a failed TLS handshake is retried in plaintext,
    // where no cleartext or md5 password is sent (see `no_plain_password`).
    if ssl_mode == tokio_postgres::config::SslMode::Prefer
        && connected.as_ref().is_err_and(is_tls_failure)
    {
        tracing::warn!(server = %server.name, "TLS handshake failed; retrying in plaintext (tls = prefer)");
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let tcp = match tokio::net::TcpStream::connect((server.host.as_str(), server.port)).await {
            Ok(tcp) => tcp,
            Err(e) => {
                // Let tokio-postgres say it, as for any other connect failure.
                tracing::debug!(error = %e, "plaintext retry could not connect");
                return Ok(pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map(|(client, connection)| spawned(client, connection, permit)));
            }
        };
        let guarded = NoPlainPassword::new(tcp);
        return Ok(pg
            .connect_raw(guarded, tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| spawned(client, connection, permit)));
    }
    Ok(connected.map(|(client, connection)| spawned(client, connection, permit)))
}

/// Drives `connection` in a task that gives the budget permit back when it ends.
fn spawned<S, T>(
    client: tokio_postgres::Client,
    connection: tokio_postgres::Connection<S, T>,
    permit: Option<OwnedSemaphorePermit>,
) -> BackendClient
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "provisioning connection ended");
        }
        drop(permit);
    });
    BackendClient { client, task }
}

/// Whether a connection failed in the TLS handshake (rustls' error somewhere in its causes).
fn is_tls_failure(e: &tokio_postgres::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cause {
        let rustls_io = match err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => inner.is::<rustls::Error>(),
            None => false,
        };
        if rustls_io || err.is::<rustls::Error>() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Opens an admin connection to a backend server's `database`.
pub(super) async fn connect_admin(
    server: &ServerConfig,
    database: &str,
    budgets: Option<&Budgets>,
) -> Result<BackendClient, ProvisionError> {
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
        .connect_timeout(CONNECT_TIMEOUT);
    connect_budgeted(&mut pg, server, budgets)
        .await?
        .map_err(|source| ProvisionError::Backend {
            server: server.name.clone(),
            what: format!("connecting as {}", server.admin_user),
            source,
        })
}

/// Opens a connection to a tenant's database as the tenant's own backend role, so the objects
/// migrations create belong to the tenant.
pub(super) async fn connect_tenant(
    server: &ServerConfig,
    database: &str,
    role: &str,
    password: &Secret,
    budgets: Option<&Budgets>,
) -> Result<BackendClient, ProvisionError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&server.host)
        .port(server.port)
        .user(role)
        .password(password.expose())
        .dbname(database)
        .application_name("tenantgate-migrate")
        .connect_timeout(CONNECT_TIMEOUT);
    connect_budgeted(&mut pg, server, budgets)
        .await?
        .map_err(|source| ProvisionError::Backend {
            server: server.name.clone(),
            what: format!("connecting to database {database} as {role}"),
            source,
        })
}

/// Checks that `role` can log in to `database` with `password` (no budget: used by `register`
/// from the CLI).
pub(super) async fn check_login(
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
        .connect_timeout(CONNECT_TIMEOUT);
    let client = connect_budgeted(&mut pg, server, None)
        .await?
        .map_err(ProvisionError::CannotConnect)?;
    let powers = client
        .query_one(
            "SELECT rolsuper, rolcreaterole, rolreplication, rolbypassrls \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await;
    client.close().await;
    let powers = powers.map_err(|source| ProvisionError::Backend {
        server: server.name.clone(),
        what: format!("reading the attributes of role {role}"),
        source,
    })?;
    // Each reaches past the tenant's own database: a superuser anywhere, CREATEROLE into
    // other roles (before PostgreSQL 16, almost a superuser), REPLICATION the whole cluster's
    // WAL, BYPASSRLS every row-level policy.
    for (index, attribute) in ["SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"]
        .into_iter()
        .enumerate()
    {
        if powers.try_get::<_, bool>(index).unwrap_or(true) {
            return Err(ProvisionError::PowerfulRole {
                role: role.to_owned(),
                attribute,
            });
        }
    }
    Ok(())
}

/// Creates the role and the database; on failure removes what it created.
pub(super) async fn create_role_and_database(
    server: &ServerConfig,
    database: &str,
    role: &str,
    password: &Secret,
    budgets: Option<&Budgets>,
) -> Result<(), ProvisionError> {
    let admin = connect_admin(server, &server.admin_database, budgets).await?;
    let result = create_with(&admin, server, database, role, password).await;
    admin.close().await;
    result
}

async fn create_with(
    admin: &tokio_postgres::Client,
    server: &ServerConfig,
    database: &str,
    role: &str,
    password: &Secret,
) -> Result<(), ProvisionError> {
    let backend = |what: String| {
        let name = server.name.clone();
        move |source| ProvisionError::Backend {
            server: name,
            what,
            source,
        }
    };
    let verifier = crate::auth::scram_verifier(password).await;
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
        drop_quietly(admin, &drop_role_sql(role)).await;
        return Err(backend(format!("creating database {database}"))(e));
    }
    let revoke = format!(
        "REVOKE ALL ON DATABASE {} FROM PUBLIC",
        escape_identifier(database)
    );
    if let Err(e) = admin.batch_execute(&revoke).await {
        drop_quietly(admin, &drop_database_sql(database)).await;
        drop_quietly(admin, &drop_role_sql(role)).await;
        return Err(backend(format!("revoking PUBLIC access to {database}"))(e));
    }
    Ok(())
}

/// `DROP DATABASE ... WITH (FORCE)` terminates the sessions still connected (PostgreSQL ≥ 13).
fn drop_database_sql(database: &str) -> String {
    format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        escape_identifier(database)
    )
}

fn drop_role_sql(role: &str) -> String {
    format!("DROP ROLE IF EXISTS {}", escape_identifier(role))
}

async fn drop_quietly(admin: &tokio_postgres::Client, sql: &str) {
    if let Err(e) = admin.batch_execute(sql).await {
        tracing::warn!(error = %e, sql, "cleanup after a failed provisioning step failed");
    }
}

/// Drops a tenant's database (disconnecting its sessions) and then its role. Either may be
/// gone already.
pub(super) async fn drop_database_and_role(
    server: &ServerConfig,
    database: &str,
    role: &str,
    budgets: Option<&Budgets>,
) -> Result<(), ProvisionError> {
    let admin = connect_admin(server, &server.admin_database, budgets).await?;
    let mut result = admin
        .batch_execute(&drop_database_sql(database))
        .await
        .map_err(|source| ProvisionError::Backend {
            server: server.name.clone(),
            what: format!("dropping database {database}"),
            source,
        });
    if result.is_ok() {
        result = admin
            .batch_execute(&drop_role_sql(role))
            .await
            .map_err(|source| ProvisionError::Backend {
                server: server.name.clone(),
                what: format!("dropping role {role}"),
                source,
            });
    }
    admin.close().await;
    result
}
