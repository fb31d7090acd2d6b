//! Client authentication: SCRAM-SHA-256 over the wire against a verifier it is given.
//!
//! `scram` is the pure exchange (no I/O); [`authenticate`] drives it over a client stream with
//! AuthenticationSASL / SASLContinue / SASLFinal. Unknown tenants and users get a mock secret
//! and the same exchange, so every failure ends in the same 28P01. This module must not query
//! the registry: the caller hands it the verifier.
//!
//! Why not pgwire's SCRAM server: since 0.42 its `ScramServerAuth` is a state machine without
//! I/O, so it could drive this exchange. It is compiled only with pgwire's `_ring`/`_aws-lc-rs`
//! features, which bring `x509-certificate` (a second X.509 stack beside `x509-cert`) and
//! take its channel-binding hash from a PEM it parses again; ours uses the `hmac`/`sha2`
//! crates postgres-protocol already uses and the end-point hash `tls` computed once. The
//! exchange (`scram.rs`) is fuzzed (`fuzz::scram_exchange`) and tested against tokio-postgres
//! and psql, with and without channel binding. Revisit if pgwire offers SCRAM without its TLS
//! features.

pub mod method;
pub mod scram;
pub mod shared_throttle;
pub mod throttle;
pub mod verifier;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::error::{ClientFacing, ErrorKind};
use crate::protocol::frame::{self, ReadError, take_cstr};
use crate::protocol::{SqlState, messages};

pub use scram::{ScramError, ScramSecret, VerifierError};
pub use verifier::{Password, PasswordError};

/// Largest SASL message accepted from a client.
const MAX_SASL_MESSAGE_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user {user:?}")]
    Failed { user: String },
    #[error("SCRAM exchange with the client failed")]
    Scram(#[source] ScramError),
    #[error("client sent message {0:?} during authentication")]
    UnexpectedMessage(char),
    #[error("malformed SASL message")]
    Malformed,
    /// The client hung up before sending its first SASL message (psql does, to prompt for a
    /// password): nothing was tried.
    #[error("client left during authentication")]
    ClientLeft,
    /// The client hung up or broke the connection after the server's first SCRAM message
    /// (it has the salt) without sending its proof: counted as a failed attempt.
    #[error("client abandoned the authentication exchange")]
    Abandoned,
    #[error("client I/O failed during authentication")]
    Io(#[source] std::io::Error),
    /// A `cert+scram` user gave the right password without a client certificate.
    #[error("user {user:?} needs a client certificate")]
    CertificateRequired { user: String },
    /// The verified client certificate names someone else.
    #[error("client certificate CN {cn:?} is not user {user:?}")]
    CertificateMismatch { user: String, cn: String },
    /// The certificate's CN is the user, but its OU names another tenant (or none, or the
    /// admin console at a tenant): it was not issued for this database.
    #[error("client certificate for {user} is for {ou:?}, not for {scope}")]
    CertificateForElsewhere {
        user: String,
        ou: Option<String>,
        scope: String,
    },
}

impl From<ReadError> for AuthError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Frame(_) => AuthError::Malformed,
            ReadError::Eof => AuthError::ClientLeft,
            ReadError::Io(io) => AuthError::Io(io),
        }
    }
}

impl ClientFacing for AuthError {
    fn sqlstate(&self) -> SqlState {
        match self {
            AuthError::Failed { .. } => SqlState::INVALID_PASSWORD,
            AuthError::CertificateRequired { .. }
            | AuthError::CertificateMismatch { .. }
            | AuthError::CertificateForElsewhere { .. } => SqlState::INVALID_AUTHORIZATION,
            AuthError::Scram(_)
            | AuthError::UnexpectedMessage(_)
            | AuthError::Malformed
            | AuthError::ClientLeft
            | AuthError::Abandoned
            | AuthError::Io(_) => SqlState::PROTOCOL_VIOLATION,
        }
    }

    fn client_message(&self) -> String {
        match self {
            AuthError::Failed { user } => {
                format!("password authentication failed for user \"{user}\"")
            }
            AuthError::Scram(ScramError::ChannelBindingUnsupported) => {
                "channel binding is offered only over TLS".to_owned()
            }
            AuthError::Scram(ScramError::ChannelBinding(detail)) => {
                format!("SCRAM channel binding negotiation error: {detail}")
            }
            AuthError::Scram(ScramError::WrongMechanism) => {
                "client selected an invalid SASL authentication mechanism".to_owned()
            }
            AuthError::Scram(_) | AuthError::Malformed => {
                "malformed SCRAM message from the client".to_owned()
            }
            AuthError::UnexpectedMessage(tag) => {
                format!("expected a SASL response, got message type '{tag}'")
            }
            AuthError::ClientLeft | AuthError::Abandoned | AuthError::Io(_) => {
                "connection lost during authentication".to_owned()
            }
            AuthError::CertificateRequired { user } => format!(
                "user \"{user}\" must present a client certificate: connect over TLS with \
                 sslcert and sslkey (a certificate whose CN is \"{user}\", signed by the \
                 server's client CA)"
            ),
            AuthError::CertificateMismatch { user, cn } => format!(
                "certificate authentication failed for user \"{user}\": the client \
                 certificate's CN is \"{cn}\""
            ),
            AuthError::CertificateForElsewhere { user, ou, scope } => format!(
                "certificate authentication failed for user \"{user}\": the client \
                 certificate is not for database \"{scope}\" (its OU is {}; it must be \
                 \"{scope}\")",
                ou.as_deref()
                    .map_or("missing".to_owned(), |ou| format!("\"{ou}\""))
            ),
        }
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::Client
    }
}

/// The secret to check a login against.
pub struct Credential {
    pub secret: ScramSecret,
    /// True for unknown tenants/users: the exchange runs and always fails.
    pub is_mock: bool,
}

/// Runs SCRAM-SHA-256 with the client. On success it returns, unsent, SASLFinal and
/// AuthenticationOk: the caller sends them before anything else, in the same write as what
/// follows (the greeting, or the error that ends the login), so a login costs one write and
/// one wakeup of the client fewer (issue 12). With `channel_binding` (the connection's
/// tls-server-end-point data), SCRAM-SHA-256-PLUS is offered first, as PostgreSQL does over
/// TLS.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    credential: Credential,
    channel_binding: Option<&[u8]>,
) -> Result<BytesMut, AuthError> {
    let mut exchange = scram::ScramExchange::new(credential.secret, credential.is_mock);
    if let Some(data) = channel_binding {
        exchange = exchange.with_channel_binding(data);
    }
    let mut out = BytesMut::with_capacity(256);
    messages::authentication_sasl(&mut out, exchange.mechanisms());
    send(stream, &mut out).await?;

    let initial = read_sasl(stream).await?;
    let (mechanism, rest) = take_cstr(&initial).ok_or(AuthError::Malformed)?;
    let (len, data) = rest.split_first_chunk::<4>().ok_or(AuthError::Malformed)?;
    let data = match usize::try_from(i32::from_be_bytes(*len)) {
        Ok(n) => data.get(..n).ok_or(AuthError::Malformed)?,
        Err(_) => &[][..],
    };
    let server_first = exchange
        .client_first(mechanism, data)
        .map_err(|e| scram_error(e, user))?;
    messages::authentication_sasl_continue(&mut out, &server_first);
    send(stream, &mut out).await?;

    let response = read_sasl(stream).await.map_err(|e| match e {
        AuthError::ClientLeft | AuthError::Io(_) => AuthError::Abandoned,
        other => other,
    })?;
    let server_final = exchange
        .client_final(&response)
        .map_err(|e| scram_error(e, user))?;
    messages::authentication_sasl_final(&mut out, &server_final);
    messages::authentication_ok(&mut out);
    Ok(out)
}

/// Ends a login that a verified client certificate proved on its own (auth method `cert`):
/// AuthenticationOk, no password asked, returned unsent as [`authenticate`] does.
pub fn accept_without_password() -> BytesMut {
    let mut out = BytesMut::with_capacity(16);
    messages::authentication_ok(&mut out);
    out
}

/// A SCRAM-SHA-256 verifier for a new password. PBKDF2 (4096 rounds) is milliseconds of CPU,
/// so it runs on the blocking pool, never on a thread that relays clients.
pub async fn scram_verifier(password: &crate::crypto::Secret) -> String {
    let hashed = password.clone();
    let verifier = tokio::task::spawn_blocking(move || {
        postgres_protocol::password::scram_sha_256(hashed.expose().as_bytes())
    })
    .await;
    match verifier {
        Ok(verifier) => verifier,
        // The blocking pool is shutting down: compute it here rather than fail.
        Err(_) => postgres_protocol::password::scram_sha_256(password.expose().as_bytes()),
    }
}

fn scram_error(e: ScramError, user: &str) -> AuthError {
    match e {
        // A proof that does not verify, or a nonce that does not match, is a wrong password
        // as far as anyone outside can tell.
        ScramError::AuthenticationFailed | ScramError::NonceMismatch => AuthError::Failed {
            user: user.to_owned(),
        },
        other => AuthError::Scram(other),
    }
}

async fn read_sasl<S: AsyncRead + Unpin>(stream: &mut S) -> Result<BytesMut, AuthError> {
    let msg = frame::read_message(stream, MAX_SASL_MESSAGE_BYTES).await?;
    if msg.tag != b'p' {
        return Err(AuthError::UnexpectedMessage(char::from(msg.tag)));
    }
    Ok(msg.body)
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> Result<(), AuthError> {
    stream.write_all(out).await.map_err(AuthError::Io)?;
    stream.flush().await.map_err(AuthError::Io)?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncReadExt;

    use super::*;

    /// Plays libpq's side of the exchange over a duplex pipe.
    async fn client_side(mut s: tokio::io::DuplexStream, password: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(buf[0], b'R');
        assert!(n > 9);
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut out = BytesMut::new();
        frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out).unwrap();
        s.write_all(&out).await.unwrap();
        let msg = frame::read_message(&mut s, 4096).await.unwrap();
        if msg.tag == b'E' {
            return msg.body.to_vec();
        }
        scram.update(&msg.body[4..]).unwrap();
        out.clear();
        frontend::sasl_response(scram.message(), &mut out).unwrap();
        s.write_all(&out).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        rest
    }

    #[tokio::test]
    async fn right_password_gets_authentication_ok() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let (mut server, client) = tokio::io::duplex(8192);
        let c = tokio::spawn(client_side(client, "pw"));
        let cred = Credential {
            secret: ScramSecret::parse(&verifier).unwrap(),
            is_mock: false,
        };
        let last = authenticate(&mut server, "alice", cred, None)
            .await
            .unwrap();
        server.write_all(&last).await.unwrap();
        drop(server);
        let tail = c.await.unwrap();
        // SASLFinal then AuthenticationOk.
        assert_eq!(&tail[tail.len() - 9..], b"R\0\0\0\x08\0\0\0\0");
    }

    #[tokio::test]
    async fn wrong_password_and_mock_both_fail_with_28p01() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        for (secret, is_mock) in [
            (ScramSecret::parse(&verifier).unwrap(), false),
            (ScramSecret::mock(&[7; 32], "ghost"), true),
        ] {
            let (mut server, client) = tokio::io::duplex(8192);
            let c = tokio::spawn(client_side(client, "wrong"));
            let err = authenticate(&mut server, "alice", Credential { secret, is_mock }, None)
                .await
                .unwrap_err();
            assert_eq!(err.sqlstate(), SqlState::INVALID_PASSWORD);
            drop(server);
            drop(c.await);
        }
    }
}
