//! The watchdog shell that owns the postmaster: spawning it with the server settings, waiting
//! until the server is ready (or reporting how it failed, with the log tail), and the steps of
//! stopping it: waiting for the watchdog, escalating to TERM/KILL, then SIGQUIT to a server that
//! outlived it. It does not create clusters or decide when to stop; [`LocalPg`] does.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::process::{
    describe_status, pid_file_names, postmaster_ready, process_exited, read_log_tail,
};
use super::run_as::RunAs;
use super::{HOST, LocalPg, LocalPgError, LocalPgOptions, START_TIMEOUT, STOP_TIMEOUT, io_err};

/// Watchdog script, run as `sh -c SCRIPT localpg-watchdog LOGFILE POSTGRES ARGS...`.
///
/// It starts postgres in the background (stdin from /dev/null, output to the
/// log file), prints its pid on stdout, and starts a reader on the original
/// stdin (our pipe). When the pipe reaches EOF (the `LocalPg` was stopped or
/// dropped, or its process died), the reader sends SIGINT (fast shutdown).
/// The main shell waits for postgres, so it exits as soon as postgres does,
/// and TERM/INT/HUP sent to the shell also trigger a fast shutdown.
const WATCHDOG_SCRIPT: &str = r#"log="$1"; shift
pg_pid=
on_signal() { if [ -n "$pg_pid" ]; then kill -INT "$pg_pid" 2>/dev/null; fi; }
trap on_signal TERM INT HUP
exec 3<&0 </dev/null
"$@" </dev/null >>"$log" 2>&1 3<&- &
pg_pid=$!
echo "$pg_pid"
exec >/dev/null
( read -r _line; kill -INT "$pg_pid" 2>/dev/null ) <&3 &
reader=$!
exec 3<&-
while :; do
  wait "$pg_pid"
  status=$?
  if kill -0 "$pg_pid" 2>/dev/null; then continue; fi
  break
done
kill "$reader" 2>/dev/null
wait "$reader" 2>/dev/null
exit "$status"
"#;

impl LocalPg {
    pub(super) fn spawn_and_wait(
        run_as: &RunAs,
        bindir: &Path,
        data_dir: &Path,
        log_file: &Path,
        socket_dir: Option<&Path>,
        port: u16,
        opts: &LocalPgOptions,
    ) -> Result<LocalPg, LocalPgError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log_file)
            .map_err(io_err(format!("opening server log {}", log_file.display())))?;
        run_as.chown(log_file)?;
        let log_start = log
            .metadata()
            .map_err(io_err(format!("reading server log {}", log_file.display())))?
            .len();

        let socket_setting = socket_dir
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = run_as.command(Path::new("/bin/sh"));
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("localpg-watchdog")
            .arg(log_file)
            .arg(bindir.join("postgres"))
            .arg("-D")
            .arg(data_dir);
        for setting in [
            format!("listen_addresses={HOST}"),
            format!("port={port}"),
            format!("unix_socket_directories={socket_setting}"),
            "fsync=off".to_owned(),
            "synchronous_commit=off".to_owned(),
            "full_page_writes=off".to_owned(),
            format!("max_connections={}", opts.max_connections),
            "logging_collector=off".to_owned(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        tracing::debug!(data_dir = %data_dir.display(), port, "starting local PostgreSQL");
        let mut child = cmd
            .spawn()
            .map_err(io_err("spawning the PostgreSQL watchdog shell"))?;
        let watchdog_stdin = child.stdin.take();
        let stdout = child.stdout.take();

        let mut pg = LocalPg {
            bindir: bindir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log_file: log_file.to_path_buf(),
            socket_dir: socket_dir.map(Path::to_path_buf),
            port,
            superuser: opts.superuser.clone(),
            password: opts.password.clone(),
            server_pid: 0,
            watchdog: Some(child),
            watchdog_stdin,
        };
        // On any error below, dropping `pg` shuts the watchdog and server down.
        match pg.wait_ready(stdout, log_start) {
            Ok(()) => {
                tracing::info!(port, data_dir = %data_dir.display(), "local PostgreSQL is ready");
                Ok(pg)
            }
            Err(e) => Err(e),
        }
    }

    fn wait_ready(
        &mut self,
        stdout: Option<std::process::ChildStdout>,
        log_start: u64,
    ) -> Result<(), LocalPgError> {
        let deadline = Instant::now() + START_TIMEOUT;
        // The watchdog prints the postgres pid first; read it off-thread so a
        // hung runuser cannot block us past the deadline.
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                let mut line = String::new();
                drop(BufReader::new(stdout).read_line(&mut line));
                drop(tx.send(line));
            });
        }
        let pid_line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        if let Ok(pid) = pid_line.trim().parse::<u32>() {
            self.server_pid = pid;
        } else {
            return Err(self.startup_failure(log_start, deadline));
        }

        let pid_file = self.data_dir.join("postmaster.pid");
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port));
        loop {
            if self.watchdog_exited()? {
                return Err(self.startup_failure(log_start, deadline));
            }
            if postmaster_ready(&pid_file, self.server_pid)
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.startup_failure(log_start, deadline));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn watchdog_exited(&mut self) -> Result<bool, LocalPgError> {
        match &mut self.watchdog {
            Some(child) => Ok(child
                .try_wait()
                .map_err(io_err("checking the PostgreSQL watchdog process"))?
                .is_some()),
            None => Ok(true),
        }
    }

    /// Build the error for a failed start (after giving an exiting server a
    /// moment to finish writing its log).
    fn startup_failure(&mut self, log_start: u64, deadline: Instant) -> LocalPgError {
        let status = self.watchdog.as_mut().and_then(|child| {
            let until = Instant::now() + Duration::from_secs(2);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => return Some(status),
                    Ok(None) if Instant::now() < until && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => return None,
                }
            }
        });
        let log_tail = read_log_tail(&self.log_file, log_start);
        match status {
            Some(status) => {
                self.watchdog = None;
                LocalPgError::ServerExited {
                    status: describe_status(status),
                    log: self.log_file.clone(),
                    log_tail,
                }
            }
            None => LocalPgError::StartTimeout {
                port: self.port,
                timeout: START_TIMEOUT,
                log: self.log_file.clone(),
                log_tail,
            },
        }
    }

    /// Waits for the watchdog to exit, escalating after [`STOP_TIMEOUT`].
    pub(super) fn stop_watchdog(&self, child: &mut Child) -> Result<(), LocalPgError> {
        let wait =
            |child: &mut Child, timeout: Duration| -> Result<Option<ExitStatus>, LocalPgError> {
                let until = Instant::now() + timeout;
                loop {
                    if let Some(status) = child
                        .try_wait()
                        .map_err(io_err("waiting for the PostgreSQL watchdog process"))?
                    {
                        return Ok(Some(status));
                    }
                    if Instant::now() >= until {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
        if let Some(status) = wait(child, STOP_TIMEOUT)? {
            if !status.success() {
                tracing::warn!(status = %describe_status(status), log = %self.log_file.display(),
                    "local PostgreSQL exited unsuccessfully");
            }
            tracing::debug!(data_dir = %self.data_dir.display(), "local PostgreSQL stopped");
            return Ok(());
        }
        // Escalate: TERM makes runuser/sh forward a shutdown; then KILL.
        tracing::warn!(data_dir = %self.data_dir.display(), "local PostgreSQL did not stop in time, terminating");
        drop(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status(),
        );
        if wait(child, Duration::from_secs(5))?.is_none() {
            drop(child.kill());
            drop(child.wait());
        }
        Err(LocalPgError::StopTimeout {
            data_dir: self.data_dir.clone(),
            timeout: STOP_TIMEOUT,
        })
    }

    /// Waits (at most `timeout`, then an immediate shutdown and 5 s more) until
    /// the server has exited.
    pub(super) fn wait_server_exit(&self, timeout: Duration) -> Result<(), LocalPgError> {
        let exited_within = |timeout: Duration| {
            let until = Instant::now() + timeout;
            while self.server_running() {
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            true
        };
        if exited_within(timeout) {
            return Ok(());
        }
        tracing::warn!(pid = self.server_pid, data_dir = %self.data_dir.display(),
            "local PostgreSQL still running after its watchdog exited, requesting immediate shutdown");
        // SIGQUIT is PostgreSQL's immediate shutdown.
        drop(
            Command::new("kill")
                .args(["-QUIT", &self.server_pid.to_string()])
                .stderr(Stdio::null())
                .status(),
        );
        exited_within(Duration::from_secs(5));
        Err(LocalPgError::StopTimeout {
            data_dir: self.data_dir.clone(),
            timeout,
        })
    }

    /// Whether our server still runs: its process is alive and `postmaster.pid`
    /// names it (the pid alone may belong to another process by now). The
    /// server removes `postmaster.pid` as it exits, after closing its ports.
    fn server_running(&self) -> bool {
        // 0: the pid was never learnt.
        self.server_pid != 0
            && pid_file_names(&self.data_dir.join("postmaster.pid"), self.server_pid)
            && !process_exited(self.server_pid)
    }
}
