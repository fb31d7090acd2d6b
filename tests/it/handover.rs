//! Upgrades without disconnects (issue 14): a new `tenantgate serve` starts on the same
//! address and handover socket, SIGUSR2 to the old one passes its idle transaction-pooling
//! plaintext clients over (socket, startup settings, prepared statements, cancel key), and
//! the old one drains what must stay (a session-pooling client) and exits. Under pgbench the
//! switch must cost no failed transaction and no refused connection; a cancel sent to the
//! address reaches a client on either process.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::serve::ServeProcess;
use common::{TestEnv, pgbench};
use tenantgate::config::Config;
use tenantgate::pool::PoolMode;
use tokio_postgres::error::SqlState;

/// Waits until `serve`'s log has `needle`.
async fn log_says(serve: &ServeProcess, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serve.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log: {}",
            serve.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `serve` on `port` with the handover socket at `socket`.
fn serve_on(env: &TestEnv, port: u16, socket: &Path) -> ServeProcess {
    let socket = socket.to_owned();
    let mut serve = ServeProcess::start(
        env,
        move |c: &mut Config| {
            c.proxy.listen = ([127, 0, 0, 1], port).into();
            c.proxy.handover_socket = Some(socket);
            c.proxy.shutdown_grace_seconds = 60;
            "info".clone_into(&mut c.proxy.log_level);
        },
        &[],
    );
    serve.port = port;
    serve
}

/// Runs `SELECT pg_sleep(30)` on `client` and cancels it with its cancel key sent to the
/// shared address: the query must end with 57014 within a few seconds.
async fn cancel_through_the_address(client: &tokio_postgres::Client, who: &str) {
    let token = client.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err(&format!("{who}: pg_sleep was not cancelled"));
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{who}: {err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{who}");
    canceller.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_clients_to_the_new_process_under_pgbench_without_a_failure() {
    let env = TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 4;
    })
    .await;
    let t = env.tenant_with_user("handover").await;
    let s = env.tenant_with_user("handsess").await;
    env.admin()
        .await
        .simple_query(&format!("ALTER TENANT {} SET (mode = 'session')", s.slug))
        .await
        .unwrap();
    let init = env.uri(t.slug.as_str(), "app", "secret");
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        pgbench(&["-i", "-s", "1", "-q", &init].map(str::to_owned))
    })
    .await
    .unwrap();
    assert!(ok, "pgbench -i: {err}");

    let port = common::free_port();
    let socket = PathBuf::from(format!("/tmp/{}.sock", common::unique("tg-handover-")));
    let mut old = serve_on(&env, port, &socket);
    old.wait_accepting().await;
    // SIGUSR2 with no newer process: the old one refuses to hand over to itself.
    old.signal("USR2");
    log_says(&old, "still serving").await;

    // Before the upgrade: a transaction-pooling client with a prepared statement and a
    // startup setting, and a session-pooling client.
    let mut config = old.client_config(t.slug.as_str(), "app", "secret");
    config.application_name("carried");
    let (moved, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let moved_connection = tokio::spawn(connection);
    let plus_one = moved.prepare("SELECT $1::int + 1").await.unwrap();
    let stays = old.connect(s.slug.as_str(), "app", "secret").await.unwrap();

    // pgbench for 10 s across the upgrade: 16 clients that stay connected, 2 that connect
    // per transaction.
    let uri = format!(
        "postgresql://app:secret@127.0.0.1:{port}/{}?sslmode=disable",
        t.slug
    );
    let run = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.push(uri.clone());
        tokio::task::spawn_blocking(move || pgbench(&all))
    };
    let steady = run(&["-S", "-n", "-c", "16", "-j", "2", "-T", "10"]);
    let per_connection = run(&["-S", "-n", "-C", "-c", "2", "-T", "10"]);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let new = serve_on(&env, port, &socket);
    log_says(&new, "tenantgate is accepting connections").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The client is inside a transaction when the signal comes: it finishes it on the old
    // process, and moves at its end.
    moved
        .batch_execute("BEGIN; CREATE TEMP TABLE during_the_switch (x int)")
        .await
        .unwrap();
    old.signal("USR2");
    log_says(&old, "SIGUSR2: a newer tenantgate takes the clients").await;
    moved
        .batch_execute("INSERT INTO during_the_switch VALUES (1); COMMIT")
        .await
        .unwrap();

    // The moved client goes on on the new process: same connection, its prepared statement,
    // its startup setting, and its cancel key.
    let row = moved.query_one(&plus_one, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let name = moved.query_one("SHOW application_name", &[]).await.unwrap();
    assert_eq!(name.get::<_, String>(0), "carried");

    // The session-pooling client stays on the old process, which keeps serving it; a cancel
    // for it reaches the address (the new process) and is forwarded.
    for _ in 0..3 {
        stays.simple_query("SELECT 1").await.unwrap();
    }
    cancel_through_the_address(&stays, "the client on the old process").await;
    let (ok, out, err) = steady.await.unwrap();
    assert!(ok, "pgbench failed across the upgrade: {err}\n{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let (ok, out, err) = per_connection.await.unwrap();
    assert!(ok, "pgbench -C failed across the upgrade: {err}\n{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");

    // The old process exits once its last client leaves, long before its 60 s grace.
    drop(stays);
    let status = old.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process did not exit cleanly: {status:?}\n{}",
        old.log_text()
    );
    let log = old.log_text();
    assert!(!log.contains("handing a client over failed"), "{log}");

    // With the old process gone, the moved client still works and can be cancelled.
    cancel_through_the_address(&moved, "the moved client").await;
    let row = moved.query_one(&plus_one, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert!(!moved_connection.is_finished());
    // Every pgbench client that stayed connected, and the moved one, came over.
    let received: u64 = new
        .log_text()
        .lines()
        .filter(|l| l.contains("finished handing over its clients"))
        .filter_map(|l| {
            l.split("received=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(received >= 17, "received {received}:\n{}", new.log_text());
    drop(new);
    assert!(!socket.exists() || std::fs::remove_file(&socket).is_ok());
}
