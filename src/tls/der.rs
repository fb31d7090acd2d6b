//! Reading the few facts we need from a DER certificate without a full X.509 parser: the
//! signature algorithm (for the tls-server-end-point hash) and the subject's common name (for
//! client-certificate auth, as PostgreSQL's `be_tls_open_server` reads `peer_cn`).
//!
//! Everything here takes untrusted bytes: no panics, no indexing, every length bounded by the
//! input. It must not decide anything about trust: rustls has verified the chain before a
//! client certificate reaches `subject_common_name`.

use sha2::{Digest as _, Sha256, Sha384, Sha512};

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

/// The first commonName (OID 2.5.4.3) in the certificate's subject, when it is a string type
/// (UTF8String, PrintableString, IA5String, T61String) without NUL bytes. PostgreSQL refuses a
/// CN with an embedded NUL too: it could make "admin\0.evil" read as "admin".
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    let (cert, _) = der_tlv(der, 0x30)?;
    let (tbs, _) = der_tlv(cert, 0x30)?;
    // TBSCertificate ::= SEQUENCE { version [0] EXPLICIT OPTIONAL, serialNumber, signature,
    //                               issuer, validity, subject, ... }
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_any(rest)?.2;
    }
    for _ in 0..4 {
        rest = der_any(rest)?.2; // serialNumber, signature, issuer, validity
    }
    let (mut rdns, _) = der_tlv(rest, 0x30)?;
    // Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue)
    while !rdns.is_empty() {
        let (mut set, after) = der_tlv(rdns, 0x31)?;
        rdns = after;
        while !set.is_empty() {
            let (atv, after) = der_tlv(set, 0x30)?;
            set = after;
            let (oid, value) = der_tlv(atv, 0x06)?;
            if oid != COMMON_NAME {
                continue;
            }
            let (tag, text, _) = der_any(value)?;
            if !matches!(tag, 0x0c | 0x13 | 0x16 | 0x14) || text.contains(&0) {
                return None;
            }
            return std::str::from_utf8(text).ok().map(str::to_owned);
        }
    }
    None
}

/// One DER TLV of any tag: (tag, contents, what follows).
fn der_any(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *bytes.first()?;
    let (contents, rest) = der_tlv(bytes, tag)?;
    Some((tag, contents, rest))
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
}
