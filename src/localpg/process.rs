//! Watching the server process from outside: whether it exited, whether its pid file says it is
//! ready, how it ended, and the tail of its log for error messages. It never signals or starts
//! a process.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use super::LOG_TAIL_LINES;

/// Whether process `pid` has exited: gone, or a zombie its parent has not
/// reaped yet.
pub(super) fn process_exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        // No procfs: kill -0 says whether the process exists.
        Err(_) => !Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success()),
    }
}

/// `postmaster.pid` exists and names `pid` (its first line).
pub(super) fn pid_file_names(pid_file: &Path, pid: u32) -> bool {
    fs::read_to_string(pid_file).is_ok_and(|text| {
        text.lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
            == Some(pid)
    })
}

/// `postmaster.pid` names our server and says `ready` (line 8, `PostgreSQL` 10+).
pub(super) fn postmaster_ready(pid_file: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid)
        && lines.get(7).is_some_and(|l| l.trim() == "ready")
}

pub(super) fn describe_status(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => format!("{status}"),
    }
}

/// Last lines of the log written since `start` (or of the whole file if
/// nothing new was written), joined on one line.
pub(super) fn read_log_tail(path: &Path, start: u64) -> String {
    let read_from = |offset: u64| -> Option<String> {
        let mut file = File::open(path).ok()?;
        file.seek(SeekFrom::Start(offset)).ok()?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = match read_from(start) {
        Some(text) if !text.trim().is_empty() => text,
        _ => read_from(0).unwrap_or_default(),
    };
    let tail = one_line_tail(&text, LOG_TAIL_LINES);
    if tail.is_empty() {
        "(log is empty)".to_owned()
    } else {
        tail
    }
}

pub(super) fn one_line_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
