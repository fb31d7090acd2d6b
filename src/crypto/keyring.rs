//! The keyring: every master key tenantgate knows, the first one current, and the stored
//! format of a secret encrypted under it.
//!
//! Format v3 (written): version byte `3` || 8-byte key id (the first 8 bytes of SHA-256 of the
//! key) || 12-byte random nonce || ciphertext with its 16-byte tag, sealed with the secret's
//! [`Binding`] (which registry field of which row it belongs to) as associated data: a
//! ciphertext copied into another row or field does not decrypt there. The key id lets
//! decryption pick its key without trying them all. Formats v2 (the same without associated
//! data) and v1 (no key id: each key is tried) were written by earlier versions: `decrypt`
//! refuses them, and only [`KeyRing::decrypt_unbound`] reads them, to bind them (rotation and
//! the upgrade at start). This module must not log keys or plaintext, and key bytes leave it
//! only through [`KeyRing::encoded`] for the key file.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha256};

use super::{CryptoError, Secret};

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const FORMAT_V3: u8 = 3;
const NONCE_BYTES: usize = 12;
const KEY_ID_BYTES: usize = 8;
const KEY_BYTES: usize = 32;

/// Where a secret is stored: the registry field and the row. Sealed into the ciphertext as
/// associated data, so a ciphertext decrypts only where it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    field: &'static str,
    row: &'a str,
}

impl<'a> Binding<'a> {
    /// A tenant's backend password (`tenants.backend_password_enc` of `slug`).
    pub const fn backend_password(slug: &'a str) -> Binding<'a> {
        Binding {
            field: "tenants.backend_password_enc",
            row: slug,
        }
    }

    fn aad(&self) -> Vec<u8> {
        // NUL cannot occur in a field name or a slug: the two parts cannot run together.
        format!("tenantgate\0{}\0{}", self.field, self.row).into_bytes()
    }
}

/// A key's public name: the first 8 bytes of SHA-256 of the key, shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_BYTES]);

impl KeyId {
    fn of(key: &[u8; KEY_BYTES]) -> KeyId {
        let digest = Sha256::digest(key);
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(digest.get(..KEY_ID_BYTES).unwrap_or(&[0; KEY_ID_BYTES]));
        KeyId(id)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// One master key. Its `Debug` shows only its id.
#[derive(Clone)]
struct Key {
    id: KeyId,
    bytes: [u8; KEY_BYTES],
    cipher: Aes256Gcm,
}

impl Key {
    fn new(bytes: [u8; KEY_BYTES]) -> Key {
        Key {
            id: KeyId::of(&bytes),
            cipher: Aes256Gcm::new(&bytes.into()),
            bytes,
        }
    }

    fn open(&self, nonce: &[u8; NONCE_BYTES], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let payload = Payload { msg: sealed, aad };
        self.cipher.decrypt(Nonce::from_slice(nonce), payload).ok()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

/// Master keys, current first. Never empty.
#[derive(Debug, Clone)]
#[must_use]
pub struct KeyRing {
    keys: Vec<Key>,
}

impl KeyRing {
    /// Parses one or more keys (32 bytes each, base64 or 64 hex digits) separated by newlines
    /// or commas; blank lines and lines starting with `#` are skipped, a repeated key is kept
    /// once. The first key is the current one. `from` names the source in errors.
    pub fn parse(text: &str, from: &str) -> Result<KeyRing, CryptoError> {
        let mut keys: Vec<Key> = Vec::new();
        let items = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.starts_with('#'))
            .flat_map(|line| line.split(','))
            .map(str::trim)
            .filter(|item| !item.is_empty());
        for (i, item) in items.enumerate() {
            let key = Key::new(decode_key(item).ok_or_else(|| CryptoError::BadKey {
                from: format!("{from} (key {})", i + 1),
            })?);
            if !keys.iter().any(|k| k.id == key.id) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(CryptoError::BadKey {
                from: format!("{from} (no key in it)"),
            });
        }
        Ok(KeyRing { keys })
    }

    /// A ring of one fresh random key.
    pub fn generate() -> KeyRing {
        let mut bytes = [0u8; KEY_BYTES];
        rand::fill(&mut bytes);
        KeyRing {
            keys: vec![Key::new(bytes)],
        }
    }

    /// This ring with `newer`'s current key in front: what rotation writes.
    pub fn with_current(&self, newer: &KeyRing) -> KeyRing {
        let mut keys = vec![newer.current().clone()];
        keys.extend(
            self.keys
                .iter()
                .filter(|k| k.id != newer.current_id())
                .cloned(),
        );
        KeyRing { keys }
    }

    /// Only the current key: what retiring leaves.
    pub fn current_only(&self) -> KeyRing {
        KeyRing {
            keys: vec![self.current().clone()],
        }
    }

    fn current(&self) -> &Key {
        // Never empty: parse and generate refuse or make at least one key.
        &self.keys[0]
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> KeyId {
        self.current().id
    }

    /// Every key's id, current first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key file's text: one base64 key per line, current first. For the key file only.
    pub fn encoded(&self) -> String {
        let mut text = String::new();
        for key in &self.keys {
            text.push_str(&BASE64.encode(key.bytes));
            text.push('\n');
        }
        text
    }

    /// Encrypts under the current key, format v3, bound to `binding`.
    pub fn encrypt(&self, secret: &Secret, binding: &Binding<'_>) -> Vec<u8> {
        let key = self.current();
        let mut nonce = [0u8; NONCE_BYTES];
        rand::fill(&mut nonce);
        let aad = binding.aad();
        let payload = Payload {
            msg: secret.expose().as_bytes(),
            aad: &aad,
        };
        // AES-GCM encryption fails only for plaintexts over 64 GiB.
        let sealed = key
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + KEY_ID_BYTES + NONCE_BYTES + sealed.len());
        out.push(FORMAT_V3);
        out.extend_from_slice(&key.id.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a secret stored (format v3) where `binding` says. A v3 ciphertext from any
    /// other field or row fails with `Decrypt`; v1 and v2 ciphertexts, which carry no binding,
    /// fail with `Unbound`.
    pub fn decrypt(&self, stored: &[u8], binding: &Binding<'_>) -> Result<Secret, CryptoError> {
        let (version, rest) = stored.split_first().ok_or(CryptoError::Malformed)?;
        match *version {
            FORMAT_V3 => self.open_with_id(rest, &binding.aad()),
            FORMAT_V1 | FORMAT_V2 => Err(CryptoError::Unbound),
            _ => Err(CryptoError::Malformed),
        }
    }

    /// Decrypts a v1 or v2 secret, written before secrets were bound to their place: only to
    /// re-encrypt it bound. A v3 secret is refused (`Malformed`): it needs its binding.
    pub fn decrypt_unbound(&self, stored: &[u8]) -> Result<Secret, CryptoError> {
        let (version, rest) = stored.split_first().ok_or(CryptoError::Malformed)?;
        match *version {
            FORMAT_V1 => {
                let (nonce, sealed) = rest
                    .split_first_chunk::<NONCE_BYTES>()
                    .ok_or(CryptoError::Malformed)?;
                let plain = self
                    .keys
                    .iter()
                    .find_map(|k| k.open(nonce, sealed, &[]))
                    .ok_or(CryptoError::Decrypt)?;
                utf8(plain)
            }
            FORMAT_V2 => self.open_with_id(rest, &[]),
            _ => Err(CryptoError::Malformed),
        }
    }

    /// Opens `key id || nonce || sealed` with `aad`.
    fn open_with_id(&self, rest: &[u8], aad: &[u8]) -> Result<Secret, CryptoError> {
        let (id, rest) = rest
            .split_first_chunk::<KEY_ID_BYTES>()
            .ok_or(CryptoError::Malformed)?;
        let (nonce, sealed) = rest
            .split_first_chunk::<NONCE_BYTES>()
            .ok_or(CryptoError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id.0 == *id)
            .ok_or(CryptoError::UnknownKey { id: KeyId(*id) })?;
        utf8(key.open(nonce, sealed, aad).ok_or(CryptoError::Decrypt)?)
    }

    /// The MAC of `message` for `purpose` under the current key (`super::mac`).
    pub fn sign(&self, purpose: &str, message: &[u8]) -> [u8; super::mac::MAC_BYTES] {
        super::mac::sign(&self.current().bytes, purpose, message)
    }

    /// Whether `tag` is the MAC of `message` for `purpose` under any key of the ring, so a
    /// peer that has rotated to a newer key (or not yet) is still believed while both rings
    /// hold the key it signed with.
    pub fn verify(&self, purpose: &str, message: &[u8], tag: &[u8]) -> bool {
        self.keys
            .iter()
            .any(|k| super::mac::verify(&k.bytes, purpose, message, tag))
    }

    /// Whether `stored` is bound (format v3) and under the current key: nothing left to
    /// re-encrypt.
    pub fn is_current(&self, stored: &[u8]) -> bool {
        is_bound(stored) && key_id_of(stored) == Some(self.current_id())
    }
}

fn utf8(plain: Vec<u8>) -> Result<Secret, CryptoError> {
    String::from_utf8(plain)
        .map(Secret::new)
        .map_err(|_| CryptoError::Malformed)
}

/// Whether `stored` is format v3 (bound to its place).
pub fn is_bound(stored: &[u8]) -> bool {
    stored.first() == Some(&FORMAT_V3)
}

/// The key id a v2 or v3 blob names; `None` for v1 or malformed blobs.
pub fn key_id_of(stored: &[u8]) -> Option<KeyId> {
    match stored.split_first() {
        Some((&(FORMAT_V2 | FORMAT_V3), rest)) => rest
            .split_first_chunk::<KEY_ID_BYTES>()
            .map(|(id, _)| KeyId(*id)),
        _ => None,
    }
}

/// 32 bytes written as base64 or 64 hex digits.
fn decode_key(text: &str) -> Option<[u8; KEY_BYTES]> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..KEY_BYTES)
            .map(|i| {
                text.get(i * 2..i * 2 + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
    } else {
        BASE64.decode(text).ok()
    }?;
    bytes.try_into().ok()
}

/// The v1 format, for tests that stand in for data written before key rotation existed.
#[cfg(test)]
pub(super) fn encrypt_v1(ring: &KeyRing, secret: &Secret) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::fill(&mut nonce);
    let sealed = ring
        .current()
        .cipher
        .encrypt(Nonce::from_slice(&nonce), secret.expose().as_bytes())
        .unwrap();
    let mut out = vec![FORMAT_V1];
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}
