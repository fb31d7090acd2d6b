//! The two facts read from a DER certificate, with `x509-cert`: the signature algorithm (for
//! the tls-server-end-point hash) and the subject's common name (for client-certificate auth,
//! as PostgreSQL's `be_tls_open_server` reads `peer_cn`).
//!
//! Everything here takes untrusted bytes: no panics; a certificate that is not valid DER has
//! neither fact. It must not decide anything about trust: rustls has verified the chain before
//! a client certificate reaches `subject_common_name`.

use sha2::{Digest as _, Sha256, Sha384, Sha512};
use x509_cert::Certificate;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode as _, Tag, Tagged as _};

const MD5_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.4");
const SHA1_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.5");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const ECDSA_WITH_SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const ORGANIZATIONAL_UNIT: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");

/// tls-server-end-point (RFC 5929 §4.1): the certificate hashed with its signature's hash
/// function, SHA-256 when that is MD5 or SHA-1. None for algorithms without one (Ed25519,
/// RSA-PSS), where PostgreSQL also refuses channel binding.
pub fn end_point_hash(cert_der: &[u8]) -> Option<Vec<u8>> {
    let cert = Certificate::from_der(cert_der).ok()?;
    let hash = match cert.signature_algorithm.oid {
        MD5_WITH_RSA | SHA1_WITH_RSA | SHA256_WITH_RSA | ECDSA_WITH_SHA1 | ECDSA_WITH_SHA256 => {
            Hash::Sha256
        }
        SHA384_WITH_RSA | ECDSA_WITH_SHA384 => Hash::Sha384,
        SHA512_WITH_RSA | ECDSA_WITH_SHA512 => Hash::Sha512,
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

/// The first commonName in the certificate's subject, when it is a string type (UTF8String,
/// PrintableString, IA5String, T61String) without NUL bytes. PostgreSQL refuses a CN with an
/// embedded NUL too: it could make "admin\0.evil" read as "admin".
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    subject_names(der).0
}

/// The subject's first commonName and first organizationalUnitName (same rules as
/// [`subject_common_name`]). The OU names what the certificate is for: the tenant slug, or
/// the admin console's database name.
pub fn subject_names(der: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(cert) = Certificate::from_der(der) else {
        return (None, None);
    };
    let first = |oid: ObjectIdentifier| {
        cert.tbs_certificate
            .subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|atv| atv.oid == oid)
            .and_then(|atv| string_value(&atv.value))
    };
    (first(COMMON_NAME), first(ORGANIZATIONAL_UNIT))
}

fn string_value(value: &x509_cert::der::Any) -> Option<String> {
    let text = value.value();
    let string_type = matches!(
        value.tag(),
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString
    );
    if !string_type || text.contains(&0) {
        return None;
    }
    std::str::from_utf8(text).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn common_name_is_read_from_the_subject_not_the_issuer() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "the issuer");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let der = cert.der();
        assert_eq!(subject_common_name(der).as_deref(), Some("app"));
        let mut no_cn = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap();
        no_cn.distinguished_name = rcgen::DistinguishedName::new();
        let cert = no_cn.self_signed(&key).unwrap();
        assert_eq!(subject_common_name(cert.der()), None);
        for n in 0..der.len() {
            drop(subject_common_name(&der[..n]));
        }
    }

    #[test]
    fn a_common_name_with_a_nul_or_of_another_type_is_no_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let with = |value: rcgen::DnValue| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, value);
            subject_common_name(params.self_signed(&key).unwrap().der())
        };
        assert_eq!(
            with(rcgen::DnValue::Utf8String("admin".into())).as_deref(),
            Some("admin")
        );
        assert_eq!(
            with(rcgen::DnValue::Utf8String("admin\0.evil".into())),
            None
        );
        let bmp = rcgen::string::BmpString::try_from("admin").unwrap();
        assert_eq!(with(rcgen::DnValue::BmpString(bmp)), None);
    }
}
