//! Transaction pooling: clients hold a backend only while a transaction is open, never see
//! another client's session state or settings, and their named prepared statements follow them
//! from backend to backend.

use crate::common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::TestEnv;
use common::activity::{PeakBackends, cancel_a_running_sleep, terminate_all_and_wait};
use common::query::{first_value, value};
use common::wire::{self, RawClient};
use tenantgate::pool::PoolMode;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

async fn transaction_env(pool_size: u32) -> TestEnv {
    TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = pool_size;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_three_backends_between_transactions() {
    let env = Arc::new(transaction_env(3).await);
    let t = env.tenant_with_user("tx-many").await;
    let slug = t.slug.as_str().to_owned();
    env.app(&slug)
        .await
        .batch_execute("CREATE TABLE counters (client int, n int)")
        .await
        .unwrap();
    let watcher = PeakBackends::start(vec![t.database.clone()], Duration::from_millis(20)).await;
    let mut tasks = Vec::new();
    for client in 0..50i32 {
        let env = env.clone();
        let slug = slug.clone();
        tasks.push(tokio::spawn(async move {
            // All fifty stay connected at once: only transactions take backends.
            let c = env.connect(&slug, "app", "secret").await.unwrap();
            for n in 0..5 {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO counters VALUES ({client}, {n}); COMMIT"
                ))
                .await
                .unwrap();
                let rows = c
                    .simple_query(&format!(
                        "SELECT count(*) FROM counters WHERE client = {client}"
                    ))
                    .await
                    .unwrap();
                assert_eq!(first_value(&rows).expect("a row"), (n + 1).to_string());
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    let peak = watcher.stop();
    assert!(peak <= 3, "backend connections peaked at {peak}");
    let total = value(&clients[0], "SELECT count(*) FROM counters").await;
    assert_eq!(total, "250");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_and_settings_never_reach_another_client() {
    let env = transaction_env(1).await;
    let t = env.tenant_with_user("tx-dirty").await;
    let slug = t.slug.as_str();

    let mut cfg = env.client_config(slug, "app", "secret");
    cfg.application_name("client-a")
        .options("-c statement_timeout=1111");
    let (a, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut cfg = env.client_config(slug, "app", "secret");
    cfg.application_name("client-b");
    let (b, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);

    // Interleave: one backend serves both, each sees its own settings every time.
    for _ in 0..3 {
        let app_a = value(&a, "SHOW application_name").await;
        let app_b = value(&b, "SHOW application_name").await;
        let st_a = value(&a, "SHOW statement_timeout").await;
        let st_b = value(&b, "SHOW statement_timeout").await;
        assert_eq!((app_a.as_str(), app_b.as_str()), ("client-a", "client-b"));
        assert_eq!((st_a.as_str(), st_b.as_str()), ("1111ms", "0"));
    }
    let pid_a = value(&a, "SELECT pg_backend_pid()").await;
    let pid_b = value(&b, "SELECT pg_backend_pid()").await;
    assert_eq!(pid_a, pid_b, "one backend served both");

    // Session state left by A is gone when B gets the backend.
    a.batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    let work_mem = value(&b, "SHOW work_mem").await;
    assert_eq!(work_mem, "4MB");
    let temp = value(
        &b,
        "SELECT count(*) FROM pg_class WHERE relname = 'scratch'",
    )
    .await;
    assert_eq!(temp, "0");

    // A failed transaction stays A's until it rolls back; B waits, then sees a clean backend.
    a.batch_execute("BEGIN").await.unwrap();
    assert!(a.batch_execute("SELECT 1/0").await.is_err());
    let b_task = tokio::spawn(async move {
        let status = b.simple_query("SELECT 'ok'").await;
        (b, status)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !b_task.is_finished(),
        "B must wait while A holds the only backend"
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    let (b, status) = tokio::time::timeout(Duration::from_secs(10), b_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_value(&status.unwrap()).expect("a row"), "ok");

    // A leaves mid-transaction: its backend is closed, B gets a fresh one outside any transaction.
    a.batch_execute("BEGIN; CREATE TABLE half_done (x int)")
        .await
        .unwrap();
    drop(a);
    let in_tx = tokio::time::timeout(
        Duration::from_secs(10),
        b.simple_query("SELECT count(*) FROM pg_class WHERE relname = 'half_done'"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first_value(&in_tx).expect("a row"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::many_single_char_names,
    reason = "k/v/n read as the data they hold"
)]
async fn a_hundred_clients_with_prepared_statements_share_five_backends() {
    let env = Arc::new(transaction_env(5).await);
    let t = env.tenant_with_user("tx-prep").await;
    let slug = t.slug.as_str().to_owned();
    env.app(&slug)
        .await
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let watcher = PeakBackends::start(vec![t.database.clone()], Duration::from_millis(20)).await;
    let mut tasks = Vec::new();
    for client in 0..100i32 {
        let env = env.clone();
        let slug = slug.clone();
        tasks.push(tokio::spawn(async move {
            let c = env.connect(&slug, "app", "secret").await.unwrap();
            // Prepared once, used across many transactions (and so many backends).
            let insert = c.prepare("INSERT INTO kv VALUES ($1, $2)").await.unwrap();
            let select = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
            for round in 0..5i32 {
                let k = client * 100 + round;
                c.execute(&insert, &[&k, &format!("v{k}")]).await.unwrap();
                let v: String = c.query_one(&select, &[&k]).await.unwrap().get(0);
                assert_eq!(v, format!("v{k}"));
                // One-off statements: prepared, used and closed by tokio-postgres.
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM kv WHERE k >= $1 AND k < $1 + 100",
                        &[&(client * 100)],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, i64::from(round + 1));
            }
            // Close and re-prepare under tokio-postgres's next name.
            drop(select);
            let again = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
            let v: String = c
                .query_one(&again, &[&(client * 100)])
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, format!("v{}", client * 100));
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let peak = watcher.stop();
    assert!(peak <= 5, "backend connections peaked at {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_error_in_a_pipeline_leaves_everything_consistent() {
    let env = transaction_env(1).await;
    let t = env.tenant_with_user("tx-prep-err").await;
    let c = env.app(t.slug.as_str()).await;
    let bad = c.prepare("SELECT no_such_column FROM pg_class").await;
    assert_eq!(bad.unwrap_err().code(), Some(&SqlState::UNDEFINED_COLUMN));
    let good = c.prepare("SELECT $1::int * 3").await.unwrap();
    let v: i32 = c.query_one(&good, &[&7]).await.unwrap().get(0);
    assert_eq!(v, 21);
    // Same text as another client's statement: shared on the backend, separate names.
    let other = env.app(t.slug.as_str()).await;
    let theirs = other.prepare("SELECT $1::int * 3").await.unwrap();
    let v: i32 = other.query_one(&theirs, &[&5]).await.unwrap().get(0);
    assert_eq!(v, 15);
    drop(theirs);
    let v: i32 = c.query_one(&good, &[&2]).await.unwrap().get(0);
    assert_eq!(v, 6, "another client's Close must not close ours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_query_in_transaction_mode() {
    let env = transaction_env(2).await;
    let t = env.tenant_with_user("tx-cancel").await;
    let client = env.app(t.slug.as_str()).await;
    let (client, result) = cancel_a_running_sleep(client, &t.database).await;
    assert_eq!(result.unwrap_err().code(), Some(&SqlState::QUERY_CANCELED));
    client.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_extended_and_prepared_over_a_small_pool() {
    let env = transaction_env(5).await;
    let t = env.tenant_with_user("tx-bench").await;
    let uri = env.uri(t.slug.as_str(), "app", "secret");
    let pgbench = common::cluster().bindir().join("pgbench");
    let init = {
        let (pgbench, uri) = (pgbench.clone(), uri.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(pgbench)
                .args(["-i", "-s", "1", "-q", &uri])
                .output()
                .unwrap()
        })
    }
    .await
    .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let watcher = PeakBackends::start(vec![t.database.clone()], Duration::from_millis(20)).await;
    for mode in ["simple", "extended", "prepared"] {
        let (pgbench, uri) = (pgbench.clone(), uri.clone());
        let out = tokio::task::spawn_blocking(move || {
            // -M prepared runs select-only: pgbench prepares each statement with a blocking
            // call from the thread that also drives its other clients, so with TPC-B's
            // explicit transactions it deadlocks behind any transaction pooler whose pool is
            // smaller than its client count (every backend held by an open transaction of a
            // client that thread cannot serve while it waits).
            let script: &[&str] = if mode == "prepared" { &["-S"] } else { &[] };
            Command::new(pgbench)
                .args(script)
                .args(["-c", "50", "-j", "2", "-T", "3", "-M", mode, "-n", &uri])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{stdout}"
        );
    }
    let peak = watcher.stop();
    assert!(peak <= 5, "backend connections peaked at {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_hits_the_next_client_on_the_same_backend() {
    // One backend shared by A and B; cancels for A keep arriving while A's transactions end
    // and B's begin on that same backend.
    let env = transaction_env(1).await;
    let t = env.tenant_with_user("tx-race").await;
    let slug = t.slug.as_str();
    let a = env.app(slug).await;
    let b = env.app(slug).await;
    let token = a.cancel_token();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let canceller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                drop(token.cancel_query(NoTls).await);
                sent += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            sent
        })
    };
    let a_canceled = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let a_loop = {
        let stop = stop.clone();
        let canceled = a_canceled.clone();
        tokio::spawn(async move {
            // Mostly 2 ms queries, so A's transactions end (and B's begin) while cancels for A
            // are on their way. Every fourth is 50 ms, so some cancels surely land inside one
            // of A's queries: a cancel reaches the server only a fork of the postmaster after
            // it was sent, which can outlast a 2 ms query on a loaded machine.
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let sql = if round % 4 == 0 {
                    "SELECT pg_sleep(0.05)"
                } else {
                    "SELECT pg_sleep(0.002)"
                };
                if let Err(e) = a.batch_execute(sql).await {
                    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
                    canceled.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // At least 3 s, and on until the race has really been run (a cancel reached one of A's
    // queries): on a loaded machine that can take longer.
    let started = tokio::time::Instant::now();
    let mut b_queries = 0u32;
    while started.elapsed() < Duration::from_secs(3)
        || (a_canceled.load(Ordering::Relaxed) == 0 && started.elapsed() < Duration::from_secs(30))
    {
        b.batch_execute("SELECT pg_sleep(0.01)")
            .await
            .expect("B's query must never be canceled on A's behalf");
        b_queries += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = canceller.await.unwrap();
    a_loop.await.unwrap();
    let a_canceled = a_canceled.load(Ordering::Relaxed);
    assert!(sent > 10 && b_queries > 5, "sent {sent}, b ran {b_queries}");
    // The race was really exercised: some of A's own queries were canceled.
    assert!(a_canceled > 0, "no cancel reached A ({sent} sent)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_with_several_syncs_in_flight_share_one_backend() {
    let env = Arc::new(transaction_env(1).await);
    let t = env.tenant_with_user("tx-pipe").await;
    let slug = t.slug.as_str().to_owned();
    let mut tasks = Vec::new();
    for client in 0..4i32 {
        let env = env.clone();
        let slug = slug.clone();
        tasks.push(tokio::spawn(async move {
            let c = env.connect(&slug, "app", "secret").await.unwrap();
            // Per-client text, so the backend holds several clients' statements at once.
            let double = c
                .prepare(&format!("SELECT $1::int * 2 + {client} - {client}"))
                .await
                .unwrap();
            let square = c.prepare("SELECT $1::int * $1::int").await.unwrap();
            for round in 0..10i32 {
                // tokio-postgres pipelines these: Bind/Execute/Sync × 40 in flight, on named
                // statements that may not be prepared on the backend this round gets.
                let queries = (0..20i32).flat_map(|i| {
                    let n = client * 1000 + round * 20 + i;
                    let (c, double, square) = (&c, &double, &square);
                    [
                        futures_util::future::Either::Left(async move {
                            let v: i32 = c.query_one(double, &[&n]).await.unwrap().get(0);
                            assert_eq!(v, n * 2);
                        }),
                        futures_util::future::Either::Right(async move {
                            let v: i32 = c.query_one(square, &[&(n % 1000)]).await.unwrap().get(0);
                            assert_eq!(v, (n % 1000) * (n % 1000));
                        }),
                    ]
                });
                futures_util::future::join_all(queries).await;
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("pipelines finish")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_larger_than_the_relay_buffer_still_works() {
    let env = transaction_env(2).await;
    let t = env.tenant_with_user("tx-big").await;
    let c = env.app(t.slug.as_str()).await;
    let other = env.app(t.slug.as_str()).await;
    // A 40 KB query text (an ORM's long IN list), prepared and used several times while
    // another client takes turns on the pool.
    let list: Vec<String> = (0..6000).map(|i| i.to_string()).collect();
    let sql = format!(
        "SELECT count(*) FROM generate_series(1, 10000) g WHERE g IN ({}) AND g > $1",
        list.join(",")
    );
    assert!(sql.len() > 20_000);
    let stmt = c.prepare(&sql).await.unwrap();
    for round in 0..3i32 {
        let n: i64 = c.query_one(&stmt, &[&round]).await.unwrap().get(0);
        assert_eq!(n, 5999 - i64::from(round));
        other.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_of_a_protocol_statement_is_answered_and_frees_the_name() {
    use postgres_protocol::message::frontend;
    let env = transaction_env(1).await;
    let t = env.tenant_with_user("tx-dealloc").await;
    let other = env.app(t.slug.as_str()).await;
    let mut c = RawClient::connect(env.port(), t.slug.as_str(), "app", "secret").await;
    let tags = |messages: &[(u8, Vec<u8>)]| messages.iter().map(|m| m.0).collect::<Vec<u8>>();
    let mut out = bytes::BytesMut::new();

    // Parse "_pg3_0" (psycopg's first name) and run it.
    frontend::parse("_pg3_0", "SELECT 41 + 1", [], &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await.unwrap();
    assert_eq!(tags(&c.until_ready().await.unwrap()), b"1Z");
    out.clear();
    frontend::bind(
        "",
        "_pg3_0",
        [],
        [],
        |(), _| Ok(postgres_protocol::IsNull::No),
        [],
        &mut out,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await.unwrap();
    assert_eq!(tags(&c.until_ready().await.unwrap()), b"2DCZ");

    // An older libpq frees it with a DEALLOCATE query: answered here, as PostgreSQL would.
    out.clear();
    frontend::query("DEALLOCATE _pg3_0", &mut out).unwrap();
    c.send(&out).await.unwrap();
    let answer = c.until_ready().await.unwrap();
    assert_eq!(tags(&answer), b"CZ");
    assert_eq!(answer[0].1, b"DEALLOCATE\0");
    assert_eq!(answer[1].1, b"I");
    // The backend went back to the pool (of 1): another client gets it.
    tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1"))
        .await
        .expect("the backend was released")
        .unwrap();

    // The name is free: preparing it again with another text works.
    out.clear();
    frontend::parse("_pg3_0", "SELECT 2", [], &mut out).unwrap();
    frontend::sync(&mut out);
    c.send(&out).await.unwrap();
    assert_eq!(tags(&c.until_ready().await.unwrap()), b"1Z");

    // Inside a transaction, the made-up ReadyForQuery says so; DEALLOCATE ALL too.
    out.clear();
    frontend::query("BEGIN", &mut out).unwrap();
    c.send(&out).await.unwrap();
    c.until_ready().await.unwrap();
    out.clear();
    frontend::query("DEALLOCATE ALL", &mut out).unwrap();
    c.send(&out).await.unwrap();
    let answer = c.until_ready().await.unwrap();
    assert_eq!(tags(&answer), b"CZ");
    assert_eq!(answer[1].1, b"T");
    out.clear();
    frontend::query("COMMIT", &mut out).unwrap();
    c.send(&out).await.unwrap();
    c.until_ready().await.unwrap();

    // A name the client never prepared goes to the backend, which says so.
    out.clear();
    frontend::query("DEALLOCATE nope", &mut out).unwrap();
    c.send(&out).await.unwrap();
    let answer = c.until_ready().await.unwrap();
    assert_eq!(tags(&answer), b"EZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_statement_cache_closes_the_least_recently_used_on_the_backend() {
    let env = TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 1;
        c.pool.prepared_statement_cache_size = 3;
    })
    .await;
    let t = env.tenant_with_user("tx-lru").await;
    let c = env.app(t.slug.as_str()).await;
    // Ten statements kept by the client, used round after round over one backend whose
    // cache holds three: every result is right, and the backend never keeps more than three
    // (plus the ones of the batch in flight).
    let mut statements = Vec::new();
    for i in 0..10i32 {
        statements.push(c.prepare(&format!("SELECT $1::int + {i}")).await.unwrap());
    }
    for round in 0..3i32 {
        for (i, statement) in statements.iter().enumerate() {
            let i = i32::try_from(i).unwrap();
            let v: i32 = c.query_one(statement, &[&round]).await.unwrap().get(0);
            assert_eq!(v, round + i);
        }
        let kept: i64 = c
            .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap()
            .get(0);
        // Three cached, plus this count query's own unnamed statement is not listed.
        assert!(kept <= 4, "the backend keeps {kept} prepared statements");
    }
}

/// Found by the statement_rewriter fuzz target: a complete Parse whose statement name has no
/// terminating NUL was held back waiting for bytes that would never come, so the client hung.
/// Now it goes to the backend, whose protocol error the client gets at once; other clients of
/// the tenant carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_parse_gets_an_error_not_a_hang() {
    let env = transaction_env(1).await;
    let t = env.tenant_with_user("tx-malformed").await;
    let mut c = RawClient::connect(env.port(), t.slug.as_str(), "app", "secret").await;
    // 'P', length 4 + 3, "abc": no NUL anywhere; then Sync.
    c.send(b"P\0\0\0\x07abcS\0\0\0\x04").await.unwrap();
    let (tag, body) = tokio::time::timeout(Duration::from_secs(10), c.read())
        .await
        .expect("an answer, not a hang")
        .unwrap();
    assert_eq!(
        wire::error_code(tag, &body),
        Some(SqlState::PROTOCOL_VIOLATION),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let other = env.app(t.slug.as_str()).await;
    let n: i32 = tokio::time::timeout(Duration::from_secs(10), other.query_one("SELECT 7", &[]))
        .await
        .expect("the pool serves others")
        .unwrap()
        .get(0);
    assert_eq!(n, 7);
}

/// Issue 11, defect 6: a transaction-pooling client keeps running for days; when the registry
/// moves its tenant to another database, its next transactions must go there (not to the
/// database of its login), and a client that has not seen the change yet must not flip the
/// tenant's pool back to the old target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_client_follows_a_moved_database_and_the_pool_never_flips_back() {
    let env = transaction_env(2).await;
    let t = env.tenant_with_user("tx-moving").await;
    let other = env.tenant_with_user("tx-target").await;
    let slug = t.slug.as_str();
    let long_lived = env.app(slug).await;
    assert_eq!(
        value(&long_lived, "SELECT current_database()").await,
        t.database
    );

    env.move_tenant(&t.slug, &other).await;
    let moved = common::eventually(Duration::from_secs(5), || async {
        value(&long_lived, "SELECT current_database()").await == other.database
    })
    .await;
    assert!(
        moved,
        "the long-lived client still reaches the old database"
    );

    // A new client and the long-lived one, interleaved: every transaction of both lands on
    // the new database.
    let fresh = env.app(slug).await;
    for _ in 0..20 {
        assert_eq!(
            value(&long_lived, "SELECT current_database()").await,
            other.database
        );
        assert_eq!(
            value(&fresh, "SELECT current_database()").await,
            other.database
        );
    }
}

/// Backends a pool opens while all its clients use the same settings carry them in their
/// startup packet (so the reset between clients costs no SET). A client with other settings
/// must never run on such a backend with the first clients' values: it gets another backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_opened_with_shared_settings_never_serve_a_client_with_others() {
    let env = transaction_env(1).await;
    let t = env.tenant_with_user("tx-startup").await;
    let slug = t.slug.as_str();
    let mut cfg = env.client_config(slug, "app", "secret");
    cfg.application_name("uniform")
        .options("-c statement_timeout=2222");
    let (a, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    a.simple_query("SELECT 1").await.unwrap();
    // Replace the pool's only backend: the new one is opened with A's settings.
    terminate_all_and_wait(&t.database).await;
    for _ in 0..3 {
        let st = value(&a, "SHOW statement_timeout").await;
        assert_eq!(st, "2222ms");
    }
    // A client without settings: server defaults, whatever the backend was opened with.
    let plain = env.app(slug).await;
    for _ in 0..3 {
        let st = value(&plain, "SHOW statement_timeout").await;
        let app = value(&plain, "SHOW application_name").await;
        assert_eq!((st.as_str(), app.as_str()), ("0", ""));
        let st = value(&a, "SHOW statement_timeout").await;
        let app = value(&a, "SHOW application_name").await;
        assert_eq!((st.as_str(), app.as_str()), ("2222ms", "uniform"));
    }
}

/// COPY FROM STDIN through the extended protocol (tokio-postgres' `copy_in`, libpq's
/// `PQexecParams`): the client sends a Sync right after Execute and another after CopyDone,
/// and the server ignores Syncs while it reads COPY data, so only one ReadyForQuery comes
/// back. The backend must still go back to the pool when the COPY is over, for this client's
/// next transaction and for anyone else's (a pool of one backend shows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_copy_gives_its_backend_back() {
    use futures_util::SinkExt;
    let env = TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 1;
        c.pool.checkout_timeout_ms = 3_000;
    })
    .await;
    let t = env.tenant_with_user("tx-copy").await;
    let slug = t.slug.as_str();
    let (a, connection) = env
        .client_config(slug, "app", "secret")
        .connect(NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    a.batch_execute("CREATE TABLE IF NOT EXISTS copied (x int)")
        .await
        .unwrap();
    for round in 0..3 {
        assert!(
            !connection.is_finished(),
            "round {round}: A's connection ended"
        );
        let sink = a
            .copy_in::<_, bytes::Bytes>("COPY copied FROM STDIN")
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
            .await
            .unwrap();
        let rows = sink.as_mut().finish().await.unwrap();
        assert_eq!(rows, 3, "round {round}");
        let b = env.app(slug).await;
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            b.simple_query("SELECT count(*) FROM copied"),
        )
        .await
        .expect("B got an answer")
        .unwrap_or_else(|e| panic!("round {round}: B got no backend: {e}"));
        assert_eq!(
            first_value(&seen).expect("a row"),
            (3 * (round + 1)).to_string()
        );
    }
    // Bad data (the server ends the COPY with an error) and a COPY the client abandons
    // (CopyFail): the backend comes back all the same.
    let sink = a
        .copy_in::<_, bytes::Bytes>("COPY copied FROM STDIN")
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::from_static(b"not a number\n"))
        .await
        .unwrap();
    let failed = sink.as_mut().finish().await.unwrap_err();
    assert_eq!(
        failed.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{failed}"
    );
    let sink = a
        .copy_in::<_, bytes::Bytes>("COPY copied FROM STDIN")
        .await
        .unwrap();
    drop(sink);
    let b = env.app(slug).await;
    for (who, c) in [("A", &a), ("B", &b)] {
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            c.simple_query("SELECT count(*) FROM copied"),
        )
        .await
        .expect("an answer")
        .unwrap_or_else(|e| panic!("{who} got no backend after failed COPYs: {e}"));
        assert_eq!(first_value(&seen).expect("a row"), "9", "{who}");
    }
}

/// README: a session-level SET is "gone by the client's next transaction". Under load a
/// released backend is handed on without a reset (the next client's first messages carry it);
/// when the next taker is the client that left the SET, it must be reset all the same. Three
/// clients keep a pool of two busy while one sets work_mem and reads it back, many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_set_is_gone_by_its_next_transaction_under_load() {
    let env = transaction_env(2).await;
    let t = env.tenant_with_user("tx-own-set").await;
    let slug = t.slug.as_str();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut noise = Vec::new();
    for _ in 0..3 {
        let c = env.app(slug).await;
        let stop = std::sync::Arc::clone(&stop);
        noise.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.simple_query("SELECT pg_sleep(0.001)").await.unwrap();
            }
        }));
    }
    let a = env.app(slug).await;
    let default = value(&a, "SHOW work_mem").await;
    let mut kept = 0;
    for _ in 0..150 {
        a.batch_execute("SET work_mem = '77kB'").await.unwrap();
        if value(&a, "SHOW work_mem").await != default {
            kept += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for n in noise {
        n.await.unwrap();
    }
    assert_eq!(
        kept, 0,
        "the client's own SET survived into its next transaction {kept} times of 150"
    );
}
