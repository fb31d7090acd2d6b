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
//! This module must not know about tenants beyond turning a server name into a slug string.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

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

/// `[tls]`: TLS between clients and tenantgate. Restart to change.
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
        for file in [&mut self.cert_file, &mut self.key_file]
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
}

impl TlsSetupError {
    /// The config key to name in a one-line config error.
    pub fn config_key(&self) -> &'static str {
        match self {
            TlsSetupError::Read { key, .. } | TlsSetupError::BadPem { key, .. } => key,
            TlsSetupError::NoKey { .. } | TlsSetupError::Rustls(_) => "tls.key_file",
            TlsSetupError::NoCertificate { .. } | TlsSetupError::MissingFiles => "tls.cert_file",
        }
    }
}

/// The TLS side of the listener, built once at start-up.
pub struct TlsServer {
    pub mode: TlsMode,
    acceptor: Option<TlsAcceptor>,
    /// tls-server-end-point channel-binding data: the hash of our leaf certificate. None when
    /// its signature algorithm has no defined hash (Ed25519, RSA-PSS): then SCRAM-SHA-256-PLUS
    /// is not offered, as PostgreSQL does.
    end_point: Option<Arc<[u8]>>,
    /// Lower-case, without leading or trailing dots.
    sni_base_domain: Option<String>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("mode", &self.mode)
            .field("channel_binding", &self.end_point.is_some())
            .field("sni_base_domain", &self.sni_base_domain)
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
            });
        }
        // Never fall back to plaintext because a file is not named.
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Err(TlsSetupError::MissingFiles);
        };
        let certs = load_certs(cert_file)?;
        let key = load_key(key_file)?;
        let end_point = certs.first().and_then(|leaf| end_point_hash(leaf));
        if end_point.is_none() {
            tracing::warn!(
                "the server certificate's signature algorithm defines no channel-binding hash; \
                 SCRAM-SHA-256-PLUS will not be offered"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsSetupError::Rustls)?;
        // A client that offers ALPN must offer "postgresql" (PostgreSQL 17 does the same).
        server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(TlsServer {
            mode: config.mode,
            acceptor: Some(TlsAcceptor::from(Arc::new(server))),
            end_point: end_point.map(Arc::from),
            sni_base_domain,
        })
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
}

impl TlsServer {
    /// Facts about an established session.
    pub fn info(&self, stream: &TlsStream<TcpStream>) -> TlsInfo {
        TlsInfo {
            server_name: stream.get_ref().1.server_name().map(str::to_owned),
            channel_binding: self.end_point.clone(),
        }
    }
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

/// tls-server-end-point (RFC 5929 §4.1): the certificate hashed with its signature's hash
/// function, SHA-256 when that is MD5 or SHA-1. None for algorithms without one (Ed25519,
/// RSA-PSS), where PostgreSQL also refuses channel binding.
pub fn end_point_hash(cert_der: &[u8]) -> Option<Vec<u8>> {
    // DER contents of the OID arcs (without tag and length).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04]; // 1.2.840.10045.4
    let oid = signature_algorithm_oid(cert_der)?;
    let hash = match oid {
        // md5WithRSA (4), sha1WithRSA (5), sha256WithRSA (11); ecdsa-with-SHA1, ecdsa-with-SHA256
        [rsa @ .., 4 | 5 | 11] if rsa == RSA => Hash::Sha256,
        [e @ .., 1] if e == ECDSA => Hash::Sha256,
        [e @ .., 3, 2] if e == ECDSA => Hash::Sha256,
        [rsa @ .., 12] if rsa == RSA => Hash::Sha384,
        [e @ .., 3, 3] if e == ECDSA => Hash::Sha384,
        [rsa @ .., 13] if rsa == RSA => Hash::Sha512,
        [e @ .., 3, 4] if e == ECDSA => Hash::Sha512,
        _ => return None,
    };
    Some(match hash {
        Hash::Sha256 => Sha256::digest(cert_der).to_vec(),
        Hash::Sha384 => Sha384::digest(cert_der).to_vec(),
        Hash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, ... };
/// AlgorithmIdentifier ::= SEQUENCE { algorithm OBJECT IDENTIFIER, parameters ANY OPTIONAL }.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = der_tlv(der, 0x30)?;
    let (_tbs, rest) = der_tlv(cert, 0x30)?;
    let (alg, _) = der_tlv(rest, 0x30)?;
    let (oid, _) = der_tlv(alg, 0x06)?;
    Some(oid)
}

/// One DER TLV with the expected tag: (contents, what follows).
fn der_tlv(bytes: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = bytes.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (len_bytes, rest) = rest.split_at_checked(n)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    rest.split_at_checked(len)
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
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der();
        assert_eq!(
            end_point_hash(der).unwrap(),
            Sha256::digest(der.as_ref()).to_vec()
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(end_point_hash(cert.der()).unwrap().len(), 48);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(end_point_hash(cert.der()), None);
        // Garbage never panics.
        for n in 0..64 {
            drop(end_point_hash(&der[..n]));
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
