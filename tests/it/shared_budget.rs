//! One budget for several instances (issue 15): a server's `max_connections` is the budget of
//! all tenantgate instances together. Three instances (two in this process, one a real
//! `tenantgate serve` process) under a connect-per-visit load and long-lived clients never
//! have more than the budget of tenant backends open on the server, serve every client, and
//! when the process is killed with SIGKILL, the other two take the whole budget within the
//! lease TTL and a couple of beats, and its clients carry on through them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenantgate::pool::PoolMode;
use tenantgate::server::Proxy;
use tokio_postgres::NoTls;

use crate::common::serve::ServeProcess;
use crate::common::{TestEnv, admin_client, eventually, pgbench};

/// The server's budget, shared by the three instances.
const BUDGET: i64 = 30;
/// What the long-lived clients run, over and over (a transaction each, in transaction mode).
const WORK: &str = "SELECT pg_sleep(0.05)";

/// Queries served through one instance, and the errors its clients saw.
#[derive(Default)]
struct Served {
    ok: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Served {
    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
}

/// A long-lived client: connects through the first of `via` and runs [`WORK`] until `stop`.
/// When its instance is gone (`killed` set), it reconnects through the next one; any other
/// error is recorded.
async fn client(
    via: Vec<(tokio_postgres::Config, Arc<Served>)>,
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut at = 0;
    'connect: while !stop.load(Ordering::Relaxed) {
        let (config, served) = &via[at];
        let failed = |e: tokio_postgres::Error, at: &mut usize| {
            if killed.load(Ordering::Relaxed) && *at + 1 < via.len() {
                *at += 1;
            } else {
                served.errors.lock().unwrap().push(e.to_string());
            }
        };
        let app = match config.connect(NoTls).await {
            Ok((app, connection)) => {
                tokio::spawn(connection);
                app
            }
            Err(e) => {
                failed(e, &mut at);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'connect;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            match app.simple_query(WORK).await {
                Ok(_) => {
                    served.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failed(e, &mut at);
                    continue 'connect;
                }
            }
        }
    }
}

/// Tenant backends open on the server (connections to `databases`).
async fn backends(admin: &tokio_postgres::Client, databases: &[String]) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY($1)",
            &[&databases],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines, reason = "one scenario, phase after phase")]
async fn three_instances_share_one_budget_and_the_survivors_take_a_killed_ones_share() {
    let env = TestEnv::start_with(|c| {
        c.instance.heartbeat_seconds = 1;
        c.instance.heartbeat_ttl_seconds = Some(3);
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 20;
        c.servers[0].max_connections = u32::try_from(BUDGET).unwrap();
    })
    .await;
    let b = Proxy::start(env.config.clone()).await.expect("instance B");
    let mut c = ServeProcess::start(&env, |_| {}, &[]);
    let tenants = [
        env.tenant_with_user("sba").await,
        env.tenant_with_user("sbb").await,
        env.tenant_with_user("sbc").await,
    ];
    let databases: Vec<String> = tenants.iter().map(|t| t.database.clone()).collect();
    c.wait_accepting().await;
    let registry = admin_client(&env.registry_database()).await;
    let live_leases = || async {
        registry
            .query_one(
                "SELECT count(*) FROM budget_shares WHERE renewed_at > now() - interval '3 s'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            live_leases().await == 3
        })
        .await,
        "each of the three instances holds a lease on the server's budget"
    );

    // The sampler: tenant backends on the server, every 100 ms, until the end.
    let done = Arc::new(AtomicBool::new(false));
    let sampling = tokio::spawn({
        let (done, databases) = (Arc::clone(&done), databases.clone());
        async move {
            let admin = admin_client("postgres").await;
            let (mut most, mut samples) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                most = backends(&admin, &databases).await.max(most);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (most, samples)
        }
    });

    // A: pgbench, a connection per transaction. B: 12 long-lived clients of the second
    // tenant. C: 12 of the third, which move to B when C dies. Together they want more than
    // the budget, so the instances' shares are all in use.
    let script = env.dir.join("shared_budget.sql");
    std::fs::write(&script, "SELECT pg_sleep(0.02);\n").unwrap();
    let uri = env.uri(tenants[0].slug.as_str(), "app", "secret");
    let bench = tokio::task::spawn_blocking(move || {
        let script = script.display().to_string();
        pgbench(&[
            "-n", "-C", "-c", "6", "-j", "2", "-T", "6", "-f", &script, &uri,
        ])
    });
    let (on_b, on_c) = (Arc::new(Served::default()), Arc::new(Served::default()));
    let (killed, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut b_config = tokio_postgres::Config::new();
    b_config
        .host("127.0.0.1")
        .port(b.local_addr().port())
        .user("app")
        .password("secret")
        .connect_timeout(Duration::from_secs(10));
    let mut clients = Vec::new();
    for _ in 0..12 {
        let mut to_b = b_config.clone();
        to_b.dbname(tenants[1].slug.as_str());
        clients.push(tokio::spawn(client(
            vec![(to_b, Arc::clone(&on_b))],
            Arc::clone(&killed),
            Arc::clone(&stop),
        )));
        let mut c_to_b = b_config.clone();
        c_to_b.dbname(tenants[2].slug.as_str());
        let to_c = c.client_config(tenants[2].slug.as_str(), "app", "secret");
        clients.push(tokio::spawn(client(
            vec![(to_c, Arc::clone(&on_c)), (c_to_b, Arc::clone(&on_b))],
            Arc::clone(&killed),
            Arc::clone(&stop),
        )));
    }
    let (ok, out, err) = bench.await.unwrap();
    assert!(ok, "pgbench through A: {err}\n{out}");
    assert!(
        out.contains("number of failed transactions: 0"),
        "pgbench through A: {out}"
    );
    let a_served = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(a_served > 0, "A served pgbench: {out}");
    let (b_before, c_before) = (on_b.ok(), on_c.ok());
    assert!(
        b_before > 0 && c_before > 0,
        "B and C served: {b_before}, {c_before}"
    );
    assert_eq!(
        on_b.errors(),
        Vec::<String>::new(),
        "clients of B saw errors"
    );
    assert_eq!(
        on_c.errors(),
        Vec::<String>::new(),
        "clients of C saw errors"
    );

    // Kill -9 C under load: its clients come back through B, which wants all it can get.
    // C's lease lapses within the TTL (3 s) of its last renewal; the next beats of A and B
    // (every second) delete it, A shrinks to its headroom and B takes the rest.
    let c_id: String = registry
        .query_one(
            "SELECT id FROM instances WHERE address = $1",
            &[&format!("127.0.0.1:{}", c.port)],
        )
        .await
        .unwrap()
        .get(0);
    killed.store(true, Ordering::Relaxed);
    let killed_at = tokio::time::Instant::now();
    c.signal("KILL");
    let survivors = || async {
        registry
            .query_one(
                "SELECT coalesce(sum(share), 0)::int8, count(*) FILTER (WHERE instance_id = $1) \
                 FROM budget_shares",
                &[&c_id],
            )
            .await
            .unwrap()
    };
    let whole = eventually(Duration::from_millis(5500), || async {
        let row = survivors().await;
        row.get::<_, i64>(0) == BUDGET && row.get::<_, i64>(1) == 0
    })
    .await;
    assert!(
        whole,
        "A and B hold the whole budget within 5.5 s of the kill (looked for {:?})",
        killed_at.elapsed()
    );
    let sampler_admin = admin_client("postgres").await;
    let b_databases = databases[1..].to_vec();
    let mut most_on_b = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while most_on_b <= 20 && tokio::time::Instant::now() < deadline {
        most_on_b = backends(&sampler_admin, &b_databases).await.max(most_on_b);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used = most_on_b > 20;
    assert!(
        used,
        "B, wanting 24 backends, uses more than 20 of the budget ({most_on_b} seen)"
    );
    let b_after = on_b.ok();

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("clients stop")
            .unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let (most, samples) = sampling.await.unwrap();
    assert!(samples > 50, "sampled throughout ({samples} samples)");
    assert!(
        most <= BUDGET,
        "at most {BUDGET} tenant backends at any sample, saw {most}"
    );
    assert!(b_after > b_before, "B served on after the kill");
    assert_eq!(
        on_b.errors(),
        Vec::<String>::new(),
        "clients of B saw errors"
    );
    b.shutdown(Duration::from_secs(1)).await;
}

/// A second instance started beside one that holds the whole budget (an upgrade, a scale-out)
/// gets its part between heartbeats: the newcomer's capped grant calls the holder by NOTIFY,
/// the holder closes idle connections down to its fair part and calls back. With 30 s
/// heartbeats, only that can serve the newcomer's client within seconds; the server never
/// sees more than the budget meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_gets_its_part_of_a_held_budget_without_waiting_for_heartbeats() {
    const SMALL: i64 = 6;
    let env = TestEnv::start_with(|c| {
        c.instance.heartbeat_seconds = 30;
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 10;
        c.pool.checkout_timeout_ms = 20_000;
        c.servers[0].max_connections = u32::try_from(SMALL).unwrap();
    })
    .await;
    let t = env.tenant_with_user("sbnew").await;
    let databases = vec![t.database.clone()];
    let admin = admin_client("postgres").await;

    // The first instance, alone, holds the whole budget and opens all of it: six clients in
    // transactions at once, then idle.
    let mut holders = Vec::new();
    for _ in 0..SMALL {
        holders.push(env.connect(t.slug.as_str(), "app", "secret").await.unwrap());
    }
    let busy = holders
        .iter()
        .map(|c| c.simple_query("SELECT pg_sleep(0.3)"));
    for result in futures_util::future::join_all(busy).await {
        result.unwrap();
    }
    assert_eq!(
        backends(&admin, &databases).await,
        SMALL,
        "A opened the whole budget"
    );

    let b = Proxy::start(env.config.clone()).await.expect("instance B");
    let started = tokio::time::Instant::now();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(b.local_addr().port())
        .user("app")
        .password("secret")
        .dbname(t.slug.as_str());
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let sampling = tokio::spawn({
        let databases = databases.clone();
        async move {
            let mut most = 0;
            for _ in 0..40 {
                most = most.max(backends(&admin, &databases).await);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            most
        }
    });
    client.simple_query("SELECT 1").await.expect("B's client");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "B served its first client after {took:?}: its share came with the heartbeats (30 s), \
         not with the call"
    );
    let most = sampling.await.unwrap();
    assert!(
        most <= SMALL,
        "at most {SMALL} backends meanwhile, saw {most}"
    );
    // A's clients go on with what A kept.
    for holder in &holders {
        holder.simple_query("SELECT 1").await.unwrap();
    }
    b.shutdown(Duration::from_secs(1)).await;
}
