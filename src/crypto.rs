//! Secrets at rest: AES-256-GCM with a master key from the environment or a key file, and the
//! [`Secret`] type whose `Debug` and `Display` never show the value.
//!
//! Stored format: version byte `1` || 12-byte random nonce || ciphertext with its 16-byte tag.
//! This module must not log secrets, and nothing outside it sees the master key.

use std::path::PathBuf;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

const FORMAT_V1: u8 = 1;
const NONCE_BYTES: usize = 12;

/// `[secrets]`: where the master key comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Environment variable holding the master key (32 bytes, base64 or 64 hex digits).
    /// Checked first. Default `TENANTGATE_MASTER_KEY`. Restart to change.
    #[serde(default = "default_master_key_env")]
    pub master_key_env: String,
    /// File holding the master key in the same encoding, used when the variable is unset.
    /// Relative to the config file. Default: none. Restart to change.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
}

fn default_master_key_env() -> String {
    "TENANTGATE_MASTER_KEY".to_owned()
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            master_key_env: default_master_key_env(),
            master_key_file: None,
        }
    }
}

/// A secret string: printed as `***`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("no master key: set {env} or secrets.master_key_file (32 random bytes, base64 or hex)")]
    NoKey { env: String },
    #[error("cannot read master key file {path}: {source}")]
    ReadKeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("master key from {from} is not 32 bytes in base64 or hex")]
    BadKey { from: String },
    #[error("stored secret is malformed")]
    Malformed,
    #[error("stored secret does not decrypt with this master key")]
    Decrypt,
}

/// The master key. Its `Debug` prints nothing of it.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

impl MasterKey {
    /// Loads the key: the environment variable first, then the key file.
    pub fn load(config: &SecretsConfig) -> Result<MasterKey, CryptoError> {
        if let Ok(text) = std::env::var(&config.master_key_env) {
            return MasterKey::decode(&text, &config.master_key_env);
        }
        let Some(path) = &config.master_key_file else {
            return Err(CryptoError::NoKey {
                env: config.master_key_env.clone(),
            });
        };
        let text = std::fs::read_to_string(path).map_err(|source| CryptoError::ReadKeyFile {
            path: path.display().to_string(),
            source,
        })?;
        MasterKey::decode(&text, &path.display().to_string())
    }

    /// Parses 32 bytes written as base64 or 64 hex digits.
    pub fn decode(text: &str, from: &str) -> Result<MasterKey, CryptoError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| {
                    text.get(i * 2..i * 2 + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
        } else {
            BASE64.decode(text).ok()
        };
        let bytes = bytes.filter(|b| b.len() == 32).ok_or(CryptoError::BadKey {
            from: from.to_owned(),
        })?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| CryptoError::BadKey {
            from: from.to_owned(),
        })?;
        Ok(MasterKey { cipher })
    }

    /// A fresh random key, base64-encoded, for the quickstart.
    pub fn generate_encoded() -> String {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        BASE64.encode(key)
    }

    /// Encrypts a secret for storage.
    pub fn encrypt(&self, secret: &Secret) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::fill(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.expose().as_bytes())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_BYTES + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a stored secret.
    pub fn decrypt(&self, stored: &[u8]) -> Result<Secret, CryptoError> {
        let (version, rest) = stored.split_first().ok_or(CryptoError::Malformed)?;
        if *version != FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, sealed) = rest
            .split_first_chunk::<NONCE_BYTES>()
            .ok_or(CryptoError::Malformed)?;
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plain)
            .map(Secret)
            .map_err(|_| CryptoError::Malformed)
    }
}

/// A random password of `len` characters from an unambiguous URL-safe alphabet.
pub fn generate_password(len: usize) -> Secret {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut raw = vec![0u8; len];
    rand::fill(&mut raw[..]);
    let s = raw
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect::<String>();
    Secret(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = MasterKey::decode(&MasterKey::generate_encoded(), "test").unwrap();
        let blob = key.encrypt(&Secret::new("hunter2"));
        assert_eq!(key.decrypt(&blob).unwrap().expose(), "hunter2");
        assert!(!blob.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn wrong_key_and_tampering_fail() {
        let a = MasterKey::decode(&MasterKey::generate_encoded(), "a").unwrap();
        let b = MasterKey::decode(&MasterKey::generate_encoded(), "b").unwrap();
        let mut blob = a.encrypt(&Secret::new("x"));
        assert!(matches!(b.decrypt(&blob), Err(CryptoError::Decrypt)));
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(a.decrypt(&blob).is_err());
        assert!(a.decrypt(&[]).is_err());
        assert!(a.decrypt(&[1, 2, 3]).is_err());
    }

    #[test]
    fn hex_keys_work_and_short_keys_do_not() {
        assert!(MasterKey::decode(&"ab".repeat(32), "hex").is_ok());
        assert!(MasterKey::decode("c2hvcnQ=", "short").is_err());
    }

    #[test]
    fn secret_debug_hides_value() {
        let s = Secret::new("topsecret");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }
}
