//! Restarts and upgrades without refused connections (issue 14): a second tenantgate binds
//! the same address (SO_REUSEPORT) while the first runs; the first then drains. New
//! connections must never be refused across the switch, and clients already on the first
//! keep working until they leave.

use crate::common;

use std::time::Duration;

use common::{TestEnv, pgbench};
use tenantgate::pool::PoolMode;
use tenantgate::server::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_address_takes_new_clients_while_the_first_drains() {
    let port = common::free_port();
    let mut env = TestEnv::start_with(|c| {
        c.proxy.listen = ([127, 0, 0, 1], port).into();
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 4;
    })
    .await;
    let t = env.tenant_with_user("upgrade").await;
    let uri = env.uri(t.slug.as_str(), "app", "secret");
    let init = uri.clone();
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || pgbench(&["-i", "-s", "1", "-q", &init]))
            .await
            .unwrap();
    assert!(ok, "pgbench -i: {err}");
    // A client of the first instance from before the upgrade.
    let old_client = env.app(t.slug.as_str()).await;

    // A connection per transaction for 6 s, across the switch.
    let bench_uri = uri.clone();
    let bench = tokio::task::spawn_blocking(move || {
        pgbench(&[
            "-S", "-C", "-c", "4", "-j", "2", "-T", "6", "-n", &bench_uri,
        ])
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = Proxy::start(env.config.clone())
        .await
        .expect("a second instance on the same address");
    assert_eq!(second.local_addr().port(), port);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = env.proxy.take().unwrap();
    let first_stats = first.state().stats.clone();
    let drained = tokio::spawn(first.shutdown(Duration::from_secs(20)));

    // The old client keeps working while the first instance drains, and its leaving lets
    // the drain end long before the grace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        old_client
            .simple_query("SELECT 1")
            .await
            .expect("the old client during the drain");
    }
    drop(old_client);
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the first instance stopped once its clients left")
        .unwrap();

    let (ok, out, err) = bench.await.unwrap();
    assert!(ok, "pgbench failed across the switch: {err}\n{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    // Both instances served pgbench's connections.
    let before = first_stats.totals().clients_total;
    let after = second.state().stats.totals().clients_total;
    assert!(
        before > 10 && after > 10,
        "first served {before} clients, second {after}"
    );
    second.shutdown(Duration::from_secs(1)).await;
}
