//! One client's connection, top to bottom: the PROXY protocol header when the peer is a
//! trusted load balancer (`proxy_header`) → encryption (SSLRequest, direct TLS) → login
//! (`login`: startup, routing, authentication) → tenant session or admin console. Errors from
//! setup are sent to the client here, in one place, as a FATAL ErrorResponse with the error's
//! own SQLSTATE.
//!
//! After the encryption decision the rest of the path is generic over the stream and is
//! instantiated twice, for `TcpStream` and for `TlsStream<TcpStream>`, so plaintext clients
//! relay on the bare socket exactly as before TLS existed.
//!
//! The TLS setup (acceptor, channel-binding hash, SNI rule) is read once per connection, so a
//! reload in the middle of a login cannot mix two certificates. A login holds a slot among the
//! logins in progress (`login_slot`) from accept to the end of authentication, never longer.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::future::Either;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::State;
use super::login::{
    Conn, Login, LoginAttempt, LoginError, audit_line, audit_login, login, login_outcome,
};
use super::login_slot::LoginSlot;
use super::proxy_header::{self, ProxyHeaderError, Source};
use crate::admin;
use crate::auth::AuthError;
use crate::clients::ClientEntry;
use crate::error::{ClientFacing, log_error};
use crate::protocol::startup::{self, FirstPacket, StartupError};
use crate::protocol::{SqlState, messages};
use crate::session::{
    self, Admission, RelayEnd, Services, Session, SessionEnd, SessionError, SetupError,
};
use crate::stats::LoginOutcome;
use crate::tls::{ALPN_POSTGRESQL, TLS_HANDSHAKE_RECORD, TlsServer};

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
    /// The client went to a newer process (an upgrade's handover).
    HandedOver,
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
            CloseReason::Session(RelayEnd::ResetFailed) => f.write_str("backend reset failed"),
            CloseReason::Shutdown => f.write_str("shutdown"),
            CloseReason::LoginTimeout => f.write_str("login timeout"),
            CloseReason::LeftDuringLogin => f.write_str("client left during login"),
            CloseReason::TlsHandshakeFailed => f.write_str("TLS handshake failed"),
            CloseReason::Error(code) => write!(f, "error {}", code.code()),
            CloseReason::HandedOver => f.write_str("handed over to a newer process"),
        }
    }
}

/// How the client chose to talk, decided on the raw socket.
enum Opening {
    /// Plaintext; the first packet after any refused encryption requests.
    Plain(FirstPacket),
    /// TLS: after SSLRequest answered `S`, or direct (the first byte was a ClientHello).
    Tls { direct: bool },
}

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone, Copy)]
pub(super) enum Peer {
    /// The client itself.
    Client(SocketAddr),
    /// A load balancer in `[proxy] proxy_protocol_from`: its PROXY header names the client.
    Balancer(SocketAddr),
}

/// Serves one client connection to its end: the login phase in a box of its own, freed before
/// the session starts, so a connected client's task holds only its session (issue 12: the
/// login's state, a few KiB, would otherwise be kept for the client's whole life).
pub(super) async fn serve_client(
    state: &State,
    client_id: u64,
    stream: TcpStream,
    from: Peer,
    shutdown: &CancellationToken,
) -> CloseReason {
    let logged_in = Box::pin(log_in_client(state, client_id, stream, from, shutdown)).await;
    session_phase(state, logged_in).await
}

/// The session of a logged-in client, made without an await so that the login's outcome is
/// not kept beside the session for the client's whole life.
fn session_phase<'a>(
    state: &'a State,
    logged_in: LoginEnd<'a>,
) -> impl Future<Output = CloseReason> + 'a {
    match logged_in {
        LoginEnd::Done(reason) => Either::Left(std::future::ready(reason)),
        LoginEnd::Plain(ready) => Either::Right(Either::Left(serve_session(state, ready))),
        LoginEnd::Tls(ready) => {
            Either::Right(Either::Right(Box::pin(serve_session(state, *ready))))
        }
    }
}

/// How the login phase of a connection ended.
#[allow(
    clippy::large_enum_variant,
    reason = "made once per connection and taken apart at once (`session_phase`)"
)]
enum LoginEnd<'a> {
    /// The connection is done (an error was sent, a cancel request or an admin console
    /// session was handled).
    Done(CloseReason),
    /// A plaintext tenant client, ready for its session.
    Plain(Ready<'a, TcpStream>),
    /// A TLS tenant client (boxed: its stream is large, and only TLS clients pay for it).
    Tls(Box<Ready<'a, tokio_rustls::server::TlsStream<TcpStream>>>),
}

/// A tenant's client with its session started, and who it is for a handover.
pub(super) struct Ready<'a, S> {
    pub stream: S,
    pub session: Session<'a>,
    pub who: Option<Who>,
}

/// From accept to a ready session: PROXY header, encryption, login, session start.
async fn log_in_client<'a>(
    state: &'a State,
    client_id: u64,
    mut stream: TcpStream,
    from: Peer,
    shutdown: &'a CancellationToken,
) -> LoginEnd<'a> {
    let peer = match Box::pin(client_address(state, &mut stream, from)).await {
        Ok(address) => Some(address),
        Err(reason) => return LoginEnd::Done(reason),
    };
    // Held from here to the end of authentication: stalled or slow logins take slots, not
    // the whole process. Waiting briefly smooths a burst; past that the client is told.
    let slot_wait = Duration::from_millis(state.config.get().proxy.login_slot_wait_ms);
    let source = peer.map(|p| p.ip());
    let login_slot = match Box::pin(LoginSlot::take(&state.login_slots, source, slot_wait)).await {
        Ok(slot) => slot,
        Err(full) => {
            let err = LoginError::from(full);
            // Nothing is known yet but where it came from.
            let reason = format!("{} {err}", err.sqlstate().code());
            audit_line(peer, &LoginAttempt::default(), "refused", &reason);
            state.stats.process().login(LoginOutcome::TooManyLogins);
            return LoginEnd::Done(Box::pin(fail(&mut stream, &err)).await);
        }
    };
    let login_timeout = Duration::from_millis(state.config.get().proxy.login_timeout_ms);
    // One deadline for the whole login: encryption, TLS handshake, startup and SCRAM.
    let deadline = Instant::now() + login_timeout;
    let tls_setup = state.tls.current();
    let opening = match Box::pin(tokio::time::timeout_at(
        deadline,
        encryption(state, &tls_setup, &mut stream),
    ))
    .await
    {
        Ok(Ok(opening)) => opening,
        Ok(Err(e)) => {
            state.stats.process().login(LoginOutcome::Refused);
            return LoginEnd::Done(Box::pin(fail(&mut stream, &e)).await);
        }
        Err(_) => {
            state.stats.process().login(LoginOutcome::Timeout);
            Box::pin(fail(&mut stream, &LoginError::Timeout(login_timeout))).await;
            return LoginEnd::Done(CloseReason::LoginTimeout);
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
            .await
            .map_or_else(LoginEnd::Done, LoginEnd::Plain);
        }
    };
    // encryption() picks TLS only when there is an acceptor.
    let Some(acceptor) = tls_setup.acceptor() else {
        return LoginEnd::Done(CloseReason::TlsHandshakeFailed);
    };
    let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(error = %e, direct, "TLS handshake failed");
            state.stats.process().login(LoginOutcome::Refused);
            return LoginEnd::Done(CloseReason::TlsHandshakeFailed);
        }
        Err(_) => {
            state.stats.process().login(LoginOutcome::Timeout);
            return LoginEnd::Done(CloseReason::LoginTimeout);
        }
    };
    // PostgreSQL 17 insists on ALPN for direct TLS, so that a TLS connection meant for another
    // protocol cannot be replayed at a PostgreSQL server.
    if direct && tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        state.stats.process().login(LoginOutcome::Refused);
        return LoginEnd::Done(Box::pin(fail(&mut tls, &LoginError::DirectTlsWithoutAlpn)).await);
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
    .map_or_else(LoginEnd::Done, |ready| LoginEnd::Tls(Box::new(ready)))
}

/// A client's stream after the encryption decision, and whether its socket can go to another
/// process as it is (an upgrade's handover): a bare TCP socket can, a TLS session cannot
/// (its keys live in this process).
pub(super) trait ClientStream:
    AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static
{
    const TRANSFERABLE: bool;

    /// The bare socket, for a handover; None when it cannot be handed over.
    fn into_socket(self) -> Option<TcpStream>;
}

impl ClientStream for TcpStream {
    const TRANSFERABLE: bool = true;

    fn into_socket(self) -> Option<TcpStream> {
        Some(self)
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    const TRANSFERABLE: bool = false;

    fn into_socket(self) -> Option<TcpStream> {
        None
    }
}

/// The client's address: the peer's, or the one a trusted balancer's PROXY header names.
/// The header is read under the login timeout, before a login slot is taken: the per-source
/// slots are the client's, not the balancer's. On failure the connection ends (the error was
/// sent to the peer).
async fn client_address(
    state: &State,
    stream: &mut TcpStream,
    from: Peer,
) -> Result<SocketAddr, CloseReason> {
    let balancer = match from {
        Peer::Client(address) => return Ok(address),
        Peer::Balancer(address) => address,
    };
    let login_timeout = Duration::from_millis(state.config.get().proxy.login_timeout_ms);
    let client = match tokio::time::timeout(login_timeout, proxy_header::read_header(stream)).await
    {
        Ok(Ok(Source::Client(address))) => address,
        Ok(Ok(Source::Balancer)) => balancer,
        Ok(Err(e)) => {
            let outcome = match e {
                ProxyHeaderError::Closed => LoginOutcome::Abandoned,
                _ => LoginOutcome::Refused,
            };
            state.stats.process().login(outcome);
            return Err(Box::pin(fail(stream, &LoginError::from(e))).await);
        }
        Err(_) => {
            state.stats.process().login(LoginOutcome::Timeout);
            Box::pin(fail(stream, &LoginError::Timeout(login_timeout))).await;
            return Err(CloseReason::LoginTimeout);
        }
    };
    tracing::Span::current().record("peer", tracing::field::display(client));
    Ok(client)
}

/// Login, then the tenant's session started (or the admin console served) over the chosen
/// stream.
async fn serve_login<'a, S: ClientStream>(
    state: &'a State,
    client_id: u64,
    conn: Conn<S>,
    first: Option<FirstPacket>,
    deadline_and_slot: (Instant, LoginSlot),
    shutdown: &'a CancellationToken,
) -> Result<Ready<'a, S>, CloseReason> {
    // Boxed, like every phase a connected client is done with: its state is freed when it
    // ends, so an idle session's task holds only the stream and the session (issue 12).
    let logged_in = Box::pin(log_in(
        state,
        client_id,
        conn,
        first,
        deadline_and_slot,
        shutdown,
    ))
    .await;
    let (mut stream, admission, owed) = match logged_in {
        LoggedIn::Tenant(stream, admission, owed) => (stream, admission, owed),
        LoggedIn::Ended(reason) => return Err(reason),
    };
    let services = services(state, shutdown, S::TRANSFERABLE);
    // What a newer process would need to know of the client besides its session.
    let who = services.handover.map(|_| Who::of(&admission));
    let session = match Box::pin(session::start(&mut stream, services, admission, owed)).await {
        Ok(session) => session,
        Err(e) => return Err(Box::pin(fail_setup(&mut stream, &e)).await),
    };
    Ok(Ready {
        stream,
        session,
        who,
    })
}

/// What sessions use of the proxy; the handover token only for a client that can be handed
/// over, when this process may hand clients over at all.
pub(super) fn services<'a>(
    state: &'a State,
    shutdown: &'a CancellationToken,
    transferable: bool,
) -> Services<'a> {
    let config = state.config.get();
    Services {
        directory: &state.directory,
        pools: &state.pools,
        cancels: &state.cancels,
        clients: &state.clients,
        stats: &state.stats,
        suspend_grace: Duration::from_secs(config.proxy.suspend_grace_seconds),
        max_client_message_bytes: config.proxy.max_message_bytes,
        shutdown,
        handover: (transferable && state.handover.is_configured())
            .then(|| state.handover.requested()),
    }
}

/// Runs a ready session to its end, and hands the client over when it ends that way.
///
/// Not an `async fn`: one keeps its arguments twice in its future (as passed, and as the
/// locals it moves them to), and this future is every connected client's (issue 12).
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` would keep its arguments twice (see above)"
)]
pub(super) fn serve_session<'a, S: ClientStream>(
    state: &'a State,
    mut ready: Ready<'a, S>,
) -> impl Future<Output = CloseReason> + 'a {
    async move {
        match ready.session.run(&mut ready.stream).await {
            Ok(SessionEnd::Relay(end)) => CloseReason::Session(end),
            Ok(SessionEnd::Shutdown) => CloseReason::Shutdown,
            Ok(SessionEnd::TenantNotActive(_)) => CloseReason::Error(SqlState::CANNOT_CONNECT_NOW),
            Ok(SessionEnd::BackendLost) => CloseReason::Error(SqlState::CONNECTION_FAILURE),
            Ok(SessionEnd::HandedOver) => {
                let carried = ready.session.carried();
                // Off this process's roster, counters and cancel map before the newer one has it.
                drop(ready.session);
                match (ready.stream.into_socket(), ready.who) {
                    (Some(socket), Some(who)) => {
                        Box::pin(super::handover::depart(state, socket, who, carried)).await
                    }
                    _ => CloseReason::Shutdown,
                }
            }
            Err(e) => Box::pin(fail_session(&mut ready.stream, &e)).await,
        }
    }
}

/// Who a client is, as a newer process needs it after a handover.
pub(super) struct Who {
    pub tenant: String,
    pub user: String,
    pub settings: Vec<(String, String)>,
    pub peer: Option<SocketAddr>,
}

impl Who {
    fn of(admission: &Admission) -> Who {
        Who {
            tenant: admission.tenant.slug.as_str().to_owned(),
            user: admission.user.clone(),
            settings: admission.settings.clone(),
            peer: admission.peer,
        }
    }
}

/// How a login ended: a tenant's client to set up a session for, or done (an error was sent,
/// a cancel request was handled, an admin console session ran).
enum LoggedIn<S> {
    /// With the exchange's last messages, unsent (`Login::Tenant`).
    Tenant(S, Admission, BytesMut),
    Ended(CloseReason),
}

/// Startup and authentication under the login deadline, audited; an admin user's console
/// session is served from here.
async fn log_in<S>(
    state: &State,
    client_id: u64,
    mut conn: Conn<S>,
    first: Option<FirstPacket>,
    (deadline, mut login_slot): (Instant, LoginSlot),
    shutdown: &CancellationToken,
) -> LoggedIn<S>
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
    if let Some(outcome) = login_outcome(&login) {
        state.stats.process().login(outcome);
    }
    if !who.user.is_empty() {
        audit_login(conn.peer, &who, &login);
    }
    let login = match login {
        Ok(login) => login,
        Err(e @ LoginError::Timeout(_)) => {
            fail(&mut conn.stream, &e).await;
            return LoggedIn::Ended(CloseReason::LoginTimeout);
        }
        Err(e) => return LoggedIn::Ended(fail(&mut conn.stream, &e).await),
    };
    let (record, user, settings, owed) = match login {
        Login::Cancel => return LoggedIn::Ended(CloseReason::CancelRequest),
        Login::Admin { user, owed } => {
            // The console's first message follows in a write of its own (rare: no need to
            // save the write).
            if let Err(e) = write_owed(&mut conn.stream, &owed).await {
                tracing::debug!(error = %e, "admin client left after authentication");
                return LoggedIn::Ended(CloseReason::Session(RelayEnd::ClientClosed));
            }
            return LoggedIn::Ended(serve_admin(state, client_id, conn, &user, shutdown).await);
        }
        Login::Tenant {
            record,
            user,
            settings,
            owed,
        } => (record, user, settings, owed),
    };
    tracing::Span::current().record("tenant", record.slug.as_str());
    let admission = Admission {
        client_id,
        tenant: record,
        user,
        settings,
        peer: conn.peer,
        tls: conn
            .tls
            .as_ref()
            .map(|t| t.cipher.clone())
            .unwrap_or_default(),
    };
    LoggedIn::Tenant(conn.stream, admission, owed)
}

async fn write_owed<S: AsyncWrite + Unpin>(stream: &mut S, owed: &[u8]) -> std::io::Result<()> {
    stream.write_all(owed).await?;
    stream.flush().await
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
        let packet = match startup::read_first_packet(stream, max).await {
            // Said plainly: a balancer in front that nobody listed in proxy_protocol_from.
            Err(StartupError::BadLength(word)) if proxy_header::is_header_start(word) => {
                return Err(ProxyHeaderError::Untrusted.into());
            }
            read => read?,
        };
        match packet {
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

/// Sends a setup error to the client as FATAL and logs it.
pub(super) async fn fail<S: AsyncWrite + Unpin>(stream: &mut S, err: &LoginError) -> CloseReason {
    if matches!(
        err,
        LoginError::Auth(AuthError::ClientLeft | AuthError::Abandoned)
            | LoginError::Startup(StartupError::Eof)
            | LoginError::ProxyHeader(ProxyHeaderError::Closed)
    ) {
        return CloseReason::LeftDuringLogin;
    }
    log_error(err, "login failed");
    send_fatal(stream, err).await;
    CloseReason::Error(err.sqlstate())
}

pub(super) async fn fail_setup<S: AsyncWrite + Unpin>(
    stream: &mut S,
    err: &SetupError,
) -> CloseReason {
    log_error(err, "session setup failed");
    match err {
        // The backend's own ErrorResponse says it best.
        SetupError::SettingRejected(server_error) => {
            drop(stream.write_all(&server_error.raw).await);
        }
        _ => send_fatal(stream, err).await,
    }
    CloseReason::Error(err.sqlstate())
}

async fn fail_session<S: AsyncWrite + Unpin>(stream: &mut S, err: &SessionError) -> CloseReason {
    if let SessionError::Setup(setup) = err {
        return fail_setup(stream, setup).await;
    }
    log_error(err, "session failed");
    send_fatal(stream, err).await;
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
