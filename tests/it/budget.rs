//! The server budget: many tenant pools on one backend server never hold more connections
//! than the server's budget; idle connections of other tenants are closed to make room.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::TestEnv;
use common::activity::{PeakBackends, backend_count};
use tenantgate::crypto::Binding;
use tenantgate::registry::{NewTenant, TenantSlug, TenantState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_tenants_never_exceed_a_budget_of_ten() {
    const BUDGET: u32 = 10;
    let env = TestEnv::start_with(|c| {
        c.pool.pool_size = 3;
        c.pool.checkout_timeout_ms = 60_000;
        c.servers[0].max_connections = BUDGET;
    })
    .await;
    // Three physical databases; 300 tenants registered against them.
    let mut physical = Vec::new();
    for _ in 0..3 {
        physical.push(env.tenant_with_user("phys").await);
    }
    let databases: Vec<String> = physical.iter().map(|t| t.database.clone()).collect();
    let mut slugs = Vec::new();
    for i in 0..300usize {
        let base = &physical[i % 3];
        let slug = TenantSlug::parse(&common::unique("many-")).unwrap();
        // The base's password, encrypted for this row (a copied ciphertext would not open).
        let password = env
            .key
            .decrypt(
                &base.backend_password_enc,
                &Binding::backend_password(base.slug.as_str()),
            )
            .unwrap();
        let encrypted = env
            .key
            .encrypt(&password, &Binding::backend_password(slug.as_str()));
        env.registry
            .insert_tenant(&NewTenant {
                slug: &slug,
                display_name: None,
                state: TenantState::Active,
                plan: "default",
                server: &base.server,
                database: &base.database,
                backend_role: &base.backend_role,
                backend_password_enc: &encrypted,
                registered: false,
            })
            .await
            .unwrap();
        env.add_user(slug.as_str(), "app", "secret").await;
        slugs.push(slug.as_str().to_owned());
    }

    let watcher = PeakBackends::start(databases.clone(), Duration::from_millis(10)).await;
    let env = Arc::new(env);
    let slugs = Arc::new(slugs);
    let mut tasks = Vec::new();
    for worker in 0..30usize {
        let (env, slugs) = (env.clone(), slugs.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9u64 ^ (worker as u64 + 1);
            for round in 0..12usize {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Half the load on ten hot tenants, half spread over all of them.
                let n = usize::try_from(seed % 300).unwrap();
                let index = if round % 2 == 0 { n % 10 } else { n };
                let slug = &slugs[index];
                let client = env.connect(slug, "app", "secret").await?;
                let row = client.query_one("SELECT current_database()", &[]).await?;
                let db: String = row.get(0);
                assert!(db.starts_with("tenant_phys"));
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        task.await
            .unwrap()
            .expect("no client error under the budget");
    }
    let peak = watcher.stop();
    assert!(
        peak <= i64::from(BUDGET),
        "backend connections peaked at {peak}"
    );
    assert!(peak >= 3, "the load did not use the budget ({peak})");
    let state = env.proxy.as_ref().unwrap().state();
    let budget = state.pools.budget("local").unwrap();
    assert!(budget.in_use() <= BUDGET);
    assert!(
        state.pools.pool_count().await > 10,
        "pools were created for many tenants"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_is_evicted_after_its_ttl_but_never_while_a_client_uses_it() {
    let env = TestEnv::start_with(|c| {
        c.pool.pool_size = 1;
        c.pool.pool_idle_timeout_seconds = 1;
    })
    .await;
    let t = env.tenant_with_user("ttl").await;
    let slug = t.slug.as_str().to_owned();
    let pools = env.proxy.as_ref().unwrap().state().pools.clone();

    // A holds the only backend and sits idle past the pool's TTL.
    let a = env.app(&slug).await;
    a.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    pools.pool_count().await;

    // B must queue on the same pool (pool_size 1), not get a second pool and backend.
    let env = Arc::new(env);
    let b = {
        let (env, slug) = (env.clone(), slug.clone());
        tokio::spawn(async move { env.connect(&slug, "app", "secret").await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !b.is_finished(),
        "B got a backend while A holds the only one"
    );
    assert_eq!(backend_count(&t.database).await, 1);
    drop(a);
    tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("B gets the backend once A leaves")
        .unwrap()
        .unwrap();

    // Nobody uses it now: after the TTL the pool goes, with its connection.
    let evicted = common::eventually(Duration::from_secs(10), || async {
        pools.pool_count().await == 0
    })
    .await;
    assert!(evicted, "the idle pool was not evicted");
    let closed = common::eventually(Duration::from_secs(10), || async {
        backend_count(&t.database).await == 0
    })
    .await;
    assert!(closed, "the evicted pool's backend stayed open");
}

/// Defect 9: a pool evicted while a client used it is parked for that client, taken back by
/// the next client, parked again; when its last client leaves, nobody takes it back, and its
/// backends must close then. They stayed open: the pool was only dropped, and moka keeps a
/// value it removed until crossbeam-epoch collects it (moka-rs/moka#383).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_evicted_while_in_use_closes_its_backends_when_its_last_client_leaves() {
    let env = TestEnv::start_with(|c| {
        c.pool.pool_size = 2;
        c.pool.pool_idle_timeout_seconds = 1;
    })
    .await;
    let t = env.tenant_with_user("parked").await;
    let slug = t.slug.as_str();
    let pools = env.proxy.as_ref().unwrap().state().pools.clone();

    let a = env.app(slug).await;
    a.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Past its TTL with A still connected: out of the map, kept (parked) for A.
    assert_eq!(pools.pool_count().await, 0);
    // B takes it back (a second backend), leaves; past the TTL again it is parked again.
    let b = env.app(slug).await;
    b.simple_query("SELECT 1").await.unwrap();
    drop(b);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(pools.pool_count().await, 0);
    a.simple_query("SELECT 1").await.unwrap();
    assert_eq!(backend_count(&t.database).await, 2);

    drop(a);
    let closed = common::eventually(Duration::from_secs(10), || async {
        backend_count(&t.database).await == 0
    })
    .await;
    assert!(
        closed,
        "the parked pool's backends stayed open after its last client left"
    );
    // A closed backend's permit comes back once the proxy has read the server's EOF, a
    // moment after the backend left pg_stat_activity (it leaves that before it exits).
    let budget = pools.budget("local").unwrap();
    let returned =
        common::eventually(Duration::from_secs(5), || async { budget.in_use() == 0 }).await;
    assert!(
        returned,
        "closed backends still hold budget permits: {}",
        budget.in_use()
    );
}

/// The pids of the backends open on `database`.
async fn backend_pids(admin: &tokio_postgres::Client, database: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    pids.sort_unstable();
    pids
}

/// Budget pressure without churn (issue 12). Budget 2: tenant A's one backend sits idle, tenant
/// B's one backend serves short transactions. B's second client, arriving while B's backend
/// is busy, waits for it to come back (within `reclaim_grace_ms`) instead of closing A's idle
/// backend to open a second one for B: A keeps the same backend through ten such bursts. With
/// the grace at 0 (the control), the same bursts close A's backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tenant_waits_for_its_own_backend_before_closing_another_tenants() {
    for (grace_ms, churns) in [(5_000, false), (0, true)] {
        let env = TestEnv::start_with(|c| {
            c.pool.mode = tenantgate::pool::PoolMode::Transaction;
            c.pool.pool_size = 2;
            c.pool.reclaim_grace_ms = grace_ms;
            c.servers[0].max_connections = 2;
        })
        .await;
        let a = env.tenant_with_user("grace-a").await;
        let b = env.tenant_with_user("grace-b").await;
        let admin = common::admin_client("postgres").await;
        let a_client = env.connect(a.slug.as_str(), "app", "secret").await.unwrap();
        a_client.simple_query("SELECT 1").await.unwrap();
        let b1 = env.connect(b.slug.as_str(), "app", "secret").await.unwrap();
        let b2 = env.connect(b.slug.as_str(), "app", "secret").await.unwrap();
        b1.simple_query("SELECT 1").await.unwrap();
        let a_backend = backend_pids(&admin, &a.database).await;
        assert_eq!(a_backend.len(), 1, "A holds one backend");
        for _ in 0..10 {
            // b2 asks while b1's transaction holds B's backend.
            let (first, second) = tokio::join!(b1.simple_query("SELECT pg_sleep(0.1)"), async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                b2.simple_query("SELECT 1").await
            });
            first.unwrap();
            second.unwrap();
        }
        let after = backend_pids(&admin, &a.database).await;
        if churns {
            assert_ne!(
                after, a_backend,
                "control: with no grace, B's bursts close A's idle backend"
            );
        } else {
            assert_eq!(
                after, a_backend,
                "A's idle backend was closed for B, whose own backend came back within the grace"
            );
            assert_eq!(
                backend_pids(&admin, &b.database).await.len(),
                1,
                "B never opened a second backend"
            );
        }
        drop((a_client, b1, b2));
    }
}
