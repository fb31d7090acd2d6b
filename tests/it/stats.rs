//! Per-tenant usage counters: a known workload through the proxy gives exact query and
//! transaction counts in both pooling modes; totals survive the pool's eviction; checkout
//! waits, backend connects and their errors, and connections reclaimed under a server budget
//! are counted for the right tenant.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, admin_client, eventually};
use tenantgate::pool::PoolMode;
use tenantgate::registry::TenantSlug;
use tenantgate::stats::{Counters, Stats};

const CLIENTS: u64 = 3;
/// `SELECT 1` as simple queries.
const SIMPLE: u64 = 5;
/// Explicit transactions, each `BEGIN`, `SELECT 2`, `COMMIT` (three simple queries).
const EXPLICIT: u64 = 3;
/// Executions of one prepared statement (extended protocol).
const EXTENDED: u64 = 4;

/// What one client of `workload` sends, counted as the counters define it.
///
/// Queries (`Q` and `E` messages): SIMPLE + 3 × EXPLICIT + EXTENDED + the final `SELECT 3`.
/// Transactions (ReadyForQuery `I` from the backend): one per simple query outside a block
/// (SIMPLE + the final one), one per explicit transaction (its COMMIT; BEGIN and SELECT 2 end
/// in `T`), and one per Sync tokio-postgres sends: prepare (Parse/Describe/Sync), each
/// execution (Bind/Execute/Sync), and the statement's Close/Sync when it is dropped.
const QUERIES_PER_CLIENT: u64 = SIMPLE + 3 * EXPLICIT + EXTENDED + 1;
const TRANSACTIONS_PER_CLIENT: u64 = SIMPLE + EXPLICIT + 1 + EXTENDED + 1 + 1;
/// A `SELECT 1` Query message: tag, length, "SELECT 1\0".
const SELECT_1_BYTES: u64 = 1 + 4 + 9;

fn stats_of(env: &TestEnv) -> Stats {
    env.proxy.as_ref().unwrap().state().stats.clone()
}

fn counters(stats: &Stats, slug: &str) -> Counters {
    stats
        .tenant(&TenantSlug::parse(slug).unwrap())
        .map(|row| row.counters)
        .unwrap_or_default()
}

/// Waits until no client of `slug` is connected (their sessions have ended and counted
/// everything), then returns the counters.
async fn settled(stats: &Stats, slug: &str) -> Counters {
    let gone = eventually(Duration::from_secs(10), || async {
        counters(stats, slug).clients_now == 0
    })
    .await;
    assert!(gone, "clients_now did not return to 0");
    counters(stats, slug)
}

/// One client's known workload; see `QUERIES_PER_CLIENT` and `TRANSACTIONS_PER_CLIENT`.
async fn workload(env: &TestEnv, slug: &str) {
    let c = env.app(slug).await;
    for _ in 0..SIMPLE {
        c.simple_query("SELECT 1").await.unwrap();
    }
    for _ in 0..EXPLICIT {
        c.batch_execute("BEGIN").await.unwrap();
        c.simple_query("SELECT 2").await.unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    let statement = c.prepare("SELECT $1::int4").await.unwrap();
    for i in 0..i32::try_from(EXTENDED).unwrap() {
        let row = c.query_one(&statement, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    // Dropping the statement sends Close and Sync; the next query's answer comes after theirs.
    drop(statement);
    c.simple_query("SELECT 3").await.unwrap();
}

async fn counts_a_known_workload_exactly(mode: PoolMode) {
    let env = Arc::new(
        TestEnv::start_with(|c| {
            c.pool.mode = mode;
            c.pool.pool_size = 2;
        })
        .await,
    );
    let t = env.tenant_with_user("stats-work").await;
    let slug = t.slug.as_str().to_owned();
    let stats = stats_of(&env);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (env, slug) = (env.clone(), slug.clone());
        clients.push(tokio::spawn(async move { workload(&env, &slug).await }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let c = settled(&stats, &slug).await;
    assert_eq!(c.clients_now, 0);
    assert_eq!(c.clients_total, CLIENTS);
    assert_eq!(c.queries, CLIENTS * QUERIES_PER_CLIENT, "{c:?}");
    assert_eq!(c.transactions, CLIENTS * TRANSACTIONS_PER_CLIENT, "{c:?}");
    // Every Query message counts its bytes; the rest of the traffic is small.
    assert!(c.bytes_in >= CLIENTS * SIMPLE * SELECT_1_BYTES, "{c:?}");
    assert!(c.bytes_in < CLIENTS * 16 * 1024, "{c:?}");
    // At least a ReadyForQuery (6 bytes) per transaction came back, and rows besides.
    assert!(c.bytes_out > 6 * c.transactions, "{c:?}");
    assert!(c.bytes_out < CLIENTS * 64 * 1024, "{c:?}");
    assert!((1..=2).contains(&c.backend_connects), "{c:?}");
    assert_eq!(c.backend_connect_errors, 0);
    assert_eq!((c.pool_evictions, c.reclaimed_connections), (0, 0));
    // Only this tenant was counted; the totals are its counters.
    assert_eq!(stats.snapshot().len(), 1);
    assert_eq!(stats.totals(), c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_counts_a_known_workload_exactly() {
    counts_a_known_workload_exactly(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_counts_a_known_workload_exactly() {
    counts_a_known_workload_exactly(PoolMode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_survive_the_eviction_of_the_pool() {
    let env = TestEnv::start_with(|c| {
        c.pool.pool_size = 1;
        c.pool.pool_idle_timeout_seconds = 1;
    })
    .await;
    let t = env.tenant_with_user("stats-evict").await;
    let slug = t.slug.as_str();
    let stats = stats_of(&env);
    let pools = env.proxy.as_ref().unwrap().state().pools.clone();

    let c = env.app(slug).await;
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("SELECT 2").await.unwrap();
    drop(c);
    let before = settled(&stats, slug).await;
    assert_eq!((before.queries, before.transactions), (2, 2));
    assert_eq!(before.backend_connects, 1);

    let evicted = eventually(Duration::from_secs(10), || async {
        pools.pool_count().await == 0
    })
    .await;
    assert!(evicted, "the idle pool was not evicted");
    let after = counters(&stats, slug);
    assert_eq!(
        after,
        Counters {
            pool_evictions: 1,
            ..before
        }
    );

    // A new client gets a new pool and adds to the same totals.
    let c = env.app(slug).await;
    c.simple_query("SELECT 3").await.unwrap();
    drop(c);
    let again = settled(&stats, slug).await;
    assert_eq!(again.clients_total, 2);
    assert_eq!((again.queries, again.transactions), (3, 3));
    assert_eq!(again.backend_connects, 2);
    assert!(again.bytes_in > before.bytes_in && again.bytes_out > before.bytes_out);
    assert_eq!(again.pool_evictions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_waited_for_a_contended_backend_is_counted() {
    let env = Arc::new(
        TestEnv::start_with(|c| {
            c.pool.pool_size = 1;
            c.pool.checkout_timeout_ms = 10_000;
        })
        .await,
    );
    let t = env.tenant_with_user("stats-wait").await;
    let slug = t.slug.as_str().to_owned();
    let stats = stats_of(&env);

    // Session pooling: A holds the only backend; B queues behind it until A leaves.
    let a = env.app(&slug).await;
    a.simple_query("SELECT 1").await.unwrap();
    let alone = counters(&stats, &slug).wait_us;
    let admin = env.admin().await;
    let b = {
        let (env, slug) = (env.clone(), slug.clone());
        tokio::spawn(async move { env.app(&slug).await })
    };
    // B's wait begins only once its login is through (a loaded machine takes hundreds of
    // milliseconds for that): from the moment the pool has it waiting, it waits 600 ms.
    common::until_waiting(&admin, &slug, 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !b.is_finished(),
        "B got a backend while A holds the only one"
    );
    drop(a);
    let b = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("B gets the backend once A leaves")
        .unwrap();
    b.simple_query("SELECT 1").await.unwrap();
    let waited = counters(&stats, &slug).wait_us - alone;
    assert!(waited >= 500_000, "B's wait counted as {waited} µs");
    assert!(waited < 10_000_000, "B's wait counted as {waited} µs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_connections_and_connect_errors_count_for_their_tenant() {
    let env = TestEnv::start_with(|c| {
        c.pool.pool_size = 1;
        c.servers[0].max_connections = 1;
    })
    .await;
    let stats = stats_of(&env);
    let first = env.tenant_with_user("stats-idle").await;
    let second = env.tenant_with_user("stats-next").await;

    // The first tenant's client leaves its backend idle in the pool; the second tenant needs
    // the server's only connection, so the first tenant's idle one is closed.
    let c = env.app(first.slug.as_str()).await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    settled(&stats, first.slug.as_str()).await;
    let c = env.app(second.slug.as_str()).await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    let idle = settled(&stats, first.slug.as_str()).await;
    let next = settled(&stats, second.slug.as_str()).await;
    assert_eq!(idle.reclaimed_connections, 1, "{idle:?}");
    assert_eq!(next.reclaimed_connections, 0, "{next:?}");
    assert_eq!((idle.backend_connects, next.backend_connects), (1, 1));

    // A tenant whose role's password changed behind tenantgate's back: the backend refuses
    // it, which is a connect error and no connection.
    let third = env.tenant_with_user("stats-third").await;
    admin_client("postgres")
        .await
        .batch_execute(&format!(
            "ALTER ROLE \"{}\" PASSWORD 'changed-behind-our-back'",
            third.backend_role
        ))
        .await
        .unwrap();
    let refused = env.connect(third.slug.as_str(), "app", "secret").await;
    assert!(refused.is_err(), "the backend accepted a changed password");
    let c = settled(&stats, third.slug.as_str()).await;
    assert_eq!(c.clients_total, 1);
    assert_eq!(c.backend_connects, 0);
    assert!(c.backend_connect_errors >= 1, "{c:?}");
}

/// The registry's `tenant_usage` of `slug`, summed over hours, in the order of
/// `Counters::COLUMNS` after `clients_now`; and whether every row starts on an hour (UTC).
async fn registry_usage(env: &TestEnv, slug: &str) -> (Vec<u64>, bool) {
    let registry = common::connect_str(&env.config.registry.url).await.unwrap();
    let row = registry
        .query_one(
            "SELECT coalesce(sum(clients), 0)::int8, coalesce(sum(transactions), 0)::int8, \
             coalesce(sum(queries), 0)::int8, coalesce(sum(bytes_in), 0)::int8, \
             coalesce(sum(bytes_out), 0)::int8, coalesce(sum(wait_us), 0)::int8, \
             coalesce(sum(backend_connects), 0)::int8, \
             coalesce(sum(backend_connect_errors), 0)::int8, \
             coalesce(sum(pool_evictions), 0)::int8, \
             coalesce(sum(reclaimed_connections), 0)::int8, \
             bool_and(period_start = date_trunc('hour', period_start, 'UTC')) IS NOT FALSE \
             FROM tenant_usage WHERE tenant_slug = $1",
            &[&slug],
        )
        .await
        .unwrap();
    let sums = (0..10)
        .map(|i| u64::try_from(row.get::<_, i64>(i)).unwrap())
        .collect();
    (sums, row.get(10))
}

/// The counters as `registry_usage` sums them.
fn stored(c: &Counters) -> Vec<u64> {
    c.values()[1..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_flushed_to_the_registry_by_the_hour() {
    let env = TestEnv::start_with(|c| c.stats.flush_interval_seconds = 1).await;
    let t = env.tenant_with_user("stats-flush").await;
    let slug = t.slug.as_str();
    let stats = stats_of(&env);
    for _ in 0..2 {
        let c = env.app(slug).await;
        c.simple_query("SELECT 1").await.unwrap();
        c.batch_execute("BEGIN; SELECT 2; COMMIT").await.unwrap();
    }
    let counted = settled(&stats, slug).await;
    assert_eq!((counted.clients_total, counted.queries), (2, 4));
    let flushed = eventually(Duration::from_secs(10), || async {
        registry_usage(&env, slug).await.0 == stored(&counted)
    })
    .await;
    let (usage, on_the_hour) = registry_usage(&env, slug).await;
    assert!(
        flushed,
        "registry has {usage:?}, counters are {:?}",
        stored(&counted)
    );
    assert!(on_the_hour);

    // Later flushes add only what is new.
    let c = env.app(slug).await;
    c.simple_query("SELECT 3").await.unwrap();
    drop(c);
    let counted = settled(&stats, slug).await;
    assert_eq!((counted.clients_total, counted.queries), (3, 5));
    let flushed = eventually(Duration::from_secs(10), || async {
        registry_usage(&env, slug).await.0 == stored(&counted)
    })
    .await;
    assert!(flushed, "the second flush did not add up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_what_the_interval_has_not() {
    let mut env = TestEnv::start_with(|c| c.stats.flush_interval_seconds = 3600).await;
    let t = env.tenant_with_user("stats-last").await;
    let slug = t.slug.as_str().to_owned();
    let stats = stats_of(&env);
    let c = env.app(&slug).await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    let counted = settled(&stats, &slug).await;
    assert_eq!(registry_usage(&env, &slug).await.0, vec![0; 10]);
    env.stop().await;
    assert_eq!(registry_usage(&env, &slug).await.0, stored(&counted));
}
