//! Memory per idle client (issue 12), tenantgate beside PgBouncer: `benches/idle_clients.sh`
//! runs it. A benchmark, not a test.
//!
//! It starts a private PostgreSQL with one database, registers it as tenant `bench` in a
//! tenantgate registry (user `app`, whose SCRAM-SHA-256 verifier has `--scram-iterations`
//! iterations, 16 by default, so the clients' PBKDF2 does not dominate the logins), and sets up
//! PgBouncer on the same database with the same user and verifier. Both poolers run in
//! transaction mode with the same pool size. Then, for each N, transport (plain, TLS) and proxy:
//!
//! 1. a fresh proxy process (so what an earlier run left in its allocator does not count);
//! 2. warm-up: `--concurrency` clients log in, run `SELECT 1` and leave (the pool's backend
//!    connections are open, the lazy start-up work is done);
//! 3. RSS before (`VmRSS` of the proxy process);
//! 4. N clients log in (SCRAM-SHA-256, over TLS or not), run `SELECT 1` (a transaction each)
//!    and stay connected, idle; `--idle-seconds` later, RSS after;
//! 5. the proxy is stopped (it closes first, so the client side leaves no TIME_WAIT behind).
//!
//! Reports (RSS after - RSS before) / N per proxy, and tenantgate/PgBouncer.
//!
//! Every client socket is bound to one of `--sources` loopback addresses (127.0.0.2, ...) before
//! it connects, so N is not capped by one address's ephemeral ports. N is capped by the open
//! files limit: each client is one descriptor in this process and one in the proxy. This
//! program cannot raise the limit (no unsafe code); `ulimit -n` in the calling shell does. An N
//! over the limit is replaced by the largest that fits, and the report says so.
//!
//!     cargo build --release --bins --examples && target/release/examples/idle_clients \
//!         --tenantgate target/release/tenantgate --clients 10000

#![allow(clippy::print_stdout, reason = "the report is the output")]

mod support;

use std::fmt;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tenantgate::crypto::{Binding, MasterKey, Secret};
use tenantgate::localpg::{LocalPg, LocalPgOptions, free_port};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Tenant slug, PgBouncer database name, and what clients send as the database.
const DATABASE: &str = "bench";
/// The tenant's database in PostgreSQL.
const BACKEND_DATABASE: &str = "tg_bench";
/// Client user and password, the same for both proxies, and their backend role.
const USER: &str = "app";
const PASSWORD: &str = "secret";
/// Open files kept for everything but the client sockets (listener, backends, registry, logs).
const FD_RESERVE: u64 = 256;
/// Ephemeral ports per source address (Linux default range 32768-60999).
const PORTS_PER_SOURCE: usize = 28_000;

#[derive(Parser, Debug)]
struct Args {
    /// The tenantgate binary to start.
    #[arg(long, default_value = "target/release/tenantgate")]
    tenantgate: String,
    /// The PgBouncer binary to start.
    #[arg(long, default_value = "/usr/sbin/pgbouncer")]
    pgbouncer: String,
    /// Idle clients per measurement, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    clients: Vec<u64>,
    /// Transports, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "plain,tls")]
    transports: Vec<Transport>,
    /// Proxies, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "tenantgate,pgbouncer")]
    proxies: Vec<ProxyKind>,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Source addresses 127.0.0.2 ... for the client sockets (1 to 250).
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Seconds the clients stay idle before the second RSS reading.
    #[arg(long, default_value_t = 2)]
    idle_seconds: u64,
    /// Backend connections of the pool (tenantgate pool_size, PgBouncer default_pool_size).
    #[arg(long, default_value_t = 20)]
    pool_size: u32,
    /// Iterations of the client user's SCRAM-SHA-256 verifier.
    #[arg(long, default_value_t = 16)]
    scram_iterations: u32,
    /// Working directory (created if missing, removed at the end); default: a new one in $TMPDIR.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    Plain,
    Tls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProxyKind {
    Tenantgate,
    Pgbouncer,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Transport::Plain => "plain",
            Transport::Tls => "tls",
        })
    }
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            ProxyKind::Tenantgate => "tenantgate",
            ProxyKind::Pgbouncer => "pgbouncer",
        })
    }
}

/// A proxy process: stopped with SIGTERM (then SIGKILL) by [`Proxy::stop`], killed if dropped.
struct Proxy(Child);

impl Proxy {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    async fn stop(mut self) {
        drop(
            Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status(),
        );
        for _ in 0..150 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Drop kills it.
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            drop(self.0.kill());
            drop(self.0.wait());
        }
    }
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// What every measurement shares.
struct Bench {
    dir: PathBuf,
    pg: LocalPg,
    master_key: String,
    cert_file: PathBuf,
    key_file: PathBuf,
    tls: MakeRustlsConnect,
    client: tokio_postgres::Config,
    sources: Vec<Ipv4Addr>,
    concurrency: usize,
    pool_size: u32,
    idle: Duration,
    tenantgate: String,
    pgbouncer: String,
    as_root: bool,
}

/// One measurement.
struct Row {
    proxy: ProxyKind,
    transport: Transport,
    clients: u64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    login_seconds: f64,
    errors: usize,
    first_error: Option<String>,
}

impl Row {
    fn bytes_per_client(&self) -> f64 {
        let delta = i128::from(self.rss_after_kib) - i128::from(self.rss_before_kib);
        as_f64(delta * 1024) / as_f64(i128::from(self.clients.max(1)))
    }
}

#[allow(
    clippy::cast_precision_loss,
    reason = "byte counts and client counts for display"
)]
fn as_f64(n: i128) -> f64 {
    n as f64
}

fn mib(kib: u64) -> f64 {
    as_f64(i128::from(kib)) / 1024.0
}

/// A client that logged in, ran `SELECT 1` and now sits idle.
struct Idle {
    client: tokio_postgres::Client,
    connection: JoinHandle<()>,
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?)
}

/// The soft limit on open files of this process (`ulimit -n`); the proxies inherit it.
fn open_files_limit() -> anyhow::Result<Option<u64>> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files' in /proc/self/limits")?;
    let soft = line
        .split_whitespace()
        .nth(3)
        .context("malformed 'Max open files'")?;
    Ok(soft.parse().ok())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
            .unwrap_or(false)
    })
}

async fn connect_admin(conn: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = conn
        .parse::<tokio_postgres::Config>()?
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        drop(connection.await);
    });
    Ok(client)
}

/// A self-signed certificate for 127.0.0.1 and localhost, written to `dir`, and a client
/// configuration that trusts it.
fn certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, MakeRustlsConnect)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "idle clients bench");
    let cert = params.self_signed(&key)?;
    let (cert_file, key_file) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((cert_file, key_file, MakeRustlsConnect::new(client)))
}

impl Bench {
    /// PostgreSQL, the tenant's database, the registry with the tenant and its user, the
    /// certificate.
    async fn set_up(args: &Args, dir: PathBuf) -> anyhow::Result<Bench> {
        let pg = LocalPg::start(LocalPgOptions::new(dir.join("pgdata")))
            .context("starting PostgreSQL")?;
        let admin = connect_admin(&pg.connection_string("postgres")).await?;
        // One role for clients and backends, its PostgreSQL verifier the same low-iteration
        // string the proxies hold: PgBouncer logs in to PostgreSQL with the keys of the client's
        // SCRAM exchange (auth_file holds no password), which works only when both verifiers
        // are the same; tenantgate logs in with the password.
        let verifier = support::scram_verifier(PASSWORD, args.scram_iterations);
        admin
            .batch_execute(&format!("CREATE ROLE {USER} LOGIN PASSWORD '{verifier}'"))
            .await?;
        // CREATE DATABASE must be sent alone (not in a transaction block).
        admin
            .batch_execute(&format!("CREATE DATABASE {BACKEND_DATABASE} OWNER {USER}"))
            .await?;
        admin.batch_execute("CREATE DATABASE tg_registry").await?;

        // The registry's schema, as tenantgate creates it at start-up; then the tenant, its
        // backend password encrypted under the master key, and the client user.
        let master_key = MasterKey::generate_encoded();
        let key = MasterKey::decode(&master_key, "generated")?;
        let mut registry = connect_admin(&pg.connection_string("tg_registry")).await?;
        tenantgate::registry::migrate::apply(&mut registry)
            .await
            .context("creating the registry schema")?;
        let encrypted = key.encrypt(
            &Secret::new(PASSWORD.to_owned()),
            &Binding::backend_password(DATABASE),
        );
        registry
            .execute(
                "INSERT INTO tenants (slug, state, server, database_name, backend_role, \
                                      backend_password_enc) \
                 VALUES ($1, 'active', 'local', $2, $3, $4)",
                &[&DATABASE, &BACKEND_DATABASE, &USER, &encrypted],
            )
            .await
            .context("registering the tenant")?;
        registry
            .execute(
                "INSERT INTO tenant_users (tenant_slug, username, scram_verifier) \
                 VALUES ($1, $2, $3)",
                &[&DATABASE, &USER, &verifier],
            )
            .await?;

        let (cert_file, key_file, tls) = certificate(&dir)?;
        let mut client = tokio_postgres::Config::new();
        client
            .user(USER)
            .password(PASSWORD)
            .dbname(DATABASE)
            .host("127.0.0.1")
            .application_name("idle_clients");
        let pgb = dir.join("pgbouncer");
        std::fs::create_dir_all(&pgb)?;
        // PgBouncer drops to the postgres user when started as root: it writes its log here.
        std::fs::set_permissions(&pgb, std::fs::Permissions::from_mode(0o777))?;
        std::fs::write(
            pgb.join("userlist.txt"),
            format!("\"{USER}\" \"{verifier}\"\n"),
        )?;
        Ok(Bench {
            dir,
            pg,
            master_key,
            cert_file,
            key_file,
            tls,
            client,
            sources: (2..2 + args.sources.clamp(1, 250))
                .map(|i| Ipv4Addr::new(127, 0, 0, i))
                .collect(),
            concurrency: args.concurrency.max(1),
            pool_size: args.pool_size,
            idle: Duration::from_secs(args.idle_seconds),
            tenantgate: args.tenantgate.clone(),
            pgbouncer: args.pgbouncer.clone(),
            as_root: running_as_root(),
        })
    }

    fn start_tenantgate(
        &self,
        port: u16,
        transport: Transport,
        clients: u64,
    ) -> anyhow::Result<Proxy> {
        let tls = match transport {
            Transport::Plain => "mode = \"disable\"".to_owned(),
            Transport::Tls => format!(
                "mode = \"require\"\ncert_file = {}\nkey_file = {}",
                toml_string(&self.cert_file),
                toml_string(&self.key_file)
            ),
        };
        let config = format!(
            r#"
[proxy]
listen = "127.0.0.1:{port}"
log_level = "warn"
max_client_connections = {max_clients}
shutdown_grace_seconds = 1

[registry]
url = "{registry}"

[pool]
mode = "transaction"
pool_size = {pool_size}
checkout_timeout_ms = 30000

[tls]
{tls}

[[server]]
name = "local"
host = "127.0.0.1"
port = {pg_port}
admin_user = "{user}"
admin_password = "{password}"
max_connections = {budget}
tls = "disable"
"#,
            max_clients = clients + 1000,
            registry = self.pg.connection_string("tg_registry"),
            pool_size = self.pool_size,
            pg_port = self.pg.port(),
            user = self.pg.superuser(),
            password = self.pg.password(),
            budget = self.pool_size + 10,
        );
        let path = self.dir.join(format!("tenantgate-{port}.toml"));
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(self.dir.join(format!("tenantgate-{port}.log")))?;
        let child = Command::new(&self.tenantgate)
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .env("TENANTGATE_MASTER_KEY", &self.master_key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.tenantgate))?;
        Ok(Proxy(child))
    }

    fn start_pgbouncer(
        &self,
        port: u16,
        transport: Transport,
        clients: u64,
    ) -> anyhow::Result<Proxy> {
        let pgb = self.dir.join("pgbouncer");
        let tls = match transport {
            Transport::Plain => "client_tls_sslmode = disable".to_owned(),
            Transport::Tls => format!(
                "client_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}",
                self.cert_file.display(),
                self.key_file.display()
            ),
        };
        let ini = format!(
            "[databases]\n\
             {DATABASE} = host=127.0.0.1 port={pg_port} dbname={BACKEND_DATABASE}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {auth_file}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = {max_clients}\n\
             log_connections = 0\n\
             log_disconnections = 0\n\
             logfile = {logfile}\n\
             {tls}\n",
            pg_port = self.pg.port(),
            auth_file = pgb.join("userlist.txt").display(),
            pool_size = self.pool_size,
            max_clients = clients + 1000,
            logfile = pgb.join(format!("pgbouncer-{port}.log")).display(),
        );
        let path = pgb.join(format!("pgbouncer-{port}.ini"));
        std::fs::write(&path, ini)?;
        let mut command = Command::new(&self.pgbouncer);
        if self.as_root {
            // PgBouncer refuses to run as root.
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.pgbouncer))?;
        Ok(Proxy(child))
    }

    /// Logs one client in through `port` from `source`, runs `SELECT 1`, leaves it idle.
    async fn open(
        &self,
        port: u16,
        transport: Transport,
        source: Ipv4Addr,
    ) -> anyhow::Result<Idle> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let stream = socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await?;
        stream.set_nodelay(true)?;
        let (client, connection) = match transport {
            Transport::Plain => {
                let (client, connection) = self.client.connect_raw(stream, NoTls).await?;
                (client, tokio::spawn(async move { drop(connection.await) }))
            }
            Transport::Tls => {
                let mut make = self.tls.clone();
                let tls = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut make, "127.0.0.1")?;
                let mut config = self.client.clone();
                config.ssl_mode(SslMode::Require);
                let (client, connection) = config.connect_raw(stream, tls).await?;
                (client, tokio::spawn(async move { drop(connection.await) }))
            }
        };
        client.simple_query("SELECT 1").await?;
        Ok(Idle { client, connection })
    }

    /// `n` idle clients, `concurrency` logins at a time. Returns the clients, the number of
    /// failures and the first failure.
    async fn open_many(
        self: &Arc<Self>,
        port: u16,
        transport: Transport,
        n: u64,
    ) -> (Vec<Idle>, usize, Option<String>) {
        let next = Arc::new(AtomicUsize::new(0));
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let mut workers = Vec::new();
        for w in 0..self.concurrency {
            let (bench, next) = (self.clone(), next.clone());
            let source = self.sources[w % self.sources.len()];
            workers.push(tokio::spawn(async move {
                let (mut idle, mut errors, mut first) = (Vec::new(), 0, None);
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    match bench.open(port, transport, source).await {
                        Ok(client) => idle.push(client),
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (idle, errors, first)
            }));
        }
        let (mut idle, mut errors, mut first) = (Vec::with_capacity(n), 0, None);
        for worker in workers {
            match worker.await {
                Ok((i, e, f)) => {
                    idle.extend(i);
                    errors += e;
                    first = first.or(f);
                }
                Err(e) => {
                    errors += 1;
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
        (idle, errors, first)
    }

    async fn measure(
        self: &Arc<Self>,
        proxy_kind: ProxyKind,
        transport: Transport,
        n: u64,
    ) -> anyhow::Result<Row> {
        let port = free_port()?;
        let proxy = match proxy_kind {
            ProxyKind::Tenantgate => self.start_tenantgate(port, transport, n)?,
            ProxyKind::Pgbouncer => self.start_pgbouncer(port, transport, n)?,
        };
        wait_listening(port, &proxy_kind).await?;

        // Warm-up: the pool's backends opened, one-time work done, then everyone leaves.
        let concurrency = u64::try_from(self.concurrency)?;
        let (warm, errors, first) = self.open_many(port, transport, concurrency).await;
        if errors > 0 {
            bail!(
                "{proxy_kind} {transport}: warm-up logins failed: {}",
                first.unwrap_or_default()
            );
        }
        close(warm).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let rss_before_kib = rss_kib(proxy.pid())?;
        let started = Instant::now();
        let (idle, errors, first_error) = self.open_many(port, transport, n).await;
        let login_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(self.idle).await;
        let rss_after_kib = rss_kib(proxy.pid())?;

        // The proxy closes first: the TIME_WAIT sockets are its own, not the clients' (whose
        // ephemeral ports the next run needs).
        proxy.stop().await;
        close(idle).await;
        Ok(Row {
            proxy: proxy_kind,
            transport,
            clients: n.saturating_sub(u64::try_from(errors)?),
            rss_before_kib,
            rss_after_kib,
            login_seconds,
            errors,
            first_error,
        })
    }
}

/// Drops clients (each sends Terminate) and waits for their connection tasks.
async fn close(clients: Vec<Idle>) {
    let mut tasks = Vec::with_capacity(clients.len());
    for Idle { client, connection } in clients {
        drop(client);
        tasks.push(connection);
    }
    for task in tasks {
        drop(task.await);
    }
}

async fn wait_listening(port: u16, what: &ProxyKind) -> anyhow::Result<()> {
    for _ in 0..300 {
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not start listening on port {port}")
}

fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<11} {:<9} {:>7} {:>11} {:>11} {:>13} {:>10} {:>9} {:>7}",
        "proxy",
        "transport",
        "N",
        "rss_before",
        "rss_after",
        "bytes/client",
        "tg/pgb",
        "login_s",
        "errors"
    );
    for row in rows {
        let ratio = match row.proxy {
            ProxyKind::Tenantgate => rows
                .iter()
                .find(|p| {
                    p.proxy == ProxyKind::Pgbouncer
                        && p.transport == row.transport
                        && p.clients + u64::try_from(p.errors).unwrap_or(0)
                            == row.clients + u64::try_from(row.errors).unwrap_or(0)
                })
                .map(Row::bytes_per_client)
                .filter(|b| *b > 0.0)
                .map_or_else(
                    || "-".to_owned(),
                    |b| format!("{:.1}", row.bytes_per_client() / b),
                ),
            ProxyKind::Pgbouncer => String::new(),
        };
        println!(
            "{:<11} {:<9} {:>7} {:>8.1} MiB {:>7.1} MiB {:>13.0} {:>10} {:>9.1} {:>7}",
            row.proxy,
            row.transport,
            row.clients,
            mib(row.rss_before_kib),
            mib(row.rss_after_kib),
            row.bytes_per_client(),
            ratio,
            row.login_seconds,
            row.errors
        );
    }
    for row in rows {
        if let Some(e) = &row.first_error {
            println!(
                "first error, {} {} N={}: {e}",
                row.proxy, row.transport, row.clients
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = open_files_limit()?;
    let fits = limit.map_or(u64::MAX, |l| l.saturating_sub(FD_RESERVE));
    let mut counts: Vec<u64> = Vec::new();
    for &n in &args.clients {
        let n = if n > fits {
            println!(
                "N={n} needs about {} open files in this process and in each proxy; the limit \
                 (ulimit -n) is {}: measuring N={fits} instead",
                n + FD_RESERVE,
                limit.unwrap_or(0)
            );
            fits
        } else {
            n
        };
        let per_source = usize::try_from(n)?.div_ceil(usize::from(args.sources.clamp(1, 250)));
        if per_source > PORTS_PER_SOURCE {
            println!(
                "N={n}: {per_source} clients per source address may exhaust its ephemeral ports; \
                 raise --sources"
            );
        }
        if n > 0 && !counts.contains(&n) {
            counts.push(n);
        }
    }
    println!(
        "idle clients: open files limit {}, {} logins at a time from {} source addresses, \
         pool size {}, transaction pooling, SCRAM-SHA-256 with {} iterations, {} s idle",
        limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string()),
        args.concurrency,
        args.sources.clamp(1, 250),
        args.pool_size,
        args.scram_iterations,
        args.idle_seconds
    );

    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tenantgate-idle-{}", std::process::id()))
    });
    // Declared before the cluster, so dropped after it, however the run ends.
    let _remove = RemoveDir(dir.clone());
    std::fs::create_dir_all(&dir)?;
    // PostgreSQL and PgBouncer run as the postgres user when this runs as root.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let bench = Arc::new(Bench::set_up(&args, dir).await?);

    let mut rows = Vec::new();
    for &n in &counts {
        for &transport in &args.transports {
            for &proxy in &args.proxies {
                let row = bench.measure(proxy, transport, n).await?;
                println!(
                    "{proxy} {transport} N={}: RSS {:.1} -> {:.1} MiB, {:.0} bytes per idle client \
                     (logins {:.1} s, {} errors)",
                    row.clients,
                    mib(row.rss_before_kib),
                    mib(row.rss_after_kib),
                    row.bytes_per_client(),
                    row.login_seconds,
                    row.errors
                );
                drop(std::io::stdout().flush());
                rows.push(row);
            }
        }
    }
    print_table(&rows);
    drop(bench);
    Ok(())
}
