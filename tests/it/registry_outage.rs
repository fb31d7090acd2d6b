//! The registry's own PostgreSQL restarts (issue 11): once it is back, tenantgate's registry
//! pool replaces the connections the restart closed and its change listener reconnects, so no
//! client is refused and registry changes keep reaching the running proxy.
//!
//! The registry lives on a dedicated cluster here (tenant databases stay on the shared one):
//! restarting it must not disturb other tests, nor the tenants' backend pools.

use crate::common;

use std::time::Duration;

use common::activity::activity_on;
use common::query::describe;
use common::{TestEnv, eventually};
use tenantgate::localpg::{LocalPg, LocalPgOptions};
use tenantgate::registry::TenantState;
use tokio_postgres::error::SqlState;

async fn start_pg(options: LocalPgOptions) -> LocalPg {
    tokio::task::spawn_blocking(move || LocalPg::start(options))
        .await
        .unwrap()
        .expect("start the registry's PostgreSQL")
}

/// Fast shutdown and start again on the same port and data directory: what
/// `pg_ctl restart -m fast` does, but the server stays owned by `LocalPg` (a server restarted
/// by pg_ctl would be daemonized and outlive the test).
async fn restart_pg(pg: LocalPg, options: &LocalPgOptions) -> LocalPg {
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    start_pg(options.clone()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_registry_restart_every_login_succeeds_and_changes_still_arrive() {
    let dir = common::cluster()
        .data_dir()
        .parent()
        .unwrap()
        .join(common::unique("registry-pg-"));
    let mut options = LocalPgOptions::new(dir.join("pgdata"));
    let pg = start_pg(options.clone()).await;
    options.port = Some(pg.port());
    let url = pg.connection_string("postgres");
    let env = TestEnv::start_with(|c| {
        c.registry.url = url;
        c.proxy.suspend_grace_seconds = 1;
    })
    .await;
    let warm = env.tenant_with_user("warm").await;
    let cold = env.tenant_with_user("cold").await;
    for i in 0..8 {
        env.add_user(warm.slug.as_str(), &format!("w{i}"), "secret")
            .await;
    }
    for i in 0..10 {
        env.add_user(cold.slug.as_str(), &format!("c{i}"), "secret")
            .await;
    }

    // Warm the proxy's registry pool: concurrent logins of different users look up
    // different verifiers at once, so the pool opens several connections.
    let (env, warm, cold) = (&env, &warm, &cold);
    let logins = futures_util::future::join_all((0..8).map(|i| async move {
        env.connect(warm.slug.as_str(), &format!("w{i}"), "secret")
            .await
    }))
    .await;
    for login in logins {
        login.unwrap().simple_query("SELECT 1").await.unwrap();
    }
    assert!(
        activity_on(&pg, "application_name = 'tenantgate' AND state = 'idle'").await >= 2,
        "the registry pool is not warm"
    );

    let pg = restart_pg(pg, &options).await;

    // Ten clients whose verifiers are not cached: each login asks the registry, through
    // pooled connections the restart closed. All succeed, first time.
    let logins = futures_util::future::join_all((0..10).map(|i| async move {
        env.connect(cold.slug.as_str(), &format!("c{i}"), "secret")
            .await
    }))
    .await;
    let refused: Vec<String> = logins
        .iter()
        .filter_map(|login| login.as_ref().err())
        .map(describe)
        .collect();
    assert!(
        refused.is_empty(),
        "{} of 10 logins after the registry restart were refused: {refused:?}",
        refused.len()
    );

    // The change listener is back...
    let listening = eventually(Duration::from_secs(15), || async {
        activity_on(
            &pg,
            "application_name = 'tenantgate-listener' AND query LIKE 'LISTEN%'",
        )
        .await
            >= 1
    })
    .await;
    assert!(listening, "the registry change listener did not reconnect");

    // ...and a change made through the registry reaches the running proxy: well within
    // the cache TTL (60 s), new logins are refused and the running client is closed.
    let running = env.app(warm.slug.as_str()).await;
    running.simple_query("SELECT 1").await.unwrap();
    tenantgate::provision::set_state(&env.registry, warm.slug.as_str(), TenantState::Suspended)
        .await
        .unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        match env.connect(warm.slug.as_str(), "app", "secret").await {
            Ok(_) => false,
            Err(e) => e.code() == Some(&SqlState::CANNOT_CONNECT_NOW),
        }
    })
    .await;
    assert!(refused, "the suspension did not reach the proxy");
    let closed = eventually(Duration::from_secs(5), || async { running.is_closed() }).await;
    assert!(
        closed,
        "the suspended tenant's running client stayed connected"
    );

    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
