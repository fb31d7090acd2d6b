//! Creating a cluster: checking that the postgres user can reach the data directory, and running
//! `initdb` with the superuser and its password file. It never starts the server.

use std::fs;
use std::path::Path;
use std::process::Stdio;

use super::process::{describe_status, one_line_tail};
use super::run_as::{PwFile, RunAs};
use super::{LOG_TAIL_LINES, LocalPgError, LocalPgOptions, io_err};

/// Run initdb on an empty (or new) data directory.
pub(super) fn initdb(
    run_as: &RunAs,
    bindir: &Path,
    data_dir: &Path,
    opts: &LocalPgOptions,
) -> Result<(), LocalPgError> {
    let pwfile = PwFile::create(&opts.password, run_as)?;
    let mut cmd = run_as.command(&bindir.join("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg(format!("--username={}", opts.superuser))
        .arg(format!("--pwfile={}", pwfile.0.display()))
        .args([
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdin(Stdio::null());
    tracing::debug!(data_dir = %data_dir.display(), "running initdb");
    let command = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(io_err(format!("running initdb ({command})")))?;
    drop(pwfile);
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    Err(LocalPgError::CommandFailed {
        command,
        status: describe_status(out.status),
        stderr: one_line_tail(&text, LOG_TAIL_LINES),
    })
}

/// As root, make sure the postgres user can reach and write the data directory.
pub(super) fn check_accessible(run_as: &RunAs, data_dir: &Path) -> Result<(), LocalPgError> {
    let RunAs::Postgres { uid, .. } = run_as else {
        return Ok(());
    };
    let ok = run_as
        .command(Path::new("/bin/sh"))
        .args(["-c", r#"test -x "$1" && test -w "$1""#, "localpg-check"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io_err("running runuser to check data directory access"))?
        .success();
    if ok {
        return Ok(());
    }
    let blocking = data_dir.ancestors().skip(1).find_map(|dir| {
        let meta = fs::metadata(dir).ok()?;
        let mode = std::os::unix::fs::MetadataExt::mode(&meta);
        let owner = std::os::unix::fs::MetadataExt::uid(&meta);
        (owner != *uid && mode & 0o001 == 0).then(|| (dir.to_path_buf(), mode & 0o7777))
    });
    let reason = match blocking {
        Some((dir, mode)) => format!(
            "parent directory {} (mode {mode:04o}) is not traversable by others; use a data directory elsewhere (e.g. under /tmp or /var/tmp) or `chmod o+x` it",
            dir.display()
        ),
        None => "it is not writable/traversable by that user; check its owner and mode".to_owned(),
    };
    Err(LocalPgError::NotAccessible {
        path: data_dir.to_path_buf(),
        reason,
    })
}
