//! The wire protocol by hand, for what drivers do not let a test control: message frames, one
//! reader of messages over any stream (TCP, TLS, bytes already read), the SQLSTATE of an
//! ErrorResponse, and a bare client that logs in with SCRAM and then sends whatever it is told.

use std::io;

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// SSLRequest: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// The first 8 bytes of a CancelRequest: length 16, code 80877102.
pub const CANCEL_REQUEST: [u8; 8] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];

/// One protocol message: tag, length, body.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple-protocol Query message for `sql`.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frame(b'Q', &body)
}

/// Sends SSLRequest to 127.0.0.1:`port`; returns the one-byte answer (`S` or `N`) and the
/// connection, which goes on from there.
pub async fn ssl_request(port: u16) -> (u8, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(&SSL_REQUEST)
        .await
        .expect("send SSLRequest");
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .expect("an answer to SSLRequest");
    (answer[0], stream)
}

/// One message from `stream`: (tag, body). A closed stream is an error, not a panic, so a
/// test can see what a peer did after a client misbehaved.
pub async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let body_len = usize::try_from(len).unwrap().saturating_sub(4);
    assert!(body_len < 1 << 20, "absurd message length {len}");
    let mut body = vec![0u8; body_len];
    stream.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// The SQLSTATE (field `C`) of an ErrorResponse; None for any other message.
pub fn error_code(tag: u8, body: &[u8]) -> Option<SqlState> {
    error_field(tag, body, b'C').map(|code| SqlState::from_code(&code))
}

/// The message (field `M`) of an ErrorResponse; None for any other message.
pub fn error_message(tag: u8, body: &[u8]) -> Option<String> {
    error_field(tag, body, b'M')
}

/// Field `wanted` of an ErrorResponse.
fn error_field(tag: u8, body: &[u8], wanted: u8) -> Option<String> {
    if tag != b'E' {
        return None;
    }
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        if field == wanted {
            return Some(std::str::from_utf8(&tail[..end]).ok()?.to_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

/// A connection the server refused before it said anything else: its ErrorResponse, after
/// which the server hung up.
#[derive(Debug)]
pub struct Refusal {
    /// Which of the streams given to [`until_refused`].
    pub index: usize,
    pub code: SqlState,
    pub message: String,
}

/// Reads all of `streams` at once (connections that sent nothing, e.g. to hold login slots)
/// until `n` of them have been refused: an ErrorResponse, then EOF. Returns the refusals in
/// the order they came, fewer than `n` if `timeout` passed first. Panics if a stream gets
/// anything else, or closes without an ErrorResponse. The streams not refused are left open
/// and unread: a server that has not answered them is still holding them.
pub async fn until_refused(
    streams: &mut [TcpStream],
    n: usize,
    timeout: std::time::Duration,
) -> Vec<Refusal> {
    use futures_util::StreamExt as _;
    let mut reads: futures_util::stream::FuturesUnordered<_> = streams
        .iter_mut()
        .enumerate()
        .map(|(index, stream)| async move {
            let answer = read_message(stream).await;
            let mut after = [0u8; 1];
            (index, answer, stream.read(&mut after).await)
        })
        .collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut refused = Vec::new();
    while refused.len() < n {
        let Ok(Some((index, answer, after))) =
            tokio::time::timeout_at(deadline, reads.next()).await
        else {
            break;
        };
        let (tag, body) =
            answer.unwrap_or_else(|e| panic!("connection {index} closed without a word: {e}"));
        let (Some(code), Some(message)) = (error_code(tag, &body), error_message(tag, &body))
        else {
            panic!(
                "connection {index} got {:?} instead of an ErrorResponse",
                char::from(tag)
            );
        };
        assert!(
            matches!(after, Ok(0)),
            "connection {index} was not closed after {message:?}: {after:?}"
        );
        refused.push(Refusal {
            index,
            code,
            message,
        });
    }
    refused
}

/// A bare protocol client over `S` (TCP unless said otherwise). Reads report a closed
/// connection as an error instead of panicking, so a hostile test can misbehave and then see
/// what the proxy did.
pub struct RawClient<S = TcpStream> {
    stream: S,
    /// The SASL mechanisms the server offered at login.
    pub mechanisms: Vec<String>,
}

impl RawClient {
    /// Connects to 127.0.0.1:`port` and logs in (see [`RawClient::login`]).
    pub async fn connect(port: u16, database: &str, user: &str, password: &str) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        RawClient::login(stream, database, user, password).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Starts up on `stream` and authenticates with SCRAM-SHA-256 (no channel binding), up to
    /// the first ReadyForQuery; panics if the login fails.
    pub async fn login(stream: S, database: &str, user: &str, password: &str) -> RawClient<S> {
        let mut raw = RawClient {
            stream,
            mechanisms: Vec::new(),
        };
        let mut out = bytes::BytesMut::new();
        frontend::startup_message([("user", user), ("database", database)], &mut out).unwrap();
        raw.send(&out).await.expect("send the startup message");
        let mut scram = None;
        loop {
            let (tag, body) = raw.read().await.expect("login");
            match (tag, body.get(..4)) {
                (b'R', Some([0, 0, 0, 10])) => {
                    raw.mechanisms = body[4..]
                        .split(|b| *b == 0)
                        .filter(|m| !m.is_empty())
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .collect();
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    out.clear();
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .unwrap();
                    raw.send(&out).await.expect("send SASLInitialResponse");
                    scram = Some(s);
                }
                (b'R', Some([0, 0, 0, 11])) => {
                    let s = scram.as_mut().expect("SASL started");
                    s.update(&body[4..]).unwrap();
                    out.clear();
                    frontend::sasl_response(s.message(), &mut out).unwrap();
                    raw.send(&out).await.expect("send SASLResponse");
                }
                (b'Z', _) => return raw,
                (b'E', _) => panic!("login failed: {}", String::from_utf8_lossy(&body)),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// One message: (tag, body).
    pub async fn read(&mut self) -> io::Result<(u8, Vec<u8>)> {
        read_message(&mut self.stream).await
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> io::Result<Vec<(u8, Vec<u8>)>> {
        let mut got = Vec::new();
        loop {
            let message = self.read().await?;
            let done = message.0 == b'Z';
            got.push(message);
            if done {
                return Ok(got);
            }
        }
    }

    /// The stream, e.g. to ask a TLS stream what it negotiated.
    pub fn stream(&self) -> &S {
        &self.stream
    }
}
