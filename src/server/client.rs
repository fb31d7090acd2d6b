//! One client's path, top to bottom: startup packet → authentication → tenant record → pool
//! checkout → session. Setup returns typed values; errors from setup are sent to the client
//! here, in one place, as a FATAL ErrorResponse with the error's own SQLSTATE.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::State;
use crate::admin;
use crate::auth::{self, AuthError, Credential, ScramSecret};
use crate::clients::ClientEntry;
use crate::error::{ClientFacing, ErrorKind, log_error};
use crate::protocol::startup::{self, FirstPacket, StartupError, StartupMessage};
use crate::protocol::{SqlState, messages};
use crate::registry::{RegistryError, TenantRecord, TenantSlug, TenantState};
use crate::session::settings::{self, SettingsError};
use crate::session::{self, RelayEnd, SessionContext, SessionEnd, SessionError};

/// Why a client connection ended; logged once when its task ends.
#[derive(Debug)]
pub enum CloseReason {
    /// A cancel request was handled (forwarded or dropped).
    CancelRequest,
    /// The session ended the way the relay saw it.
    Session(RelayEnd),
    /// tenantgate is shutting down.
    Shutdown,
    /// The client did not finish logging in within the login timeout.
    LoginTimeout,
    /// The client went away during startup or authentication.
    LeftDuringLogin,
    /// An error was sent to the client (its SQLSTATE).
    Error(SqlState),
}

impl CloseReason {
    pub fn log(&self) {
        match self {
            CloseReason::Error(code) => {
                tracing::debug!(sqlstate = code.code(), "connection closed after an error");
            }
            other => tracing::debug!(reason = %other, "connection closed"),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::CancelRequest => f.write_str("cancel request"),
            CloseReason::Session(RelayEnd::ClientTerminated) => f.write_str("client terminated"),
            CloseReason::Session(RelayEnd::ClientClosed) => f.write_str("client closed socket"),
            CloseReason::Session(RelayEnd::BackendClosed) => f.write_str("backend closed"),
            CloseReason::Session(RelayEnd::Idle) => f.write_str("idle"),
            CloseReason::Shutdown => f.write_str("shutdown"),
            CloseReason::LoginTimeout => f.write_str("login timeout"),
            CloseReason::LeftDuringLogin => f.write_str("client left during login"),
            CloseReason::Error(code) => write!(f, "error {}", code.code()),
        }
    }
}

/// Everything that can stop a client before its session starts.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("no user name in the startup packet")]
    NoUser,
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("tenant {slug} is {state}")]
    TenantNotActive {
        slug: TenantSlug,
        state: TenantState,
    },
    #[error("login did not finish within {0:?}")]
    Timeout(Duration),
    #[error("{0} is not an admin user")]
    NotAdmin(String),
}

impl ClientFacing for LoginError {
    fn sqlstate(&self) -> SqlState {
        match self {
            LoginError::Startup(e) => e.sqlstate(),
            LoginError::NoUser | LoginError::NotAdmin(_) => SqlState::INVALID_AUTHORIZATION,
            LoginError::Settings(SettingsError::Replication) => SqlState::FEATURE_NOT_SUPPORTED,
            LoginError::Settings(_) | LoginError::Timeout(_) => SqlState::PROTOCOL_VIOLATION,
            LoginError::Auth(e) => e.sqlstate(),
            LoginError::Registry(e) => e.sqlstate(),
            LoginError::TenantNotActive { .. } => SqlState::CANNOT_CONNECT_NOW,
        }
    }

    fn client_message(&self) -> String {
        match self {
            LoginError::Startup(e) => e.client_message(),
            LoginError::NoUser => "no PostgreSQL user name specified in startup packet".to_owned(),
            LoginError::Settings(e) => e.to_string(),
            LoginError::Auth(e) => e.client_message(),
            LoginError::Registry(e) => e.client_message(),
            LoginError::TenantNotActive { slug, state } => {
                format!("tenant \"{slug}\" is {state} and does not accept connections")
            }
            LoginError::Timeout(_) => "canceling authentication due to timeout".to_owned(),
            LoginError::NotAdmin(user) => format!(
                "user \"{user}\" is not an admin user: only admin users may connect to the admin database"
            ),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            LoginError::Startup(e) => e.kind(),
            LoginError::NoUser
            | LoginError::Settings(_)
            | LoginError::Timeout(_)
            | LoginError::NotAdmin(_) => ErrorKind::Client,
            LoginError::Auth(e) => e.kind(),
            LoginError::Registry(e) => e.kind(),
            LoginError::TenantNotActive { .. } => ErrorKind::Limit,
        }
    }
}

/// What the login phase produced.
enum Login {
    /// A CancelRequest, already handled.
    Cancel,
    /// An authenticated client of an active tenant.
    Tenant {
        record: Arc<TenantRecord>,
        user: String,
        settings: Vec<(String, String)>,
    },
    /// An authenticated admin user, for the admin console.
    Admin { user: String },
}

/// Serves one client connection to its end.
pub(super) async fn serve_client(
    state: &State,
    client_id: u64,
    mut stream: TcpStream,
    shutdown: &CancellationToken,
) -> CloseReason {
    let login_timeout = Duration::from_millis(state.config.get().proxy.login_timeout_ms);
    let login = match tokio::time::timeout(login_timeout, login(state, &mut stream)).await {
        Ok(Ok(login)) => login,
        Ok(Err(e)) => return fail(&mut stream, &e).await,
        Err(_) => {
            fail(&mut stream, &LoginError::Timeout(login_timeout)).await;
            return CloseReason::LoginTimeout;
        }
    };
    let peer = stream.peer_addr().ok();
    let (record, user, mut settings) = match login {
        Login::Cancel => return CloseReason::CancelRequest,
        Login::Admin { user } => {
            return serve_admin(state, client_id, stream, &user, shutdown).await;
        }
        Login::Tenant {
            record,
            user,
            settings,
        } => (record, user, settings),
    };
    let limits = state.pools.limits_for(&record);
    // KILL and shutdown end the session through this token.
    let stop = shutdown.child_token();
    let _on_roster = state.clients.join(ClientEntry {
        id: client_id,
        tenant: Some(record.slug.clone()),
        user,
        addr: peer,
        application_name: settings
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        mode: limits.mode.as_str(),
        connected_at: chrono::Utc::now(),
        stop: stop.clone(),
    });
    if let Some(ms) = limits.statement_timeout_ms {
        // The plan's statement_timeout, unless the client chose its own.
        if !settings
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("statement_timeout"))
        {
            settings.insert(0, ("statement_timeout".to_owned(), format!("{ms}ms")));
        }
    }
    tracing::Span::current().record("tenant", record.slug.as_str());
    // Counted from here until this task ends, however the session ends.
    let counted = state.stats.for_tenant(&record.slug).client_connected();
    let ctx = SessionContext {
        tenant: &record,
        directory: &state.directory,
        suspend_grace: Duration::from_secs(state.config.get().proxy.suspend_grace_seconds),
        pools: &state.pools,
        mode: limits.mode,
        client_id,
        cancels: &state.cancels,
        reset_timeout: Duration::from_millis(state.pools.config().reset_timeout_ms),
        max_client_message_bytes: state.config.get().proxy.max_message_bytes,
        statement_cache_size: state.pools.config().prepared_statement_cache_size,
        shutdown: &stop,
        stats: counted.stats(),
    };
    match session::run(&mut stream, &settings, &ctx).await {
        Ok(SessionEnd::Relay(end)) => CloseReason::Session(end),
        Ok(SessionEnd::Shutdown) => CloseReason::Shutdown,
        Ok(SessionEnd::TenantNotActive(_)) => CloseReason::Error(SqlState::CANNOT_CONNECT_NOW),
        Err(e) => fail_session(&mut stream, &e).await,
    }
}

/// Startup and authentication, bounded by the caller's login timeout.
async fn login(state: &State, stream: &mut TcpStream) -> Result<Login, LoginError> {
    let max = state.config.get().proxy.max_startup_packet_bytes;
    let startup = loop {
        match startup::read_first_packet(stream, max).await? {
            // TLS and GSS encryption come later: say no, and the client goes on in the clear
            // (or gives up, if it requires encryption).
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|e| LoginError::Startup(StartupError::Io(e)))?;
            }
            FirstPacket::Cancel { pid, secret } => {
                state
                    .cancels
                    .cancel(pid, secret, Duration::from_secs(5))
                    .await;
                return Ok(Login::Cancel);
            }
            FirstPacket::Startup(message) => break message,
        }
    };
    negotiate_version(stream, &startup).await?;
    let user = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or(LoginError::NoUser)?;
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    tracing::Span::current().record("user", user);
    let settings = settings::client_settings(&startup.params)?;
    if database == state.config.get().admin.database {
        authenticate_admin(state, stream, user).await?;
        return Ok(Login::Admin {
            user: user.to_owned(),
        });
    }
    let record = authenticate(state, stream, database, user).await?;
    if record.state != TenantState::Active {
        return Err(LoginError::TenantNotActive {
            slug: record.slug.clone(),
            state: record.state,
        });
    }
    Ok(Login::Tenant {
        record,
        user: user.to_owned(),
        settings,
    })
}

/// SCRAM against an admin user's verifier (or a mock one). Tenant users are not admin
/// users: the two live in different registry tables.
async fn authenticate_admin<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    stream: &mut S,
    user: &str,
) -> Result<(), LoginError> {
    let verifier = state.directory.registry().admin_verifier(user).await?;
    let credential = match verifier.as_deref().and_then(ScramSecret::parse) {
        Some(secret) => Credential {
            secret,
            is_mock: false,
        },
        None => Credential {
            secret: ScramSecret::mock(&state.mock_key, &format!("\0admin\0{user}")),
            is_mock: true,
        },
    };
    let is_admin = !credential.is_mock;
    match auth::authenticate(stream, user, credential).await {
        // The exchange ran in full either way; only then is a non-admin told why.
        Err(AuthError::Failed { .. }) if !is_admin => Err(LoginError::NotAdmin(user.to_owned())),
        other => Ok(other?),
    }
}

/// Hands an authenticated admin to the console.
async fn serve_admin(
    state: &State,
    client_id: u64,
    stream: TcpStream,
    user: &str,
    shutdown: &CancellationToken,
) -> CloseReason {
    let stop = shutdown.child_token();
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let _on_roster = state.clients.join(ClientEntry {
        id: client_id,
        tenant: None,
        user: user.to_owned(),
        addr: Some(peer),
        application_name: String::new(),
        mode: "admin",
        connected_at: chrono::Utc::now(),
        stop: stop.clone(),
    });
    tracing::info!(user, "admin console session");
    match admin::serve(Arc::clone(&state.admin), stream, user, peer, &stop).await {
        Ok(admin::AdminEnd::Stopped) => CloseReason::Shutdown,
        Ok(admin::AdminEnd::ClientLeft) | Err(_) => {
            CloseReason::Session(RelayEnd::ClientTerminated)
        }
    }
}

/// A client asking for protocol 3.x (x > 0) or `_pq_.` options is told what we speak: 3.0 and
/// none of the options.
async fn negotiate_version<S: AsyncWrite + Unpin>(
    stream: &mut S,
    startup: &StartupMessage,
) -> Result<(), LoginError> {
    let unrecognized: Vec<String> = startup
        .params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if startup.minor_version == 0 && unrecognized.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    messages::negotiate_protocol_version(&mut out, 0, &unrecognized);
    stream
        .write_all(&out)
        .await
        .map_err(|e| LoginError::Startup(StartupError::Io(e)))
}

/// SCRAM against the stored verifier of (tenant, user), or against a mock one, so unknown
/// tenants, unknown users and wrong passwords fail alike.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    stream: &mut S,
    database: &str,
    user: &str,
) -> Result<Arc<TenantRecord>, LoginError> {
    let slug = TenantSlug::parse(database);
    let record = match &slug {
        Some(slug) => state.directory.tenant(slug).await?,
        None => None,
    };
    let verifier = match &record {
        Some(r) => state.directory.verifier(&r.slug, user).await?,
        None => None,
    };
    let real = verifier.as_deref().and_then(ScramSecret::parse);
    let credential = match real {
        Some(secret) => Credential {
            secret,
            is_mock: false,
        },
        None => Credential {
            secret: ScramSecret::mock(&state.mock_key, &format!("{database}\0{user}")),
            is_mock: true,
        },
    };
    auth::authenticate(stream, user, credential).await?;
    record.ok_or_else(|| {
        LoginError::Auth(AuthError::Failed {
            user: user.to_owned(),
        })
    })
}

/// Sends a setup error to the client as FATAL and logs it.
async fn fail<S: AsyncWrite + Unpin>(stream: &mut S, err: &LoginError) -> CloseReason {
    if matches!(
        err,
        LoginError::Auth(AuthError::ClientLeft) | LoginError::Startup(StartupError::Eof)
    ) {
        return CloseReason::LeftDuringLogin;
    }
    log_error(err, "login failed");
    send_fatal(stream, err).await;
    CloseReason::Error(err.sqlstate())
}

async fn fail_session<S: AsyncWrite + Unpin>(stream: &mut S, err: &SessionError) -> CloseReason {
    log_error(err, "session failed");
    match err {
        // The backend's own ErrorResponse says it best.
        SessionError::SettingRejected(server_error) => {
            drop(stream.write_all(&server_error.raw).await);
        }
        _ => send_fatal(stream, err).await,
    }
    CloseReason::Error(err.sqlstate())
}

async fn send_fatal<S: AsyncWrite + Unpin, E: ClientFacing + Sync>(stream: &mut S, err: &E) {
    let mut out = BytesMut::new();
    messages::error_response(
        &mut out,
        messages::Severity::Fatal,
        err.sqlstate(),
        &err.client_message(),
        None,
    );
    // The client may already be gone; there is nobody left to tell.
    drop(
        tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&out).await?;
            stream.flush().await
        })
        .await,
    );
}
