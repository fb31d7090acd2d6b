//! Secrets at rest: AES-256-GCM under a ring of master keys from the environment or a key
//! file, the shared [`MasterKey`] handle every holder (server, admin console, pool map,
//! provisioning) reads the current ring through, and the [`Secret`] type whose `Debug` and
//! `Display` never show the value.
//!
//! Moving parts: `keyring` (keys, key ids, the stored formats v1 and v2), `keyfile` (key
//! sources and the atomic key-file write), `mac` (MACs between instances under a subkey derived
//! from the master key). Rotation itself (new key into the file, registry
//! re-encrypted) is `crate::rekey`. This module must not log secrets or keys, and nothing
//! outside it sees key bytes except the key file.

mod keyfile;
mod keyring;
mod mac;

use keyfile::FileStamp;
pub use keyfile::KeySource;
pub use keyring::{Binding, KeyId, KeyRing, is_bound, key_id_of};
pub use mac::MAC_BYTES;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A running process re-reads its key source for an unknown key id at most this often.
const REREAD_INTERVAL: Duration = Duration::from_secs(1);
/// `[secrets]`: where the master key comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Environment variable holding the master key (32 bytes, base64 or 64 hex digits), or
    /// several comma-separated keys, the first one current. Checked first. Key rotation needs
    /// the file instead. Default `TENANTGATE_MASTER_KEY`. Restart to change.
    #[serde(default = "default_master_key_env")]
    pub master_key_env: String,
    /// File holding the master keys in the same encoding, one per line, the first one
    /// current; used when the variable is unset. `tenantgate key rotate` rewrites it.
    /// Re-read on RELOAD and when a secret names a key id not in memory. Relative to the
    /// config file. Default: none. Restart to change the path.
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
    #[error("cannot write master key file {path}: {source}")]
    WriteKeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("master key from {from} is not 32 bytes in base64 or hex")]
    BadKey { from: String },
    #[error("stored secret is malformed")]
    Malformed,
    #[error("stored secret does not decrypt with this master key")]
    Decrypt,
    #[error("stored secret is encrypted under master key {id}, which is not in the key ring")]
    UnknownKey { id: KeyId },
    #[error(
        "stored secret is in a format without its registry binding (written before version 6 of the registry schema); restart tenantgate or run `tenantgate key rotate` to bind it"
    )]
    Unbound,
}

/// The shared master-key handle: cheap to clone, and every clone sees a new ring at once
/// (rotation, RELOAD, or a re-read after meeting an unknown key id). Reads take a read lock
/// and an `Arc` clone; decryption happens when a tenant pool is built, not per message.
#[derive(Clone)]
pub struct MasterKey {
    shared: Arc<Shared>,
}

struct Shared {
    ring: RwLock<Arc<KeyRing>>,
    source: KeySource,
    /// When the source was last re-read because of an unknown key id.
    last_reread: Mutex<Option<Instant>>,
    /// The key file as it was when last read.
    read_stamp: Mutex<Option<FileStamp>>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

impl MasterKey {
    /// Loads the keys: the environment variable when set, else the key file.
    pub fn load(config: &SecretsConfig) -> Result<MasterKey, CryptoError> {
        let source = KeySource::of(config)?;
        let stamp = source.stamp();
        let ring = read_ring(&source)?.ok_or(CryptoError::NoKey {
            env: config.master_key_env.clone(),
        })?;
        let key = MasterKey::with_source(ring, source);
        key.set_stamp(stamp);
        Ok(key)
    }

    /// Keys given as text (one or more, newline- or comma-separated), never re-read.
    pub fn decode(text: &str, from: &str) -> Result<MasterKey, CryptoError> {
        Ok(MasterKey::with_source(
            KeyRing::parse(text, from)?,
            KeySource::Fixed,
        ))
    }

    fn with_source(ring: KeyRing, source: KeySource) -> MasterKey {
        MasterKey {
            shared: Arc::new(Shared {
                ring: RwLock::new(Arc::new(ring)),
                source,
                last_reread: Mutex::new(None),
                read_stamp: Mutex::new(None),
            }),
        }
    }

    /// A fresh random key, base64-encoded, for the quickstart.
    pub fn generate_encoded() -> String {
        KeyRing::generate().encoded()
    }

    /// The ring now.
    pub fn ring(&self) -> Arc<KeyRing> {
        Arc::clone(
            &self
                .shared
                .ring
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Where the keys come from.
    pub fn source(&self) -> &KeySource {
        &self.shared.source
    }

    /// Makes `ring` the ring every holder sees.
    pub fn replace(&self, ring: KeyRing) {
        *self
            .shared
            .ring
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
    }

    /// Re-reads the key source and swaps the ring in; on error the ring stays as it was.
    pub fn reload(&self) -> Result<Arc<KeyRing>, CryptoError> {
        // Stamped before reading: a file replaced meanwhile is read again next time.
        let stamp = self.shared.source.stamp();
        if let Some(ring) = read_ring(&self.shared.source)? {
            self.replace(ring);
            self.set_stamp(stamp);
        }
        Ok(self.ring())
    }

    fn set_stamp(&self, stamp: Option<FileStamp>) {
        *self
            .shared
            .read_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stamp;
    }

    /// Encrypts a secret for storage under the current key. The key file is re-read first
    /// (this is rare: provisioning), so a process that missed a rotation by another process
    /// still writes under the newest key and a later retire does not strand its secret.
    pub fn encrypt(&self, secret: &Secret, binding: &Binding<'_>) -> Vec<u8> {
        if matches!(self.shared.source, KeySource::File(_)) {
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "master key file not re-read; encrypting with the keys in memory");
            }
        }
        self.ring().encrypt(secret, binding)
    }

    /// Decrypts a stored secret. A secret under a key id this ring lacks (another process
    /// rotated the shared key file) makes the source be re-read, and the decryption retried:
    /// at once when the key file has changed since it was read, else at most once a second.
    pub fn decrypt(&self, stored: &[u8], binding: &Binding<'_>) -> Result<Secret, CryptoError> {
        match self.ring().decrypt(stored, binding) {
            Err(CryptoError::UnknownKey { id }) if self.may_reread() => {
                match self.reload() {
                    Ok(ring) => tracing::info!(
                        unknown = %id,
                        current = %ring.current_id(),
                        keys = ring.len(),
                        "met a secret under an unknown master key id; key ring re-read"
                    ),
                    Err(e) => {
                        tracing::warn!(unknown = %id, error = %e, "master key source not re-read");
                    }
                }
                self.ring().decrypt(stored, binding)
            }
            other => other,
        }
    }

    /// The MAC of `message` for `purpose`, under a subkey of the current master key: how
    /// instances sharing the key authenticate what they send each other.
    pub fn sign(&self, purpose: &str, message: &[u8]) -> [u8; MAC_BYTES] {
        self.ring().sign(purpose, message)
    }

    /// Whether `tag` is `message`'s MAC for `purpose` under any key in the ring.
    pub fn verify(&self, purpose: &str, message: &[u8], tag: &[u8]) -> bool {
        self.ring().verify(purpose, message, tag)
    }

    fn may_reread(&self) -> bool {
        if self.shared.source == KeySource::Fixed {
            return false;
        }
        let mut last = self
            .shared
            .last_reread
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let file_changed = {
            let read = self
                .shared
                .read_stamp
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            read.is_some() && *read != self.shared.source.stamp()
        };
        if !file_changed && last.is_some_and(|t| now.duration_since(t) < REREAD_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

fn read_ring(source: &KeySource) -> Result<Option<KeyRing>, CryptoError> {
    source
        .read()?
        .map(|(text, from)| KeyRing::parse(&text, &from))
        .transpose()
}

/// Replaces the key file with `ring`'s keys (current first), atomically, mode 0600.
pub fn write_key_file(path: &std::path::Path, ring: &KeyRing) -> Result<(), CryptoError> {
    keyfile::write_atomically(path, &ring.encoded())
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
    use std::os::unix::fs::PermissionsExt as _;

    fn key() -> MasterKey {
        MasterKey::decode(&MasterKey::generate_encoded(), "test").unwrap()
    }

    const ACME: Binding<'static> = Binding::backend_password("acme");

    #[test]
    fn round_trip_v3_names_the_current_key() {
        let key = key();
        let blob = key.encrypt(&Secret::new("hunter2"), &ACME);
        assert_eq!(blob[0], 3);
        assert_eq!(key_id_of(&blob), Some(key.ring().current_id()));
        assert!(key.ring().is_current(&blob));
        assert_eq!(key.decrypt(&blob, &ACME).unwrap().expose(), "hunter2");
        assert!(!blob.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn a_secret_decrypts_only_in_the_row_it_was_written_for() {
        let key = key();
        let blob = key.encrypt(&Secret::new("acme's"), &ACME);
        assert!(matches!(
            key.decrypt(&blob, &Binding::backend_password("globex")),
            Err(CryptoError::Decrypt)
        ));
        assert!(matches!(
            key.decrypt(&blob, &Binding::backend_password("acm")),
            Err(CryptoError::Decrypt)
        ));
    }

    #[test]
    fn v1_blobs_are_unbound_and_open_only_for_binding_with_any_key_of_the_ring() {
        let old = KeyRing::parse(&MasterKey::generate_encoded(), "old").unwrap();
        let blob = keyring::encrypt_v1(&old, &Secret::new("legacy"));
        assert_eq!(blob[0], 1);
        let ring = old.with_current(&KeyRing::generate());
        assert_eq!(ring.len(), 2);
        assert!(matches!(
            ring.decrypt(&blob, &ACME),
            Err(CryptoError::Unbound)
        ));
        assert_eq!(ring.decrypt_unbound(&blob).unwrap().expose(), "legacy");
        assert!(!ring.is_current(&blob));
        let other = KeyRing::generate();
        assert!(matches!(
            other.decrypt_unbound(&blob),
            Err(CryptoError::Decrypt)
        ));
    }

    #[test]
    fn unknown_key_id_is_named_and_tampering_fails() {
        let a = key();
        let b = key();
        let mut blob = a.encrypt(&Secret::new("x"), &ACME);
        match b.decrypt(&blob, &ACME) {
            Err(CryptoError::UnknownKey { id }) => assert_eq!(id, a.ring().current_id()),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(matches!(a.decrypt(&blob, &ACME), Err(CryptoError::Decrypt)));
        assert!(a.decrypt(&[], &ACME).is_err());
        assert!(a.decrypt(&[1, 2, 3], &ACME).is_err());
        assert!(a.decrypt(&[2, 1, 2, 3], &ACME).is_err());
        assert!(a.decrypt(&[9; 40], &ACME).is_err());
    }

    #[test]
    fn several_keys_parse_first_is_current() {
        let (k1, k2, k3) = (
            MasterKey::generate_encoded(),
            MasterKey::generate_encoded(),
            "ab".repeat(32),
        );
        let lines = KeyRing::parse(&format!("# keys\n{k1}\n\n{k2}\n{k3}\n{k1}\n"), "f").unwrap();
        let commas = KeyRing::parse(&format!(" {k1} , {k2},{k3}"), "env").unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines.ids(), commas.ids());
        assert_eq!(
            lines.current_id(),
            KeyRing::parse(&k1, "1").unwrap().current_id()
        );
        // What one ring encrypts, a ring holding that key anywhere decrypts.
        let blob = KeyRing::parse(&k3, "3")
            .unwrap()
            .encrypt(&Secret::new("s"), &ACME);
        assert_eq!(lines.decrypt(&blob, &ACME).unwrap().expose(), "s");
        // The encoded ring parses back to the same keys, current first.
        assert_eq!(
            KeyRing::parse(&lines.encoded(), "x").unwrap().ids(),
            lines.ids()
        );
        assert_eq!(lines.current_only().ids(), vec![lines.current_id()]);
    }

    #[test]
    fn bad_keys_are_refused_and_name_their_position() {
        assert!(KeyRing::parse(&"ab".repeat(32), "hex").is_ok());
        let err = KeyRing::parse(&format!("{}\nc2hvcnQ=", "ab".repeat(32)), "file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key 2"), "{err}");
        assert!(KeyRing::parse("# nothing\n\n", "empty").is_err());
    }

    #[test]
    fn unknown_key_id_rereads_a_changed_file_at_once_else_once_per_second() {
        let dir = std::env::temp_dir().join(format!("tg-keyring-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("master.key");
        let old = KeyRing::generate();
        write_key_file(&path, &old).unwrap();
        let config = SecretsConfig {
            master_key_env: "TENANTGATE_TEST_UNSET_KEY_VAR".to_owned(),
            master_key_file: Some(path.clone()),
        };
        let handle = MasterKey::load(&config).unwrap();
        let other_process = handle.clone();
        let rotated = old.with_current(&KeyRing::generate());
        let blob = rotated.encrypt(&Secret::new("after rotation"), &ACME);
        write_key_file(&path, &rotated).unwrap();
        assert_eq!(
            handle.decrypt(&blob, &ACME).unwrap().expose(),
            "after rotation"
        );
        // Every clone sees the re-read ring.
        assert_eq!(other_process.ring().current_id(), rotated.current_id());
        // A second rotation within the second: the file changed, so it is read again.
        let newer = rotated.with_current(&KeyRing::generate());
        write_key_file(&path, &newer).unwrap();
        let blob = newer.encrypt(&Secret::new("later"), &ACME);
        assert_eq!(handle.decrypt(&blob, &ACME).unwrap().expose(), "later");
        // An id no file holds, within the second and with the file unchanged: not re-read.
        let stray = KeyRing::generate().encrypt(&Secret::new("stray"), &ACME);
        assert!(matches!(
            handle.decrypt(&stray, &ACME),
            Err(CryptoError::UnknownKey { .. })
        ));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_and_key_debug_hide_values() {
        let s = Secret::new("topsecret");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        let text = MasterKey::generate_encoded();
        let key = MasterKey::decode(&text, "t").unwrap();
        let shown = format!("{key:?} {:?}", key.ring());
        assert!(!shown.contains(text.trim()), "{shown}");
    }
}
