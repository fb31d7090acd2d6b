//! The pool core's invariants under hostile clients (issue 11, DESIGN §4a): a backend handed
//! to a client is clean and at a message boundary, whatever the client before it did. Each
//! test plays the client that tries hardest to break one promise, with a pool of one backend
//! so that the next client surely gets the same backend.

use crate::common;

use std::fmt::Write as _;
use std::time::Duration;

use common::activity::terminate_all_and_wait;
use common::query::value;
use common::wire::{self, RawClient, frame, query};
use common::{TestEnv, until_waiting};
use tenantgate::pool::PoolMode;
use tokio_postgres::error::SqlState;

async fn one_backend_env() -> TestEnv {
    TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 1;
        c.pool.checkout_timeout_ms = 5_000;
    })
    .await
}

/// Defect 2: a Close answered by the proxy whose body (20 kB) is larger than the relay's
/// buffer, sent inside an open transaction. The relay once consumed bytes that had not
/// arrived and panicked, and the lease went back to the pool inside the transaction: the
/// next client's autocommit query ran in the attacker's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_larger_than_the_relay_buffer_never_leaves_a_transaction_to_the_next_client() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-close").await;
    let slug = t.slug.as_str();
    let mut attacker = RawClient::connect(env.port(), slug, "app", "secret").await;
    attacker.send(&query("BEGIN")).await.unwrap();
    let answers = attacker.until_ready().await.unwrap();
    assert_eq!(answers.last().unwrap().1, b"T");
    let mut close = vec![b'S'];
    close.extend_from_slice(b"s1\0");
    close.resize(20_000, b'x');
    let mut bytes = frame(b'C', &close);
    bytes.extend(frame(b'S', b""));
    attacker.send(&bytes).await.unwrap();
    let answers = tokio::time::timeout(Duration::from_secs(5), attacker.until_ready())
        .await
        .expect("the proxy answers a large Close")
        .unwrap();
    assert_eq!(answers.first().unwrap().0, b'3', "CloseComplete first");
    assert_eq!(answers.last().unwrap().1, b"T", "still in the transaction");
    drop(attacker);

    let next = env.app(slug).await;
    // In a transaction of its own, a statement starts when its transaction does.
    assert_eq!(
        value(&next, "SELECT now() = statement_timestamp()").await,
        "t"
    );
}

/// Defect 3: a client sends a query and the first 100 bytes of a 5,000-byte CopyData, waits
/// for ReadyForQuery and hangs up. Returned to the pool, the backend would swallow the next
/// client's query as the rest of that message and never answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_message_never_hands_its_backend_on() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-half").await;
    let slug = t.slug.as_str();
    let mut attacker = RawClient::connect(env.port(), slug, "app", "secret").await;
    let mut bytes = query("SELECT 1");
    let copy_data = frame(b'd', &[b'z'; 5_000]);
    bytes.extend_from_slice(&copy_data[..100]);
    attacker.send(&bytes).await.unwrap();
    let answers = attacker.until_ready().await.unwrap();
    assert_eq!(answers.last().unwrap().0, b'Z');
    drop(attacker);

    let next = env.app(slug).await;
    assert_eq!(value(&next, "SELECT 41 + 1").await, "42");
    assert_eq!(
        value(&next, "SELECT 'still in step'").await,
        "still in step"
    );
}

/// Defect 4: session state left by paths no CommandComplete tag shows. Each is run by one
/// client and looked for by the next, on the same backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_state_reaches_the_next_client_by_any_path() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-state").await;
    let slug = t.slug.as_str();
    let setup = env.app(slug).await;
    setup
        .batch_execute(
            "CREATE FUNCTION make_temp() RETURNS void LANGUAGE plpgsql AS \
             $$ BEGIN CREATE TEMP TABLE made_in_function (x int); END $$; \
             CREATE FUNCTION set_quietly() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM set_config('work_mem', '9MB', false); RETURN NEW; END $$; \
             CREATE TABLE touched (x int); \
             CREATE TRIGGER quietly BEFORE INSERT ON touched FOR EACH ROW EXECUTE FUNCTION set_quietly()",
        )
        .await
        .unwrap();
    drop(setup);
    let leaks: &[(&str, &str, &str)] = &[
        (
            "SELECT set_config('search_path', 'leaky,public', false)",
            "SHOW search_path",
            "\"$user\", public",
        ),
        (
            "DO $$ BEGIN PERFORM set_config('application_name', 'leaky', false); END $$",
            "SHOW application_name",
            "",
        ),
        (
            "CREATE TEMP TABLE t AS SELECT 1",
            "SELECT count(*) FROM pg_class WHERE relpersistence = 't'",
            "0",
        ),
        (
            "SELECT 1 AS x INTO TEMP u",
            "SELECT count(*) FROM pg_class WHERE relpersistence = 't'",
            "0",
        ),
        (
            "SELECT make_temp()",
            "SELECT count(*) FROM pg_class WHERE relpersistence = 't'",
            "0",
        ),
        (
            "SELECT set_config('role', current_user, false)",
            "SELECT current_setting('role')",
            "none",
        ),
        ("INSERT INTO touched VALUES (1)", "SHOW work_mem", "4MB"),
        (
            "DO $$ BEGIN EXECUTE 'LISTEN leaky'; END $$",
            "SELECT count(*) FROM pg_listening_channels()",
            "0",
        ),
        (
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "0",
        ),
        (
            "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
            "SELECT count(*) FROM pg_cursors",
            "0",
        ),
        (
            "PREPARE mine AS SELECT 1",
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'mine'",
            "0",
        ),
    ];
    for (leave, look, clean) in leaks {
        let first = env.app(slug).await;
        first.batch_execute(leave).await.unwrap();
        let pid = value(&first, "SELECT pg_backend_pid()").await;
        let second = env.app(slug).await;
        assert_eq!(value(&second, "SELECT pg_backend_pid()").await, pid);
        assert_eq!(&value(&second, look).await, clean, "after {leave}");
    }
}

/// Defect 5: a client that runs `SELECT 1; DEALLOCATE ALL` drops the shared `tg_` statements
/// from its backend; later clients (and itself) must not get 26000 for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_in_any_form_never_breaks_the_shared_statements() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-dealloc").await;
    let slug = t.slug.as_str();
    let a = env.app(slug).await;
    let b = env.app(slug).await;
    let sa = a.prepare("SELECT $1::int4 + 1").await.unwrap();
    let sb = b.prepare("SELECT $1::int4 + 1").await.unwrap();
    assert_eq!(
        a.query_one(&sa, &[&1i32]).await.unwrap().get::<_, i32>(0),
        2
    );
    assert_eq!(
        b.query_one(&sb, &[&2i32]).await.unwrap().get::<_, i32>(0),
        3
    );
    for dealloc in [
        "SELECT 1; DEALLOCATE ALL",
        "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$",
        "DISCARD ALL",
    ] {
        let c = env.app(slug).await;
        let sc = c.prepare("SELECT $1::int4 + 1").await.unwrap();
        c.simple_query(dealloc).await.unwrap();
        // The same client, straight after, on the same backend.
        assert_eq!(
            c.query_one(&sc, &[&3i32]).await.unwrap().get::<_, i32>(0),
            4
        );
        c.simple_query(dealloc).await.unwrap();
        for (client, statement) in [(&a, &sa), (&b, &sb)] {
            let row = client.query_one(statement, &[&5i32]).await;
            assert_eq!(row.unwrap().get::<_, i32>(0), 6, "after {dealloc}");
        }
    }
}

/// Defect 5: a shared statement prepared before a DDL. A client that prepares the same text
/// after the change (the client that prepared it first, or another) must get what a direct
/// connection gets, not the old statement's `cached plan must not change result type`
/// (0A000) or `cache lookup failed` (XX000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_after_a_ddl_sees_the_new_definition() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-ddl").await;
    let slug = t.slug.as_str();
    // Schema changes come from a direct connection, as a migration would.
    let direct = common::admin_client(&t.database).await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE shifting (x int); INSERT INTO shifting VALUES (1); \
             ALTER TABLE shifting OWNER TO {}",
            t.backend_role
        ))
        .await
        .unwrap();
    let a = env.app(slug).await;
    let old = a.prepare("SELECT * FROM shifting").await.unwrap();
    assert_eq!(a.query(&old, &[]).await.unwrap().len(), 1);
    direct
        .batch_execute("ALTER TABLE shifting ADD COLUMN y int DEFAULT 7")
        .await
        .unwrap();
    // The same client prepares the text again: on its own backend, as a direct client.
    let again = a.prepare("SELECT * FROM shifting").await.unwrap();
    let rows = a.query(&again, &[]).await.unwrap();
    assert_eq!((rows[0].len(), rows[0].get::<_, i32>(1)), (2, 7));
    // Another client, after another change.
    direct
        .batch_execute("ALTER TABLE shifting ADD COLUMN z int DEFAULT 8")
        .await
        .unwrap();
    let c = env.app(slug).await;
    let fresh = c.prepare("SELECT * FROM shifting").await.unwrap();
    let rows = c.query(&fresh, &[]).await.unwrap();
    assert_eq!((rows[0].len(), rows[0].get::<_, i32>(2)), (3, 8));
    // The statement prepared before the changes: on a direct connection it gets 0A000; here
    // the shared statement was prepared again for the others, so it may get the new shape
    // (its driver refuses the extra columns). An error at most, never a hang.
    let stale = tokio::time::timeout(Duration::from_secs(10), a.query(&old, &[])).await;
    assert!(stale.is_ok(), "a stale statement hangs");
}

/// A backend opened with its clients' common settings needs no setup for the next client
/// with those settings; it must still be reset when it passes from one such client to
/// another (found by review: the owner was recorded only when something was sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_same_settings_still_never_share_session_state() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-same").await;
    let slug = t.slug.as_str();
    let connect = || async {
        let mut cfg = env.client_config(slug, "app", "secret");
        cfg.application_name("same-app");
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    };
    let first = connect().await;
    value(&first, "SELECT 1").await;
    // The pool's only backend is replaced by one opened with the clients' settings.
    terminate_all_and_wait(&t.database).await;
    let a = connect().await;
    let b = connect().await;
    for round in 0..3 {
        a.batch_execute("SET work_mem = '9MB'; CREATE TEMP TABLE IF NOT EXISTS mine (x int)")
            .await
            .unwrap();
        assert_eq!(value(&b, "SHOW work_mem").await, "4MB", "round {round}");
        assert_eq!(
            value(&b, "SELECT count(*) FROM pg_class WHERE relname = 'mine'").await,
            "0",
            "round {round}"
        );
        assert_eq!(value(&b, "SHOW application_name").await, "same-app");
    }
}

/// A reset that fails must not let the next client run in the last one's session: the last
/// client leaves a 1 ms statement_timeout and enough temporary tables that DISCARD ALL takes
/// longer (found by review, when the reset went out in the same write as the next query).
/// The reset goes with B's first query, or earlier from the pool's sweeper: B either gets a
/// clean session or, once, 08006 for a query that did not run (and a new connection is clean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_that_fails_never_lets_the_next_client_into_the_last_session() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-timeout").await;
    let slug = t.slug.as_str();
    let a = env.app(slug).await;
    let mut sql = String::new();
    for i in 0..300 {
        write!(sql, "CREATE TEMP TABLE leak{i} (x int);").unwrap();
    }
    sql.push_str("SET search_path = leaky, public; SET statement_timeout = '1ms'");
    a.batch_execute(&sql).await.unwrap();
    let mut b = env.app(slug).await;
    match b.simple_query("SHOW search_path").await {
        Ok(rows) => {
            let shown = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            });
            assert_eq!(shown.as_deref(), Some("\"$user\", public"));
        }
        Err(e) => {
            let db = e.as_db_error().expect("an error from the proxy");
            assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{db:?}");
            b = env.app(slug).await;
        }
    }
    for _ in 0..3 {
        assert_eq!(value(&b, "SHOW search_path").await, "\"$user\", public");
        assert_eq!(value(&b, "SHOW statement_timeout").await, "0");
        // Its own temporary tables: a closed backend's may linger in pg_class a moment.
        assert_eq!(
            value(
                &b,
                "SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
            )
            .await,
            "0"
        );
    }
}

/// A backend given straight to a client that waited for it is reset by that client's own
/// first messages (the reset goes in the same write): every kind of state A leaves is gone
/// for B, whether B speaks the simple or the extended protocol, and A's session lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_gets_the_backend_reset_by_its_own_first_messages() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-ahead").await;
    let slug = t.slug.to_string();
    let admin = env.admin().await;
    let check = "SELECT current_setting('search_path') || '|' || \
                 current_setting('application_name') || '|' || \
                 (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) || '|' || \
                 (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                  AND pid = pg_backend_pid()) || '|' || \
                 (SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE 'tg\\_%')";
    let clean = value(&env.app(&slug).await, check).await;
    assert!(clean.starts_with("\"$user\", public|"), "{clean}");
    for (round, extended) in [(0, false), (1, true), (2, false), (3, true)] {
        let a = env.app(&slug).await;
        a.batch_execute(
            "BEGIN; SET search_path = leaky, public; \
             SELECT set_config('application_name', 'leaky', false); \
             CREATE TEMP TABLE mine (x int); SELECT pg_advisory_lock(42); \
             PREPARE sneaky AS SELECT 1",
        )
        .await
        .unwrap();
        let b = env.app(&slug).await;
        let waiting = tokio::spawn(async move {
            let seen = if extended {
                let row = b.query_one(check, &[]).await.unwrap();
                row.get::<_, String>(0)
            } else {
                value(&b, check).await
            };
            (b, seen)
        });
        until_waiting(&admin, &slug, 1).await;
        a.batch_execute("COMMIT").await.unwrap();
        let (b, seen) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("B got the backend")
            .unwrap();
        assert_eq!(seen, clean, "round {round}: B ran in A's session");
        drop(b);
        drop(a);
    }
    let direct = common::admin_client(&t.database).await;
    assert_eq!(
        value(&direct, "SELECT pg_try_advisory_lock(42)::text").await,
        "true",
        "A's session lock is still held"
    );
}

/// The reset that goes with a waiting client's first messages fails (A left a 1 ms
/// statement_timeout and enough temporary tables that DISCARD ALL takes longer): the server
/// skips B's messages, so B's statement never runs in A's session. B is told and
/// disconnected; whatever B's statement recorded was recorded in a clean session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reset_ahead_never_runs_the_waiting_clients_statement() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-ahead-fail").await;
    let slug = t.slug.to_string();
    let admin = env.admin().await;
    let direct = common::admin_client(&t.database).await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE public.seen (settings text); GRANT ALL ON public.seen TO {}",
            t.backend_role
        ))
        .await
        .unwrap();
    let mut sql = String::from("BEGIN;");
    for i in 0..300 {
        write!(sql, "CREATE TEMP TABLE leak{i} (x int);").unwrap();
    }
    sql.push_str("SET search_path = leaky, public; SET statement_timeout = '1ms'");
    let mut failed = 0;
    for round in 0..3 {
        let a = env.app(&slug).await;
        a.batch_execute(&sql).await.unwrap();
        let b = env.app(&slug).await;
        let waiting = tokio::spawn(async move {
            b.simple_query(
                "INSERT INTO public.seen SELECT current_setting('statement_timeout') || '|' || \
                 current_setting('search_path')",
            )
            .await
        });
        until_waiting(&admin, &slug, 1).await;
        a.batch_execute("COMMIT").await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("B got an answer")
            .unwrap();
        if let Err(e) = answer {
            let db = e.as_db_error().expect("an error from the proxy");
            assert_eq!(
                db.code(),
                &SqlState::CONNECTION_FAILURE,
                "round {round}: {db:?}"
            );
            failed += 1;
        }
        drop(a);
    }
    let rows = direct
        .query("SELECT settings FROM public.seen", &[])
        .await
        .unwrap();
    for row in &rows {
        assert_eq!(row.get::<_, String>(0), "0|\"$user\", public");
    }
    assert_eq!(
        rows.len() + failed,
        3,
        "every round either ran clean or failed"
    );
    // The next client is fine.
    let c = env.app(&slug).await;
    assert_eq!(value(&c, "SHOW statement_timeout").await, "0");
}

/// Like the test before, with a client that pipelines two Syncs in its first write: when the
/// reset fails the server skips up to the first Sync only, so the second batch must not have
/// gone out behind the reset (it waits in the proxy until the reset succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reset_ahead_runs_nothing_of_a_pipelined_second_batch() {
    use postgres_protocol::message::frontend;
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-ahead-pipe").await;
    let slug = t.slug.to_string();
    let admin = env.admin().await;
    let direct = common::admin_client(&t.database).await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE public.seen (batch text); GRANT ALL ON public.seen TO {}",
            t.backend_role
        ))
        .await
        .unwrap();
    let mut slow = String::from("BEGIN;");
    for i in 0..300 {
        write!(slow, "CREATE TEMP TABLE leak{i} (x int);").unwrap();
    }
    slow.push_str("SET statement_timeout = '1ms'");
    let mut batches = bytes::BytesMut::new();
    for batch in ["one", "two"] {
        let sql = format!("INSERT INTO public.seen VALUES ('{batch}')");
        frontend::parse("", &sql, std::iter::empty(), &mut batches).unwrap();
        frontend::bind(
            "",
            "",
            std::iter::empty(),
            std::iter::empty::<()>(),
            |(), _| Ok(postgres_protocol::IsNull::No),
            std::iter::empty(),
            &mut batches,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::execute("", 0, &mut batches).unwrap();
        frontend::sync(&mut batches);
    }
    let mut failed = 0;
    for round in 0..3 {
        let mut a = RawClient::connect(env.port(), &slug, "app", "secret").await;
        a.send(&query(&slow)).await.unwrap();
        assert_eq!(a.until_ready().await.unwrap().last().unwrap().1, b"T");
        let mut b = RawClient::connect(env.port(), &slug, "app", "secret").await;
        b.send(&batches).await.unwrap();
        until_waiting(&admin, &slug, 1).await;
        a.send(&query("COMMIT")).await.unwrap();
        a.until_ready().await.unwrap();
        let (tag, body) = tokio::time::timeout(Duration::from_secs(10), b.read())
            .await
            .expect("B got an answer")
            .unwrap();
        if tag == b'E' {
            // FATAL, then the proxy closes B's connection.
            assert_eq!(
                wire::error_code(tag, &body),
                Some(SqlState::CONNECTION_FAILURE),
                "round {round}: {}",
                String::from_utf8_lossy(&body)
            );
            failed += 1;
            continue;
        }
        for _ in 0..2 {
            let answers = tokio::time::timeout(Duration::from_secs(10), b.until_ready())
                .await
                .expect("B's batches answered")
                .unwrap();
            assert!(answers.iter().all(|(tag, _)| *tag != b'E'), "round {round}");
        }
    }
    let rows = direct
        .query("SELECT batch FROM public.seen", &[])
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        2 * (3 - failed),
        "only rounds whose reset succeeded inserted, both batches"
    );
}

/// A waiting client whose first message is answered by the proxy itself (a `DEALLOCATE ALL`,
/// as psycopg sends) asks the backend for nothing but the reset: the backend must not go to
/// the next client before the reset's answers are in, or they reach that client as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_ahead_answered_after_a_proxy_answered_message_never_reaches_the_next_client() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-ahead-dealloc").await;
    let slug = t.slug.to_string();
    let admin = env.admin().await;
    for round in 0..3 {
        let a = env.app(&slug).await;
        a.batch_execute("BEGIN; SET search_path = leaky, public")
            .await
            .unwrap();
        let b = env.app(&slug).await;
        let c = env.app(&slug).await;
        let b_task = tokio::spawn(async move { b.batch_execute("DEALLOCATE ALL").await });
        until_waiting(&admin, &slug, 1).await;
        let c_task = tokio::spawn(async move {
            let seen = value(&c, "SELECT 42::text || current_setting('search_path')").await;
            (c, seen)
        });
        until_waiting(&admin, &slug, 2).await;
        a.batch_execute("COMMIT").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), b_task)
            .await
            .expect("B answered")
            .unwrap()
            .unwrap();
        let (_c, seen) = tokio::time::timeout(Duration::from_secs(10), c_task)
            .await
            .expect("C answered")
            .unwrap();
        assert_eq!(seen, "42\"$user\", public", "round {round}");
    }
}

/// A client that sets a reported parameter to the value the last client left on the backend
/// is told of it, as a direct connection would tell it (libpq's escaping follows
/// `standard_conforming_strings` as reported): the server reports only changes from what it
/// last reported, so a backend that reported anything is reset with a round trip, whose
/// reports tenantgate absorbs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_set_to_the_last_clients_value_is_still_reported() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-ahead-report").await;
    let slug = t.slug.to_string();
    let admin = env.admin().await;
    let reported = |answers: &[(u8, Vec<u8>)]| {
        answers
            .iter()
            .any(|(tag, body)| *tag == b'S' && body.as_slice() == b"application_name\0shared\0")
    };
    for round in 0..3 {
        let mut a = RawClient::connect(env.port(), &slug, "app", "secret").await;
        a.send(&query("BEGIN; SET application_name = 'shared'"))
            .await
            .unwrap();
        let answers = a.until_ready().await.unwrap();
        assert!(reported(&answers), "round {round}: A is told");
        let mut b = RawClient::connect(env.port(), &slug, "app", "secret").await;
        b.send(&query("SET application_name = 'shared'"))
            .await
            .unwrap();
        until_waiting(&admin, &slug, 1).await;
        a.send(&query("COMMIT")).await.unwrap();
        a.until_ready().await.unwrap();
        let answers = tokio::time::timeout(Duration::from_secs(10), b.until_ready())
            .await
            .expect("B answered")
            .unwrap();
        assert!(
            reported(&answers),
            "round {round}: B is not told application_name changed: {answers:?}"
        );
    }
}

/// Promise attacked: "a backend nobody takes is reset by its pool's sweeper within about
/// 100 ms" (release sends no reset; the next client's first messages carry it). A client
/// takes a session advisory lock and makes a temp table in transaction pooling, then stays
/// connected and silent, with no other client of its tenant: its lock must be free for
/// anyone soon after its transaction, the sweep must not open a second backend, must not
/// touch a backend inside a transaction, and the client's own next transaction starts clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_nobody_takes_is_reset_soon_after_its_client_let_it_go() {
    let env = TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 2;
        c.pool.checkout_timeout_ms = 5_000;
    })
    .await;
    let t = env.tenant_with_user("int-sweep").await;
    let slug = t.slug.to_string();
    let a = env.app(&slug).await;
    let check = "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) \
                 || '|' || (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid()) || '|' || current_setting('work_mem')";
    let clean = value(&a, check).await;
    assert!(clean.starts_with("0|0|"), "{clean}");
    let direct = common::admin_client(&t.database).await;
    for round in 0..3 {
        a.batch_execute(
            "SELECT pg_advisory_lock(4242); CREATE TEMP TABLE mine (x int); SET work_mem = '9MB'",
        )
        .await
        .unwrap();
        let freed = common::eventually(Duration::from_secs(3), || async {
            let got = value(&direct, "SELECT pg_try_advisory_lock(4242)::text").await;
            if got == "true" {
                direct
                    .batch_execute("SELECT pg_advisory_unlock(4242)")
                    .await
                    .unwrap();
            }
            got == "true"
        })
        .await;
        assert!(
            freed,
            "round {round}: A's session lock still held 3 s after its transaction"
        );
        let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                      AND backend_type = 'client backend' AND pid <> pg_backend_pid()";
        assert_eq!(
            value(&direct, others).await,
            "1",
            "round {round}: the sweep opened a backend"
        );
        assert_eq!(
            value(&a, check).await,
            clean,
            "round {round}: A's next transaction"
        );
    }
    // A backend inside a transaction is never swept: the transaction keeps its state across
    // several sweeps.
    a.batch_execute("BEGIN; SET LOCAL work_mem = '11MB'; CREATE TEMP TABLE t2 (x int)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        value(
            &a,
            "SELECT current_setting('work_mem') || '|' || count(*) FROM t2"
        )
        .await,
        "11MB|0"
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&a, check).await, clean);
}

/// Promise attacked: "a cancel reaches the client's statement". In transaction pooling a
/// client's statement can wait for a backend (the pool is busy) while the client cancels it:
/// the cancel was dropped as if the client were between transactions, and the statement ran
/// in full once a backend came. The cancel must wait with the statement and reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_while_the_statement_waits_for_a_backend_cancels_it() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-cancel-wait").await;
    let slug = t.slug.to_string();
    let admin = env.admin().await;
    let b = env.app(&slug).await;
    for round in 0..3 {
        let a = env.app(&slug).await;
        a.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let token = b.cancel_token();
        let sleeping = b.simple_query("SELECT pg_sleep(5)");
        let rest = async {
            until_waiting(&admin, &slug, 1).await;
            let cancel =
                tokio::spawn(async move { token.cancel_query(tokio_postgres::NoTls).await });
            // The cancel is in the proxy, waiting with the statement; then A lets go.
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.batch_execute("COMMIT").await.unwrap();
            cancel.await.unwrap().unwrap();
        };
        let started = std::time::Instant::now();
        let (answer, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(sleeping, rest)
        })
        .await
        .expect("B got an answer");
        cancelled_soon(answer.map(drop), started, round);
        assert_eq!(value(&b, "SELECT 1").await, "1", "round {round}: B goes on");
    }
}

/// Promise attacked: "a client's cancel reaches its own statement, never ends its session".
/// The last client leaves 400 temp tables, so the DISCARD ALL that goes in the same write as
/// B's `pg_sleep` (simple and extended protocol) runs for milliseconds, and B cancels at
/// once (and again, as a user would, until the answer comes): the cancel (held until B's
/// backend is attached) lands while the reset runs. The reset failed with 57014, the server
/// skipped B's statement, and B was disconnected with 08006. B must get 57014 for its
/// statement, as from PostgreSQL, and keep its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_lands_on_the_reset_ahead_cancels_the_clients_statement() {
    let env = one_backend_env().await;
    let t = env.tenant_with_user("int-cancel-reset").await;
    let slug = t.slug.to_string();
    let mut heavy = String::new();
    for i in 0..400 {
        write!(heavy, "CREATE TEMP TABLE leak{i} (x int);").unwrap();
    }
    let b = env.app(&slug).await;
    for round in 0..5 {
        let a = env.app(&slug).await;
        a.batch_execute(&heavy).await.unwrap();
        let token = b.cancel_token();
        let sleeping = async {
            if round % 2 == 0 {
                b.simple_query("SELECT pg_sleep(5)").await.map(drop)
            } else {
                b.query("SELECT pg_sleep(5)", &[]).await.map(drop)
            }
        };
        // Cancel at once, and again every 20 ms until the answer comes: PostgreSQL drops a
        // cancel that reaches a backend between two commands (here, between the reset and
        // B's statement), as it would between two statements of a pipeline.
        let cancels = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            loop {
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                answer = sleeping => answer,
                () = cancels => unreachable!(),
            }
        })
        .await
        .expect("B got an answer");
        cancelled_soon(answer.map(drop), started, round);
        // A repeat cancel already on its way finds B between transactions and is dropped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(value(&b, "SELECT 1").await, "1", "round {round}: B goes on");
        drop(a);
    }
}

/// B's 5 s sleep ended early with 57014.
fn cancelled_soon(
    answer: Result<(), tokio_postgres::Error>,
    started: std::time::Instant,
    round: usize,
) {
    let err = answer.expect_err("B's sleep was cancelled");
    let db = err.as_db_error().expect("an error from the server");
    assert_eq!(
        db.code(),
        &SqlState::QUERY_CANCELED,
        "round {round}: {db:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "round {round}: the sleep ran"
    );
}
