//! Test certificates with rcgen: CAs, server certificates for given names, client
//! certificates for a CN, written to a directory removed on drop; and rustls client configs
//! trusting some CAs, optionally presenting a client certificate.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "not every helper is used by every area"
)]

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate authority that signs server and client certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Pair {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate whose subject CN is `cn`, with no OU (for no database).
    pub fn client(&self, cn: &str) -> Pair {
        self.client_for(cn, None)
    }

    /// A client certificate whose subject CN is `cn` and OU `ou` (the database it is for: a
    /// tenant slug, or the admin console's name).
    pub fn client_for(&self, cn: &str, ou: Option<&str>) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(ou) = ou {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A directory of certificate files, removed on drop.
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(prefix: &str) -> CertDir {
        let dir = std::env::temp_dir().join(format!(
            "tenantgate-certs-{}-{}",
            std::process::id(),
            crate::common::unique(prefix)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        CertDir { dir }
    }

    /// Writes `text` to `name` (mode 0600: libpq refuses a key others can read).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// Writes a pair as `name.crt` and `name.key`; returns both paths.
    pub fn write_pair(&self, name: &str, pair: &Pair) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.crt"), &pair.cert),
            self.write(&format!("{name}.key"), &pair.key),
        )
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

/// A rustls client trusting `roots`, presenting `client` if given.
pub fn rustls_client(roots: &[&TestCa], client: Option<&Pair>) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for ca in roots {
        store.add(ca.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    match client {
        Some(pair) => {
            let certs = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}
