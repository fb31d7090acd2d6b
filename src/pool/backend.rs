//! One backend connection: the proxy's own connection to a tenant's database, opened as the
//! tenant's backend role. It owns the socket, the backend's key for cancels, and the current
//! ParameterStatus values, and it runs the setup queries (client parameters, reset) outside the
//! relay.
//!
//! The socket is plain TCP or TLS as the server's `tls` setting and its answer to SSLRequest
//! say (`backend_tls`). Backend auth answers SCRAM-SHA-256 (postgres-protocol's client; PBKDF2
//! runs on the blocking pool, off the reactor), md5 or cleartext, whichever the server asks for;
//! over TLS it picks SCRAM-SHA-256-PLUS (tls-server-end-point channel binding) when the server
//! offers it. The password is a [`Secret`] and is never logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backend_tls::{
    BackendStream, BackendTls, BackendTlsError, BackendTlsMode, NegotiateError,
};
use crate::crypto::Secret;
use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::SqlState;
use crate::protocol::frame::{self, Message, ReadError, take_cstr};

/// Startup settings (name, value), shared by the connections opened with them.
pub type Settings = Arc<Vec<(String, String)>>;

/// Largest message accepted from a backend during setup phases.
const MAX_SETUP_MESSAGE_BYTES: usize = 1 << 20;

/// Where and as whom to connect for one tenant.
#[derive(Clone)]
pub struct BackendTarget {
    pub server: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub role: String,
    pub password: Secret,
    /// The server's TLS settings (`[[server]] tls`, `ca_file`).
    pub tls: Arc<BackendTls>,
}

impl std::fmt::Debug for BackendTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{} as {} (server {}, tls {})",
            self.host,
            self.port,
            self.database,
            self.role,
            self.server,
            self.tls.mode()
        )
    }
}

/// An ErrorResponse a backend sent, kept whole so it can be forwarded as it is.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    /// The whole message, tag and length included.
    pub raw: BytesMut,
}

impl ServerError {
    fn parse(body: &[u8]) -> ServerError {
        let mut code = String::new();
        let mut message = String::new();
        let mut rest = body;
        while let Some((field, after)) = rest.split_first() {
            if *field == 0 {
                break;
            }
            let Some((value, after)) = take_cstr(after) else {
                break;
            };
            match field {
                b'C' => value.clone_into(&mut code),
                b'M' => value.clone_into(&mut message),
                _ => {}
            }
            rest = after;
        }
        let mut raw = BytesMut::with_capacity(body.len() + 5);
        raw.extend_from_slice(b"E");
        raw.extend_from_slice(
            &u32::try_from(body.len() + 4)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        raw.extend_from_slice(body);
        ServerError { code, message, raw }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("connecting to {addr} failed")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("backend I/O failed")]
    Io(#[from] std::io::Error),
    #[error("backend closed the connection")]
    Closed,
    #[error("backend sent a malformed message: {0}")]
    Protocol(String),
    #[error("backend refused: {} {}", .0.code, .0.message)]
    Refused(ServerError),
    #[error("backend asked for an unsupported authentication method {0}")]
    UnsupportedAuth(i32),
    /// The server asked for a cleartext or md5 password on a connection that fell back to
    /// plaintext after a failed TLS handshake (`tls = prefer`): whoever broke the handshake
    /// may be the one asking, so the password is not sent.
    #[error(
        "server {server} asked for a {method} password after its TLS handshake failed; not sent"
    )]
    PasswordAfterDowngrade {
        server: String,
        method: &'static str,
    },
    #[error("backend SCRAM exchange failed")]
    Scram(#[source] std::io::Error),
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("server {server} is at its connection budget of {max}")]
    BudgetExhausted { server: String, max: u32 },
    /// A connect found no room in the budget and no checkout waiting for it any more (they
    /// were served by connections that came back): given up, told to nobody.
    #[error("no room in the server's budget and no client waiting for this connection")]
    NotWanted,
    #[error(transparent)]
    Tls(#[from] BackendTlsError),
}

impl From<NegotiateError> for BackendError {
    fn from(e: NegotiateError) -> Self {
        match e {
            NegotiateError::Tls(tls) => BackendError::Tls(tls),
            NegotiateError::Io(io) => BackendError::Io(io),
        }
    }
}

impl From<ReadError> for BackendError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Frame(f) => BackendError::Protocol(f.to_string()),
            ReadError::Eof => BackendError::Closed,
            ReadError::Io(io) => BackendError::Io(io),
        }
    }
}

impl ClientFacing for BackendError {
    fn sqlstate(&self) -> SqlState {
        match self {
            BackendError::Refused(e) if e.code == SqlState::TOO_MANY_CONNECTIONS.code() => {
                SqlState::TOO_MANY_CONNECTIONS
            }
            BackendError::BudgetExhausted { .. } | BackendError::NotWanted => {
                SqlState::TOO_MANY_CONNECTIONS
            }
            BackendError::Refused(_)
            | BackendError::ConnectTimeout { .. }
            | BackendError::Connect { .. }
            | BackendError::Io(_)
            | BackendError::Closed
            | BackendError::Protocol(_)
            | BackendError::UnsupportedAuth(_)
            | BackendError::PasswordAfterDowngrade { .. }
            | BackendError::Scram(_)
            | BackendError::Timeout(_)
            | BackendError::Tls(_) => SqlState::CONNECTION_FAILURE,
        }
    }

    fn client_message(&self) -> String {
        match self {
            BackendError::Refused(e) => format!(
                "the tenant's database server refused the connection: {}",
                e.message
            ),
            BackendError::ConnectTimeout { .. }
            | BackendError::Connect { .. }
            | BackendError::Timeout(_) => {
                "could not connect to the tenant's database server".to_owned()
            }
            BackendError::Io(_) | BackendError::Closed | BackendError::Protocol(_) => {
                "the connection to the tenant's database server was lost".to_owned()
            }
            BackendError::UnsupportedAuth(_) | BackendError::Scram(_) => {
                "tenantgate could not log in to the tenant's database server".to_owned()
            }
            BackendError::PasswordAfterDowngrade { server, method } => format!(
                "tenantgate could not log in to the tenant's database server: server \"{server}\" \
                 asked for a {method} password after its TLS handshake failed, and tenantgate does \
                 not send one over a connection that may have been downgraded"
            ),
            BackendError::BudgetExhausted { server, max } => format!(
                "all {max} connections tenantgate may open to server \"{server}\" are busy; try again"
            ),
            BackendError::NotWanted => {
                "all connections tenantgate may open to the tenant's server are busy; try again"
                    .to_owned()
            }
            // Written for the operator the client will ask: the server's config name and the
            // reason, never its address or certificate contents.
            BackendError::Tls(e) => {
                format!("tenantgate could not connect to the tenant's database server: {e}")
            }
        }
    }

    fn kind(&self) -> ErrorKind {
        match self {
            BackendError::BudgetExhausted { .. } | BackendError::NotWanted => ErrorKind::Limit,
            BackendError::ConnectTimeout { .. }
            | BackendError::Connect { .. }
            | BackendError::Io(_)
            | BackendError::Closed
            | BackendError::Protocol(_)
            | BackendError::Refused(_)
            | BackendError::UnsupportedAuth(_)
            | BackendError::PasswordAfterDowngrade { .. }
            | BackendError::Scram(_)
            | BackendError::Timeout(_)
            | BackendError::Tls(_) => ErrorKind::Backend,
        }
    }
}

/// A live, authenticated backend connection.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts about one connection's state, each read on its own"
)]
pub struct BackendConn {
    pub(crate) stream: BackendStream,
    /// The backend's process id (clients see this one in BackendKeyData).
    pub pid: i32,
    /// The backend's own cancel secret; clients never see it.
    pub secret: i32,
    /// Where cancels for this backend go.
    pub addr: SocketAddr,
    /// The server's TLS settings when this connection speaks TLS: a cancel request for it goes
    /// over TLS too, so its key never crosses the network in the clear.
    pub cancel_tls: Option<Arc<BackendTls>>,
    /// ParameterStatus values as the backend last reported them, in arrival order.
    pub params: Vec<(String, String)>,
    /// ParameterStatus values right after login, before any client setting.
    pub base_params: Arc<Vec<(String, String)>>,
    /// Set when the connection must not go back to the pool.
    pub broken: bool,
    /// Transaction pooling: the client this connection last served (0: none since reset).
    pub owner: u64,
    /// Client settings in effect (the startup settings after a reset).
    pub applied: Vec<(String, String)>,
    /// Settings sent in the startup packet: what a reset brings the session back to. Empty
    /// unless the pool's clients all use the same settings (`pool::StartupSettings`).
    pub startup_settings: Settings,
    /// A reset (DISCARD ALL) was sent when the last client released this connection, and
    /// its answer has not been read: the next checkout reads it first ([`finish_reset`]).
    ///
    /// [`finish_reset`]: BackendConn::finish_reset
    pub reset_pending: bool,
    /// Reset before the next use, even by the client it served last: the shared statements
    /// tenantgate believes prepared here may not be (a client ran DEALLOCATE or DISCARD, or
    /// the server said one is missing or stale).
    pub needs_reset: bool,
    /// A ParameterStatus reached a client since the last reset whose answer was read here:
    /// the server's record of what it last reported differs from the startup values, so the
    /// next reset must be a round trip (its reports absorbed here), not sent ahead of a
    /// client's messages (whose first ReadyForQuery would carry them, and miss the client's
    /// own change back to a value the last client left).
    pub reported_since_reset: bool,
    /// The server commits a DISCARD ALL run through the extended protocol at once, before
    /// any message after it (PostgreSQL 15, and 14.5, 13.8, 12.12, 11.17, 10.22 on): only
    /// then may a reset go ahead of a client's messages.
    pub reset_ahead_ok: bool,
    /// Named statements tenantgate prepared here (transaction pooling), by server name.
    pub statements: super::statements::BackendStatements,
    /// This connection's share of its server's budget, given back when it closes.
    pub(crate) budget_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its place among its pool's `pool_size`, given back like the budget's (see `Drop`).
    pub(crate) pool_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The SASL mechanism the login used, if any.
    sasl_mechanism: Option<&'static str>,
}

/// Whether a server of this `server_version` ("15.18 (Debian 15.18-0+deb12u1)") commits a
/// statement that cannot run in a transaction block, sent through the extended protocol,
/// at once (the fix of 2022-07-26): before it, such a statement shared an implicit
/// transaction with the messages after it, which a later error rolled back.
fn commits_discard_all_at_once(version: &str) -> bool {
    let number = version.split_whitespace().next().unwrap_or_default();
    let mut parts = number.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    });
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    match major {
        15.. => true,
        14 => minor >= 5,
        13 => minor >= 8,
        12 => minor >= 12,
        11 => minor >= 17,
        10 => minor >= 22,
        _ => false,
    }
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendConn(pid {} at {})", self.pid, self.addr)
    }
}

impl Drop for BackendConn {
    /// Says goodbye politely when the pool drops us; a full socket buffer just closes. The
    /// server's budget slot and the pool's are given back only once the server has closed
    /// the connection (its backend process has exited), so a connection opened in its place
    /// never runs beside the old one: see [`release_when_closed`].
    fn drop(&mut self) {
        if !self.broken {
            self.terminate();
        }
        let permits = [self.budget_permit.take(), self.pool_slot.take()];
        if permits.iter().any(Option::is_some) {
            release_when_closed(self.stream.socket_handle(), permits);
        }
    }
}

/// Longest wait for a dropped connection's server to close it before its budget slot is given
/// back anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Holds `permits` until the server closes `socket` (a duplicate of a connection being
/// dropped), at most [`CLOSE_WAIT`]. The write side is shut down first (FIN even though the
/// duplicate keeps the socket open), so a server not told Terminate sees the end too. The
/// server closes its socket when its backend process exits, after it has left
/// `pg_stat_activity` and given back its connection slot. Without a runtime (or a
/// duplicate), the permits go at once.
fn release_when_closed(
    socket: Option<std::net::TcpStream>,
    permits: [Option<tokio::sync::OwnedSemaphorePermit>; 2],
) {
    let (Some(socket), Ok(runtime)) = (socket, tokio::runtime::Handle::try_current()) else {
        return;
    };
    runtime.spawn(async move {
        let _permits = permits;
        drop(socket.shutdown(std::net::Shutdown::Write));
        if socket.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut socket) = tokio::net::TcpStream::from_std(socket) else {
            return;
        };
        let mut sink = [0u8; 256];
        drop(
            tokio::time::timeout(CLOSE_WAIT, async {
                // Whatever the server still sends (a FATAL, TLS close_notify), until EOF.
                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await,
        );
    });
}

/// Outcome of a setup query.
pub enum SetupOutcome {
    Done,
    /// The backend answered with an error; the connection is still in sync (ReadyForQuery seen).
    Failed(ServerError),
}

/// A TCP connection to the target's server, Nagle off.
async fn open_socket(target: &BackendTarget, timeout: Duration) -> Result<TcpStream, BackendError> {
    let addr_text = format!("{}:{}", target.host, target.port);
    let socket = tokio::time::timeout(
        timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| BackendError::ConnectTimeout {
        addr: addr_text.clone(),
    })?
    .map_err(|source| BackendError::Connect {
        addr: addr_text,
        source,
    })?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

impl BackendConn {
    /// Sends Terminate if the socket takes it now; the connection closes when dropped.
    pub fn terminate(&mut self) {
        self.stream.try_send_final(b"X\0\0\0\x04");
    }

    /// True when the server closed this connection or sent something unasked: for an idle
    /// connection, that it must not be used. Never waits and never consumes a byte.
    pub fn peer_gone(&self) -> bool {
        self.stream.peer_gone()
    }

    /// True when the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// The SASL mechanism the backend login used (`SCRAM-SHA-256-PLUS` when channel binding
    /// was used), or None for md5, cleartext and trust.
    pub fn sasl_mechanism(&self) -> Option<&'static str> {
        self.sasl_mechanism
    }

    /// Opens and authenticates a connection with only `user` and `database` as startup
    /// parameters, so DISCARD ALL returns it to exactly this state.
    pub async fn connect(
        target: &BackendTarget,
        timeout: Duration,
    ) -> Result<BackendConn, BackendError> {
        BackendConn::connect_with(target, timeout, Arc::default()).await
    }

    /// Connects with `startup_settings` in the startup packet: the values a reset (DISCARD
    /// ALL, RESET ALL) brings the session back to.
    pub async fn connect_with(
        target: &BackendTarget,
        timeout: Duration,
        startup_settings: Settings,
    ) -> Result<BackendConn, BackendError> {
        let socket = open_socket(target, timeout).await?;
        let addr = socket.peer_addr()?;
        let negotiated = tokio::time::timeout(timeout, target.tls.negotiate(socket))
            .await
            .map_err(|_| BackendError::Timeout(timeout))?;
        let mut downgraded = false;
        let stream = match negotiated {
            // libpq's prefer: a failed TLS handshake is retried in plaintext on a new socket.
            // Unlike libpq, no cleartext or md5 password goes over it (see `answer_auth`).
            Err(NegotiateError::Tls(e @ BackendTlsError::Handshake { .. }))
                if target.tls.mode() == BackendTlsMode::Prefer =>
            {
                tracing::warn!(error = %e, "retrying in plaintext (tls = prefer)");
                downgraded = true;
                BackendStream::Plain(open_socket(target, timeout).await?)
            }
            other => other?,
        };
        let cancel_tls = stream.is_tls().then(|| Arc::clone(&target.tls));
        let mut conn = BackendConn {
            stream,
            sasl_mechanism: None,
            pid: 0,
            secret: 0,
            addr,
            cancel_tls,
            params: Vec::new(),
            base_params: Arc::default(),
            broken: true,
            owner: 0,
            applied: startup_settings.to_vec(),
            startup_settings,
            needs_reset: false,
            reported_since_reset: false,
            reset_ahead_ok: false,
            reset_pending: false,
            statements: super::statements::BackendStatements::default(),
            budget_permit: None,
            pool_slot: None,
        };
        tokio::time::timeout(timeout, conn.startup(target, downgraded))
            .await
            .map_err(|_| BackendError::Timeout(timeout))??;
        conn.base_params = Arc::new(conn.params.clone());
        conn.reset_ahead_ok = conn
            .params
            .iter()
            .find(|(name, _)| name == "server_version")
            .is_some_and(|(_, version)| commits_discard_all_at_once(version));
        conn.broken = false;
        Ok(conn)
    }

    /// Logs in. `downgraded`: this connection is plaintext because a TLS handshake failed.
    async fn startup(
        &mut self,
        target: &BackendTarget,
        downgraded: bool,
    ) -> Result<(), BackendError> {
        let mut buf = BytesMut::new();
        let settings = Arc::clone(&self.startup_settings);
        frontend::startup_message(
            [
                ("user", target.role.as_str()),
                ("database", target.database.as_str()),
            ]
            .into_iter()
            .chain(settings.iter().map(|(n, v)| (n.as_str(), v.as_str()))),
            &mut buf,
        )?;
        self.send(&buf).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.read().await?;
            match msg.tag {
                b'R' => {
                    self.answer_auth(&msg, target, &mut scram, downgraded)
                        .await?;
                }
                b'S' => self.record_parameter(&msg.body),
                b'K' => {
                    let (pid, secret) = msg
                        .body
                        .split_first_chunk::<4>()
                        .and_then(|(p, rest)| Some((p, rest.first_chunk::<4>()?)))
                        .ok_or_else(|| BackendError::Protocol("short BackendKeyData".into()))?;
                    self.pid = i32::from_be_bytes(*pid);
                    self.secret = i32::from_be_bytes(*secret);
                }
                b'E' => return Err(BackendError::Refused(ServerError::parse(&msg.body))),
                b'Z' => return Ok(()),
                // NoticeResponse, NegotiateProtocolVersion: nothing to do.
                _ => {}
            }
        }
    }

    async fn answer_auth(
        &mut self,
        msg: &Message,
        target: &BackendTarget,
        scram: &mut Option<ScramSha256>,
        downgraded: bool,
    ) -> Result<(), BackendError> {
        let (code, data) = msg
            .body
            .split_first_chunk::<4>()
            .ok_or_else(|| BackendError::Protocol("short Authentication message".into()))?;
        let password = target.password.expose().as_bytes();
        let mut out = BytesMut::new();
        let code = i32::from_be_bytes(*code);
        // After a downgrade, whoever broke the handshake may be asking: a cleartext password
        // would be handed over, an md5 hash of it (with a salt they chose) cracked offline.
        // SCRAM reveals neither. An operator who accepts plaintext sets `tls = "disable"`.
        if downgraded && (code == 3 || code == 5) {
            return Err(BackendError::PasswordAfterDowngrade {
                server: target.server.clone(),
                method: if code == 3 { "cleartext" } else { "md5" },
            });
        }
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(password, &mut out)?,
            5 => {
                let salt = data
                    .first_chunk::<4>()
                    .ok_or_else(|| BackendError::Protocol("short md5 salt".into()))?;
                let hash = md5_hash(target.role.as_bytes(), password, *salt);
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let offered = |name: &[u8]| data.split(|b| *b == 0).any(|m| m == name);
                let end_point = self.stream.end_point();
                // As libpq: PLUS when TLS gives binding data and the server offers it; over TLS
                // without PLUS offered, tell the server we could have ("y"), so a stripped
                // mechanism list is detected; over plaintext, "n".
                let (mechanism, binding) = match end_point {
                    Some(hash) if offered(b"SCRAM-SHA-256-PLUS") => (
                        "SCRAM-SHA-256-PLUS",
                        ChannelBinding::tls_server_end_point(hash),
                    ),
                    Some(_) => ("SCRAM-SHA-256", ChannelBinding::unrequested()),
                    None => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
                };
                if !offered(mechanism.as_bytes()) {
                    return Err(BackendError::UnsupportedAuth(10));
                }
                let client = ScramSha256::new(password, binding);
                frontend::sasl_initial_response(mechanism, client.message(), &mut out)?;
                self.sasl_mechanism = Some(mechanism);
                *scram = Some(client);
            }
            11 => {
                let mut client = scram
                    .take()
                    .ok_or_else(|| BackendError::Protocol("SASLContinue before SASL".into()))?;
                let data = data.to_vec();
                // PBKDF2 with thousands of iterations: keep it off the reactor.
                let client =
                    tokio::task::spawn_blocking(move || client.update(&data).map(|()| client))
                        .await
                        .map_err(|e| BackendError::Protocol(format!("SCRAM task failed: {e}")))?
                        .map_err(BackendError::Scram)?;
                frontend::sasl_response(client.message(), &mut out)?;
                *scram = Some(client);
            }
            12 => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| BackendError::Protocol("SASLFinal before SASL".into()))?;
                client.finish(data).map_err(BackendError::Scram)?;
                return Ok(());
            }
            other => return Err(BackendError::UnsupportedAuth(other)),
        }
        self.send(&out).await
    }

    /// Writes and flushes: over TLS, bytes can stay in the session until flushed.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn read(&mut self) -> Result<Message, BackendError> {
        Ok(frame::read_message(&mut self.stream, MAX_SETUP_MESSAGE_BYTES).await?)
    }

    fn record_parameter(&mut self, body: &[u8]) {
        let Some((name, rest)) = take_cstr(body) else {
            return;
        };
        let Some((value, _)) = take_cstr(rest) else {
            return;
        };
        if let Some(slot) = self.params.iter_mut().find(|(n, _)| n == name) {
            value.clone_into(&mut slot.1);
        } else {
            self.params.push((name.to_owned(), value.to_owned()));
        }
    }

    /// Sends `DISCARD ALL` without waiting for its answer (transaction pooling: a client
    /// that leaves, a backend the sweeper finds left unreset, one whose reset cannot go ahead
    /// of the next client's messages): the server resets while the connection sits in the
    /// pool, and the next checkout reads the answer ([`BackendConn::finish_reset`]), usually
    /// already there. The connection then serves nobody in particular, with its startup
    /// settings. A connection that fails here is marked broken and not reused.
    pub async fn start_reset(&mut self) -> Result<(), BackendError> {
        const DISCARD_ALL: &[u8] = b"Q\0\0\0\x10DISCARD ALL\0";
        if let Err(e) = self.send(DISCARD_ALL).await {
            self.broken = true;
            return Err(e);
        }
        self.reset_pending = true;
        self.owner = 0;
        self.startup_settings
            .as_slice()
            .clone_into(&mut self.applied);
        self.statements.clear();
        self.needs_reset = false;
        // The next checkout reads the reset's answer, reports included.
        self.reported_since_reset = false;
        Ok(())
    }

    /// Reads the answer to the reset [`BackendConn::start_reset`] sent, through its
    /// ReadyForQuery: Ok only if it succeeded and left the session idle. An error, an EOF, a
    /// timeout or anything unexpected is an Err, and the connection must not be used.
    pub async fn finish_reset(&mut self, timeout: Duration) -> Result<(), BackendError> {
        if !self.reset_pending {
            return Ok(());
        }
        let read = async {
            let mut failure = None;
            loop {
                let msg = self.read().await?;
                match msg.tag {
                    b'S' => self.record_parameter(&msg.body),
                    b'E' => failure = Some(ServerError::parse(&msg.body)),
                    b'Z' if msg.body.first() == Some(&b'I') => {
                        return failure.map_or(Ok(()), |e| Err(BackendError::Refused(e)));
                    }
                    b'Z' => {
                        return Err(BackendError::Protocol(
                            "the reset left a transaction open".into(),
                        ));
                    }
                    // CommandComplete; a NoticeResponse or notification for the last client.
                    _ => {}
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, read)
            .await
            .unwrap_or(Err(BackendError::Timeout(timeout)));
        if outcome.is_err() {
            self.broken = true;
        } else {
            self.reset_pending = false;
        }
        outcome
    }

    /// Runs a simple query outside the relay and waits for ReadyForQuery, recording any
    /// ParameterStatus it causes. Rows and notices are dropped.
    pub async fn run_setup_query(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<SetupOutcome, BackendError> {
        let result = tokio::time::timeout(timeout, self.setup_query(sql)).await;
        match result {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => {
                self.broken = true;
                Err(e)
            }
            Err(_) => {
                self.broken = true;
                Err(BackendError::Timeout(timeout))
            }
        }
    }

    async fn setup_query(&mut self, sql: &str) -> Result<SetupOutcome, BackendError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(&buf).await?;
        let mut failure = None;
        loop {
            let msg = self.read().await?;
            match msg.tag {
                b'S' => self.record_parameter(&msg.body),
                b'E' => failure = Some(ServerError::parse(&msg.body)),
                b'Z' => {
                    if msg.body.first() != Some(&b'I') {
                        return Err(BackendError::Protocol(
                            "setup query left a transaction open".into(),
                        ));
                    }
                    return Ok(failure.map_or(SetupOutcome::Done, SetupOutcome::Failed));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_that_commit_discard_all_at_once() {
        assert!(commits_discard_all_at_once(
            "15.18 (Debian 15.18-0+deb12u1)"
        ));
        assert!(commits_discard_all_at_once("17devel"));
        assert!(commits_discard_all_at_once("14.5"));
        assert!(!commits_discard_all_at_once("14.4"));
        assert!(commits_discard_all_at_once("10.22"));
        assert!(!commits_discard_all_at_once("9.6.24"));
        assert!(!commits_discard_all_at_once(""));
    }

    #[test]
    fn server_error_fields_and_raw_bytes() {
        let body = b"SFATAL\0C57P01\0Mterminating\0\0";
        let e = ServerError::parse(body);
        assert_eq!(e.code, "57P01");
        assert_eq!(e.message, "terminating");
        assert_eq!(e.raw.first(), Some(&b'E'));
        assert_eq!(e.raw.len(), body.len() + 5);
    }

    #[test]
    fn target_debug_hides_password() {
        let server: super::super::ServerConfig =
            toml::from_str("name = \"main\"\nhost = \"h\"\n").unwrap();
        let t = BackendTarget {
            server: "main".into(),
            host: "h".into(),
            port: 1,
            database: "d".into(),
            role: "r".into(),
            password: Secret::new("pw-secret"),
            tls: Arc::new(BackendTls::from_server(&server).unwrap()),
        };
        assert!(!format!("{t:?}").contains("pw-secret"));
    }
}
