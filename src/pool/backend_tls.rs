//! TLS from tenantgate to its backend servers: `[[server]] tls` and `ca_file` with libpq's
//! sslmode meanings, the SSLRequest exchange on a fresh backend socket, the stream the relay
//! reads and writes ([`BackendStream`]: plain TCP or TLS, one enum), and the rustls connector
//! provisioning's tokio-postgres connections use, so both paths honour the same setting.
//!
//! Modes, as libpq's sslmode (and PgBouncer's server_tls_sslmode):
//! - `disable`: plaintext, no SSLRequest;
//! - `prefer` (default): SSLRequest; TLS when the server answers `S` (no certificate checks,
//!   like libpq), plaintext when it answers `N` (and, in `backend`, on a new connection when
//!   the TLS handshake fails);
//! - `require`: TLS or fail; the certificate chain is not checked, but the handshake is real
//!   (the server proves it holds the certificate's key: signatures verified with ring);
//! - `verify-ca`: the chain must verify against `ca_file`, whatever names it carries;
//! - `verify-full`: chain and host name (or IP address) must match the server's `host`.
//!
//! rustls with the ring provider only. This module must not decide pooling or authentication
//! (the channel-binding data it exposes is used by `backend`), and never logs certificate or key
//! material.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::ServerConfig;

/// ALPN protocol name PostgreSQL 17 registers; older servers ignore it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// `[[server]] tls`: how tenantgate protects its connections to one backend server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Plaintext; no SSLRequest is sent.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; no certificate check.
    #[default]
    Prefer,
    /// TLS or fail; no certificate check (the handshake signatures are still verified).
    Require,
    /// TLS, and the certificate chain verifies against `ca_file`.
    VerifyCa,
    /// TLS, the chain verifies against `ca_file`, and the certificate names `host`.
    VerifyFull,
}

impl BackendTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendTlsMode::Disable => "disable",
            BackendTlsMode::Prefer => "prefer",
            BackendTlsMode::Require => "require",
            BackendTlsMode::VerifyCa => "verify-ca",
            BackendTlsMode::VerifyFull => "verify-full",
        }
    }

    /// True when a server without TLS must be refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            BackendTlsMode::Require | BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull
        )
    }

    /// True when the certificate chain is checked against `ca_file`.
    pub fn verifies_chain(self) -> bool {
        matches!(self, BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull)
    }
}

impl fmt::Display for BackendTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a server's TLS settings cannot be used; a config error (one line, exit 2).
#[derive(Debug, thiserror::Error)]
pub enum BackendTlsSetupError {
    #[error(
        "tls = \"{mode}\" needs ca_file (PEM certificates of the CAs that sign the server's certificate)"
    )]
    MissingCa { mode: BackendTlsMode },
    #[error("cannot read {}: {source}", path.display())]
    ReadCa { path: PathBuf, source: io::Error },
    #[error("{} is not valid PEM: {message}", path.display())]
    BadPem { path: PathBuf, message: String },
    #[error("{} holds no PEM certificate", path.display())]
    EmptyCa { path: PathBuf },
    #[error("{} holds a certificate that cannot be a trust anchor: {message}", path.display())]
    BadCa { path: PathBuf, message: String },
    #[error("host {host:?} is not a DNS name or IP address a certificate can name")]
    BadHost { host: String },
    #[error("cannot build the TLS client config: {0}")]
    Rustls(String),
}

impl BackendTlsSetupError {
    /// The key to name in the one-line config error, below `server[i]`.
    pub fn config_key(&self) -> &'static str {
        match self {
            BackendTlsSetupError::MissingCa { .. }
            | BackendTlsSetupError::ReadCa { .. }
            | BackendTlsSetupError::BadPem { .. }
            | BackendTlsSetupError::EmptyCa { .. }
            | BackendTlsSetupError::BadCa { .. } => "ca_file",
            BackendTlsSetupError::BadHost { .. } => "host",
            BackendTlsSetupError::Rustls(_) => "tls",
        }
    }
}

/// Why TLS to a backend could not be set up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum BackendTlsError {
    #[error("server {server} does not support TLS but tls = \"{mode}\"")]
    NotSupported {
        server: String,
        mode: BackendTlsMode,
    },
    #[error("server {server} answered the SSLRequest with {answer:?} instead of S or N")]
    BadAnswer { server: String, answer: char },
    #[error("TLS handshake with server {server} failed: {reason}")]
    Handshake { server: String, reason: String },
    #[error("server {server}'s TLS settings are unusable: {source}")]
    Setup {
        server: String,
        #[source]
        source: Arc<BackendTlsSetupError>,
    },
}

/// One server's TLS settings, built once (the CA file is read here, not per connection).
pub struct BackendTls {
    server: String,
    mode: BackendTlsMode,
    /// None for `disable`.
    connector: Option<TlsConnector>,
    /// The rustls config behind `connector`, for tokio-postgres (provisioning).
    client_config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("server", &self.server)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    /// Reads `ca_file` (when the mode needs it) and builds the rustls client config.
    pub fn from_server(server: &ServerConfig) -> Result<BackendTls, BackendTlsSetupError> {
        let mode = server.tls;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let roots = match (&server.ca_file, mode.verifies_chain()) {
            (Some(path), true) => Some(Arc::new(load_roots(path)?)),
            (None, true) => return Err(BackendTlsSetupError::MissingCa { mode }),
            (_, false) => None,
        };
        let host = server.host.trim_matches(['[', ']']);
        let server_name = match ServerName::try_from(host.to_owned()) {
            Ok(name) => name,
            Err(_) if mode == BackendTlsMode::VerifyFull => {
                return Err(BackendTlsSetupError::BadHost {
                    host: server.host.clone(),
                });
            }
            // Only SNI uses it then; a name the certificate is never checked against.
            Err(_) => ServerName::DnsName(
                rustls::pki_types::DnsName::try_from("backend.invalid")
                    .map_err(|e| BackendTlsSetupError::Rustls(e.to_string()))?
                    .to_owned(),
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            (BackendTlsMode::VerifyFull, Some(roots)) => {
                WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()
                    .map_err(|e| BackendTlsSetupError::Rustls(e.to_string()))?
            }
            (BackendTlsMode::VerifyCa, Some(roots)) => Arc::new(NamelessVerifier {
                roots: Some(roots),
                algorithms,
            }),
            _ => Arc::new(NamelessVerifier {
                roots: None,
                algorithms,
            }),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| BackendTlsSetupError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        let client_config = Arc::new(config);
        Ok(BackendTls {
            server: server.name.clone(),
            mode,
            connector: (mode != BackendTlsMode::Disable)
                .then(|| TlsConnector::from(Arc::clone(&client_config))),
            client_config,
            server_name,
        })
    }

    pub fn mode(&self) -> BackendTlsMode {
        self.mode
    }

    /// Turns a freshly connected socket into the stream the backend protocol runs on:
    /// SSLRequest, then TLS or plaintext as the mode and the server's answer say.
    pub async fn negotiate(&self, mut tcp: TcpStream) -> Result<BackendStream, NegotiateError> {
        let Some(connector) = &self.connector else {
            return Ok(BackendStream::Plain(tcp));
        };
        // SSLRequest: length 8, code 80877103.
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        // Exactly one byte: anything the server sent after it before the handshake would be
        // unprotected (CVE-2021-23222), and reading one byte buffers nothing more.
        let answer = tcp.read_u8().await?;
        match answer {
            b'S' => {}
            b'N' if !self.mode.requires_tls() => return Ok(BackendStream::Plain(tcp)),
            b'N' => {
                return Err(BackendTlsError::NotSupported {
                    server: self.server.clone(),
                    mode: self.mode,
                }
                .into());
            }
            other => {
                return Err(BackendTlsError::BadAnswer {
                    server: self.server.clone(),
                    answer: char::from(other),
                }
                .into());
            }
        }
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| BackendTlsError::Handshake {
                server: self.server.clone(),
                reason: describe_handshake_error(&e),
            })?;
        Ok(BackendStream::Tls(Box::new(tls)))
    }

    /// tokio-postgres settings for the same server: its sslmode and a connector that verifies
    /// as this mode says (and does channel binding when the server offers it).
    pub fn postgres_tls(
        &self,
    ) -> (
        tokio_postgres::config::SslMode,
        tokio_postgres_rustls::MakeRustlsConnect,
    ) {
        use tokio_postgres::config::SslMode;
        let mode = match self.mode {
            BackendTlsMode::Disable => SslMode::Disable,
            BackendTlsMode::Prefer => SslMode::Prefer,
            BackendTlsMode::Require | BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull => {
                SslMode::Require
            }
        };
        (
            mode,
            tokio_postgres_rustls::MakeRustlsConnect::new((*self.client_config).clone()),
        )
    }
}

/// Either a TLS setup error or the socket failing under it.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error(transparent)]
    Tls(#[from] BackendTlsError),
    #[error("backend I/O failed during the SSLRequest")]
    Io(#[from] io::Error),
}

/// Words for an operator and a client: rustls' certificate errors as "certificate verify
/// failed: ...", other handshake failures by their rustls text.
fn describe_handshake_error(e: &io::Error) -> String {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match inner {
        rustls::Error::InvalidCertificate(cert) => {
            let why = match cert {
                CertificateError::UnknownIssuer => {
                    "not signed by a CA in ca_file (unknown issuer)".to_owned()
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "the certificate does not name the server's host".to_owned()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the certificate is not valid yet".to_owned()
                }
                CertificateError::BadSignature => "bad certificate signature".to_owned(),
                other => format!("{other:?}"),
            };
            format!("certificate verify failed: {why}")
        }
        other => other.to_string(),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, BackendTlsSetupError> {
    let text = std::fs::read(path).map_err(|source| BackendTlsSetupError::ReadCa {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BackendTlsSetupError::BadPem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(BackendTlsSetupError::EmptyCa {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| BackendTlsSetupError::BadCa {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Every mode but `verify-full`, which rustls' WebPKI verifier handles: the server must prove
/// it holds its certificate's key (the handshake signatures are verified), so the session is
/// real TLS and channel binding means something. With `roots` (`verify-ca`) the chain must also
/// lead to a root of `ca_file`; names are never looked at (libpq's verify-ca). Without
/// (`prefer`, `require`) any certificate is taken.
#[derive(Debug)]
struct NamelessVerifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NamelessVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Still a certificate: garbage is refused.
        let cert = ParsedCertificate::try_from(end_entity)?;
        if let Some(roots) = &self.roots {
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The backend side of a session: plain TCP or TLS. One match per poll is all the plaintext
/// path pays (no box, no dynamic dispatch).
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    /// tls-server-end-point channel-binding data (RFC 5929): the hash of the server's leaf
    /// certificate, when the session is TLS and its signature algorithm defines one.
    pub fn end_point(&self) -> Option<Vec<u8>> {
        match self {
            BackendStream::Plain(_) => None,
            BackendStream::Tls(tls) => {
                let leaf = tls.get_ref().1.peer_certificates()?.first()?;
                crate::tls::end_point_hash(leaf)
            }
        }
    }

    /// True when the socket is readable: bytes or EOF arrived, or it failed. An idle
    /// PostgreSQL backend sends nothing, so for an idle connection this means the server
    /// closed it (a terminated backend sends a FATAL ErrorResponse, then closes). Peeks at
    /// the TCP socket under TLS too, so no TLS record is consumed. Never waits.
    pub fn peer_gone(&self) -> bool {
        let tcp = match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        };
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        tcp.poll_peek(&mut cx, &mut buf).is_ready()
    }

    /// A second handle on the TCP socket under this stream (a duplicated descriptor, not
    /// registered with any runtime yet), to watch for the server closing it after this stream
    /// is dropped. `None` if the descriptor cannot be duplicated.
    pub fn socket_handle(&self) -> Option<std::net::TcpStream> {
        let tcp = match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        };
        socket2::SockRef::from(tcp)
            .try_clone()
            .ok()
            .map(std::net::TcpStream::from)
    }

    /// Best effort, never waits: queues `bytes` (and, for TLS, close_notify) and writes what
    /// the socket takes now. Used to say Terminate from `Drop`.
    pub fn try_send_final(&mut self, bytes: &[u8]) {
        match self {
            BackendStream::Plain(tcp) => drop(tcp.try_write(bytes)),
            BackendStream::Tls(tls) => {
                let (tcp, session) = tls.get_mut();
                if io::Write::write_all(&mut session.writer(), bytes).is_err() {
                    return;
                }
                session.send_close_notify();
                let mut out = NowWriter(tcp);
                while session.wants_write() {
                    match session.write_tls(&mut out) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
            }
        }
    }
}

/// `std::io::Write` over a tokio socket that writes only what it takes without waiting.
struct NowWriter<'a>(&'a TcpStream);

impl io::Write for NowWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(tls: BackendTlsMode, ca_file: Option<PathBuf>) -> ServerConfig {
        let mut s: ServerConfig = toml::from_str("name = \"db1\"\nhost = \"localhost\"\n").unwrap();
        s.tls = tls;
        s.ca_file = ca_file;
        s
    }

    #[test]
    fn mode_names_follow_libpq() {
        for (text, mode) in [
            ("disable", BackendTlsMode::Disable),
            ("prefer", BackendTlsMode::Prefer),
            ("require", BackendTlsMode::Require),
            ("verify-ca", BackendTlsMode::VerifyCa),
            ("verify-full", BackendTlsMode::VerifyFull),
        ] {
            let s: ServerConfig =
                toml::from_str(&format!("name = \"a\"\nhost = \"h\"\ntls = \"{text}\"\n")).unwrap();
            assert_eq!(s.tls, mode);
            assert_eq!(mode.as_str(), text);
        }
        let default: ServerConfig = toml::from_str("name = \"a\"\nhost = \"h\"\n").unwrap();
        assert_eq!(default.tls, BackendTlsMode::Prefer);
        assert!(
            toml::from_str::<ServerConfig>("name = \"a\"\nhost = \"h\"\ntls = \"on\"\n").is_err()
        );
    }

    #[test]
    fn verifying_modes_need_a_readable_nonempty_ca_file() {
        let e = BackendTls::from_server(&server(BackendTlsMode::VerifyFull, None)).unwrap_err();
        assert!(matches!(e, BackendTlsSetupError::MissingCa { .. }), "{e}");
        assert_eq!(e.config_key(), "ca_file");
        let dir = std::env::temp_dir().join(format!("tg-backend-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e =
            BackendTls::from_server(&server(BackendTlsMode::VerifyCa, Some(missing))).unwrap_err();
        assert!(matches!(e, BackendTlsSetupError::ReadCa { .. }), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e =
            BackendTls::from_server(&server(BackendTlsMode::VerifyCa, Some(empty))).unwrap_err();
        assert!(matches!(e, BackendTlsSetupError::EmptyCa { .. }), "{e}");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let tls = BackendTls::from_server(&server(BackendTlsMode::VerifyFull, Some(good))).unwrap();
        assert_eq!(tls.mode(), BackendTlsMode::VerifyFull);
        // require and prefer need no CA.
        BackendTls::from_server(&server(BackendTlsMode::Require, None)).unwrap();
        BackendTls::from_server(&server(BackendTlsMode::Prefer, None)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
