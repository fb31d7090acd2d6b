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
use common::wire::{self, RawClient};
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

    // pgbench for 20 s, upgraded mid-run: 20 clients that stay connected, 2 that connect per
    // transaction.
    let uri = format!(
        "postgresql://app:secret@127.0.0.1:{port}/{}?sslmode=disable",
        t.slug
    );
    let run = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.push(uri.clone());
        tokio::task::spawn_blocking(move || pgbench(&all))
    };
    let steady = run(&["-S", "-n", "-c", "20", "-j", "2", "-T", "20"]);
    let per_connection = run(&["-S", "-n", "-C", "-c", "2", "-T", "20"]);
    tokio::time::sleep(Duration::from_secs(8)).await;

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
    // All 20 pgbench clients that stayed connected, and the moved one, came over.
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
    assert!(received >= 21, "received {received}:\n{}", new.log_text());
    drop(new);
    assert!(!socket.exists() || std::fs::remove_file(&socket).is_ok());
}

/// Tenant clients on `proxy`'s roster.
fn tenant_clients(proxy: &tenantgate::server::Proxy) -> usize {
    proxy
        .state()
        .clients
        .list()
        .iter()
        .filter(|c| c.tenant.is_some())
        .count()
}

/// A test environment whose proxy (the "old" process) binds a handover socket.
async fn env_with_handover(socket: &Path) -> TestEnv {
    let socket = socket.to_owned();
    TestEnv::start_with(move |c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 2;
        c.proxy.handover_socket = Some(socket);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_half_a_message_sent_moves_only_once_the_message_is_whole() {
    let socket = PathBuf::from(format!("/tmp/{}.sock", common::unique("tg-half-")));
    let mut env = env_with_handover(&socket).await;
    let t = env.tenant_with_user("halfmove").await;
    let mut half = RawClient::connect(env.port(), t.slug.as_str(), "app", "secret").await;
    let query = wire::query("SELECT 40 + 2");
    half.send(&query[..3]).await.unwrap();
    let mut idle = RawClient::connect(env.port(), t.slug.as_str(), "app", "secret").await;

    let new = tenantgate::server::Proxy::start(env.config.clone())
        .await
        .unwrap();
    let old = env.proxy.take().unwrap();
    old.hand_over().await.unwrap();
    // The idle client moves at once; the one with three bytes of a Query in the old
    // process's buffer stays there.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            tenant_clients(&new) == 1 && tenant_clients(&old) == 1
        })
        .await,
        "new {} old {}",
        tenant_clients(&new),
        tenant_clients(&old)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((tenant_clients(&new), tenant_clients(&old)), (1, 1));
    // The rest of the message: the old process answers it, then the client moves.
    half.send(&query[3..]).await.unwrap();
    let answer = half.until_ready().await.unwrap();
    assert!(
        answer
            .iter()
            .any(|(tag, body)| *tag == b'D' && body.ends_with(b"42")),
        "{answer:?}"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            tenant_clients(&new) == 2 && tenant_clients(&old) == 0
        })
        .await
    );
    for client in [&mut half, &mut idle] {
        client.send(&wire::query("SELECT 7")).await.unwrap();
        let answer = client.until_ready().await.unwrap();
        assert!(answer.iter().any(|(tag, _)| *tag == b'D'), "{answer:?}");
    }
    // What /metrics reports as tenantgate_handover_clients_total{outcome}.
    assert_eq!(old.state().stats.process().handovers(), (2, 0, 0));
    assert_eq!(new.state().stats.process().handovers(), (0, 0, 2));
    tokio::time::timeout(
        Duration::from_secs(10),
        old.shutdown(Duration::from_secs(30)),
    )
    .await
    .expect("the old process had nobody left to wait for");
    new.shutdown(Duration::from_secs(1)).await;
}

/// Reads one length-prefixed frame of the handover link (any descriptor with it is closed).
async fn read_link_frame(stream: &mut tokio::net::UnixStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
    stream.read_exact(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_process_that_dies_with_a_client_in_flight_costs_that_client_a_clear_57p01() {
    use tokio::io::AsyncWriteExt as _;
    let socket = PathBuf::from(format!("/tmp/{}.sock", common::unique("tg-dies-")));
    let env = env_with_handover(&socket).await;
    let t = env.tenant_with_user("handdies").await;
    let (client, connection) = env
        .client_config(t.slug.as_str(), "app", "secret")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();

    // A "newer process" that greets, reads the client it is sent, and dies without taking it.
    std::fs::remove_file(&socket).unwrap();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let hello = read_link_frame(&mut stream).await;
        assert!(String::from_utf8_lossy(&hello).contains("\"hello\""));
        let welcome = br#"{"type":"welcome","instance":1,"version":"fake"}"#;
        let mut frame = u32::try_from(welcome.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(welcome);
        stream.write_all(&frame).await.unwrap();
        let sent = read_link_frame(&mut stream).await;
        assert!(String::from_utf8_lossy(&sent).contains("\"client\""));
    });
    let proxy = env.proxy.as_ref().unwrap();
    proxy.hand_over().await.unwrap();
    fake.await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("the client was told within the take timeout")
        .unwrap();
    let err = ended.expect_err("the client's connection ended with an error");
    let db = err.as_db_error().expect("a FATAL from tenantgate");
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN, "{db}");
    assert!(
        db.message().contains("could not hand this connection"),
        "{db}"
    );
    assert_eq!(tenant_clients(proxy), 0);
}
