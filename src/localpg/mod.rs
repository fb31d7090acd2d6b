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
//! user, `initdb` creates a cluster, `watchdog` spawns the server under its
//! watchdog and stops it, `process` watches the server from outside; this file
//! holds the options, errors and the [`LocalPg`] handle with its public API.

use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::time::Duration;

mod bindir;
mod initdb;
mod process;
mod run_as;
mod watchdog;

pub use bindir::find_bindir;
use initdb::{check_accessible, initdb};
use run_as::RunAs;

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
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping local PostgreSQL");
        }
    }
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
    use std::net::{SocketAddr, SocketAddrV4, TcpStream};
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    use std::time::Instant;

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
