//! Fault injection for issue 11, "No dead, dirty or half-sent backend ever reaches a client".
//!
//! DESIGN §4a promises that a backend handed to a client is alive, clean and at a message
//! boundary in both directions, and that a backend that cannot be proven all three is closed,
//! never returned. Each test here attacks one of those promises on real PostgreSQL: backends
//! killed (`kill -9`, `pg_terminate_backend`), servers restarted (fast and immediate), the
//! network between proxy and server frozen, and hostile clients that leave session state, a
//! transaction or half a message behind. After every fault the clients that had nothing to do
//! with it must see no error, and what the proxy reports (`SHOW SERVERS`, `SHOW POOLS`) must
//! come back to what the server has (`pg_stat_activity`): no dead or leaked connection counted.
//!
//! Tests that crash or restart a server get a dedicated cluster (a crashed backend makes the
//! postmaster restart every backend of its cluster); the registry stays on the shared one.

use crate::common;

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::activity::{terminate_backends, until_running};
use common::query::{describe, try_value};
use common::wire::{RawClient, frame};
use common::{TestEnv, connect_str};
use futures_util::future::join_all;
use tenantgate::config::Config;
use tenantgate::localpg::{LocalPg, LocalPgOptions};
use tenantgate::pool::{PlanConfig, PoolMode, ServerConfig};
use tenantgate::provision::{self, CreateTenant};
use tenantgate::registry::TenantRecord;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// Longest one client step may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(10);
/// How long the pool's counts may take to match the server's after a fault.
const SETTLE: Duration = Duration::from_secs(10);
/// True in a transaction that began with this very statement: nobody left one open.
const FRESH_TRANSACTION: &str = "SELECT now() = statement_timestamp()";

// ---------------------------------------------------------------------------------------------
// Harness: environments, tenants, clusters
// ---------------------------------------------------------------------------------------------

/// A proxy whose `[pool]` has `mode` and `pool_size`, with one plan per pooling mode (named
/// after it) so one proxy can serve tenants in both, and with an extra `[[server]]` for each
/// `(name, port)`, all on 127.0.0.1 with the shared cluster's superuser.
async fn start_env(
    pool_size: u32,
    mode: PoolMode,
    servers: &[(&str, u16)],
    tweak: impl FnOnce(&mut Config),
) -> TestEnv {
    let servers: Vec<(String, u16)> = servers
        .iter()
        .map(|(name, port)| ((*name).to_owned(), *port))
        .collect();
    TestEnv::start_with(move |c| {
        c.pool.mode = mode;
        c.pool.pool_size = pool_size;
        for mode in [PoolMode::Session, PoolMode::Transaction] {
            c.plans.insert(
                mode.as_str().to_owned(),
                PlanConfig {
                    mode: Some(mode),
                    ..PlanConfig::default()
                },
            );
        }
        for (name, port) in servers {
            let mut server: ServerConfig = c.servers[0].clone();
            server.name = name;
            server.port = port;
            c.servers.push(server);
        }
        tweak(c);
    })
    .await
}

/// A tenant on `server` whose plan gives it pooling `mode`, with a user `app` / `secret`.
async fn tenant_on(env: &TestEnv, prefix: &str, server: &str, mode: PoolMode) -> TenantRecord {
    let slug = common::unique(prefix);
    let options = CreateTenant {
        server: Some(server.to_owned()),
        plan: Some(mode.as_str().to_owned()),
        ..CreateTenant::default()
    };
    let tenant = provision::create_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        &slug,
        &options,
    )
    .await
    .expect("create tenant");
    env.add_user(&slug, "app", "secret").await;
    tenant
}

/// A private cluster for a test that crashes or restarts its server.
struct Dedicated {
    pg: Option<LocalPg>,
    options: LocalPgOptions,
}

impl Dedicated {
    async fn start() -> Dedicated {
        let shared = common::cluster();
        let dir = shared
            .data_dir()
            .parent()
            .expect("cluster dir")
            .join(common::unique("dedicated-"));
        let mut options = LocalPgOptions::new(dir.join("pgdata"));
        // The same superuser as the shared cluster: `start_env` copies its [[server]].
        shared.superuser().clone_into(&mut options.superuser);
        shared.password().clone_into(&mut options.password);
        let start = options.clone();
        let pg = tokio::task::spawn_blocking(move || LocalPg::start(start))
            .await
            .unwrap()
            .expect("start a dedicated cluster");
        Dedicated {
            pg: Some(pg),
            options,
        }
    }

    fn pg(&self) -> &LocalPg {
        self.pg.as_ref().expect("cluster running")
    }

    fn conn(&self) -> String {
        self.pg().connection_string("postgres")
    }

    /// `pg_ctl restart -m <mode>`, done as `pg_ctl stop -m <mode>` and a start on the same
    /// port and data directory, so the new postmaster runs under `LocalPg`'s watchdog (a
    /// postmaster `pg_ctl restart` forks would outlive the test).
    async fn restart(&mut self, mode: &'static str) {
        let old = self.pg.take().expect("cluster running");
        let mut options = self.options.clone();
        options.port = Some(old.port());
        let pg = tokio::task::spawn_blocking(move || {
            let status = as_postgres(&old.bindir().join("pg_ctl"))
                .args(["stop", "--silent", "-w", "-t", "30", "-m", mode, "-D"])
                .arg(old.data_dir())
                .status()
                .expect("run pg_ctl");
            assert!(status.success(), "pg_ctl stop -m {mode} failed: {status}");
            // Its watchdog has exited with the postmaster.
            drop(old);
            LocalPg::start(options)
        })
        .await
        .unwrap()
        .expect("start the cluster again");
        self.pg = Some(pg);
    }
}

/// A command for a PostgreSQL binary, run as the `postgres` user when we are root (as
/// `localpg` runs them).
fn as_postgres(program: &Path) -> Command {
    let root =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self"))
            == 0;
    if root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn kill(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Polls until the server at `conn` answers queries again.
async fn wait_until_up(conn: &str) {
    let up = common::eventually(Duration::from_secs(30), || async {
        match connect_str(conn).await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(up, "the server did not come back");
}

// ---------------------------------------------------------------------------------------------
// Harness: client steps
// ---------------------------------------------------------------------------------------------

/// `step`, failing the test if it takes longer than `limit`: nothing may hang.
async fn within<T>(limit: Duration, what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, step)
        .await
        .unwrap_or_else(|_elapsed| panic!("{what}: no answer within {limit:?}; the client hangs"))
}

/// Runs one statement; it must succeed in a transaction of its own. Records what went wrong.
async fn expect_clean_answer(client: &Client, who: &str, failures: &mut Vec<String>) {
    match within(HANG, who, try_value(client, FRESH_TRANSACTION)).await {
        Ok(v) if v == "t" => {}
        Ok(v) => failures.push(format!(
            "{who}: ran inside a transaction someone else left open (now() = statement_timestamp() is {v:?})"
        )),
        Err(e) => failures.push(format!("{who}: {}", describe(&e))),
    }
}

/// `n` new clients, one after the other, each logging in and running one statement.
async fn new_clients_work(
    env: &TestEnv,
    slug: &str,
    n: usize,
    label: &str,
    failures: &mut Vec<String>,
) {
    for i in 0..n {
        let who = format!("{label} {i}");
        match within(HANG, &who, env.connect(slug, "app", "secret")).await {
            Ok(client) => expect_clean_answer(&client, &who, failures).await,
            Err(e) => failures.push(format!("{who}: login failed: {}", describe(&e))),
        }
    }
}

/// Makes the tenant's pool open `n` backends (n clients busy at once), then leaves them idle
/// in the pool.
async fn warm(env: &TestEnv, tenant: &TenantRecord, n: usize) {
    let slug = tenant.slug.as_str();
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(
            within(HANG, "warm-up login", env.connect(slug, "app", "secret"))
                .await
                .expect("warm-up client"),
        );
    }
    let busy = join_all(
        clients
            .iter()
            .map(|c| c.simple_query("SELECT pg_sleep(0.3)")),
    );
    for result in within(HANG, "warm-up queries", busy).await {
        result.expect("warm-up query");
    }
    drop(clients);
    let admin = env.admin().await;
    let warmed = common::eventually(SETTLE, || async {
        pool_counts(&admin, slug).await.1 == i64::try_from(n).unwrap()
    })
    .await;
    assert!(
        warmed,
        "the pool of {slug} never held {n} idle backends: {:?}",
        pool_counts(&admin, slug).await
    );
}

/// (backends, idle) of one tenant's pool as `SHOW POOLS` reports them (0, 0 without a pool).
async fn pool_counts(admin: &Client, slug: &str) -> (i64, i64) {
    let rows = admin
        .query(
            "SELECT backends, idle FROM pools WHERE tenant = $1",
            &[&slug],
        )
        .await
        .expect("SHOW POOLS");
    rows.iter().fold((0, 0), |(b, i), row| {
        (b + row.get::<_, i64>(0), i + row.get::<_, i64>(1))
    })
}

/// The tenants' backend connections on the server (as the tenants' backend roles, so the
/// tests' own superuser connections do not count): (all, idle).
async fn server_counts(direct: &Client, tenants: &[&TenantRecord]) -> (i64, i64) {
    let databases: Vec<String> = tenants.iter().map(|t| t.database.clone()).collect();
    let roles: Vec<String> = tenants.iter().map(|t| t.backend_role.clone()).collect();
    let row = direct
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE state = 'idle') FROM pg_stat_activity \
             WHERE datname = ANY($1) AND usename = ANY($2)",
            &[&databases, &roles],
        )
        .await
        .expect("pg_stat_activity");
    (row.get(0), row.get(1))
}

/// What the proxy says it holds next to what the server has.
#[derive(Debug)]
#[allow(dead_code, reason = "read through Debug in assertion messages")]
struct Counts {
    /// `SHOW SERVERS`: connections holding a permit of the server's budget.
    server_used: i64,
    /// `SHOW SERVERS`: idle connections in the server's pools.
    server_idle: i64,
    /// `SHOW POOLS`, summed over the tenants: backends open.
    pool_backends: i64,
    /// `SHOW POOLS`, summed over the tenants: idle backends.
    pool_idle: i64,
    /// `pg_stat_activity`: the tenants' backend connections.
    real: i64,
    /// `pg_stat_activity`: those of them idle.
    real_idle: i64,
}

impl Counts {
    /// With no client connected, every count is the number of connections the server has,
    /// all idle.
    fn settled(&self) -> bool {
        [
            self.server_used,
            self.server_idle,
            self.pool_backends,
            self.pool_idle,
            self.real_idle,
        ]
        .iter()
        .all(|n| *n == self.real)
    }
}

/// Polls until `SHOW SERVERS` and `SHOW POOLS` agree with `pg_stat_activity` on the server
/// at `cluster`; `tenants` are every tenant of `server` and have no client left. Records the
/// last counts in `failures` if they never do.
async fn check_settles(
    env: &TestEnv,
    server: &str,
    cluster: &str,
    tenants: &[&TenantRecord],
    failures: &mut Vec<String>,
) {
    let admin = env.admin().await;
    let direct = connect_str(cluster).await.expect("direct connection");
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let row = admin
            .query_one("SELECT used, idle FROM servers WHERE name = $1", &[&server])
            .await
            .expect("SHOW SERVERS");
        let (mut pool_backends, mut pool_idle) = (0, 0);
        for t in tenants {
            let (b, i) = pool_counts(&admin, t.slug.as_str()).await;
            pool_backends += b;
            pool_idle += i;
        }
        let (real, real_idle) = server_counts(&direct, tenants).await;
        let counts = Counts {
            server_used: row.get(0),
            server_idle: row.get(1),
            pool_backends,
            pool_idle,
            real,
            real_idle,
        };
        if counts.settled() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            failures.push(format!(
                "the pool's counts never came back to the server's within {SETTLE:?}: {counts:?}"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Harness: a freezable network
// ---------------------------------------------------------------------------------------------

/// A loopback TCP relay in front of a server whose forwarding can be frozen (nothing crosses,
/// in either direction, not even a close) and resumed: a network stall between proxy and
/// server. New connections are still accepted while frozen, as a stalled route would.
struct StallRelay {
    port: u16,
    frozen: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallRelay {
    async fn start(target_port: u16) -> StallRelay {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        let (frozen, gate) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pump(in_read, out_write, gate.clone()),
                        pump(out_read, in_write, gate)
                    );
                });
            }
        });
        StallRelay {
            port,
            frozen,
            accept,
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    fn resume(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for StallRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One direction of a relayed connection; what it read waits while the relay is frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut gate: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if gate.wait_for(|frozen| !*frozen).await.is_err() {
            return;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    drop(to.shutdown().await);
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of a backend mid-transaction
// ---------------------------------------------------------------------------------------------

/// Promise attacked: "alive". A backend killed with SIGKILL in the middle of a client's
/// transaction makes the postmaster restart every backend of the cluster, the idle pooled
/// ones included. Only that client's transaction may fail (08006, or the closed connection a
/// direct client sees); once the server is back, a transaction-pooling client that had nothing
/// in flight and every new client get a working backend, never one that died while it sat
/// idle in the pool; and the pool's counts match the server's again.
async fn kill_9_mid_transaction(mode: PoolMode) {
    let cluster = Dedicated::start().await;
    let env = start_env(3, mode, &[("crash", cluster.pg().port())], |_| {}).await;
    let t = tenant_on(&env, "kill9-", "crash", mode).await;
    let slug = t.slug.as_str();
    warm(&env, &t, 3).await;
    // Between transactions a transaction-pooling client holds no backend: the crash is none
    // of its business. (A session-pooling client's own backend dies, as it would directly.)
    let bystander = match mode {
        PoolMode::Transaction => {
            let c = env.app(slug).await;
            try_value(&c, "SELECT 1").await.unwrap();
            Some(c)
        }
        PoolMode::Session => None,
    };
    // A superuser session the postmaster's crash cycle will end: when it is gone, the cycle
    // has begun (the victim learns of its own death before the postmaster does).
    let canary = connect_str(&cluster.conn()).await.unwrap();
    let victim = env.app(slug).await;
    victim.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = try_value(&victim, "SELECT pg_backend_pid()")
        .await
        .unwrap()
        .parse()
        .unwrap();
    kill(pid, "KILL");

    let lost = within(
        HANG,
        "the victim's next statement",
        victim.simple_query("SELECT 1"),
    )
    .await;
    match lost {
        Ok(_) => panic!("a statement succeeded on a backend killed with SIGKILL"),
        Err(e) => assert!(
            e.code()
                .is_none_or(|code| *code == SqlState::CONNECTION_FAILURE),
            "the victim must see its connection fail (08006 or closed), got {}",
            describe(&e)
        ),
    }

    let restarted = common::eventually(HANG, || async {
        canary.simple_query("SELECT 1").await.is_err()
    })
    .await;
    assert!(
        restarted,
        "the postmaster never restarted the cluster's backends"
    );
    wait_until_up(&cluster.conn()).await;
    let mut failures = Vec::new();
    if let Some(c) = &bystander {
        expect_clean_answer(c, "the idle transaction-pooling client", &mut failures).await;
    }
    new_clients_work(&env, slug, 5, "new client", &mut failures).await;
    drop((victim, bystander));
    check_settles(&env, "crash", &cluster.conn(), &[&t], &mut failures).await;
    assert!(failures.is_empty(), "after the crash: {failures:#?}");
}

/// "Alive" under session pooling: see `kill_9_mid_transaction`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transaction_fails_only_that_client_in_session_mode() {
    kill_9_mid_transaction(PoolMode::Session).await;
}

/// "Alive" under transaction pooling: see `kill_9_mid_transaction`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transaction_fails_only_that_client_in_transaction_mode() {
    kill_9_mid_transaction(PoolMode::Transaction).await;
}

// ---------------------------------------------------------------------------------------------
// 2. pg_terminate_backend of every idle pooled backend
// ---------------------------------------------------------------------------------------------

/// Promise attacked: "alive" ("a checkout that finds it dead takes another, and the client
/// never sees the dead one"). Five backends sit idle in the pool; a superuser terminates them
/// all. Ten new clients, one after the other, must each get a working backend: zero errors
/// (not the 57P01 the dead backends left in their sockets, not 08006). Then the counts match.
async fn terminated_idle_backends(mode: PoolMode) {
    let env = start_env(5, mode, &[], |_| {}).await;
    let t = tenant_on(&env, "term-", "local", mode).await;
    warm(&env, &t, 5).await;
    let direct = common::admin_client("postgres").await;
    let terminated = terminate_backends(&t.database, Some(&t.backend_role)).await;
    assert_eq!(terminated, 5, "five idle pooled backends to terminate");
    let gone = common::eventually(SETTLE, || async {
        server_counts(&direct, &[&t]).await.0 == 0
    })
    .await;
    assert!(gone, "the terminated backends did not go away");

    let mut failures = Vec::new();
    new_clients_work(&env, t.slug.as_str(), 10, "client", &mut failures).await;
    let shared = common::cluster().connection_string("postgres");
    check_settles(&env, "local", &shared, &[&t], &mut failures).await;
    assert!(
        failures.is_empty(),
        "after pg_terminate_backend of the idle pool: {failures:#?}"
    );
}

/// "Alive" under session pooling: see `terminated_idle_backends`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_backends_never_reach_a_client_in_session_mode() {
    terminated_idle_backends(PoolMode::Session).await;
}

/// "Alive" under transaction pooling: see `terminated_idle_backends`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_backends_never_reach_a_client_in_transaction_mode() {
    terminated_idle_backends(PoolMode::Transaction).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Restart of the tenant's server
// ---------------------------------------------------------------------------------------------

/// Runs `SELECT pg_sleep(60)` through the proxy for `slug`, in the background.
async fn sleeper(
    env: &TestEnv,
    slug: &str,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    let client = env.app(slug).await;
    tokio::spawn(async move {
        client.simple_query("SELECT pg_sleep(60)").await?;
        Ok(())
    })
}

/// `pool_size` clients of the tenant busy at once must all be served, on as many backends.
async fn pool_refills(
    env: &TestEnv,
    t: &TenantRecord,
    cluster: &str,
    pool_size: usize,
    failures: &mut Vec<String>,
) {
    let slug = t.slug.as_str();
    let direct = connect_str(cluster).await.unwrap();
    let mut clients = Vec::new();
    for i in 0..pool_size {
        match within(HANG, "login", env.connect(slug, "app", "secret")).await {
            Ok(c) => clients.push(c),
            Err(e) => failures.push(format!("{slug} refill client {i}: {}", describe(&e))),
        }
    }
    let busy = join_all(clients.iter().map(|c| c.simple_query("SELECT pg_sleep(1)")));
    let full = common::eventually(HANG, || async {
        server_counts(&direct, &[t]).await.0 == i64::try_from(pool_size).unwrap()
    });
    let (results, full) = within(HANG, "refilling the pool", async {
        tokio::join!(busy, full)
    })
    .await;
    for (i, result) in results.iter().enumerate() {
        if let Err(e) = result {
            failures.push(format!("{slug} refill client {i}: {}", describe(e)));
        }
    }
    if !full {
        failures.push(format!(
            "{slug}: the pool never had {pool_size} backends open again"
        ));
    }
}

/// Promise attacked: "alive", across a restart of the tenant's server. A client with a query in
/// flight gets 57P01 (what PostgreSQL sends on a fast shutdown) or 08006 (backend lost; an
/// immediate shutdown sends no error, only a warning); clients with nothing in flight, in
/// transaction pooling, see no error once the server is back; new clients of both modes get
/// working backends; the pool refills to its size and its counts match the server's.
async fn server_restart(shutdown: &'static str) {
    let mut cluster = Dedicated::start().await;
    let env = start_env(
        3,
        PoolMode::Session,
        &[("restart", cluster.pg().port())],
        |_| {},
    )
    .await;
    let session = tenant_on(&env, "restart-s-", "restart", PoolMode::Session).await;
    let transaction = tenant_on(&env, "restart-t-", "restart", PoolMode::Transaction).await;
    warm(&env, &session, 2).await;
    warm(&env, &transaction, 2).await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        let c = env.app(transaction.slug.as_str()).await;
        try_value(&c, "SELECT 1").await.unwrap();
        idle.push(c);
    }
    let sleepers = [
        sleeper(&env, session.slug.as_str()).await,
        sleeper(&env, transaction.slug.as_str()).await,
    ];
    let databases = [session.database.as_str(), transaction.database.as_str()];
    let sleeping = until_running(cluster.pg(), &databases, "SELECT pg_sleep(60)", 2).await;
    assert!(sleeping, "both sleepers must be running on the server");

    cluster.restart(shutdown).await;
    let mut failures = Vec::new();
    for (sleeper, mode) in sleepers.into_iter().zip(["session", "transaction"]) {
        match within(HANG, "the query in flight", sleeper).await.unwrap() {
            Ok(()) => failures.push(format!("{mode} sleeper: its query succeeded")),
            Err(e)
                if e.code() == Some(&SqlState::ADMIN_SHUTDOWN)
                    || e.code() == Some(&SqlState::CONNECTION_FAILURE) => {}
            Err(e) => failures.push(format!(
                "{mode} sleeper: want 57P01 or 08006, got {}",
                describe(&e)
            )),
        }
    }
    wait_until_up(&cluster.conn()).await;
    for (i, c) in idle.iter().enumerate() {
        expect_clean_answer(c, &format!("idle transaction client {i}"), &mut failures).await;
    }
    for t in [&session, &transaction] {
        let label = format!("new client of {}", t.slug);
        new_clients_work(&env, t.slug.as_str(), 3, &label, &mut failures).await;
    }
    for t in [&session, &transaction] {
        pool_refills(&env, t, &cluster.conn(), 3, &mut failures).await;
    }
    drop(idle);
    let tenants = [&session, &transaction];
    check_settles(&env, "restart", &cluster.conn(), &tenants, &mut failures).await;
    assert!(
        failures.is_empty(),
        "after pg_ctl restart -m {shutdown}: {failures:#?}"
    );
}

/// "Alive" across `pg_ctl restart -m fast`: see `server_restart`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_restart_of_the_server_is_survived() {
    server_restart("fast").await;
}

/// "Alive" across `pg_ctl restart -m immediate`: see `server_restart`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_restart_of_the_server_is_survived() {
    server_restart("immediate").await;
}

// ---------------------------------------------------------------------------------------------
// 4. Network stall between proxy and server
// ---------------------------------------------------------------------------------------------

/// A clear answer to a client that cannot get a backend: connection failure or pool timeout.
fn is_stall_error(code: &SqlState) -> bool {
    [
        SqlState::CONNECTION_FAILURE,
        SqlState::CONNECTION_EXCEPTION,
        SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        SqlState::TOO_MANY_CONNECTIONS,
    ]
    .contains(code)
}

/// A new client while the network is frozen: its login and first query must end in an error
/// with a SQLSTATE within `limit`.
async fn stalled_attempt(env: &TestEnv, slug: &str, limit: Duration) -> Result<(), String> {
    let started = tokio::time::Instant::now();
    let attempt = tokio::time::timeout(limit, async {
        let c = env.connect(slug, "app", "secret").await?;
        c.simple_query("SELECT 1").await?;
        Ok::<_, tokio_postgres::Error>(())
    })
    .await;
    match attempt {
        Err(_) => Err(format!("{slug}: no answer within {limit:?} (hang)")),
        Ok(Ok(())) => Err(format!("{slug}: answered through a frozen network")),
        Ok(Err(e)) if e.code().is_some_and(is_stall_error) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "{slug}: unclear error after {:?}: {}",
            started.elapsed(),
            describe(&e)
        )),
    }
}

/// Promise attacked: "every wait on a peer has a timeout" and, after the stall, "at a message
/// boundary". While the network to the server is frozen, new clients of both modes fail with a
/// connection or pool SQLSTATE within connect + checkout + reset timeouts (plus slack), and
/// nothing hangs; once it flows again, the clients that held backends carry on, new clients get
/// their own answers (not bytes queued during the stall), and the counts match the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_stall_fails_new_clients_within_the_timeouts_then_recovers() {
    const CONNECT_MS: u64 = 1000;
    const CHECKOUT_MS: u64 = 1500;
    const RESET_MS: u64 = 1000;
    let relay = StallRelay::start(common::cluster().port()).await;
    let env = start_env(2, PoolMode::Session, &[("stalled", relay.port)], |c| {
        c.pool.connect_timeout_ms = CONNECT_MS;
        c.pool.checkout_timeout_ms = CHECKOUT_MS;
        c.pool.reset_timeout_ms = RESET_MS;
    })
    .await;
    let session = tenant_on(&env, "stall-s-", "stalled", PoolMode::Session).await;
    let transaction = tenant_on(&env, "stall-t-", "stalled", PoolMode::Transaction).await;
    // One backend each, held: the session client's for its life, the transaction client's by
    // an open transaction. A new client needs a new backend, through the frozen network.
    let holder_s = env.app(session.slug.as_str()).await;
    try_value(&holder_s, "SELECT 1").await.unwrap();
    let holder_t = env.app(transaction.slug.as_str()).await;
    holder_t.batch_execute("BEGIN").await.unwrap();

    relay.freeze();
    let limit = Duration::from_millis(CONNECT_MS + CHECKOUT_MS + RESET_MS) + Duration::from_secs(3);
    let mut failures = Vec::new();
    for t in [&session, &transaction] {
        // Two at once: one starts a connect, the other waits for it or for a free slot.
        let attempts = join_all((0..2).map(|_| stalled_attempt(&env, t.slug.as_str(), limit)));
        failures.extend(attempts.await.into_iter().filter_map(Result::err));
    }
    relay.resume();

    let after = async {
        try_value(&holder_t, "SELECT 1").await?;
        holder_t.batch_execute("COMMIT").await?;
        try_value(&holder_s, "SELECT 1").await
    };
    if let Err(e) = within(HANG, "the holders after the stall", after).await {
        failures.push(format!(
            "a client holding a backend failed after the stall: {}",
            describe(&e)
        ));
    }
    for t in [&session, &transaction] {
        for n in 0..3 {
            let who = format!("client {n} of {} after the stall", t.slug);
            let c = within(HANG, &who, env.connect(t.slug.as_str(), "app", "secret")).await;
            let answer = match c {
                Ok(c) => within(HANG, &who, try_value(&c, &format!("SELECT 'answer {n}'"))).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(v) if v == format!("answer {n}") => {}
                Ok(v) => failures.push(format!("{who}: got someone else's answer {v:?}")),
                Err(e) => failures.push(format!("{who}: {}", describe(&e))),
            }
        }
    }
    drop((holder_s, holder_t));
    let shared = common::cluster().connection_string("postgres");
    let tenants = [&session, &transaction];
    check_settles(&env, "stalled", &shared, &tenants, &mut failures).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Hostile clients (transaction pooling, one backend, so the next client gets the same one)
// ---------------------------------------------------------------------------------------------

async fn one_backend_env(prefix: &str) -> (TestEnv, TenantRecord) {
    let env = start_env(1, PoolMode::Transaction, &[], |_| {}).await;
    let t = tenant_on(&env, prefix, "local", PoolMode::Transaction).await;
    (env, t)
}

/// Promise attacked: "at a message boundary", and "a panic or an early return anywhere in a
/// client task counts as cannot be proven". Inside a transaction, a client sends a Close of a
/// named statement padded to 20 kB (larger than the relay's buffer), then Sync, then leaves.
/// The next client must run outside any transaction, and the proxy must keep serving the
/// tenant's other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_close_in_a_transaction_never_hands_on_the_transaction() {
    let (env, t) = one_backend_env("close-").await;
    let slug = t.slug.as_str();
    let other = env.app(slug).await;
    try_value(&other, "SELECT 1").await.unwrap();

    let mut hostile = RawClient::connect(env.port(), slug, "app", "secret").await;
    hostile.send(&frame(b'Q', b"BEGIN\0")).await.unwrap();
    let begun = within(HANG, "BEGIN", hostile.until_ready()).await.unwrap();
    assert_eq!(begun.last().map(|m| m.1.as_slice()), Some(&b"T"[..]));
    let mut close = b"Sfault_statement\0".to_vec();
    close.resize(20 * 1024, b'x');
    let mut bytes = frame(b'C', &close);
    bytes.extend(frame(b'S', b""));
    // Whatever the proxy answers, or if it hangs up, the client then leaves.
    drop(hostile.send(&bytes).await);
    drop(tokio::time::timeout(Duration::from_secs(3), hostile.until_ready()).await);
    drop(hostile);

    let mut failures = Vec::new();
    match within(
        HANG,
        "login after the hostile client",
        env.connect(slug, "app", "secret"),
    )
    .await
    {
        Ok(next) => expect_clean_answer(&next, "the next client", &mut failures).await,
        Err(e) => failures.push(format!("the next client's login: {}", describe(&e))),
    }
    expect_clean_answer(&other, "a client connected before", &mut failures).await;
    drop(other);
    let shared = common::cluster().connection_string("postgres");
    check_settles(&env, "local", &shared, &[&t], &mut failures).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise attacked: "at a message boundary" (client to backend). A client sends `SELECT 1`
/// followed by the first 100 bytes of a 5,000-byte CopyData, reads its answer, and hangs up.
/// The backend must not go back to the pool in the middle of that CopyData: the next client's
/// `SELECT 1` answers within 5 s, correctly, in a transaction of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_copy_data_left_behind_never_swallows_the_next_query() {
    let (env, t) = one_backend_env("halfcopy-").await;
    let slug = t.slug.as_str();
    let mut hostile = RawClient::connect(env.port(), slug, "app", "secret").await;
    let mut bytes = frame(b'Q', b"SELECT 1\0");
    let copy_data = frame(b'd', &[b'x'; 5000]);
    bytes.extend_from_slice(&copy_data[..100]);
    hostile.send(&bytes).await.unwrap();
    let answer = within(
        HANG,
        "SELECT 1 with half a CopyData after it",
        hostile.until_ready(),
    )
    .await
    .expect("the proxy answers the complete query");
    let tags: Vec<u8> = answer.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"TDCZ");
    drop(hostile);

    let next = within(
        HANG,
        "login after the hostile client",
        env.connect(slug, "app", "secret"),
    )
    .await
    .expect("the next client logs in");
    let one = within(
        Duration::from_secs(5),
        "the next client's SELECT 1",
        async { try_value(&next, "SELECT 1").await },
    )
    .await;
    assert_eq!(one.map_err(|e| describe(&e)).as_deref(), Ok("1"));
    let mut failures = Vec::new();
    expect_clean_answer(&next, "the next client", &mut failures).await;
    drop(next);
    let shared = common::cluster().connection_string("postgres");
    check_settles(&env, "local", &shared, &[&t], &mut failures).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One way for client A to leave session state on its backend, and how client B would see it.
struct Leak {
    what: &'static str,
    /// A runs it as its own (implicit) transaction.
    by_a: &'static str,
    /// Over the extended protocol instead of a simple Query.
    extended: bool,
    /// B runs it; it returns `clean` when nothing of A's is left.
    check: String,
    clean: String,
}

fn leak(what: &'static str, by_a: &'static str, check: &str, clean: &str) -> Leak {
    Leak {
        what,
        by_a,
        extended: false,
        check: check.to_owned(),
        clean: clean.to_owned(),
    }
}

/// The ways A leaves state behind; `clean` holds what B sees before any of them: its
/// search_path, work_mem, application_name and role.
fn leaks(clean: &[String]) -> Vec<Leak> {
    let no_temp = |table: &str| format!("SELECT to_regclass('pg_temp.{table}') IS NULL");
    let [search_path, work_mem, application_name, role] = clean else {
        panic!("four baseline values");
    };
    vec![
        leak(
            "set_config() in a SELECT",
            "SELECT set_config('search_path', 'leaky, public', false)",
            "SHOW search_path",
            search_path,
        ),
        Leak {
            extended: true,
            ..leak(
                "set_config() over the extended protocol",
                "SELECT set_config('work_mem', '7MB', false)",
                "SHOW work_mem",
                work_mem,
            )
        },
        leak(
            "set_config() in a DO block",
            "DO $$ BEGIN PERFORM set_config('application_name', 'leaky', false); END $$",
            "SHOW application_name",
            application_name,
        ),
        leak(
            "CREATE TEMP TABLE ... AS (tag SELECT)",
            "CREATE TEMP TABLE leak_ctas AS SELECT 1 AS x",
            &no_temp("leak_ctas"),
            "t",
        ),
        leak(
            "SELECT ... INTO TEMP",
            "SELECT 1 AS x INTO TEMP leak_into",
            &no_temp("leak_into"),
            "t",
        ),
        leak(
            "temp table created in a plpgsql function",
            "SELECT leak_make_temp()",
            &no_temp("leak_fn"),
            "t",
        ),
        leak(
            "set_config('role')",
            "SELECT set_config('role', current_user, false)",
            "SHOW role",
            role,
        ),
        leak(
            "LISTEN in a DO block",
            "DO $$ BEGIN EXECUTE 'LISTEN leaky'; END $$",
            "SELECT count(*) FROM pg_listening_channels()",
            "0",
        ),
        leak(
            "session advisory lock",
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
        leak(
            "cursor WITH HOLD",
            "DECLARE leak_cursor CURSOR WITH HOLD FOR SELECT 1",
            "SELECT count(*) FROM pg_cursors",
            "0",
        ),
    ]
}

/// Promise attacked: "clean" ("no session state of any earlier client is visible by any path:
/// SET, set_config(), DO blocks, temp tables however created, roles, advisory locks, LISTEN,
/// cursors WITH HOLD"). Client A leaves state behind in ways whose command tag is not SET,
/// CREATE, LISTEN or DECLARE; client B, next on the same backend (pool of one), must see none
/// of it. Every leak is listed in the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_left_by_any_path_never_reaches_the_next_client() {
    let (env, t) = one_backend_env("leaks-").await;
    let slug = t.slug.as_str();
    let setup = env.app(slug).await;
    setup
        .batch_execute(
            "CREATE FUNCTION leak_make_temp() RETURNS void LANGUAGE plpgsql \
             AS $$ BEGIN CREATE TEMP TABLE leak_fn (x int); END $$",
        )
        .await
        .unwrap();
    drop(setup);
    let a = env.app(slug).await;
    let b = env.app(slug).await;
    let mut clean = Vec::new();
    for sql in [
        "SHOW search_path",
        "SHOW work_mem",
        "SHOW application_name",
        "SHOW role",
    ] {
        clean.push(try_value(&b, sql).await.unwrap());
    }
    let leaks = leaks(&clean);
    let mut failures = Vec::new();
    for leak in &leaks {
        let done = if leak.extended {
            within(HANG, leak.what, a.query(leak.by_a, &[]))
                .await
                .map(drop)
        } else {
            within(HANG, leak.what, a.batch_execute(leak.by_a)).await
        };
        if let Err(e) = done {
            failures.push(format!(
                "{}: A's statement failed: {}",
                leak.what,
                describe(&e)
            ));
            continue;
        }
        match within(HANG, leak.what, try_value(&b, &leak.check)).await {
            Ok(v) if v == leak.clean => {}
            Ok(v) => failures.push(format!(
                "{}: B sees {v:?} from `{}` (clean: {:?})",
                leak.what, leak.check, leak.clean
            )),
            Err(e) => failures.push(format!("{}: B's check failed: {}", leak.what, describe(&e))),
        }
    }
    // A's transaction ended long ago: its session lock must be free for anyone.
    let direct = common::admin_client(&t.database).await;
    let free = try_value(&direct, "SELECT pg_try_advisory_lock(42)")
        .await
        .unwrap();
    if free == "t" {
        direct
            .batch_execute("SELECT pg_advisory_unlock(42)")
            .await
            .unwrap();
    } else {
        failures.push("session advisory lock: still held after A's transaction ended".to_owned());
    }
    assert!(
        failures.is_empty(),
        "session state leaked from A to B: {failures:#?}"
    );
}

/// Promise attacked: "the shared prepared statements are the only thing kept, and only while
/// the server still knows them". A and B prepare the same query (one shared statement on the
/// backend); a third client runs `DEALLOCATE ALL` in a way the proxy does not answer itself (in
/// a multi-statement Query, then inside a DO block). A and B's next executions must work: no
/// 26000 "prepared statement does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deallocate_all_behind_the_proxy_never_breaks_shared_statements() {
    let (env, t) = one_backend_env("dealloc-").await;
    let slug = t.slug.as_str();
    let client_a = env.app(slug).await;
    let client_b = env.app(slug).await;
    let client_c = env.app(slug).await;
    let mut failures = Vec::new();
    // Each round shares a statement of its own, so a broken round does not spoil the next.
    for (offset, deallocate) in [
        (100, "SELECT 1; DEALLOCATE ALL"),
        (200, "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"),
    ] {
        let query = format!("SELECT $1::int + {offset}");
        let sa = client_a.prepare(&query).await.unwrap();
        let sb = client_b.prepare(&query).await.unwrap();
        // Both use the shared statement on the backend before the DEALLOCATE, and after.
        for stage in ["before", "after"] {
            if stage == "after" {
                within(HANG, deallocate, client_c.batch_execute(deallocate))
                    .await
                    .unwrap();
            }
            for (n, who, client, statement) in [(1, "A", &client_a, &sa), (2, "B", &client_b, &sb)]
            {
                match within(HANG, who, client.query_one(statement, &[&n])).await {
                    Ok(row) if row.get::<_, i32>(0) == n + offset => {}
                    Ok(row) => failures.push(format!(
                        "{who} {stage} `{deallocate}`: wrong answer {}",
                        row.get::<_, i32>(0)
                    )),
                    Err(e) => {
                        failures.push(format!("{who} {stage} `{deallocate}`: {}", describe(&e)));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise attacked: "the shared prepared statements are kept only while the server still
/// knows them" (as what the client means). Client A prepares and runs a query; the objects it
/// uses change (a column added to its table; its type dropped and created again); a new client C
/// prepares and runs the same text. C must succeed as a direct client does, with the new shape,
/// never with 0A000 "cached plan must not change result type" or XX000 from a stale shared
/// statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_table_or_type_never_breaks_a_new_clients_prepare() {
    let (env, t) = one_backend_env("stale-").await;
    let slug = t.slug.as_str();
    // Made outside the proxy, so no client's CREATE makes the proxy reset the backend (which
    // would drop the shared statements and hide the problem).
    let direct = common::admin_client(&t.database).await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE t_fault (a int); INSERT INTO t_fault VALUES (1); \
             ALTER TABLE t_fault OWNER TO {role}; \
             CREATE TYPE fault_mood AS ENUM ('ok'); ALTER TYPE fault_mood OWNER TO {role}",
            role = t.backend_role
        ))
        .await
        .unwrap();
    let a = env.app(slug).await;
    let cases = [
        (
            "SELECT * FROM t_fault",
            "ALTER TABLE t_fault ADD COLUMN z int",
            2,
        ),
        (
            "SELECT 'ok'::fault_mood AS mood, 1 AS n",
            "DROP TYPE fault_mood; CREATE TYPE fault_mood AS ENUM ('ok', 'meh')",
            2,
        ),
    ];
    let mut failures = Vec::new();
    for (query, change, columns) in cases {
        let old = a.prepare(query).await.unwrap();
        assert_eq!(a.query(&old, &[]).await.unwrap().len(), 1);
        direct.batch_execute(change).await.unwrap();
        // What a direct client gets.
        let baseline = direct.prepare(query).await.unwrap();
        assert_eq!(baseline.columns().len(), columns);
        assert_eq!(direct.query(&baseline, &[]).await.unwrap().len(), 1);

        let c = env.app(slug).await;
        let outcome = within(HANG, query, async {
            let statement = c.prepare(query).await?;
            let rows = c.query(&statement, &[]).await?;
            Ok::<_, tokio_postgres::Error>((statement.columns().len(), rows.len()))
        })
        .await;
        match outcome {
            Ok((n, 1)) if n == columns => {}
            Ok((n, rows)) => failures.push(format!(
                "`{query}` after `{change}`: {n} columns, {rows} rows (direct: {columns} columns, 1 row)"
            )),
            Err(e) => failures.push(format!(
                "`{query}` after `{change}`: a new client's prepare and run failed: {}",
                describe(&e)
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------------
// 6. A client that vanishes mid-message
// ---------------------------------------------------------------------------------------------

/// Promise attacked: "at a message boundary" (client to backend). A client writes part of a
/// Query (part of its header; its header and part of its text; the same inside an open
/// transaction) and drops its socket. The backend that may have got those bytes is closed,
/// not returned: the next client (pool of one) works, in a transaction of its own, and the
/// counts match the server's after each.
async fn vanish_mid_message(mode: PoolMode) {
    let env = start_env(1, mode, &[], |_| {}).await;
    let t = tenant_on(&env, "vanish-", "local", mode).await;
    let slug = t.slug.as_str();
    let shared = common::cluster().connection_string("postgres");
    let select = frame(b'Q', b"SELECT 1\0");
    let begin = frame(b'Q', b"BEGIN\0");
    let long = frame(b'Q', format!("SELECT '{}'\0", "x".repeat(200)).as_bytes());
    let variants: [(&str, Vec<&[u8]>); 3] = [
        ("part of a Query header", vec![&select, &long[..3]]),
        (
            "a Query header and part of its text",
            vec![&select, &long[..60]],
        ),
        (
            "part of a Query inside a transaction",
            vec![&begin, &long[..60]],
        ),
    ];
    for (what, steps) in variants {
        let mut hostile = RawClient::connect(env.port(), slug, "app", "secret").await;
        let (partial, complete) = steps.split_last().unwrap();
        for step in complete {
            hostile.send(step).await.unwrap();
            within(HANG, what, hostile.until_ready()).await.unwrap();
        }
        hostile.send(partial).await.unwrap();
        // Ordering, not waiting for a condition: let the proxy read (and maybe forward) the
        // partial bytes before the socket closes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(hostile);

        let mut failures = Vec::new();
        match within(HANG, what, env.connect(slug, "app", "secret")).await {
            Ok(next) => expect_clean_answer(&next, "the next client", &mut failures).await,
            Err(e) => failures.push(format!("login: {}", describe(&e))),
        }
        check_settles(&env, "local", &shared, &[&t], &mut failures).await;
        assert!(
            failures.is_empty(),
            "after a client left {what}: {failures:#?}"
        );
    }
}

/// "At a message boundary" under session pooling: see `vanish_mid_message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_message_loses_its_backend_in_session_mode() {
    vanish_mid_message(PoolMode::Session).await;
}

/// "At a message boundary" under transaction pooling: see `vanish_mid_message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_message_loses_its_backend_in_transaction_mode() {
    vanish_mid_message(PoolMode::Transaction).await;
}
