//! One client's path, top to bottom: encryption (SSLRequest, direct TLS) → startup packet →
//! route (SNI, database name) → authentication → tenant record → pool checkout → session.
//! Setup returns typed values; errors from setup are sent to the client here, in one place, as
//! a FATAL ErrorResponse with the error's own SQLSTATE.
//!
//! After the encryption decision the rest of the path is generic over the stream and is
//! instantiated twice, for `TcpStream` and for `TlsStream<TcpStream>`, so plaintext clients
//! relay on the bare socket exactly as before TLS existed.
//!
//! The TLS setup (acceptor, channel-binding hash, SNI rule) is read once per connection, so a
//! reload in the middle of a login cannot mix two certificates.
//!
//! Routing with TLS: when the client's SNI is exactly a tenant's custom domain
//! (`tenant_domains`), or `tls.sni_base_domain` is set and the SNI is `<tenant>.<base>`, the
//! SNI names the tenant and the database name is not used for routing
//! (even the admin database name: the console is reached only without a tenant SNI). After
//! authentication, a database name that is another existing tenant is refused (28000), so a
//! client cannot believe it reached one tenant while it reached another; checking only after
//! authentication keeps unauthenticated clients from probing which tenants exist.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::State;
use super::login_slot::{LoginSlot, NoSlot};
use crate::admin;
use crate::auth::method::{Proof, authenticate_by_method};
use crate::auth::throttle::{LoginThrottle, Target, Throttled};
use crate::auth::{self, AuthError, Credential, ScramSecret};
use crate::clients::ClientEntry;
use crate::error::{ClientFacing, ErrorKind, log_error};
use crate::protocol::startup::{self, FirstPacket, StartupError, StartupMessage};
use crate::protocol::{SqlState, messages};
use crate::registry::{
    AuthMethod, RegistryError, TenantRecord, TenantSlug, TenantState, normalize_domain,
};
use crate::session::settings::{self, SettingsError};
use crate::session::{self, RelayEnd, SessionContext, SessionEnd, SessionError};
use crate::tls::{ALPN_POSTGRESQL, TLS_HANDSHAKE_RECORD, TlsInfo, TlsMode, TlsServer};

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
    /// The TLS handshake failed (nothing could be sent to the client).
    TlsHandshakeFailed,
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
            CloseReason::TlsHandshakeFailed => f.write_str("TLS handshake failed"),
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
    #[error(transparent)]
    Throttled(#[from] Throttled),
    #[error("no login slot free within {0:?}")]
    TooManyLogins(Duration),
    #[error("login did not finish within {0:?}")]
    Timeout(Duration),
    #[error("{0} is not an admin user")]
    NotAdmin(String),
    #[error("plaintext login refused: tls.mode is require")]
    TlsRequired,
    #[error("SSLRequest or GSSENCRequest over an encrypted connection")]
    EncryptionRequestOverTls,
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    #[error("database {database:?} is another tenant than SNI {server_name:?} (tenant {tenant:?})")]
    SniMismatch {
        server_name: String,
        tenant: String,
        database: String,
    },
}

impl From<NoSlot> for LoginError {
    fn from(NoSlot(waited): NoSlot) -> Self {
        LoginError::TooManyLogins(waited)
    }
}

impl ClientFacing for LoginError {
    fn sqlstate(&self) -> SqlState {
        match self {
            LoginError::Startup(e) => e.sqlstate(),
            LoginError::NoUser
            | LoginError::NotAdmin(_)
            | LoginError::TlsRequired
            | LoginError::SniMismatch { .. } => SqlState::INVALID_AUTHORIZATION,
            LoginError::EncryptionRequestOverTls | LoginError::DirectTlsWithoutAlpn => {
                SqlState::PROTOCOL_VIOLATION
            }
            LoginError::Settings(SettingsError::Replication) => SqlState::FEATURE_NOT_SUPPORTED,
            LoginError::Settings(_) | LoginError::Timeout(_) => SqlState::PROTOCOL_VIOLATION,
            LoginError::Auth(e) => e.sqlstate(),
            LoginError::Registry(e) => e.sqlstate(),
            LoginError::TenantNotActive { .. } => SqlState::CANNOT_CONNECT_NOW,
            LoginError::Throttled(_) | LoginError::TooManyLogins(_) => {
                SqlState::TOO_MANY_CONNECTIONS
            }
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
            LoginError::TooManyLogins(_) => {
                "sorry, too many logins in progress; try again later".to_owned()
            }
            LoginError::Throttled(t) => format!(
                "too many failed login attempts; try again later (in {} seconds)",
                t.retry_after.as_secs().max(1)
            ),
            LoginError::NotAdmin(user) => format!(
                "user \"{user}\" is not an admin user: only admin users may connect to the admin database"
            ),
            LoginError::TlsRequired => "this server requires TLS: connect with sslmode=require \
                 (or verify-ca, verify-full)"
                .to_owned(),
            LoginError::EncryptionRequestOverTls => {
                "SSLRequest or GSSENCRequest received over an encrypted connection".to_owned()
            }
            LoginError::DirectTlsWithoutAlpn => "received direct SSL connection request \
                 without ALPN protocol negotiation extension"
                .to_owned(),
            LoginError::SniMismatch {
                server_name,
                tenant,
                database,
            } => format!(
                "database \"{database}\" does not match tenant \"{tenant}\" named by the TLS \
                 server name \"{server_name}\": connect to {server_name} without a database name, \
                 or with database \"{tenant}\""
            ),
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            LoginError::Startup(e) => e.kind(),
            LoginError::NoUser
            | LoginError::Settings(_)
            | LoginError::Timeout(_)
            | LoginError::NotAdmin(_)
            | LoginError::TlsRequired
            | LoginError::EncryptionRequestOverTls
            | LoginError::DirectTlsWithoutAlpn
            | LoginError::SniMismatch { .. } => ErrorKind::Client,
            LoginError::Auth(e) => e.kind(),
            LoginError::Registry(e) => e.kind(),
            LoginError::TenantNotActive { .. }
            | LoginError::Throttled(_)
            | LoginError::TooManyLogins(_) => ErrorKind::Limit,
        }
    }
}

/// Who tried to log in, as far as the startup packet said: for the audit line.
#[derive(Debug, Default)]
struct LoginAttempt {
    /// The admin console rather than a tenant.
    admin: bool,
    /// The tenant (database name or SNI tenant) asked for.
    tenant: String,
    user: String,
}

/// The audit line of one login (target `tenantgate::audit`, info): who, from where, and how it
/// ended. No secret is in any of these fields.
fn audit_login(peer: Option<SocketAddr>, who: &LoginAttempt, result: &Result<Login, LoginError>) {
    let (outcome, reason) = match result {
        Ok(Login::Cancel) => return,
        Ok(Login::Tenant { .. } | Login::Admin { .. }) => ("ok", String::new()),
        Err(
            LoginError::Auth(
                AuthError::Failed { .. }
                | AuthError::CertificateRequired { .. }
                | AuthError::CertificateMismatch { .. },
            )
            | LoginError::NotAdmin(_),
        ) => ("failed auth", String::new()),
        Err(LoginError::Auth(AuthError::ClientLeft) | LoginError::Startup(StartupError::Eof)) => {
            ("abandoned", String::new())
        }
        Err(e) => ("refused", format!("{} {e}", e.sqlstate().code())),
    };
    audit_line(peer, who, outcome, &reason);
}

fn audit_line(peer: Option<SocketAddr>, who: &LoginAttempt, outcome: &str, reason: &str) {
    tracing::info!(
        target: "tenantgate::audit",
        event = "login",
        kind = if who.admin { "admin" } else { "tenant" },
        tenant = %who.tenant,
        user = %who.user,
        source = %peer.map(|p| p.to_string()).unwrap_or_default(),
        outcome,
        reason,
        "login"
    );
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

/// How the client chose to talk, decided on the raw socket.
enum Opening {
    /// Plaintext; the first packet after any refused encryption requests.
    Plain(FirstPacket),
    /// TLS: after SSLRequest answered `S`, or direct (the first byte was a ClientHello).
    Tls { direct: bool },
}

/// A client socket after the encryption decision, with what the login path needs to know.
struct Conn<S> {
    stream: S,
    peer: Option<SocketAddr>,
    /// Present when the client speaks TLS.
    tls: Option<TlsInfo>,
    /// The TLS setup current when the client connected (a reload does not change it midway).
    tls_setup: Arc<TlsServer>,
}

/// Serves one client connection to its end.
pub(super) async fn serve_client(
    state: &State,
    client_id: u64,
    mut stream: TcpStream,
    shutdown: &CancellationToken,
) -> CloseReason {
    let peer = stream.peer_addr().ok();
    // Held from here to the end of authentication: stalled or slow logins take slots, not
    // the whole process. Waiting briefly smooths a burst; past that the client is told.
    let slot_wait = Duration::from_millis(state.config.get().proxy.login_slot_wait_ms);
    let login_slot = match LoginSlot::take(&state.login_slots, slot_wait).await {
        Ok(slot) => slot,
        Err(full) => {
            let err = LoginError::from(full);
            // Nothing is known yet but where it came from.
            let reason = format!("{} {err}", err.sqlstate().code());
            audit_line(peer, &LoginAttempt::default(), "refused", &reason);
            return fail(&mut stream, &err).await;
        }
    };
    let login_timeout = Duration::from_millis(state.config.get().proxy.login_timeout_ms);
    // One deadline for the whole login: encryption, TLS handshake, startup and SCRAM.
    let deadline = Instant::now() + login_timeout;
    let tls_setup = state.tls.current();
    let opening =
        match tokio::time::timeout_at(deadline, encryption(state, &tls_setup, &mut stream)).await {
            Ok(Ok(opening)) => opening,
            Ok(Err(e)) => return fail(&mut stream, &e).await,
            Err(_) => {
                fail(&mut stream, &LoginError::Timeout(login_timeout)).await;
                return CloseReason::LoginTimeout;
            }
        };
    let direct = match opening {
        Opening::Tls { direct } => direct,
        Opening::Plain(first) => {
            let conn = Conn {
                stream,
                peer,
                tls: None,
                tls_setup,
            };
            return serve_login(
                state,
                client_id,
                conn,
                Some(first),
                (deadline, login_slot),
                shutdown,
            )
            .await;
        }
    };
    // encryption() picks TLS only when there is an acceptor.
    let Some(acceptor) = tls_setup.acceptor() else {
        return CloseReason::TlsHandshakeFailed;
    };
    let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(error = %e, direct, "TLS handshake failed");
            return CloseReason::TlsHandshakeFailed;
        }
        Err(_) => return CloseReason::LoginTimeout,
    };
    // PostgreSQL 17 insists on ALPN for direct TLS, so that a TLS connection meant for another
    // protocol cannot be replayed at a PostgreSQL server.
    if direct && tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return fail(&mut tls, &LoginError::DirectTlsWithoutAlpn).await;
    }
    let info = tls_setup.info(&tls);
    tracing::debug!(direct, sni = info.server_name.as_deref(), "TLS established");
    let conn = Conn {
        stream: tls,
        peer,
        tls: Some(info),
        tls_setup,
    };
    // Boxed: the TLS stream makes this future large, and only TLS clients pay for the box.
    Box::pin(serve_login(
        state,
        client_id,
        conn,
        None,
        (deadline, login_slot),
        shutdown,
    ))
    .await
}

/// Login and session over the chosen stream.
async fn serve_login<S>(
    state: &State,
    client_id: u64,
    mut conn: Conn<S>,
    first: Option<FirstPacket>,
    (deadline, mut login_slot): (Instant, LoginSlot),
    shutdown: &CancellationToken,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let login_timeout = Duration::from_millis(state.config.get().proxy.login_timeout_ms);
    let mut who = LoginAttempt::default();
    let login = tokio::time::timeout_at(
        deadline,
        login(state, &mut conn, first, &mut who, &mut login_slot),
    )
    .await;
    drop(login_slot);
    let login = login.unwrap_or(Err(LoginError::Timeout(login_timeout)));
    if !who.user.is_empty() {
        audit_login(conn.peer, &who, &login);
    }
    let login = match login {
        Ok(login) => login,
        Err(e @ LoginError::Timeout(_)) => {
            fail(&mut conn.stream, &e).await;
            return CloseReason::LoginTimeout;
        }
        Err(e) => return fail(&mut conn.stream, &e).await,
    };
    let peer = conn.peer;
    let (record, user, mut settings) = match login {
        Login::Cancel => return CloseReason::CancelRequest,
        Login::Admin { user } => {
            return serve_admin(state, client_id, conn, &user, shutdown).await;
        }
        Login::Tenant {
            record,
            user,
            settings,
        } => (record, user, settings),
    };
    let mut stream = conn.stream;
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
        tls: conn
            .tls
            .as_ref()
            .map(|t| t.cipher.clone())
            .unwrap_or_default(),
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

/// Decides on the raw socket whether the client speaks TLS: a direct TLS ClientHello, or
/// SSLRequest answered `S` when TLS is on (`N` otherwise, and for GSSENCRequest: the client
/// goes on in the clear, or gives up if it requires encryption).
async fn encryption(
    state: &State,
    tls: &TlsServer,
    stream: &mut TcpStream,
) -> Result<Opening, LoginError> {
    let io = |e| LoginError::Startup(StartupError::Io(e));
    if tls.acceptor().is_some() {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.map_err(io)? == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            return Ok(Opening::Tls { direct: true });
        }
    }
    let max = state.config.get().proxy.max_startup_packet_bytes;
    loop {
        match startup::read_first_packet(stream, max).await? {
            FirstPacket::SslRequest if tls.acceptor().is_some() => {
                // Nothing after the SSLRequest has been read: whatever the client sent next
                // goes to the TLS handshake (no plaintext injected before it, CVE-2021-23222).
                stream.write_all(b"S").await.map_err(io)?;
                return Ok(Opening::Tls { direct: false });
            }
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                stream.write_all(b"N").await.map_err(io)?;
            }
            other => return Ok(Opening::Plain(other)),
        }
    }
}

/// Startup, routing and authentication, bounded by the caller's login deadline.
async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    conn: &mut Conn<S>,
    first: Option<FirstPacket>,
    who: &mut LoginAttempt,
    slot: &mut LoginSlot,
) -> Result<Login, LoginError> {
    let stream = &mut conn.stream;
    let packet = match first {
        Some(packet) => packet,
        None => {
            startup::read_first_packet(stream, state.config.get().proxy.max_startup_packet_bytes)
                .await?
        }
    };
    let startup = match packet {
        FirstPacket::Startup(message) => message,
        // A cancel carries its own secret; PostgreSQL accepts it in the clear whatever the
        // encryption policy.
        FirstPacket::Cancel { pid, secret } => {
            state
                .cancels
                .cancel(pid, secret, Duration::from_secs(5))
                .await;
            return Ok(Login::Cancel);
        }
        FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
            return Err(LoginError::EncryptionRequestOverTls);
        }
    };
    // Before any authentication request, so no password travels in the clear.
    if conn.tls.is_none() && conn.tls_setup.mode == TlsMode::Require {
        return Err(LoginError::TlsRequired);
    }
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
    user.clone_into(&mut who.user);
    database.clone_into(&mut who.tenant);
    let settings = settings::client_settings(&startup.params)?;
    let source = conn.peer.map(|p| p.ip());
    let server_name = conn.tls.as_ref().and_then(|t| t.server_name.as_deref());
    let proof = Proof {
        channel_binding: conn.tls.as_ref().and_then(|t| t.channel_binding.as_deref()),
        client_cn: conn.tls.as_ref().and_then(|t| t.client_cn.as_deref()),
    };
    let sni_tenant = match server_name {
        Some(name) => tenant_for_server_name(state, &conn.tls_setup, name).await?,
        None => None,
    };
    let Some(sni_tenant) = sni_tenant else {
        if database == state.config.get().admin.database {
            who.admin = true;
            authenticate_admin(state, stream, user, proof, (source, slot)).await?;
            return Ok(Login::Admin {
                user: user.to_owned(),
            });
        }
        let record = authenticate(state, stream, database, user, proof, (source, slot)).await?;
        return tenant_login(record, user, settings);
    };
    who.tenant.clone_from(&sni_tenant);
    let record = authenticate(state, stream, &sni_tenant, user, proof, (source, slot)).await?;
    if database != sni_tenant {
        if let Some(other) = TenantSlug::parse(database) {
            if state.directory.tenant(&other).await?.is_some() {
                return Err(LoginError::SniMismatch {
                    server_name: server_name.unwrap_or_default().to_owned(),
                    tenant: sni_tenant,
                    database: database.to_owned(),
                });
            }
        }
    }
    tenant_login(record, user, settings)
}

/// The tenant a TLS server name designates: a custom domain of a tenant (`tenant_domains`)
/// when it is exactly one, else `<tenant>.<sni_base_domain>`.
async fn tenant_for_server_name(
    state: &State,
    tls_setup: &TlsServer,
    server_name: &str,
) -> Result<Option<String>, LoginError> {
    let by_base_domain = tls_setup.tenant_from_sni(server_name);
    if let Some(domain) = normalize_domain(server_name) {
        match state.directory.tenant_for_domain(&domain).await {
            Ok(Some(slug)) => return Ok(Some(slug.as_str().to_owned())),
            Ok(None) => {}
            // The base-domain rule needs no registry: a tenant it names stays reachable while
            // the registry is away (its record may be cached).
            Err(e) if by_base_domain.is_some() => {
                tracing::warn!(error = %e, "custom domain lookup failed; using sni_base_domain");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(by_base_domain)
}

fn tenant_login(
    record: Arc<TenantRecord>,
    user: &str,
    settings: Vec<(String, String)>,
) -> Result<Login, LoginError> {
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
    proof: Proof<'_>,
    (source, slot): (Option<IpAddr>, &mut LoginSlot),
) -> Result<(), LoginError> {
    let attempt = begin_attempt(state, source, Target::Admin, slot).await?;
    let login = state.directory.registry().admin_login(user).await?;
    let method = login.as_ref().map_or(AuthMethod::Scram, |l| l.method);
    let mock = || ScramSecret::mock(&state.mock_key, &format!("\0admin\0{user}"));
    let credential = match login.as_ref().and_then(|l| ScramSecret::parse(&l.verifier)) {
        Some(secret) => Credential {
            secret,
            is_mock: false,
        },
        None => Credential {
            secret: mock(),
            is_mock: true,
        },
    };
    // A `cert` admin without a certificate fails as a non-admin does (auth::method explains).
    let is_admin = !(credential.is_mock || method == AuthMethod::Cert && proof.client_cn.is_none());
    let result = authenticate_by_method(stream, user, method, credential, mock(), proof).await;
    end_attempt(state, attempt, &result).await;
    match result {
        // The exchange ran in full either way; only then is a non-admin told why.
        Err(AuthError::Failed { .. }) if !is_admin => Err(LoginError::NotAdmin(user.to_owned())),
        other => Ok(other?),
    }
}

/// Hands an authenticated admin to the console.
async fn serve_admin<S>(
    state: &State,
    client_id: u64,
    conn: Conn<S>,
    user: &str,
    shutdown: &CancellationToken,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let stop = shutdown.child_token();
    let peer = conn
        .peer
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let secure = conn.tls.is_some();
    let _on_roster = state.clients.join(ClientEntry {
        id: client_id,
        tenant: None,
        user: user.to_owned(),
        addr: Some(peer),
        application_name: String::new(),
        mode: "admin",
        connected_at: chrono::Utc::now(),
        tls: conn
            .tls
            .as_ref()
            .map(|t| t.cipher.clone())
            .unwrap_or_default(),
        stop: stop.clone(),
    });
    tracing::info!(user, "admin console session");
    let session = admin::Session { user, peer, secure };
    match admin::serve(Arc::clone(&state.admin), conn.stream, &session, &stop).await {
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
    proof: Proof<'_>,
    (source, slot): (Option<IpAddr>, &mut LoginSlot),
) -> Result<Arc<TenantRecord>, LoginError> {
    let attempt = begin_attempt(state, source, Target::Tenant(database), slot).await?;
    let slug = TenantSlug::parse(database);
    let record = match &slug {
        Some(slug) => state.directory.tenant(slug).await?,
        None => None,
    };
    let login = match &record {
        Some(r) => state.directory.user_login(&r.slug, user).await?,
        None => None,
    };
    let method = login.as_ref().map_or(AuthMethod::Scram, |l| l.method);
    let mock = || ScramSecret::mock(&state.mock_key, &format!("{database}\0{user}"));
    let real = login.as_ref().and_then(|l| ScramSecret::parse(&l.verifier));
    let credential = match real {
        Some(secret) => Credential {
            secret,
            is_mock: false,
        },
        None => Credential {
            secret: mock(),
            is_mock: true,
        },
    };
    let result = authenticate_by_method(stream, user, method, credential, mock(), proof).await;
    end_attempt(state, attempt, &result).await;
    result?;
    record.ok_or_else(|| {
        LoginError::Auth(AuthError::Failed {
            user: user.to_owned(),
        })
    })
}

/// Asks the failed-login throttle whether this attempt may go on, and waits out its delay
/// (an async sleep in this client's task, with its login slot given back: nobody else
/// waits). Before any registry lookup or SCRAM work, so a locked-out source costs us almost
/// nothing.
async fn begin_attempt(
    state: &State,
    source: Option<IpAddr>,
    target: Target<'_>,
    slot: &mut LoginSlot,
) -> Result<Option<auth::throttle::Attempt>, LoginError> {
    let Some(source) = source else {
        return Ok(None);
    };
    let attempt = state.throttle.begin(source, target).await?;
    if !attempt.delay.is_zero() {
        tracing::debug!(
            delay_ms = attempt.delay.as_millis(),
            "login attempt delayed"
        );
        if let Err(full) = slot.sleep_without(attempt.delay).await {
            // Nothing was tried: the attempt neither failed nor succeeded.
            LoginThrottle::refund(attempt);
            return Err(full.into());
        }
    }
    Ok(Some(attempt))
}

/// Tells the throttle how the exchange ended.
async fn end_attempt(
    state: &State,
    attempt: Option<auth::throttle::Attempt>,
    result: &Result<(), AuthError>,
) {
    let Some(attempt) = attempt else {
        return;
    };
    match result {
        Ok(()) => state.throttle.succeeded(attempt).await,
        // Nothing was proven or disproven: psql, for one, hangs up to prompt for a password.
        Err(AuthError::ClientLeft) => LoginThrottle::refund(attempt),
        Err(_) => LoginThrottle::failed(attempt),
    }
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
