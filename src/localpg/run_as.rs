//! Running `PostgreSQL` binaries as the right user: directly, or through `runuser -u postgres --`
//! when we are root (no `unsafe`, no setuid of our own), and the initdb password file that user
//! can read. It does not decide what to run.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{LocalPgError, PG_SYSTEM_USER, io_err};

/// How `PostgreSQL` binaries are run: directly, or as the `postgres` user when we are root.
#[derive(Clone, Debug)]
pub(super) enum RunAs {
    Current,
    Postgres {
        uid: u32,
        gid: u32,
        runuser: PathBuf,
    },
}

impl RunAs {
    pub(super) fn detect() -> Result<Self, LocalPgError> {
        if effective_uid()? != 0 {
            return Ok(Self::Current);
        }
        let (uid, gid) = postgres_ids()?;
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("runuser"));
        Ok(Self::Postgres { uid, gid, runuser })
    }

    /// A command running `program` as the right user.
    pub(super) fn command(&self, program: &Path) -> Command {
        let mut cmd = match self {
            Self::Current => Command::new(program),
            Self::Postgres { runuser, .. } => {
                let mut cmd = Command::new(runuser);
                cmd.args(["-u", PG_SYSTEM_USER, "--"]).arg(program);
                cmd
            }
        };
        // The postgres user may not be able to enter our working directory (e.g. /root).
        cmd.current_dir("/");
        cmd
    }

    /// Give `path` to the postgres user (no-op when not root).
    pub(super) fn chown(&self, path: &Path) -> Result<(), LocalPgError> {
        if let Self::Postgres { uid, gid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid)).map_err(io_err(format!(
                "changing the owner of {} to the postgres user",
                path.display()
            )))?;
        }
        Ok(())
    }
}

pub(super) fn effective_uid() -> Result<u32, LocalPgError> {
    if let Ok(status) = fs::read_to_string("/proc/self/status")
        && let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok())
    {
        return Ok(uid);
    }
    let out = Command::new("id")
        .arg("-u")
        .output()
        .map_err(io_err("running `id -u` to find the effective user"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| LocalPgError::Io {
            context: "running `id -u` to find the effective user".to_owned(),
            source: io::Error::other("unexpected output"),
        })
}

pub(super) fn postgres_ids() -> Result<(u32, u32), LocalPgError> {
    if let Ok(passwd) = fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4
                && fields[0] == PG_SYSTEM_USER
                && let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse())
            {
                return Ok((uid, gid));
            }
        }
    }
    // Not in /etc/passwd: ask NSS through `id`.
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, PG_SYSTEM_USER])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(LocalPgError::PostgresUserMissing),
    }
}

/// A pwfile for initdb, readable by the postgres user and removed on drop.
pub(super) struct PwFile(pub(super) PathBuf);

impl PwFile {
    pub(super) fn create(password: &str, run_as: &RunAs) -> Result<Self, LocalPgError> {
        use std::io::Write as _;
        let path = std::env::temp_dir().join(format!("localpg-pw-{:016x}", rand::random::<u64>()));
        let context = format!("writing the initdb password file {}", path.display());
        let ctx = || context.clone();
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(ctx()))?;
        let guard = Self(path);
        writeln!(file, "{password}").map_err(io_err(ctx()))?;
        drop(file);
        run_as.chown(&guard.0)?;
        Ok(guard)
    }
}

impl Drop for PwFile {
    fn drop(&mut self) {
        drop(fs::remove_file(&self.0));
    }
}
