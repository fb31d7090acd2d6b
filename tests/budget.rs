//! The server budget: many tenant pools on one backend server never hold more connections
//! than the server's budget; idle connections of other tenants are closed to make room.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::{TestEnv, admin_client};
use tenantgate::registry::{NewTenant, TenantSlug, TenantState};

/// Backend connections the cluster has open to any of `databases`.
async fn connections_to(databases: &[String]) -> i64 {
    admin_client("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY($1)",
            &[&databases],
        )
        .await
        .unwrap()
        .get(0)
}

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
        env.registry
            .insert_tenant(&NewTenant {
                slug: &slug,
                display_name: None,
                state: TenantState::Active,
                plan: "default",
                server: &base.server,
                database: &base.database,
                backend_role: &base.backend_role,
                backend_password_enc: &base.backend_password_enc,
            })
            .await
            .unwrap();
        env.add_user(slug.as_str(), "app", "secret").await;
        slugs.push(slug.as_str().to_owned());
    }

    let peak = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (peak, databases) = (peak.clone(), databases.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(connections_to(&databases).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
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
    watcher.abort();
    let peak = peak.load(Ordering::Relaxed);
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
