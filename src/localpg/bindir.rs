//! Finding the installed `PostgreSQL` server binaries (`initdb`, `pg_ctl`, `postgres`). It only
//! looks; it runs nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::LocalPgError;

/// The directory containing `initdb`, `pg_ctl` and `postgres`: PATH first,
/// then `pg_config --bindir`, then the newest `/usr/lib/postgresql/<N>/bin`.
/// Symlinked binaries (e.g. in `/usr/local/bin`) resolve to their real directory.
///
/// # Errors
///
/// [`LocalPgError::BinariesNotFound`] if no such directory exists.
pub fn find_bindir() -> Result<PathBuf, LocalPgError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.is_absolute() && has_server_binaries(&dir) {
                return Ok(resolve_bindir(dir));
            }
        }
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server_binaries(&dir) {
            return Ok(resolve_bindir(dir));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(LocalPgError::BinariesNotFound)
}

pub(super) fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|name| {
        fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Follow symlinks (e.g. /usr/local/bin/postgres -> /usr/lib/postgresql/15/bin/postgres)
/// to the real binary directory, if it is complete.
pub(super) fn resolve_bindir(dir: PathBuf) -> PathBuf {
    fs::canonicalize(dir.join("postgres"))
        .ok()
        .and_then(|real| real.parent().map(Path::to_path_buf))
        .filter(|real| has_server_binaries(real))
        .unwrap_or(dir)
}
