//! `tenantgate serve` and the signals a service manager sends (issue 14): sd_notify readiness
//! over a real datagram socket, SIGTERM draining within the grace, SIGINT stopping at once.

use crate::common;

use std::time::{Duration, Instant};

use common::serve::ServeProcess;
use tokio::net::UnixDatagram;
use tokio_postgres::error::SqlState;

/// The next sd_notify datagram, as text.
async fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), socket.recv(&mut buf))
        .await
        .expect("a notification within 30 s")
        .unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// A client through `serve` whose connection task is kept: its result is how an unsolicited
/// FATAL (57P01 at shutdown) shows.
async fn watched_client(
    serve: &ServeProcess,
    slug: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = serve
        .client_config(slug, "app", "secret")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    (client, tokio::spawn(connection))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_says_ready_once_accepting_reloading_on_sighup_and_stopping_on_sigterm() {
    let env = common::TestEnv::start().await;
    let path = std::env::temp_dir().join(format!(
        "tg-notify-{}-{}.sock",
        std::process::id(),
        common::unique("")
    ));
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut serve = ServeProcess::start(&env, |_| {}, &[("NOTIFY_SOCKET", path.as_os_str())]);

    let ready = next_notification(&socket).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=accepting connections"), "{ready:?}");
    // Ready means ready: the port takes clients the moment the notification arrives.
    tokio::net::TcpStream::connect(("127.0.0.1", serve.port))
        .await
        .expect("READY=1 came before the port accepted");

    serve.signal("HUP");
    let reloading = next_notification(&socket).await;
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1")
            && reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let ready = next_notification(&socket).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");

    serve.signal("TERM");
    let stopping = next_notification(&socket).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = serve.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        serve.log_text()
    );
    drop(std::fs::remove_file(&path));
}

/// SIGTERM drains: no new clients, but a client in the middle of a transaction commits after
/// the signal, and the process exits as soon as it leaves, well within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_transaction_commit_refuses_new_clients_and_exits_when_they_leave() {
    let env = common::TestEnv::start().await;
    let t = env.tenant_with_user("sigterm").await;
    let slug = t.slug.as_str();
    let mut serve = ServeProcess::start(&env, |c| c.proxy.shutdown_grace_seconds = 10, &[]);
    serve.wait_accepting().await;
    let (client, connection) = watched_client(&serve, slug).await;
    client
        .batch_execute("CREATE TABLE drained (x int)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .unwrap();

    serve.signal("TERM");
    let signalled = Instant::now();
    let refused = common::eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", serve.port))
            .await
            .is_err()
    })
    .await;
    assert!(refused, "new connections still accepted while draining");
    client.batch_execute("COMMIT").await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM drained", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert!(
        serve.wait_exit(Duration::ZERO).await.is_none(),
        "exited early"
    );

    drop(client);
    assert!(connection.await.unwrap().is_ok(), "the client left cleanly");
    let status = serve.wait_exit(Duration::from_secs(8)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        serve.log_text()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "waited out the grace"
    );
}

/// SIGINT does not wait for anyone: a client in an open transaction is closed with 57P01 at
/// once, its transaction rolled back, and the process exits long before a 60 s grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_a_session_in_a_transaction_at_once() {
    let env = common::TestEnv::start().await;
    let t = env.tenant_with_user("sigint").await;
    let slug = t.slug.as_str();
    let mut serve = ServeProcess::start(&env, |c| c.proxy.shutdown_grace_seconds = 60, &[]);
    serve.wait_accepting().await;
    let (client, connection) = watched_client(&serve, slug).await;
    client
        .batch_execute("CREATE TABLE interrupted (x int)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO interrupted VALUES (1)")
        .await
        .unwrap();

    serve.signal("INT");
    let status = serve.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        serve.log_text()
    );
    let err = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the client was closed")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    assert!(client.is_closed());
    let direct = common::admin_client(&t.database).await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM interrupted", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the open transaction was rolled back");
}

/// A SIGINT in the middle of a SIGTERM drain cuts it short: the sessions still open are
/// closed with 57P01 at once instead of at the end of the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_a_sigterm_drain_closes_the_remaining_sessions_now() {
    let env = common::TestEnv::start().await;
    let t = env.tenant_with_user("drainint").await;
    let mut serve = ServeProcess::start(
        &env,
        |c| {
            c.proxy.shutdown_grace_seconds = 60;
            "info".clone_into(&mut c.proxy.log_level);
        },
        &[],
    );
    serve.wait_accepting().await;
    let (client, connection) = watched_client(&serve, t.slug.as_str()).await;
    client.batch_execute("BEGIN").await.unwrap();

    serve.signal("TERM");
    let draining = common::eventually(Duration::from_secs(5), || async {
        serve.log_text().contains("SIGTERM: draining")
    })
    .await;
    assert!(draining, "{}", serve.log_text());
    assert!(serve.wait_exit(Duration::from_millis(500)).await.is_none());
    serve.signal("INT");
    let status = serve.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        serve.log_text()
    );
    let err = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the client was closed")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
}
