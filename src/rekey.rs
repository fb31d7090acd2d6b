//! Master-key rotation across the key file and the registry: `rotate` puts a new key in front
//! of the key file and re-encrypts every stored secret under it; `retire` drops the old keys
//! once every stored secret is under the current one. Both run inside one registry
//! transaction with the tenant rows locked and an advisory lock held, so two instances (or
//! the CLI and an admin console) rotating at once take turns, and both swap the new ring into
//! the caller's shared [`MasterKey`] so every holder in this process uses it at once. Other
//! processes pick the new key up on RELOAD, when they encrypt, or when they meet a secret
//! under a key id they lack (see `crypto`).
//!
//! Order matters for "no downtime": the key file is written before the re-encrypted secrets
//! are committed, so any process that reads a new secret can find its key in the file. If the
//! commit fails the file simply holds one more key. This module must not log or return keys;
//! it reports key ids only.

use std::path::PathBuf;

use crate::crypto::{
    Binding, CryptoError, KeyId, KeyRing, KeySource, MasterKey, Secret, is_bound, write_key_file,
};
use crate::registry::{Registry, RegistryError, StoredSecret, TenantSlug};

#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error(
        "the master key comes from the environment variable {var}, which tenantgate cannot rewrite; to rotate, move the keys into the file named by secrets.master_key_file and unset {var}"
    )]
    EnvSource { var: String },
    #[error("the master keys were given as text, not from a key file; there is no file to rotate")]
    NoKeyFile,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(
        "tenant {slug}'s stored secret cannot be decrypted with the key file's keys ({source}); nothing was changed"
    )]
    Undecryptable {
        slug: TenantSlug,
        source: CryptoError,
    },
    #[error(
        "{count} stored secret(s) are not under the current master key {current} yet (the first: tenant {first}); nothing was retired. Make sure every instance has re-read the key file (RELOAD), rotate again, then retire"
    )]
    NotCurrent {
        count: usize,
        current: KeyId,
        first: TenantSlug,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What `rotate` did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new current key's id.
    pub key_id: KeyId,
    /// Stored secrets re-encrypted under it.
    pub reencrypted: usize,
    /// Keys in the key file now (the new one and the old ones).
    pub keys: usize,
}

/// What `retire` did.
#[derive(Debug, Clone)]
pub struct Retired {
    /// The key that stays.
    pub key_id: KeyId,
    /// Old keys dropped from the key file.
    pub dropped: usize,
    /// Stored secrets checked to be under the current key.
    pub secrets: usize,
}

/// The key file `key` was loaded from, or why rotation cannot rewrite its source.
fn key_file(key: &MasterKey) -> Result<PathBuf, RekeyError> {
    match key.source() {
        KeySource::File(path) => Ok(path.clone()),
        KeySource::Env(var) => Err(RekeyError::EnvSource { var: var.clone() }),
        KeySource::Fixed => Err(RekeyError::NoKeyFile),
    }
}

fn read_file(path: &std::path::Path) -> Result<KeyRing, RekeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| CryptoError::ReadKeyFile {
        path: path.display().to_string(),
        source,
    })?;
    Ok(KeyRing::parse(&text, &path.display().to_string())?)
}

/// Generates a new key, writes the key file as the new key then the old ones, and
/// re-encrypts every stored secret under the new key in one registry transaction.
pub async fn rotate(registry: &Registry, key: &MasterKey) -> Result<Rotated, RekeyError> {
    let path = key_file(key)?;
    let mut next_ring = None;
    let reencrypted = registry
        .rewrite_secrets(|secrets: Vec<StoredSecret>| {
            // Under the lock, the file as it is now: another instance may have rotated.
            let next = read_file(&path)?.with_current(&KeyRing::generate());
            // Decrypt everything before touching the file, so a secret no key opens stops
            // the rotation with nothing changed.
            let mut replaced = Vec::with_capacity(secrets.len());
            for secret in secrets {
                let binding = Binding::backend_password(secret.slug.as_str());
                let plain = open(&next, &secret.blob, &binding).map_err(|source| {
                    RekeyError::Undecryptable {
                        slug: secret.slug.clone(),
                        source,
                    }
                })?;
                replaced.push(StoredSecret {
                    blob: next.encrypt(&plain, &binding),
                    slug: secret.slug,
                });
            }
            write_key_file(&path, &next)?;
            next_ring = Some(next);
            Ok::<_, RekeyError>(replaced)
        })
        .await?;
    let next = next_ring.ok_or(RekeyError::NoKeyFile)?;
    let outcome = Rotated {
        key_id: next.current_id(),
        reencrypted,
        keys: next.len(),
    };
    key.replace(next);
    tracing::info!(key_id = %outcome.key_id, reencrypted, keys = outcome.keys, "master key rotated");
    Ok(outcome)
}

/// A stored secret in plain, bound (v3) or from before secrets were bound (v1, v2).
fn open(ring: &KeyRing, blob: &[u8], binding: &Binding<'_>) -> Result<Secret, CryptoError> {
    if is_bound(blob) {
        ring.decrypt(blob, binding)
    } else {
        ring.decrypt_unbound(blob)
    }
}

/// Binds every stored secret written before secrets were bound to their registry row
/// (formats v1 and v2, issue 13): each is re-encrypted in format v3 under the current key with
/// its row as associated data, so a ciphertext copied into another row no longer decrypts.
/// Runs at every start; cheap when nothing is left to bind (one count, no lock). Works with
/// any key source (it does not touch the key file). A secret no key opens is left as it is,
/// with a warning: its tenant fails at connect with the reason, the others start. Returns how
/// many were bound.
pub async fn bind_unbound(registry: &Registry, key: &MasterKey) -> Result<usize, RekeyError> {
    if registry.unbound_secrets().await? == 0 {
        return Ok(0);
    }
    let bound = registry
        .rewrite_secrets(|secrets: Vec<StoredSecret>| {
            let ring = key.ring();
            let mut replaced = Vec::new();
            for secret in secrets.into_iter().filter(|s| !is_bound(&s.blob)) {
                let plain = match ring.decrypt_unbound(&secret.blob) {
                    Ok(plain) => plain,
                    Err(e) => {
                        tracing::warn!(tenant = %secret.slug, error = %e, "stored secret left unbound: no key opens it");
                        continue;
                    }
                };
                let binding = Binding::backend_password(secret.slug.as_str());
                replaced.push(StoredSecret {
                    blob: ring.encrypt(&plain, &binding),
                    slug: secret.slug,
                });
            }
            Ok::<_, RekeyError>(replaced)
        })
        .await?;
    tracing::info!(bound, "stored secrets bound to their registry rows");
    Ok(bound)
}

/// Drops every key but the current one from the key file, after checking (rows locked) that
/// every stored secret is under the current key and decrypts with it alone.
pub async fn retire(registry: &Registry, key: &MasterKey) -> Result<Retired, RekeyError> {
    let path = key_file(key)?;
    let mut outcome = None;
    registry
        .rewrite_secrets(|secrets: Vec<StoredSecret>| {
            let ring = read_file(&path)?;
            let stale: Vec<&StoredSecret> = secrets
                .iter()
                .filter(|s| !ring.is_current(&s.blob))
                .collect();
            if let Some(first) = stale.first() {
                return Err(RekeyError::NotCurrent {
                    count: stale.len(),
                    current: ring.current_id(),
                    first: first.slug.clone(),
                });
            }
            let kept = ring.current_only();
            for secret in &secrets {
                kept.decrypt(
                    &secret.blob,
                    &Binding::backend_password(secret.slug.as_str()),
                )
                .map_err(|source| RekeyError::Undecryptable {
                    slug: secret.slug.clone(),
                    source,
                })?;
            }
            if ring.len() > 1 {
                write_key_file(&path, &kept)?;
            }
            outcome = Some((
                Retired {
                    key_id: kept.current_id(),
                    dropped: ring.len() - 1,
                    secrets: secrets.len(),
                },
                kept,
            ));
            Ok(Vec::new())
        })
        .await?;
    let (retired, kept) = outcome.ok_or(RekeyError::NoKeyFile)?;
    key.replace(kept);
    tracing::info!(key_id = %retired.key_id, dropped = retired.dropped, "old master keys retired");
    Ok(retired)
}
