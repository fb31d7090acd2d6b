//! Where master keys come from and how the key file is replaced: the environment variable or
//! the key file (`[secrets]`), read whole; the key file written atomically (a private temp
//! file in the same directory, fsync, rename, fsync of the directory), mode 0600.
//!
//! This module reads and writes key text; it must not log it or parse it (see `keyring`).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::{CryptoError, SecretsConfig};

/// Where a process's master keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An environment variable (it wins over the file when set). Read once: a running
    /// process's environment does not change.
    Env(String),
    /// `secrets.master_key_file`.
    File(PathBuf),
    /// Given as text (tests, tools): never re-read.
    Fixed,
}

impl KeySource {
    /// The source `[secrets]` names: the variable when it is set, else the file.
    pub fn of(config: &SecretsConfig) -> Result<KeySource, CryptoError> {
        if std::env::var_os(&config.master_key_env).is_some() {
            return Ok(KeySource::Env(config.master_key_env.clone()));
        }
        match &config.master_key_file {
            Some(path) => Ok(KeySource::File(path.clone())),
            None => Err(CryptoError::NoKey {
                env: config.master_key_env.clone(),
            }),
        }
    }

    /// The source's text and how to name it in errors; `None` for [`KeySource::Fixed`].
    pub(super) fn read(&self) -> Result<Option<(String, String)>, CryptoError> {
        match self {
            KeySource::Env(var) => std::env::var(var)
                .map(|text| Some((text, var.clone())))
                .map_err(|_| CryptoError::NoKey { env: var.clone() }),
            KeySource::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| CryptoError::ReadKeyFile {
                        path: path.display().to_string(),
                        source,
                    })?;
                Ok(Some((text, path.display().to_string())))
            }
            KeySource::Fixed => Ok(None),
        }
    }

    /// What the key file looks like now (None for other sources, or when it cannot be
    /// stat'ed): a rotation replaces the file, so a different stamp means new keys.
    pub(super) fn stamp(&self) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let KeySource::File(path) = self else {
            return None;
        };
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// A key file's identity and size and modification time, compared to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// Replaces the key file with `text` atomically: readers see the old file or the new one,
/// never a part. The new file is readable by its owner only.
pub(super) fn write_atomically(path: &Path, text: &str) -> Result<(), CryptoError> {
    let failed = |source: std::io::Error| CryptoError::WriteKeyFile {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        // The rename is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        drop(std::fs::remove_file(&temp));
    }
    written.map_err(failed)
}
