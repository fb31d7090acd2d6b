//! Session mode: a client must not be able to tell tenantgate from a direct connection, and a
//! backend is reused only clean.

use crate::common;

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use common::activity::{PeakBackends, cancel_a_running_sleep};
use common::query::query_value;
use common::{TestEnv, admin_client};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls};

/// A client whose notifications arrive on the returned channel as (pid, payload).
async fn listening_client(
    env: &TestEnv,
    slug: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(i32, String)>,
) {
    let (client, mut connection) = env
        .client_config(slug, "app", "secret")
        .connect(NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                drop(tx.send((n.process_id(), n.payload().to_owned())));
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_pid_is_real_and_matches_notify_pid() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("pid").await;
    let (client, mut rx) = listening_client(&env, t.slug.as_str()).await;
    let pid: i32 = query_value(&client, "SELECT pg_backend_pid()").await;
    client
        .batch_execute("LISTEN chan; NOTIFY chan, 'hello'")
        .await
        .unwrap();
    let (notify_pid, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payload, "hello");
    assert_eq!(notify_pid, pid);
    // The pid is a real backend of the tenant's database.
    let seen: i64 = admin_client("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND datname = $2",
            &[&pid, &t.database],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_between_two_clients() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("notify").await;
    let (listener, mut rx) = listening_client(&env, t.slug.as_str()).await;
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = env.app(t.slug.as_str()).await;
    sender.batch_execute("NOTIFY jobs, 'job-1'").await.unwrap();
    let (_, got) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification delivered")
        .unwrap();
    assert_eq!(got, "job-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_take_effect_and_do_not_leak_to_the_next_client() {
    // One backend, so the second client surely reuses the first one's connection.
    let env = TestEnv::start_with(|c| c.pool.pool_size = 1).await;
    let t = env.tenant_with_user("params").await;
    let slug = t.slug.as_str();

    let mut cfg = env.client_config(slug, "app", "secret");
    cfg.application_name("billing-worker")
        .options("-c statement_timeout=4321 -c search_path=audit,public");
    let (c1, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let pid1: i32 = query_value(&c1, "SELECT pg_backend_pid()").await;
    let app: String = query_value(&c1, "SHOW application_name").await;
    let timeout: String = query_value(&c1, "SHOW statement_timeout").await;
    let path: String = query_value(&c1, "SHOW search_path").await;
    assert_eq!(app, "billing-worker");
    assert_eq!(timeout, "4321ms");
    assert_eq!(path, "audit,public", "as a direct connection shows it");
    // Session state the next client must not see.
    c1.batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE t1 (x int); PREPARE p AS SELECT 1; SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    drop(c1);

    let c2 = tokio::time::timeout(Duration::from_secs(10), env.app(slug))
        .await
        .unwrap();
    let pid2: i32 = query_value(&c2, "SELECT pg_backend_pid()").await;
    assert_eq!(pid1, pid2, "the backend was reused");
    let app: String = query_value(&c2, "SHOW application_name").await;
    let timeout: String = query_value(&c2, "SHOW statement_timeout").await;
    let work_mem: String = query_value(&c2, "SHOW work_mem").await;
    assert_eq!(app, "");
    assert_eq!(timeout, "0");
    assert_eq!(work_mem, "4MB");
    let temp: i64 = query_value(&c2, "SELECT count(*) FROM pg_class WHERE relname = 't1'").await;
    assert_eq!(temp, 0);
    let prepared: i64 = c2
        // tokio-postgres prepares this very query under its own name: look for ours only.
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, 0);
    let locks: i64 = c2
        .query_one(
            // This backend's locks only: other tests' tenant migrations hold advisory locks
            // in their own databases meanwhile.
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_startup_setting_is_refused_with_the_backends_error() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("badset").await;
    let mut cfg = env.client_config(t.slug.as_str(), "app", "secret");
    cfg.options("-c statement_timeout=banana");
    let Err(err) = cfg.connect(NoTls).await else {
        panic!("an invalid setting must be refused");
    };
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_transaction_never_hands_on_a_dirty_backend() {
    let env = TestEnv::start_with(|c| c.pool.pool_size = 1).await;
    let t = env.tenant_with_user("dirty").await;
    let slug = t.slug.as_str();
    let setup = env.app(slug).await;
    setup
        .batch_execute("CREATE TABLE items (v int)")
        .await
        .unwrap();
    drop(setup);

    let c1 = env.app(slug).await;
    c1.batch_execute("BEGIN; INSERT INTO items VALUES (1)")
        .await
        .unwrap();
    drop(c1);

    let c2 = tokio::time::timeout(Duration::from_secs(10), env.app(slug))
        .await
        .unwrap();
    let n: i64 = query_value(&c2, "SELECT count(*) FROM items").await;
    assert_eq!(
        n, 0,
        "the abandoned transaction must not be visible or committed"
    );
    // The next client is not inside anyone's transaction: COMMIT warns, nothing commits.
    c2.batch_execute("INSERT INTO items VALUES (2)")
        .await
        .unwrap();
    let n: i64 = query_value(&c2, "SELECT count(*) FROM items").await;
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query_and_the_session_stays_usable() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("cancel").await;
    let client = env.app(t.slug.as_str()).await;
    let (client, result) = cancel_a_running_sleep(client, &t.database).await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    let one: i32 = query_value(&client, "SELECT 1").await;
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_fails_its_client_and_the_next_client_gets_a_healthy_one() {
    let env = TestEnv::start_with(|c| c.pool.pool_size = 1).await;
    let t = env.tenant_with_user("term").await;
    let slug = t.slug.as_str();
    let victim = env.app(slug).await;
    let pid: i32 = query_value(&victim, "SELECT pg_backend_pid()").await;
    admin_client("postgres")
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    // The backend's own FATAL (57P01), or a closed connection if it raced the query.
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "unexpected error {err:?}"
    );
    assert!(victim.is_closed() || victim.simple_query("SELECT 1").await.is_err());

    let next = tokio::time::timeout(Duration::from_secs(10), env.app(slug))
        .await
        .unwrap();
    let pid2: i32 = query_value(&next, "SELECT pg_backend_pid()").await;
    assert_ne!(pid, pid2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_a_pool_of_ten() {
    let env = TestEnv::start_with(|c| c.pool.pool_size = 10).await;
    let t = env.tenant_with_user("crowd").await;
    let slug = t.slug.as_str().to_owned();
    let env = std::sync::Arc::new(env);
    let watcher = PeakBackends::start(vec![t.database.clone()], Duration::from_millis(20)).await;
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let env = env.clone();
        let slug = slug.clone();
        tasks.push(tokio::spawn(async move {
            let c = env.connect(&slug, "app", "secret").await?;
            let row = c.query_one("SELECT $1::int + 1", &[&i]).await?;
            let v: i32 = row.get(0);
            assert_eq!(v, i + 1);
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let peak = watcher.stop();
    assert!(peak <= 10, "backend connections peaked at {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries_copy_in_and_copy_out() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("pipe").await;
    let client = env.app(t.slug.as_str()).await;
    client
        .batch_execute("CREATE TABLE nums (n int, label text)")
        .await
        .unwrap();

    // tokio-postgres pipelines concurrent queries: many Parse/Bind/Execute/Sync in flight.
    let stmt = client.prepare("SELECT $1::int * 2").await.unwrap();
    let queries = (0..100i32).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move {
            let v: i32 = client.query_one(stmt, &[&i]).await.unwrap().get(0);
            assert_eq!(v, i * 2);
        }
    });
    futures_util::future::join_all(queries).await;

    // COPY FROM STDIN.
    let sink = client
        .copy_in("COPY nums FROM STDIN WITH (FORMAT csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        writeln!(data, "{i},row {i}").unwrap();
    }
    for chunk in data.as_bytes().chunks(1000) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 5000);

    // COPY TO STDOUT.
    let stream = client
        .copy_out("COPY (SELECT n, label FROM nums ORDER BY n) TO STDOUT WITH (FORMAT csv)")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out, data.as_bytes());

    // A large result crosses the relay in many reads.
    let rows = client
        .query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 2000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000);
}
