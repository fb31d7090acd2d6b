//! Many tenants, long-lived connections (issue 12): `benches/load_compare.sh` runs it against
//! tenantgate and PgBouncer in turn. A benchmark, not a test.
//!
//! It behaves like application servers with one pool per tenant: `--workers` workers each hold
//! one connection to every tenant (the URIs on the command line, one per tenant), all opened
//! before anything is timed, `--connect-concurrency` logins at a time. Each visit picks a tenant
//! (`uniform`, or `zipf:S`: the k-th URI is picked with weight 1/k^S) and runs, on the worker's
//! connection to it, `SELECT 1` and one `pgbench_accounts` lookup by a random `aid` in
//! 1..=`--accounts` (simple query protocol: two transactions, so a transaction pooler checks a
//! backend out twice per visit). After `--warmup` seconds of that load, `--duration` seconds are
//! measured; the load runs on without a pause between the two.
//!
//! It prints one line, `long_lived key=value ...`:
//!
//! - `clients`, `connect_s`, `connect_errors`: the connections opened before the load;
//! - `ops`, `ops_per_s`, `p50_ms`, `p99_ms`: visits completed in the timed part;
//! - `errors`: failed visits over warm-up and timed part (a query error, a lookup that found no
//!   row, `--timeout` passed, a broken connection that could not be opened again); `reconnects`:
//!   connections opened again after they broke;
//! - with `--stats-uri` (a direct connection to the PostgreSQL behind the proxy, as a user that
//!   may read every backend's statistics) and `--stats-databases`: `backend_connects`, the growth
//!   of `pg_stat_database.sessions` (PostgreSQL 14+) summed over those databases during the timed
//!   part, `backend_connects_per_s`, and `peak_backends`, the most `pg_stat_activity` rows in
//!   those databases, sampled every 100 ms (the proxy's budget at work);
//! - with `--pid` (the proxy's process): `proxy_cpu_s`, its utime + stime during the timed part.
//!
//! A value that was not measured is `-`. When a login failed, a line `first_connect_error: ...`
//! follows, and when a visit failed, a line `first_error: ...`.
//!
//!     target/release/examples/long_lived --workers 64 --duration 10 --distribution zipf:1.1 \
//!         postgresql://bench:secret@127.0.0.1:6432/t1 postgresql://bench:secret@127.0.0.1:6432/t2

#![allow(clippy::print_stdout, reason = "the report is the output")]

mod support;

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use tokio::task::JoinHandle;
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[derive(Parser, Debug)]
struct Args {
    /// Connection URIs, one per tenant (the order matters for zipf: the first is the hottest).
    #[arg(required = true)]
    uris: Vec<String>,
    /// Workers; each holds one connection per tenant.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before the measured part.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// How a visit picks its tenant: `uniform` or `zipf:S` (S > 0, e.g. zipf:1.1).
    #[arg(long, default_value = "uniform")]
    distribution: Distribution,
    /// Logins in flight at once while the connections are opened.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// Rows of pgbench_accounts (100000 per pgbench scale unit); lookups pick aid in 1..=N.
    #[arg(long, default_value_t = 100_000)]
    accounts: u64,
    /// Seconds a login or a visit may take before it counts as an error.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Direct connection to PostgreSQL for pg_stat_database and pg_stat_activity.
    #[arg(long)]
    stats_uri: Option<String>,
    /// The tenants' databases in PostgreSQL, comma-separated (with --stats-uri).
    #[arg(long, value_delimiter = ',')]
    stats_databases: Vec<String>,
    /// The proxy's process id, for its CPU time.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Clone, Debug)]
enum Distribution {
    Uniform,
    Zipf(f64),
}

impl FromStr for Distribution {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "uniform" {
            return Ok(Distribution::Uniform);
        }
        let exponent = s
            .strip_prefix("zipf:")
            .and_then(|e| e.parse::<f64>().ok())
            .filter(|e| e.is_finite() && *e > 0.0)
            .ok_or_else(|| format!("`{s}`: expected `uniform` or `zipf:S` with S > 0"))?;
        Ok(Distribution::Zipf(exponent))
    }
}

impl std::fmt::Display for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Distribution::Uniform => f.write_str("uniform"),
            Distribution::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// Picks tenant indexes: uniformly, or by inverting the Zipf distribution's cumulative weights.
struct Picker {
    tenants: usize,
    /// Cumulative probabilities of tenants 0..n (zipf only), the last one 1.0.
    cdf: Vec<f64>,
}

impl Picker {
    fn new(distribution: &Distribution, tenants: usize) -> anyhow::Result<Picker> {
        let cdf = match distribution {
            Distribution::Uniform => Vec::new(),
            Distribution::Zipf(s) => {
                let mut weights = Vec::with_capacity(tenants);
                let mut k = 1.0_f64;
                for _ in 0..tenants {
                    weights.push(k.powf(-s));
                    k += 1.0;
                }
                let total: f64 = weights.iter().sum();
                let mut sum = 0.0;
                weights
                    .into_iter()
                    .map(|w| {
                        sum += w / total;
                        sum
                    })
                    .collect()
            }
        };
        if tenants == 0 {
            bail!("no tenants");
        }
        Ok(Picker { tenants, cdf })
    }

    fn pick(&self, seed: &mut u64) -> usize {
        let x = next(seed);
        if self.cdf.is_empty() {
            return usize::try_from(x % u64::try_from(self.tenants).unwrap_or(u64::MAX))
                .unwrap_or(0);
        }
        // The top 32 bits as a fraction in [0, 1).
        let u = f64::from(u32::try_from(x >> 32).unwrap_or(0)) / 4_294_967_296.0;
        self.cdf.partition_point(|&c| c <= u).min(self.tenants - 1)
    }
}

/// xorshift64: a worker's own cheap random numbers.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// One open connection and the task driving it.
struct Conn {
    client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

async fn open(config: &tokio_postgres::Config) -> anyhow::Result<Conn> {
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        drop(connection.await);
    });
    Ok(Conn { client, driver })
}

/// Failures: how many, and the first one's message.
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn record(&self, what: impl FnOnce() -> String) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(what);
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn first(&self) -> Option<String> {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What the workers share.
struct Shared {
    configs: Vec<tokio_postgres::Config>,
    /// Tenant URIs for error messages (without passwords).
    names: Vec<String>,
    picker: Picker,
    accounts: u64,
    timeout: Duration,
    stop: AtomicBool,
    errors: Errors,
    reconnects: AtomicU64,
}

/// A tenant's URI as an error message may show it: host, port and database.
fn display_name(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "?".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(no database)")
    )
}

/// Opens workers × tenants connections, `concurrency` logins at a time. Returns each worker's
/// connections (None where the login failed) and the number of failed logins.
async fn open_all(
    shared: &Arc<Shared>,
    workers: usize,
    concurrency: usize,
    connect_errors: &Arc<Errors>,
) -> Vec<Vec<Option<Conn>>> {
    let tenants = shared.configs.len();
    let total = workers * tenants;
    let cursor = Arc::new(AtomicUsize::new(0));
    let mut openers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (shared, cursor, connect_errors) =
            (shared.clone(), cursor.clone(), connect_errors.clone());
        openers.push(tokio::spawn(async move {
            let mut opened = Vec::new();
            loop {
                let k = cursor.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    return opened;
                }
                let (worker, tenant) = (k / tenants, k % tenants);
                let Some(config) = shared.configs.get(tenant) else {
                    continue;
                };
                match tokio::time::timeout(shared.timeout, open(config)).await {
                    Ok(Ok(conn)) => opened.push((worker, tenant, conn)),
                    Ok(Err(e)) => connect_errors
                        .record(|| format!("login to {}: {e:#}", shared.names[tenant])),
                    Err(_) => connect_errors
                        .record(|| format!("login to {}: timed out", shared.names[tenant])),
                }
            }
        }));
    }
    let mut slots: Vec<Vec<Option<Conn>>> = (0..workers)
        .map(|_| (0..tenants).map(|_| None).collect())
        .collect();
    for opener in openers {
        match opener.await {
            Ok(opened) => {
                for (worker, tenant, conn) in opened {
                    if let Some(slot) = slots.get_mut(worker).and_then(|w| w.get_mut(tenant)) {
                        *slot = Some(conn);
                    }
                }
            }
            Err(e) => connect_errors.record(|| format!("login task: {e}")),
        }
    }
    slots
}

/// One visit on `slot` (opened again first if it broke): `SELECT 1`, then a lookup by `aid`.
async fn visit(
    slot: &mut Option<Conn>,
    config: &tokio_postgres::Config,
    aid: u64,
    reconnects: &AtomicU64,
) -> anyhow::Result<()> {
    if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
        *slot = None;
        reconnects.fetch_add(1, Ordering::Relaxed);
        *slot = Some(open(config).await.context("opening again")?);
    }
    let Some(conn) = slot.as_ref() else {
        bail!("no connection");
    };
    conn.client.simple_query("SELECT 1").await?;
    let rows = conn
        .client
        .simple_query(&format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
        ))
        .await?;
    let found = rows
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    if found != 1 {
        bail!("pgbench_accounts aid {aid}: {found} rows (is the tenant initialised?)");
    }
    Ok(())
}

/// Completion time and latency (µs) of each successful visit.
type Done = Vec<(Instant, u64)>;

async fn worker(id: u64, mut slots: Vec<Option<Conn>>, shared: Arc<Shared>) -> Done {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut done = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let tenant = shared.picker.pick(&mut seed);
        let aid = next(&mut seed) % shared.accounts.max(1) + 1;
        let (Some(slot), Some(config)) = (slots.get_mut(tenant), shared.configs.get(tenant)) else {
            continue;
        };
        let started = Instant::now();
        match tokio::time::timeout(shared.timeout, visit(slot, config, aid, &shared.reconnects))
            .await
        {
            Ok(Ok(())) => done.push((
                Instant::now(),
                u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            )),
            Ok(Err(e)) => {
                shared
                    .errors
                    .record(|| format!("{}: {e:#}", shared.names[tenant]));
                if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
                    *slot = None;
                }
            }
            Err(_) => {
                shared.errors.record(|| {
                    format!(
                        "{}: visit timed out after {} s",
                        shared.names[tenant],
                        shared.timeout.as_secs()
                    )
                });
                // Its state is unknown: drop it, the next visit opens another.
                *slot = None;
            }
        }
    }
    // Close (Terminate) and wait for the drivers, so the proxy sees clients leave cleanly.
    let drivers: Vec<_> = slots
        .into_iter()
        .flatten()
        .map(|Conn { client, driver }| {
            drop(client);
            driver
        })
        .collect();
    for driver in drivers {
        drop(tokio::time::timeout(Duration::from_secs(5), driver).await);
    }
    done
}

/// The direct connection that reads PostgreSQL's statistics.
struct Stats {
    client: tokio_postgres::Client,
    databases: Vec<String>,
}

impl Stats {
    async fn connect(uri: &str, databases: Vec<String>) -> anyhow::Result<Stats> {
        let Conn { client, .. } = open(&uri.parse()?).await.context("--stats-uri")?;
        Ok(Stats { client, databases })
    }

    /// Sessions ever opened to the tenants' databases (each query is its own transaction, so
    /// it sees fresh statistics).
    async fn sessions(&self) -> anyhow::Result<i64> {
        Ok(self
            .client
            .query_one(
                "SELECT coalesce(sum(sessions), 0)::int8 FROM pg_stat_database \
                 WHERE datname = ANY($1)",
                &[&self.databases],
            )
            .await?
            .get(0))
    }

    async fn backends(&self) -> anyhow::Result<i64> {
        Ok(self
            .client
            .query_one(
                // Client backends only: autovacuum workers have a datname too.
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = ANY($1) AND backend_type = 'client backend'",
                &[&self.databases],
            )
            .await?
            .get(0))
    }
}

#[allow(clippy::cast_precision_loss, reason = "counts for display")]
fn as_f64(n: u64) -> f64 {
    n as f64
}

fn percentile_ms(sorted_us: &[u64], q: usize) -> f64 {
    let i = (sorted_us.len() * q / 100).min(sorted_us.len().saturating_sub(1));
    sorted_us.get(i).map_or(0.0, |us| as_f64(*us) / 1000.0)
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[tokio::main]
#[allow(
    clippy::too_many_lines,
    reason = "a script: open, load, measure, report, in order"
)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut configs = Vec::new();
    for uri in &args.uris {
        let mut config: tokio_postgres::Config = uri
            .parse()
            .with_context(|| format!("parsing a URI: {uri}"))?;
        config
            .connect_timeout(timeout)
            .application_name("long_lived");
        configs.push(config);
    }
    let stats = match &args.stats_uri {
        Some(uri) if !args.stats_databases.is_empty() => Some(Arc::new(
            Stats::connect(uri, args.stats_databases.clone()).await?,
        )),
        Some(_) => bail!("--stats-uri needs --stats-databases"),
        None => None,
    };
    let shared = Arc::new(Shared {
        names: configs.iter().map(display_name).collect(),
        picker: Picker::new(&args.distribution, configs.len())?,
        configs,
        accounts: args.accounts,
        timeout,
        stop: AtomicBool::new(false),
        errors: Errors::default(),
        reconnects: AtomicU64::new(0),
    });

    // 1. Every worker's connection to every tenant, before anything is timed.
    let connect_errors = Arc::new(Errors::default());
    let started = Instant::now();
    let slots = open_all(
        &shared,
        args.workers,
        args.connect_concurrency,
        &connect_errors,
    )
    .await;
    let connect_s = started.elapsed().as_secs_f64();
    let clients = slots.iter().flatten().filter(|s| s.is_some()).count();

    // 2. Load: warm-up, then the measured part.
    let mut workers = Vec::new();
    for (id, worker_slots) in (0_u64..).zip(slots) {
        workers.push(tokio::spawn(worker(id, worker_slots, shared.clone())));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let sessions_before = match &stats {
        Some(s) => Some(s.sessions().await?),
        None => None,
    };
    let cpu_before = args.pid.map(support::cpu_seconds).transpose()?;
    let t0 = Instant::now();
    let peak = Arc::new(AtomicI64::new(-1));
    let sampler = stats.clone().map(|s| {
        let peak = peak.clone();
        tokio::spawn(async move {
            while let Ok(n) = s.backends().await {
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let t1 = Instant::now();
    let cpu_after = args.pid.map(support::cpu_seconds).transpose()?;
    let sessions_after = match &stats {
        Some(s) => Some(s.sessions().await?),
        None => None,
    };
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let mut latencies = Vec::new();
    for w in workers {
        match w.await {
            Ok(done) => latencies.extend(
                done.into_iter()
                    .filter(|(at, _)| *at >= t0 && *at <= t1)
                    .map(|(_, us)| us),
            ),
            Err(e) => shared.errors.record(|| format!("worker task: {e}")),
        }
    }
    latencies.sort_unstable();

    let seconds = (t1 - t0).as_secs_f64();
    let ops = latencies.len();
    let backend_connects = sessions_before
        .zip(sessions_after)
        .map(|(before, after)| after - before);
    let mut line = format!(
        "long_lived distribution={} tenants={} workers={} clients={clients} connect_s={connect_s:.1} \
         connect_errors={} seconds={seconds:.1} ops={ops} ops_per_s={:.1} p50_ms={:.3} p99_ms={:.3} \
         errors={} reconnects={}",
        args.distribution,
        shared.configs.len(),
        args.workers,
        connect_errors.count(),
        as_f64(u64::try_from(ops)?) / seconds,
        percentile_ms(&latencies, 50),
        percentile_ms(&latencies, 99),
        shared.errors.count(),
        shared.reconnects.load(Ordering::Relaxed),
    );
    write!(
        line,
        " backend_connects={} backend_connects_per_s={} peak_backends={} proxy_cpu_s={}",
        or_dash(backend_connects),
        or_dash(backend_connects.map(|n| format!("{:.1}", as_f64(n.unsigned_abs()) / seconds))),
        or_dash(Some(peak.load(Ordering::Relaxed)).filter(|p| *p >= 0)),
        or_dash(
            cpu_before
                .zip(cpu_after)
                .map(|(before, after)| format!("{:.2}", after - before))
        ),
    )?;
    println!("{line}");
    if let Some(e) = connect_errors.first() {
        println!("first_connect_error: {e}");
    }
    if let Some(e) = shared.errors.first() {
        println!("first_error: {e}");
    }
    Ok(())
}
