//! `localpg`: a private, throwaway `PostgreSQL` cluster started from the
//! installed server binaries.
//!
//! Role: give the quickstart command, integration tests and benchmarks a real
//! `PostgreSQL` server on `127.0.0.1` without any manual setup. The cluster is
//! tuned for speed, not durability (`fsync`, `synchronous_commit` and
//! `full_page_writes` are off), so it must never hold data anyone cares about.
//!
//! What it must not do:
//! - it is never needed in production: nothing outside quickstart, tests and
//!   benchmarks may depend on it;
//! - it never leaves a server running after its owner is gone. The server is
//!   not daemonized: a small watchdog shell owns it and shuts it down (fast
//!   shutdown) as soon as the pipe held by [`LocalPg`] reaches end-of-file,
//!   which also happens when the owning process dies without running `Drop`;
//! - it never listens on anything but the loopback interface;
//! - it never uses `unsafe`: running as root is handled by starting every
//!   `PostgreSQL` binary through `runuser -u postgres --`.
//!
//! Reusing an already initialized data directory just starts it again; the
//! superuser name and password in [`LocalPgOptions`] are then only reported,
//! not applied (they were fixed when the cluster was created).
//!
//! Parts: `bindir` finds the server binaries, `run_as` runs them as the right
//! user, `process` watches the server from outside; this file creates, starts
//! and stops a cluster.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod bindir;
mod process;
mod run_as;

pub use bindir::find_bindir;
use process::{
    describe_status, one_line_tail, pid_file_names, postmaster_ready, process_exited, read_log_tail,
};
use run_as::{PwFile, RunAs};

/// Address the server listens on (loopback only).
const HOST: &str = "127.0.0.1";
/// Name of the system user that runs `PostgreSQL` when we are root.
const PG_SYSTEM_USER: &str = "postgres";
/// Name of the server log file inside the data directory.
const LOG_FILE_NAME: &str = "postgres.log";
/// How long to wait for the server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a fast shutdown before escalating.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Number of server log lines included in start errors.
const LOG_TAIL_LINES: usize = 20;
/// Unix socket paths are limited to 107 bytes; leave room for `/.s.PGSQL.65535.lock`.
const MAX_SOCKET_DIR_LEN: usize = 80;
/// Attempts when an automatically chosen port turns out to be taken.
const PORT_ATTEMPTS: u32 = 3;

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

/// Options for [`LocalPg::start`].
#[derive(Clone)]
pub struct LocalPgOptions {
    /// Data directory; created and initialized (initdb) if it has no `PG_VERSION`.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; `None` picks a free loopback port.
    pub port: Option<u16>,
    /// Superuser name given to initdb (default `"postgres"`).
    pub superuser: String,
    /// Superuser password given to initdb; TCP logins use SCRAM-SHA-256.
    pub password: String,
    /// `max_connections` of the server (default 200).
    pub max_connections: u32,
}

impl LocalPgOptions {
    /// Options with defaults: free port, superuser `postgres`, password
    /// `postgres`, `max_connections` 200.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            port: None,
            superuser: "postgres".to_owned(),
            password: "postgres".to_owned(),
            max_connections: 200,
        }
    }
}

impl fmt::Debug for LocalPgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPgOptions")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .field("superuser", &self.superuser)
            .field("password", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Errors of the local `PostgreSQL` cluster helper. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// `initdb`/`pg_ctl`/`postgres` are not installed.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in PATH, `pg_config --bindir` or /usr/lib/postgresql/*/bin; install the PostgreSQL server packages (e.g. `apt-get install postgresql`)"
    )]
    BinariesNotFound,
    /// The options cannot work.
    #[error("invalid local PostgreSQL options: {0}")]
    InvalidOptions(String),
    /// Running as root, but there is no `postgres` system user to run the server as.
    #[error(
        "running as root, but the `postgres` system user was not found; PostgreSQL refuses to run as root (install the PostgreSQL server packages, which create that user)"
    )]
    PostgresUserMissing,
    /// The `postgres` system user cannot reach the data directory.
    #[error("the `postgres` system user cannot access {path}: {reason}")]
    NotAccessible {
        /// The data directory.
        path: PathBuf,
        /// Why, and what to do about it.
        reason: String,
    },
    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A helper command (e.g. initdb) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its output, on one line (`|` separates lines).
        stderr: String,
    },
    /// The server exited while starting.
    #[error("PostgreSQL server exited during startup ({status}); last lines of {}: {log_tail}", log.display())]
    ServerExited {
        /// Exit status of the watchdog (postgres' own exit status).
        status: String,
        /// The server log file.
        log: PathBuf,
        /// The last lines of the server log, on one line (`|` separates lines).
        log_tail: String,
    },
    /// The server did not accept connections in time.
    #[error("PostgreSQL server did not accept connections on {HOST}:{port} within {}s; last lines of {}: {log_tail}", timeout.as_secs(), log.display())]
    StartTimeout {
        /// The port we waited on.
        port: u16,
        /// How long we waited.
        timeout: Duration,
        /// The server log file.
        log: PathBuf,
        /// The last lines of the server log, on one line (`|` separates lines).
        log_tail: String,
    },
    /// The server did not shut down in time and was killed.
    #[error("PostgreSQL server (data dir {}) did not shut down within {}s and was killed", data_dir.display(), timeout.as_secs())]
    StopTimeout {
        /// The data directory.
        data_dir: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LocalPgError {
    let context = context.into();
    move |source| LocalPgError::Io { context, source }
}

/// Bind `127.0.0.1:0` and return the port the kernel picked.
///
/// The port is released before returning, so another process may take it;
/// [`LocalPg::start`] retries with a new port when that happens.
///
/// # Errors
///
/// [`LocalPgError::Io`] if the socket cannot be bound.
pub fn free_port() -> Result<u16, LocalPgError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("binding 127.0.0.1:0 to find a free port"))?;
    let addr = listener
        .local_addr()
        .map_err(io_err("reading the address of a bound socket"))?;
    Ok(addr.port())
}

/// A running throwaway `PostgreSQL` cluster; stopped by [`LocalPg::stop`] or on drop.
pub struct LocalPg {
    bindir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    socket_dir: Option<PathBuf>,
    port: u16,
    superuser: String,
    password: String,
    server_pid: u32,
    /// The watchdog (`sh`, under `runuser` when root) that owns postgres.
    watchdog: Option<Child>,
    /// Write end of the watchdog's stdin: closing it shuts the server down.
    watchdog_stdin: Option<ChildStdin>,
}

impl fmt::Debug for LocalPg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPg")
            .field("bindir", &self.bindir)
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .field("superuser", &self.superuser)
            .field("password", &"<redacted>")
            .field("server_pid", &self.server_pid)
            .field("running", &self.watchdog.is_some())
            .finish_non_exhaustive()
    }
}

impl LocalPg {
    /// Initialize `opts.data_dir` if needed, start the server on
    /// `127.0.0.1` and wait until it accepts TCP connections.
    ///
    /// Synchronous (blocks for about 1-2 s), so it can be used from
    /// non-async test setup. When the port was picked automatically and
    /// another process grabs it first, start retries with a new port.
    ///
    /// # Errors
    ///
    /// [`LocalPgError::InvalidOptions`] for an empty superuser/password or
    /// zero `max_connections`; [`LocalPgError::BinariesNotFound`];
    /// [`LocalPgError::PostgresUserMissing`] / [`LocalPgError::NotAccessible`]
    /// when running as root; [`LocalPgError::CommandFailed`] if initdb fails;
    /// [`LocalPgError::ServerExited`] / [`LocalPgError::StartTimeout`] (with
    /// the end of the server log) if the server does not come up;
    /// [`LocalPgError::Io`] for filesystem and process errors.
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the options belong to the cluster"
    )]
    pub fn start(opts: LocalPgOptions) -> Result<LocalPg, LocalPgError> {
        if opts.superuser.is_empty() {
            return Err(LocalPgError::InvalidOptions(
                "superuser name is empty".to_owned(),
            ));
        }
        if opts.password.is_empty() {
            return Err(LocalPgError::InvalidOptions(
                "password is empty (TCP logins use SCRAM-SHA-256 and need one)".to_owned(),
            ));
        }
        if opts.max_connections == 0 {
            return Err(LocalPgError::InvalidOptions(
                "max_connections must be at least 1".to_owned(),
            ));
        }
        let bindir = find_bindir()?;
        let run_as = RunAs::detect()?;
        let data_dir = std::path::absolute(&opts.data_dir).map_err(io_err(format!(
            "resolving data directory {}",
            opts.data_dir.display()
        )))?;

        let initialized = data_dir.join("PG_VERSION").is_file();
        let created = !data_dir.exists();
        if !initialized {
            fs::create_dir_all(&data_dir).map_err(io_err(format!(
                "creating data directory {}",
                data_dir.display()
            )))?;
            run_as.chown(&data_dir)?;
        }
        if let Err(e) = check_accessible(&run_as, &data_dir) {
            if created {
                drop(fs::remove_dir(&data_dir));
            }
            return Err(e);
        }
        if !initialized {
            initdb(&run_as, &bindir, &data_dir, &opts)?;
        }

        let log_file = data_dir.join(LOG_FILE_NAME);
        let socket_dir = socket_dir_for(&data_dir);
        let mut attempt = 1;
        loop {
            let port = match opts.port {
                Some(port) => port,
                None => free_port()?,
            };
            let result = Self::spawn_and_wait(
                &run_as,
                &bindir,
                &data_dir,
                &log_file,
                socket_dir.as_deref(),
                port,
                &opts,
            );
            match result {
                Err(LocalPgError::ServerExited { ref log_tail, .. })
                    if opts.port.is_none()
                        && attempt < PORT_ATTEMPTS
                        && log_tail.contains("Address already in use") =>
                {
                    tracing::debug!(port, "auto-picked port was taken, retrying");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn spawn_and_wait(
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

    /// TCP port on 127.0.0.1.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host to connect to: always `"127.0.0.1"`.
    #[must_use]
    pub fn host(&self) -> &str {
        HOST
    }

    /// Superuser name.
    #[must_use]
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// Superuser password (SCRAM-SHA-256 over TCP).
    #[must_use]
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Absolute data directory.
    #[must_use]
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of the `PostgreSQL` binaries used.
    #[must_use]
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Server log file (inside the data directory).
    #[must_use]
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Unix socket directory (the data directory), or `None` when its path
    /// is too long or unusual for a socket and only TCP is available.
    #[must_use]
    pub fn socket_dir(&self) -> Option<&Path> {
        self.socket_dir.as_deref()
    }

    /// Connection string in tokio-postgres keyword form:
    /// `host=127.0.0.1 port=.. user=.. password=.. dbname=..`.
    #[must_use]
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={HOST} port={} user={} password={} dbname={}",
            self.port,
            quote_conn_value(&self.superuser),
            quote_conn_value(&self.password),
            quote_conn_value(dbname)
        )
    }

    /// Fast shutdown; waits for the server to exit (its process gone, so its
    /// `postmaster.pid` is gone too and the data directory can be started
    /// again at once). Idempotent.
    ///
    /// # Errors
    ///
    /// [`LocalPgError::StopTimeout`] if the server had to be killed after
    /// 30 s; [`LocalPgError::Io`] if waiting for the process fails.
    pub fn stop(&mut self) -> Result<(), LocalPgError> {
        // Closing the pipe makes the watchdog send SIGINT (fast shutdown).
        drop(self.watchdog_stdin.take());
        let Some(mut child) = self.watchdog.take() else {
            return Ok(());
        };
        let stopped = self.stop_watchdog(&mut child);
        // The watchdog normally outlives the server, but not always: runuser, sent
        // SIGTERM, kills its shell after 2 s and exits while the server may still be
        // shutting down (it got SIGINT). Until the server is gone its postmaster.pid
        // stays, and a new start on this data directory fails.
        let left = if stopped.is_ok() {
            STOP_TIMEOUT
        } else {
            Duration::from_secs(5)
        };
        let server_stopped = self.wait_server_exit(left);
        stopped.and(server_stopped)
    }

    /// Waits for the watchdog to exit, escalating after [`STOP_TIMEOUT`].
    fn stop_watchdog(&self, child: &mut Child) -> Result<(), LocalPgError> {
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
    fn wait_server_exit(&self, timeout: Duration) -> Result<(), LocalPgError> {
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

impl Drop for LocalPg {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping local PostgreSQL");
        }
    }
}

/// Run initdb on an empty (or new) data directory.
fn initdb(
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
fn check_accessible(run_as: &RunAs, data_dir: &Path) -> Result<(), LocalPgError> {
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

/// The data directory doubles as the socket directory, unless its path is too
/// long for a Unix socket or contains characters that would need quoting in
/// the `unix_socket_directories` list (then only TCP is offered).
fn socket_dir_for(data_dir: &Path) -> Option<PathBuf> {
    let s = data_dir.to_str()?;
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+@".contains(&b));
    (plain && s.len() <= MAX_SOCKET_DIR_LEN).then(|| data_dir.to_path_buf())
}

/// Quote a value for a libpq/tokio-postgres keyword/value connection string.
fn quote_conn_value(value: &str) -> String {
    if !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::print_stderr,
        clippy::exit,
        reason = "tests"
    )]

    use super::*;
    use std::sync::OnceLock;

    /// A scratch directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "localpg-test-{tag}-{:012x}",
                rand::random::<u64>() & 0xffff_ffff_ffff
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn data(&self) -> PathBuf {
            self.0.join("data")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            drop(fs::remove_dir_all(&self.0));
        }
    }

    fn refuses(port: u16) -> bool {
        TcpStream::connect_timeout(
            &SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
            Duration::from_millis(300),
        )
        .is_err()
    }

    async fn client(pg: &LocalPg) -> tokio_postgres::Client {
        let (client, conn) =
            tokio_postgres::connect(&pg.connection_string("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
    }

    /// Processes whose command line mentions `needle`.
    fn processes_mentioning(needle: &str) -> Vec<String> {
        let me = std::process::id().to_string();
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .filter(|e| e.file_name().to_str() != Some(me.as_str()))
            .filter_map(|e| {
                let cmdline = fs::read(e.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline
                    .contains(needle)
                    .then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
            })
            .collect()
    }

    fn pid_alive(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    #[test]
    fn finds_bindir() {
        let dir = find_bindir().unwrap();
        assert!(dir.join("postgres").is_file());
        assert!(dir.join("initdb").is_file());
        assert!(dir.join("pg_ctl").is_file());
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_conn_value("abc"), "abc");
        assert_eq!(quote_conn_value(""), "''");
        assert_eq!(quote_conn_value("a b'c\\"), r"'a b\'c\\'");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_connect_and_stop() {
        let tmp = TempDir::new("basic");
        let mut opts = LocalPgOptions::new(tmp.data());
        opts.password = "s3cret pass'word".to_owned();
        opts.max_connections = 123;
        let mut pg = tokio::task::spawn_blocking(move || LocalPg::start(opts))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pg.host(), "127.0.0.1");
        assert_eq!(pg.superuser(), "postgres");
        let port = pg.port();

        let c = client(&pg).await;
        let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let max: String = c
            .query_one("SHOW max_connections", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(max, "123");
        let fsync: String = c.query_one("SHOW fsync", &[]).await.unwrap().get(0);
        assert_eq!(fsync, "off");

        // A wrong password is rejected (SCRAM over TCP, not trust).
        let bad = pg.connection_string("postgres").replace("s3cret", "wrong");
        assert!(
            tokio_postgres::connect(&bad, tokio_postgres::NoTls)
                .await
                .is_err()
        );
        drop(c);

        tokio::task::spawn_blocking(move || {
            pg.stop().unwrap();
            pg.stop().unwrap(); // idempotent
            assert!(refuses(port));
            assert!(!pg.data_dir().join("postmaster.pid").exists());
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_keeps_data() {
        let tmp = TempDir::new("restart");
        let opts = LocalPgOptions::new(tmp.data());
        let opts2 = opts.clone();
        let pg = tokio::task::spawn_blocking(move || LocalPg::start(opts))
            .await
            .unwrap()
            .unwrap();
        let c = client(&pg).await;
        c.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
            .await
            .unwrap();
        drop(c);
        tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();

        let pg = tokio::task::spawn_blocking(move || LocalPg::start(opts2))
            .await
            .unwrap()
            .unwrap();
        let c = client(&pg).await;
        let v: i32 = c.query_one("SELECT v FROM kept", &[]).await.unwrap().get(0);
        assert_eq!(v, 42);
        drop(c);
        tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    }

    #[test]
    fn start_failure_reports_log_tail() {
        let tmp = TempDir::new("fail");
        // Occupy the port so the server cannot bind it.
        let blocker = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut opts = LocalPgOptions::new(tmp.data());
        opts.port = Some(blocker.local_addr().unwrap().port());
        let err = LocalPg::start(opts).unwrap_err();
        let msg = err.to_string();
        eprintln!("start error (expected): {msg}");
        assert!(matches!(err, LocalPgError::ServerExited { .. }), "{msg}");
        assert!(msg.contains("could not"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(processes_mentioning(&tmp.data().to_string_lossy()).is_empty());
    }

    #[test]
    fn rejects_bad_options() {
        let mut opts = LocalPgOptions::new("/nonexistent/never-created");
        opts.password = String::new();
        assert!(matches!(
            LocalPg::start(opts),
            Err(LocalPgError::InvalidOptions(_))
        ));
    }

    #[test]
    fn binaries_not_found_is_one_line() {
        let msg = LocalPgError::BinariesNotFound.to_string();
        assert!(msg.contains("apt-get install postgresql"));
        assert!(!msg.contains('\n'));
    }

    const HELPER_ENV: &str = "LOCALPG_PARENT_DEATH_HELPER_DIR";

    /// Helper for `server_dies_with_its_process`: does nothing in a normal
    /// run; when run as a child with `HELPER_ENV` set, starts a cluster held
    /// in a static (never dropped), prints its port and exits without Drop.
    #[test]
    fn parent_death_helper() {
        use std::io::Write as _;
        static PG: OnceLock<LocalPg> = OnceLock::new();
        let Some(dir) = std::env::var_os(HELPER_ENV) else {
            return;
        };
        let pg = PG.get_or_init(|| LocalPg::start(LocalPgOptions::new(dir)).unwrap());
        let mut out = io::stdout();
        writeln!(out, "LOCALPG_PORT={} PID={}", pg.port(), pg.server_pid).unwrap();
        out.flush().unwrap();
        std::process::exit(0);
    }

    #[test]
    fn server_dies_with_its_process() {
        let tmp = TempDir::new("orphan");
        let data = tmp.data();
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "localpg::tests::parent_death_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, &data)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("LOCALPG_PORT=").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("helper printed no port: {stdout}"));
        let mut parts = line.split(" PID=");
        let port: u16 = parts.next().unwrap().parse().unwrap();
        let pid: u32 = parts.next().unwrap().trim().parse().unwrap();
        assert!(output.status.success());

        let deadline = Instant::now() + Duration::from_secs(10);
        while !refuses(port) || pid_alive(pid) {
            assert!(
                Instant::now() < deadline,
                "server on port {port} (pid {pid}) still running after its owner exited"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_mentioning(&data.to_string_lossy());
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "processes left: {left:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!data.join("postmaster.pid").exists());
    }
}
