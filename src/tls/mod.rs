//! Client-facing TLS: the `[tls]` config section, the rustls server config (ring provider
//! only), the tls-server-end-point channel-binding hash of our certificate (RFC 5929 §4.1, as
//! PostgreSQL's `be_tls_get_certificate_hash`) and SNI → tenant names. The client task runs
//! the session over either a bare `TcpStream` or a `TlsStream` (both are generic `S`), so
//! the plaintext hot path is exactly what it was without TLS.
//!
//! How a connection reaches TLS (PostgreSQL 17 protocol docs, "SSL Session Encryption"):
//! - SSLRequest → `S` → TLS handshake → StartupMessage over TLS; or `N` when TLS is off.
//! - Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): the first byte is a TLS handshake
//!   record (0x16); the client must then negotiate ALPN `postgresql`.
//!
//! The certificate, key and client CA are read again on RELOAD and SIGHUP: [`SharedTls`] holds
//! the current [`TlsServer`], and each connection takes one snapshot at accept, so its
//! handshake, channel-binding hash and routing rules agree even if a reload lands meanwhile;
//! established sessions keep the keys they negotiated.
//!
//! Client certificates (`client_ca_file`): asked for, never required at the TLS layer (the
//! per-user auth method decides, after the startup packet names the user); a certificate that
//! is presented must chain to the CA, or the handshake fails.
//!
//! This module must not know about tenants beyond turning a server name into a slug string.

mod certificate;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub use certificate::{end_point_hash, subject_common_name, subject_names};

/// The ALPN protocol name PostgreSQL 17 registers for its protocol.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// First byte of a TLS record carrying a handshake message (a ClientHello here).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// When clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: SSLRequest is answered `N`; a direct TLS ClientHello is refused.
    #[default]
    Disable,
    /// TLS for clients that ask; plaintext clients are still served.
    Allow,
    /// TLS only: a plaintext StartupMessage is refused (28000) before any password is sent.
    Require,
}

/// `[tls]`: TLS between clients and tenantgate. Every key applies to new connections on
/// RELOAD or SIGHUP (the files are read again even when their names did not change).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `disable`, `allow` or `require`. Default "disable".
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM file with the server certificate chain, leaf first. Required unless mode is
    /// `disable`. Relative to the config file.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1). Required unless
    /// mode is `disable`. Relative to the config file.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// With `db.example.com`, a client that connects over TLS to `acme.db.example.com` (its
    /// SNI) reaches tenant `acme` whatever database name it sends. Default: none.
    #[serde(default)]
    pub sni_base_domain: Option<String>,
    /// PEM file with the CA certificates that client certificates must chain to. When set,
    /// clients are asked for a certificate (not required: users whose auth method is `cert`
    /// or `cert+scram` need one). Default: none (no client certificates).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        if self.mode != TlsMode::Disable {
            if self.cert_file.is_none() {
                return bad(
                    "tls.cert_file",
                    "must be set when tls.mode is not \"disable\"",
                );
            }
            if self.key_file.is_none() {
                return bad(
                    "tls.key_file",
                    "must be set when tls.mode is not \"disable\"",
                );
            }
        }
        if self.client_ca_file.is_some() && self.mode == TlsMode::Disable {
            return bad(
                "tls.client_ca_file",
                "needs tls.mode \"allow\" or \"require\" (client certificates are part of TLS)",
            );
        }
        if let Some(base) = &self.sni_base_domain {
            if self.mode == TlsMode::Disable {
                return bad(
                    "tls.sni_base_domain",
                    "needs tls.mode \"allow\" or \"require\" (SNI is part of TLS)",
                );
            }
            let base = base.trim_matches('.');
            if base.is_empty()
                || !base
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return bad(
                    "tls.sni_base_domain",
                    "must be a DNS name like db.example.com",
                );
            }
        }
        Ok(())
    }

    /// Relative file paths are relative to the config file's directory.
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for file in [
            &mut self.cert_file,
            &mut self.key_file,
            &mut self.client_ca_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
    }
}

/// Why the TLS setup could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("{} is not valid PEM: {message}", path.display())]
    BadPem {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("tls.cert_file and tls.key_file must be set when tls.mode is not \"disable\"")]
    MissingFiles,
    #[error("the certificate and key do not make a usable TLS config: {0}")]
    Rustls(#[source] rustls::Error),
    #[error("{}: no usable CA certificate: {message}", path.display())]
    ClientCa { path: PathBuf, message: String },
}

impl TlsSetupError {
    /// The config key to name in a one-line config error.
    pub fn config_key(&self) -> &'static str {
        match self {
            TlsSetupError::Read { key, .. } | TlsSetupError::BadPem { key, .. } => key,
            TlsSetupError::NoKey { .. } | TlsSetupError::Rustls(_) => "tls.key_file",
            TlsSetupError::NoCertificate { .. } | TlsSetupError::MissingFiles => "tls.cert_file",
            TlsSetupError::ClientCa { .. } => "tls.client_ca_file",
        }
    }
}

/// The TLS side of the listener, built from `[tls]` at start-up and at each reload.
pub struct TlsServer {
    pub mode: TlsMode,
    acceptor: Option<TlsAcceptor>,
    /// tls-server-end-point channel-binding data: the hash of our leaf certificate. None when
    /// its signature algorithm has no defined hash (Ed25519, RSA-PSS): then SCRAM-SHA-256-PLUS
    /// is not offered, as PostgreSQL does.
    end_point: Option<Arc<[u8]>>,
    /// Lower-case, without leading or trailing dots.
    sni_base_domain: Option<String>,
    /// SHA-256 of the leaf certificate, hex: which certificate is served (RELOAD shows it).
    fingerprint: Option<String>,
    /// Whether clients are asked for a certificate (`client_ca_file` is set).
    client_auth: bool,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("mode", &self.mode)
            .field("channel_binding", &self.end_point.is_some())
            .field("sni_base_domain", &self.sni_base_domain)
            .field("fingerprint", &self.fingerprint)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads the certificate and key (when TLS is on) and builds the rustls config.
    pub fn from_config(config: &TlsConfig) -> Result<TlsServer, TlsSetupError> {
        let sni_base_domain = config
            .sni_base_domain
            .as_deref()
            .map(|d| d.trim_matches('.').to_ascii_lowercase());
        if config.mode == TlsMode::Disable {
            return Ok(TlsServer {
                mode: TlsMode::Disable,
                acceptor: None,
                end_point: None,
                sni_base_domain,
                fingerprint: None,
                client_auth: false,
            });
        }
        // Never fall back to plaintext because a file is not named.
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Err(TlsSetupError::MissingFiles);
        };
        let certs = load_certs(cert_file)?;
        let key = load_key(key_file)?;
        let end_point = certs.first().and_then(|leaf| end_point_hash(leaf));
        let fingerprint = certs
            .first()
            .map(|leaf| hex(&Sha256::digest(leaf.as_ref())));
        if end_point.is_none() {
            tracing::warn!(
                "the server certificate's signature algorithm defines no channel-binding hash; \
                 SCRAM-SHA-256-PLUS will not be offered"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?;
        let builder = match &config.client_ca_file {
            Some(ca_file) => builder.with_client_cert_verifier(client_verifier(ca_file, provider)?),
            None => builder.with_no_client_auth(),
        };
        let mut server = builder
            .with_single_cert(certs, key)
            .map_err(TlsSetupError::Rustls)?;
        // A client that offers ALPN must offer "postgresql" (PostgreSQL 17 does the same).
        server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(TlsServer {
            mode: config.mode,
            acceptor: Some(TlsAcceptor::from(Arc::new(server))),
            end_point: end_point.map(Arc::from),
            sni_base_domain,
            fingerprint,
            client_auth: config.client_ca_file.is_some(),
        })
    }

    /// SHA-256 of the served leaf certificate, hex; `None` when TLS is off.
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// The acceptor, when TLS is on.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }

    /// The tenant a TLS server name designates: `acme` for `acme.<sni_base_domain>`. A name
    /// outside the base domain, the base domain itself, or one with more than one label in
    /// front names no tenant.
    pub fn tenant_from_sni(&self, server_name: &str) -> Option<String> {
        let base = self.sni_base_domain.as_deref()?;
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        let label = name.strip_suffix(base)?.strip_suffix('.')?;
        (!label.is_empty() && !label.contains('.')).then(|| label.to_owned())
    }
}

/// What a client's TLS session tells the login path.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The SNI server name the client sent, if any.
    pub server_name: Option<String>,
    /// tls-server-end-point data for SCRAM-SHA-256-PLUS, if it can be offered.
    pub channel_binding: Option<Arc<[u8]>>,
    /// Protocol version and cipher suite, as SHOW CLIENTS shows them
    /// ("TLSv1.3 TLS13_AES_256_GCM_SHA384").
    pub cipher: String,
    /// The subject CN of the client certificate, which rustls has verified against
    /// `client_ca_file`; `None` without one (or without a readable CN).
    pub client_cn: Option<String>,
    /// The subject OU of that certificate: the tenant (or the admin console) it is for.
    pub client_ou: Option<String>,
}

impl TlsServer {
    /// Facts about an established session.
    pub fn info(&self, stream: &TlsStream<TcpStream>) -> TlsInfo {
        let session = stream.get_ref().1;
        let version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let suite = session
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        let (client_cn, client_ou) = match session.peer_certificates().and_then(<[_]>::first) {
            Some(leaf) if self.client_auth => subject_names(leaf),
            _ => (None, None),
        };
        TlsInfo {
            server_name: session.server_name().map(str::to_owned),
            channel_binding: self.end_point.clone(),
            cipher: format!("{version} {suite}").trim().to_owned(),
            client_cn,
            client_ou,
        }
    }
}

/// The current [`TlsServer`], replaced as a whole by a reload. Readers take an `Arc` snapshot;
/// the lock is held only to clone or swap that `Arc`, never across an await.
#[derive(Debug, Clone)]
pub struct SharedTls(Arc<std::sync::RwLock<Arc<TlsServer>>>);

impl SharedTls {
    pub fn new(server: TlsServer) -> SharedTls {
        SharedTls(Arc::new(std::sync::RwLock::new(Arc::new(server))))
    }

    /// The TLS setup new connections use now.
    pub fn current(&self) -> Arc<TlsServer> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Serves `server` to new connections; returns the one it replaces.
    pub fn replace(&self, server: TlsServer) -> Arc<TlsServer> {
        std::mem::replace(
            &mut *self
                .0
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Arc::new(server),
        )
    }
}

/// Verifies client certificates against `ca_file`, allowing clients that present none.
fn client_verifier(
    ca_file: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsSetupError> {
    let bad = |message: String| TlsSetupError::ClientCa {
        path: ca_file.to_owned(),
        message,
    };
    let text = std::fs::read(ca_file).map_err(|source| TlsSetupError::Read {
        key: "tls.client_ca_file",
        path: ca_file.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&text) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("the file holds no PEM certificate".to_owned()));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(e.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
        s
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let text = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        key: "tls.cert_file",
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::BadPem {
            key: "tls.cert_file",
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let text = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        key: "tls.key_file",
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsSetupError::NoKey {
            path: path.to_owned(),
        },
        other => TlsSetupError::BadPem {
            key: "tls.key_file",
            path: path.to_owned(),
            message: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(base: &str) -> TlsServer {
        TlsServer {
            mode: TlsMode::Allow,
            acceptor: None,
            end_point: None,
            sni_base_domain: Some(base.to_owned()),
            fingerprint: None,
            client_auth: false,
        }
    }

    #[test]
    fn sni_names_a_tenant_only_one_label_below_the_base() {
        let s = server("db.example.com");
        assert_eq!(
            s.tenant_from_sni("acme.db.example.com").as_deref(),
            Some("acme")
        );
        assert_eq!(
            s.tenant_from_sni("ACME.DB.Example.com.").as_deref(),
            Some("acme")
        );
        for none in [
            "db.example.com",
            "a.b.db.example.com",
            "acme.db.example.org",
            "acmedb.example.com",
            ".db.example.com",
            "localhost",
        ] {
            assert_eq!(s.tenant_from_sni(none), None, "{none}");
        }
    }

    #[test]
    fn config_needs_files_unless_disabled() {
        let mut c = TlsConfig {
            mode: TlsMode::Require,
            ..TlsConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "tls.cert_file");
        c.cert_file = Some("a.crt".into());
        assert_eq!(c.validate().unwrap_err().0, "tls.key_file");
        c.key_file = Some("a.key".into());
        c.validate().unwrap();
        c.sni_base_domain = Some("bad domain".to_owned());
        assert_eq!(c.validate().unwrap_err().0, "tls.sni_base_domain");
        let sni_without_tls = TlsConfig {
            sni_base_domain: Some("db.example.com".to_owned()),
            ..TlsConfig::default()
        };
        assert_eq!(
            sni_without_tls.validate().unwrap_err().0,
            "tls.sni_base_domain"
        );
        let no_files = TlsConfig {
            mode: TlsMode::Allow,
            ..TlsConfig::default()
        };
        assert!(matches!(
            TlsServer::from_config(&no_files),
            Err(TlsSetupError::MissingFiles)
        ));
        let missing = TlsServer::from_config(&TlsConfig {
            sni_base_domain: None,
            ..c
        })
        .unwrap_err();
        assert_eq!(missing.config_key(), "tls.cert_file");
    }
}
