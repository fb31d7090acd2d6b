//! Load generator for issue 4, "10,000 tenants on one server": `benches/load_compare.sh
//! --many-tenants` runs it. A benchmark, not a test.
//!
//! It starts a private PostgreSQL (`max_connections` 100 by default) with a few physical
//! databases, starts `tenantgate serve` as its own process (budget 80 by default), registers
//! 10,000 tenants against those databases straight in the registry (two INSERTs), then:
//!
//! 1. **cold**: every tenant's first connect (connect, SCRAM, `SELECT 1`, disconnect), so the
//!    proxy knows 10,000 pools; then tenantgate's RSS (`VmRSS` of its process);
//! 2. **skewed**: for `--duration` seconds, workers connect to a hot tenant (`--hot-share` of
//!    the connects, on the `--hot` first tenants) or to any tenant, run `SELECT 1` and
//!    disconnect. Reports ops/s and p50/p99 per kind.
//!
//! A sampler polls `pg_stat_activity` every 20 ms (on its own connection to the `postgres`
//! database, which it does not count) for the peak of backend connections to the tenant
//! databases and of all client backends.
//!
//!     cargo build --release && cargo run --release --example many_tenants -- \
//!         --tenantgate target/release/tenantgate

#![allow(clippy::print_stdout, reason = "the report is the output")]

use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tenantgate::crypto::{Binding, MasterKey, Secret};
use tenantgate::localpg::{LocalPg, LocalPgOptions, free_port};
use tokio_postgres::NoTls;

#[derive(Parser, Debug)]
struct Args {
    /// The tenantgate binary to start.
    #[arg(long, default_value = "target/release/tenantgate")]
    tenantgate: String,
    /// Tenants registered.
    #[arg(long, default_value_t = 10_000)]
    tenants: usize,
    /// Physical databases the tenants share.
    #[arg(long, default_value_t = 4)]
    databases: usize,
    /// PostgreSQL's max_connections.
    #[arg(long, default_value_t = 100)]
    max_connections: u32,
    /// tenantgate's budget for the server (`[[server]] max_connections`).
    #[arg(long, default_value_t = 80)]
    budget: u32,
    /// Pool size per tenant.
    #[arg(long, default_value_t = 4)]
    pool_size: u32,
    /// Pooling mode: session or transaction.
    #[arg(long, default_value = "session")]
    mode: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Seconds of skewed load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Hot tenants.
    #[arg(long, default_value_t = 50)]
    hot: usize,
    /// Share of connects that go to the hot tenants.
    #[arg(long, default_value_t = 0.8)]
    hot_share: f64,
}

/// Latencies in microseconds.
#[derive(Default)]
struct Latencies(Vec<u64>);

impl Latencies {
    fn record(&mut self, since: Instant) {
        self.0
            .push(u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX));
    }

    fn line(mut self, name: &str, seconds: f64) -> String {
        self.0.sort_unstable();
        let at = |q: usize| {
            let i = (self.0.len() * q / 100).min(self.0.len().saturating_sub(1));
            self.0.get(i).map_or(0.0, |us| ms(*us))
        };
        let n = self.0.len();
        format!(
            "{name:<22} {n:>8} ops {:>9.0} ops/s   p50 {:>8.2} ms   p99 {:>8.2} ms",
            count_f64(n) / seconds,
            at(50),
            at(99)
        )
    }
}

#[allow(
    clippy::cast_precision_loss,
    reason = "microseconds to milliseconds for display"
)]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[allow(clippy::cast_precision_loss, reason = "KiB to MiB for display")]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(clippy::cast_precision_loss, reason = "a count for display")]
fn count_f64(n: usize) -> f64 {
    n as f64
}

/// Stops tenantgate (SIGTERM, then SIGKILL) when the run ends, however it ends.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let term = Command::new("kill").args(["-TERM", &pid]).status();
        if term.is_err() {
            drop(self.0.kill());
        }
        drop(self.0.wait());
    }
}

/// Removes a directory when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
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

async fn connect(conn: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::from_str(conn)?
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        drop(connection.await);
    });
    Ok(client)
}

/// One operation: connect to `slug` through the proxy, `SELECT 1`, disconnect.
async fn op(port: u16, slug: &str) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .password("secret")
        .dbname(slug)
        .connect_timeout(Duration::from_secs(30));
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    client.simple_query("SELECT 1").await?;
    drop(client);
    drop(driver.await);
    Ok(())
}

/// xorshift64.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Client errors: how many, and the first one.
#[derive(Default)]
struct Errors {
    count: AtomicUsize,
    first: std::sync::Mutex<Option<String>>,
}

impl Errors {
    fn record(&self, slug: &str, e: &tokio_postgres::Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(|| format!("{slug}: {e:?}"));
    }

    fn first(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Every tenant's first connect, `workers` at a time.
async fn cold_phase(
    port: u16,
    tenants: usize,
    workers: usize,
    errors: &Arc<Errors>,
) -> anyhow::Result<Latencies> {
    let cursor = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (cursor, errors) = (cursor.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut cold = Latencies::default();
            loop {
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                if i >= tenants {
                    return cold;
                }
                let slug = format!("t{i}");
                let t = Instant::now();
                match op(port, &slug).await {
                    Ok(()) => cold.record(t),
                    Err(e) => errors.record(&slug, &e),
                }
            }
        }));
    }
    let mut cold = Latencies::default();
    for task in tasks {
        cold.0.extend(task.await?.0);
    }
    Ok(cold)
}

/// `--duration` seconds of connects, `--hot-share` of them on the `--hot` first tenants.
/// Returns the latencies of (hot, other) connects.
async fn skewed_phase(
    args: &Args,
    port: u16,
    errors: &Arc<Errors>,
) -> anyhow::Result<(Latencies, Latencies)> {
    let stop = Arc::new(AtomicBool::new(false));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a share in [0, 1] scaled to 0..=1000"
    )]
    let hot_per_mille = (args.hot_share.clamp(0.0, 1.0) * 1000.0) as u64;
    let (tenants, hot) = (u64::try_from(args.tenants)?, u64::try_from(args.hot)?);
    let mut tasks = Vec::new();
    for worker in 0..u64::try_from(args.workers)? {
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (worker + 1);
            let (mut warm, mut any) = (Latencies::default(), Latencies::default());
            while !stop.load(Ordering::Relaxed) {
                let is_hot = next(&mut seed) % 1000 < hot_per_mille;
                let slug = format!("t{}", next(&mut seed) % if is_hot { hot } else { tenants });
                let t = Instant::now();
                match op(port, &slug).await {
                    Ok(()) if is_hot => warm.record(t),
                    Ok(()) => any.record(t),
                    Err(e) => errors.record(&slug, &e),
                }
            }
            (warm, any)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut warm, mut any) = (Latencies::default(), Latencies::default());
    for task in tasks {
        let (w, a) = task.await?;
        warm.0.extend(w.0);
        any.0.extend(a.0);
    }
    Ok((warm, any))
}

#[tokio::main]
#[allow(
    clippy::too_many_lines,
    reason = "a script: set up, load, report, in order"
)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.hot == 0 || args.hot > args.tenants || args.databases == 0 {
        bail!("need 0 < --hot <= --tenants and --databases > 0");
    }
    let dir = std::env::temp_dir().join(format!("tenantgate-many-{}", std::process::id()));
    // Declared before the cluster, so dropped after it: removes the data directory however
    // the run ends.
    let _dir_guard = RemoveDir(dir.clone());
    let mut pg_options = LocalPgOptions::new(dir.join("pgdata"));
    pg_options.max_connections = args.max_connections;
    let pg = LocalPg::start(pg_options).context("starting PostgreSQL")?;
    let admin = connect(&pg.connection_string("postgres")).await?;
    admin
        .batch_execute("CREATE DATABASE tg_registry")
        .await
        .context("creating the registry database")?;
    let mut physical = Vec::new();
    for i in 0..args.databases {
        let (db, password) = (format!("tg_phys_{i}"), format!("phys-pw-{i}-x9"));
        // CREATE DATABASE must be sent alone (not in a transaction block).
        admin
            .batch_execute(&format!("CREATE ROLE {db} LOGIN PASSWORD '{password}'"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db} OWNER {db}"))
            .await?;
        physical.push((db, password));
    }

    // tenantgate in its own process, so its RSS is its own.
    let key_text = MasterKey::generate_encoded();
    let key = MasterKey::decode(&key_text, "generated")?;
    let port = free_port()?;
    let config_path = dir.join("tenantgate.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:{port}"
log_level = "warn"
max_client_connections = 10000

[registry]
url = "{registry}"

[pool]
mode = "{mode}"
pool_size = {pool_size}
checkout_timeout_ms = 30000
max_pools = {max_pools}

[[server]]
name = "local"
host = "127.0.0.1"
port = {pg_port}
admin_user = "{user}"
admin_password = "{password}"
max_connections = {budget}
"#,
            registry = pg.connection_string("tg_registry"),
            mode = args.mode,
            pool_size = args.pool_size,
            max_pools = args.tenants.max(10_000),
            pg_port = pg.port(),
            user = pg.superuser(),
            password = pg.password(),
            budget = args.budget,
        ),
    )?;
    let log = std::fs::File::create(dir.join("tenantgate.log"))?;
    let proxy = Proxy(
        Command::new(&args.tenantgate)
            .args(["--config", &config_path.display().to_string(), "serve"])
            .env("TENANTGATE_MASTER_KEY", &key_text)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", args.tenantgate))?,
    );
    let pid = proxy.0.id();
    let mut up = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !up {
        bail!(
            "tenantgate did not start; see {}",
            dir.join("tenantgate.log").display()
        );
    }

    // Register the tenants in one statement (tenantgate created the schema at start-up). Each
    // secret is bound to its tenant's row, so each is encrypted on its own.
    let registry = connect(&pg.connection_string("tg_registry")).await?;
    let (mut slugs, mut dbs, mut blobs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.tenants {
        let (db, password) = &physical[i % args.databases];
        let slug = format!("t{i}");
        let binding = Binding::backend_password(&slug);
        blobs.push(key.encrypt(&Secret::new(password.clone()), &binding));
        dbs.push(db.clone());
        slugs.push(slug);
    }
    registry
        .execute(
            "INSERT INTO tenants (slug, state, server, database_name, backend_role, \
                                  backend_password_enc) \
             SELECT slug, 'active', 'local', db, db, enc \
             FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(slug, db, enc)",
            &[&slugs, &dbs, &blobs],
        )
        .await
        .context("registering tenants")?;
    let verifier = postgres_protocol::password::scram_sha_256(b"secret");
    registry
        .execute(
            "INSERT INTO tenant_users (tenant_slug, username, scram_verifier) \
             SELECT slug, 'app', $1 FROM tenants",
            &[&verifier],
        )
        .await?;
    let rss_start = rss_kib(pid)?;

    // Peak backends, sampled every 20 ms.
    let peak_tenant = Arc::new(AtomicI64::new(0));
    let peak_all = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (peak_tenant, peak_all) = (peak_tenant.clone(), peak_all.clone());
        let direct = connect(&pg.connection_string("postgres")).await?;
        tokio::spawn(async move {
            loop {
                let Ok(row) = direct
                    .query_one(
                        "SELECT count(*) FILTER (WHERE datname LIKE 'tg_phys_%'), \
                                count(*) FILTER (WHERE backend_type = 'client backend') - 1 \
                         FROM pg_stat_activity",
                        &[],
                    )
                    .await
                else {
                    return;
                };
                peak_tenant.fetch_max(row.get(0), Ordering::Relaxed);
                peak_all.fetch_max(row.get(1), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let errors = Arc::new(Errors::default());

    // 1. Cold: every tenant's first connect.
    let started = Instant::now();
    let cold = cold_phase(port, args.tenants, args.workers, &errors).await?;
    let cold_seconds = started.elapsed().as_secs_f64();
    let rss_cold = rss_kib(pid)?;

    // 2. Skewed: hot tenants (warm pools) and any tenant.
    let started = Instant::now();
    let (warm, any) = skewed_phase(&args, port, &errors).await?;
    let skew_seconds = started.elapsed().as_secs_f64();
    let rss_end = rss_kib(pid)?;
    sampler.abort();
    let all_ops = warm.0.len() + any.0.len();

    println!(
        "many tenants: {} tenants on {} databases, PostgreSQL max_connections {}, tenantgate budget {}, \
         pool_size {}, {} mode, {} workers",
        args.tenants,
        args.databases,
        args.max_connections,
        args.budget,
        args.pool_size,
        args.mode,
        args.workers
    );
    println!("op = connect (SCRAM) + SELECT 1 + disconnect, through tenantgate");
    println!("{}", cold.line("cold (first connect)", cold_seconds));
    println!(
        "skewed load, {:.0} s: {:.0} ops/s ({:.0}% of connects on {} hot tenants)",
        skew_seconds,
        count_f64(all_ops) / skew_seconds,
        args.hot_share * 100.0,
        args.hot
    );
    println!("{}", warm.line("  warm (hot tenant)", skew_seconds));
    println!("{}", any.line("  any tenant", skew_seconds));
    println!(
        "peak backends: {} to tenant databases (budget {}), {} client backends in all (max_connections {})",
        peak_tenant.load(Ordering::Relaxed),
        args.budget,
        peak_all.load(Ordering::Relaxed),
        args.max_connections
    );
    println!(
        "tenantgate RSS: {:.1} MiB at start (tenants registered), {:.1} MiB with {} pools known, {:.1} MiB at the end",
        mib(rss_start),
        mib(rss_cold),
        args.tenants,
        mib(rss_end)
    );
    println!("client errors: {}", errors.count.load(Ordering::Relaxed));
    if let Some(e) = errors.first() {
        println!("first error: {e}");
    }
    drop(registry);
    drop(admin);
    drop(proxy);
    drop(pg);
    Ok(())
}
