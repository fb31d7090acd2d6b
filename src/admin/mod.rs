//! The admin console: a virtual database (default name `tenantgate`) that tenantgate serves
//! itself. Admin users (SCRAM verifiers in the registry's `admin_users`) connect with any
//! PostgreSQL client and manage tenants in SQL: SHOW and SELECT over live state, CREATE
//! TENANT, MIGRATE, SUSPEND, KILL...
//!
//! Moving parts: `command` (parsing, with sqlparser), `select` (SELECT over a virtual
//! table), `catalog` (the virtual tables), `exec` (dispatch: which file runs a command),
//! `lifecycle` (create, register, suspend, resume, kill, drop and migrate tenants), `users`
//! (users, auth methods, domains), `plans` (ALTER TENANT ... SET PLAN / SET / RESET, SHOW
//! PLANS), `reload` (RELOAD and the config diff), `keys` (master key
//! rotation), `pause` (PAUSE/RESUME), `broadcast` (those
//! commands on every other instance, by NOTIFY through the registry), `handler` (pgwire's query handlers), `table` (typed
//! values), `usage` (SHOW STATS), `error` (SQLSTATEs).
//! The server module authenticates the admin and hands the socket to [`serve`], which drives
//! pgwire's per-message processing. This module must not reach into a session's internals;
//! it sees clients through the roster and pools through the pool map. Its `[admin]` section,
//! [`AdminConfig`], lives in `config`: the console reads the whole config (SHOW CONFIG,
//! RELOAD), so the arrow points from here to `config` and not back.

mod broadcast;
mod catalog;
mod command;
mod error;
mod exec;
mod handler;
mod keys;
mod lifecycle;
mod pause;
mod plans;
mod reload;
mod select;
mod table;
mod usage;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt as _;
use pgwire::api::{ClientInfo as _, DefaultClient, NoopHandler, PgWireConnectionState};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::tokio::server::{PgWireMessageServerCodec, process_error, process_message};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub use broadcast::spawn_runner;
pub use error::AdminError;

use crate::clients::ClientRoster;
use crate::config::{AdminConfig, LiveConfig};
use crate::crypto::{MasterKey, Secret};
use crate::pool::PoolMap;
use crate::protocol::{SqlState, messages};
use crate::registry::{Registry, RegistryError, TenantDirectory};
use crate::stats::Stats;
use crate::tls::SharedTls;
use handler::AdminHandler;

/// Creates the bootstrap admin user (`admin.bootstrap_user`) if the config names one and it
/// does not exist; an existing user keeps its password.
pub async fn bootstrap(config: &AdminConfig, registry: &Registry) -> Result<(), RegistryError> {
    let Some(user) = &config.bootstrap_user else {
        return Ok(());
    };
    let from_env = config
        .bootstrap_password_env
        .as_ref()
        .and_then(|var| std::env::var(var).ok())
        .map(Secret::from);
    let Some(password) = from_env.or_else(|| config.bootstrap_password.clone()) else {
        tracing::warn!(
            user,
            "admin.bootstrap_user has no password set; not created"
        );
        return Ok(());
    };
    let verifier = crate::auth::scram_verifier(&password).await;
    if registry.set_admin_user(user, &verifier, false).await? {
        tracing::info!(user, "admin user created from the config");
    }
    Ok(())
}

/// What the console works on; built once by the server and shared by admin sessions.
pub struct AdminContext {
    pub config: LiveConfig,
    pub registry: Registry,
    pub directory: TenantDirectory,
    pub pools: PoolMap,
    pub clients: ClientRoster,
    pub key: MasterKey,
    pub stats: Stats,
    /// Client TLS, which RELOAD replaces.
    pub tls: SharedTls,
    /// This instance's id in the registry's `instances` (SHOW INSTANCES marks its row).
    pub instance_id: String,
}

/// RELOAD outside a console session (SIGHUP): applies the config file and TLS files as the
/// admin command does, and returns its summary line.
pub async fn reload(ctx: &AdminContext, actor: &str) -> Result<String, AdminError> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let progress = exec::Progress::new(sender);
    reload::reload_config(ctx, actor, &progress).await?;
    drop(progress);
    let mut receiver = receiver;
    let mut said = Vec::new();
    while let Some(line) = receiver.recv().await {
        said.push(line);
    }
    Ok(said.join("; "))
}

impl std::fmt::Debug for AdminContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminContext").finish_non_exhaustive()
    }
}

/// How an admin session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminEnd {
    /// The client sent Terminate or closed its socket.
    ClientLeft,
    /// KILL or shutdown.
    Stopped,
}

/// Who an admin session is for.
#[derive(Debug, Clone, Copy)]
pub struct Session<'a> {
    pub user: &'a str,
    pub peer: SocketAddr,
    /// The client connected over TLS.
    pub secure: bool,
}

/// Serves an authenticated admin on `stream` (AuthenticationOk already sent) until it leaves
/// or `stop` fires. The stream is plain TCP or TLS.
pub async fn serve<S>(
    ctx: Arc<AdminContext>,
    mut stream: S,
    session: &Session<'_>,
    stop: &CancellationToken,
) -> std::io::Result<AdminEnd>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let user = session.user;
    greet(&mut stream, user).await?;
    let mut client = DefaultClient::new(session.peer, session.secure);
    client.set_state(PgWireConnectionState::ReadyForQuery);
    let mut socket = Framed::new(stream, PgWireMessageServerCodec::new(client));
    let handler = Arc::new(AdminHandler::new(ctx, user));
    let noop = Arc::new(NoopHandler);
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            () = stop.cancelled() => {
                let mut out = BytesMut::new();
                messages::error_response(
                    &mut out,
                    messages::Severity::Fatal,
                    SqlState::ADMIN_SHUTDOWN,
                    "terminating connection due to administrator command",
                    None,
                );
                drop(socket.get_mut().write_all(&out).await);
                return Ok(AdminEnd::Stopped);
            }
        };
        let message = match message {
            Some(Ok(PgWireFrontendMessage::Terminate(_))) | None => {
                return Ok(AdminEnd::ClientLeft);
            }
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::info!(error = %e, "admin client sent an unreadable message");
                let mut out = BytesMut::new();
                messages::error_response(
                    &mut out,
                    messages::Severity::Fatal,
                    SqlState::PROTOCOL_VIOLATION,
                    "invalid message from the client",
                    None,
                );
                drop(socket.get_mut().write_all(&out).await);
                return Ok(AdminEnd::ClientLeft);
            }
        };
        let extended = message.is_extended_query();
        if let Err(e) = process_message(
            message,
            &mut socket,
            Arc::clone(&noop),
            Arc::clone(&handler),
            Arc::clone(&handler),
            Arc::clone(&noop),
            Arc::clone(&noop),
        )
        .await
        {
            let fatal = e.is_fatal();
            process_error(&mut socket, e, extended).await?;
            if fatal {
                return Ok(AdminEnd::ClientLeft);
            }
        }
    }
}

/// ParameterStatus the way a PostgreSQL server sends them, BackendKeyData (cancel is not
/// supported on the console: the key matches nothing) and ReadyForQuery.
async fn greet<S: AsyncWrite + Unpin>(stream: &mut S, user: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for (name, value) in [
        ("server_version", "16.0 (tenantgate admin)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "off"),
        ("session_authorization", user),
        ("application_name", ""),
    ] {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, 0, 0);
    messages::ready_for_query(&mut out, b'I');
    stream.write_all(&out).await?;
    stream.flush().await
}
