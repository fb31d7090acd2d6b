//! Hardening (issue 6): failed-login throttling, the cap on logins in progress, audit lines,
//! and no password in the log.

use crate::common;
use tenantgate::crypto::Binding;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::TestEnv;
use tokio_postgres::error::SqlState;

/// Issue 6: a brute-force loop from 127.0.0.1 against tenant A is delayed, then refused
/// before SCRAM, while a client of tenant B from the same address still logs in at once.
#[test]
fn brute_force_is_throttled_then_refused_while_another_tenant_logs_in() {
    let log = captured_log();
    CAPTURING.set(true);
    capturing_runtime().block_on(brute_force_against_one_tenant(&log));
    CAPTURING.set(false);
}

async fn brute_force_against_one_tenant(log: &Mutex<Vec<u8>>) {
    let env = TestEnv::start_with(|c| {
        c.proxy.auth_failures_before_delay = 3;
        c.proxy.auth_failures_before_lockout = 6;
        c.proxy.auth_lockout_seconds = 60;
        c.proxy.auth_max_delay_ms = 400;
        c.proxy.auth_failure_limit_factor = 5;
    })
    .await;
    let a = env.tenant_with_user("bf-a").await;
    let b = env.tenant_with_user("bf-b").await;

    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        let err = env
            .connect(a.slug.as_str(), "app", "guess")
            .await
            .unwrap_err();
        outcomes.push((err.code().cloned(), started.elapsed()));
        if outcomes.len() == 7 {
            let message = err.as_db_error().unwrap().message().to_owned();
            assert!(message.contains("too many failed login"), "{message}");
        }
    }
    let codes: Vec<Option<SqlState>> = outcomes.iter().map(|(c, _)| c.clone()).collect();
    let mut expected = vec![Some(SqlState::INVALID_PASSWORD); 6];
    expected.extend(vec![Some(SqlState::TOO_MANY_CONNECTIONS); 2]);
    assert_eq!(codes, expected, "{outcomes:?}");
    // Attempts 4, 5 and 6 waited 100, 200 and 400 ms before their exchange.
    assert!(outcomes[3].1 >= Duration::from_millis(100), "{outcomes:?}");
    assert!(outcomes[4].1 >= Duration::from_millis(200), "{outcomes:?}");
    assert!(outcomes[5].1 >= Duration::from_millis(400), "{outcomes:?}");

    // Locked out: even the right password is refused from this address during the cool-down.
    let err = env
        .connect(a.slug.as_str(), "app", "secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");

    // Tenant B, same address: no delay, no refusal. "No delay" is read from the proxy's log,
    // not from a clock: a bound on B's login time (it opens B's first backend) failed on a
    // loaded machine, and could not have told a throttle delay of at most 400 ms from load.
    // The proxy logs each delay before the exchange, in the span of the client's connection,
    // which names the client's address and port.
    let stream = common::connect_from(&env, Ipv4Addr::LOCALHOST).await;
    let peer = stream.local_addr().unwrap();
    let (client, connection) = env
        .client_config(b.slug.as_str(), "app", "secret")
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .expect("B logs in from the address A's attempts came from");
    tokio::spawn(connection);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let delays: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("login attempt delayed"))
        .collect();
    assert!(
        delays.iter().any(|l| l.contains("delay_ms=400")),
        "A's delays are not in the log: {delays:#?}"
    );
    assert!(
        !delays.iter().any(|l| of_connection(l, peer)),
        "B's login ({peer}) was delayed: {delays:#?}"
    );
}

/// Whether a captured log line was logged for the client connection from `peer`: inside its
/// span, whose fields read `client{id=7 peer=127.0.0.1:40312 user="app"}`.
fn of_connection(line: &str, peer: std::net::SocketAddr) -> bool {
    [" ", "}"]
        .iter()
        .any(|end| line.contains(&format!("peer={peer}{end}")))
}

/// A successful login resets its source's count: typos spread between good logins are never
/// throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_login_resets_the_failure_count() {
    let env = TestEnv::start_with(|c| {
        c.proxy.auth_failures_before_delay = 2;
        c.proxy.auth_failures_before_lockout = 3;
    })
    .await;
    let a = env.tenant_with_user("reset").await;
    for _ in 0..3 {
        for _ in 0..2 {
            let err = env
                .connect(a.slug.as_str(), "app", "typo")
                .await
                .unwrap_err();
            assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
        }
        env.app(a.slug.as_str()).await;
    }
}

/// Issue 6: connections that stall in startup fill `max_logins_in_progress`; the next one
/// waits briefly and gets 53300, an established client is not disturbed, and logins work
/// again once the stalled ones go away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_logins_are_capped_and_established_clients_carry_on() {
    let env = TestEnv::start_with(|c| {
        c.proxy.max_logins_in_progress = 2;
        c.proxy.login_slot_wait_ms = 1000;
    })
    .await;
    let t = env.tenant_with_user("storm").await;
    let established = env.app(t.slug.as_str()).await;

    // Three raw sockets that connect and never send a startup packet. Each connection's task
    // takes its slot some time after the handshake: once one of the three is refused, the
    // other two certainly hold both slots.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(
            tokio::net::TcpStream::connect(("127.0.0.1", env.port()))
                .await
                .unwrap(),
        );
    }
    let refused = common::wire::until_refused(&mut stalled, 1, Duration::from_secs(5)).await;
    assert_eq!(refused.len(), 1, "no stalled connection was refused");
    assert_eq!(
        refused[0].code,
        SqlState::TOO_MANY_CONNECTIONS,
        "{refused:?}"
    );
    assert!(
        refused[0].message.contains("too many logins in progress")
            && !refused[0].message.contains("from your address"),
        "{refused:?}"
    );
    let started = Instant::now();
    let err = env
        .connect(t.slug.as_str(), "app", "secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("too many logins in progress"), "{message}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    let one: i32 = established.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    drop(stalled);
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            env.connect(t.slug.as_str(), "app", "secret").await.is_ok()
        })
        .await
    );
}

/// Issue 6: a client the throttle delays gives its login slot back while it waits, so a source
/// that keeps failing against tenant A cannot fill `max_logins_in_progress` with sleeping
/// attempts: a client of tenant B still logs in at once, and the delayed attempts still get
/// their 28P01 afterwards.
#[test]
fn throttled_attempts_give_their_login_slot_back_while_they_wait() {
    let log = captured_log();
    CAPTURING.set(true);
    capturing_runtime().block_on(throttled_attempts_and_another_tenant(&log));
    CAPTURING.set(false);
}

async fn throttled_attempts_and_another_tenant(log: &Mutex<Vec<u8>>) {
    let env = TestEnv::start_with(|c| {
        c.proxy.max_logins_in_progress = 2;
        c.proxy.login_slot_wait_ms = 500;
        c.proxy.auth_failures_before_delay = 1;
        c.proxy.auth_failures_before_lockout = 100;
        c.proxy.auth_max_delay_ms = 5000;
        c.proxy.auth_failure_limit_factor = 100;
        c.proxy.login_timeout_ms = 15_000;
    })
    .await;
    let env = Arc::new(env);
    let a = env.tenant_with_user("slot-a").await;
    let b = env.tenant_with_user("slot-b").await;
    // Six failures against A (delays 0, 100, 200, 400, 800, 1600 ms): the next attempts wait
    // 3.2 s, during which B must get in.
    for _ in 0..6 {
        let err = env
            .connect(a.slug.as_str(), "app", "guess")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    }
    let mut sleepers = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let stream = common::connect_from(&env, Ipv4Addr::LOCALHOST).await;
        peers.push(stream.local_addr().unwrap());
        let env = Arc::clone(&env);
        let slug = a.slug.clone();
        sleepers.push(tokio::spawn(async move {
            let started = Instant::now();
            let err = env
                .client_config(slug.as_str(), "app", "guess")
                .connect_raw(stream, tokio_postgres::NoTls)
                .await
                .err()
                .expect("a wrong password");
            (err.code().cloned(), started.elapsed())
        }));
    }
    // Evidence that both are asleep in the throttle, rather than a guess that 300 ms is
    // enough: the proxy logs each delay (in the span of the client's connection, which names
    // its address and port) just before it gives the slot back and sleeps.
    let asleep = common::eventually(Duration::from_secs(10), || async {
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        peers.iter().all(|peer| {
            text.lines().any(|l| {
                l.contains("login attempt delayed delay_ms=3200") && of_connection(l, *peer)
            })
        })
    })
    .await;
    assert!(asleep, "A's attempts were never delayed");

    // Both slots' holders are asleep in the throttle: B gets in without waiting for them.
    // Had they kept their slots, B would have been refused after 500 ms; that B does not wait
    // for them shows in the order of events rather than a wall-clock bound: B is in while
    // both are still asleep.
    let client = env.app(b.slug.as_str()).await;
    assert!(
        sleepers.iter().all(|s| !s.is_finished()),
        "B logged in only after A's attempts ended"
    );
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    for sleeper in sleepers {
        let (code, waited) = sleeper.await.unwrap();
        assert_eq!(code, Some(SqlState::INVALID_PASSWORD), "{waited:?}");
        assert!(waited >= Duration::from_millis(3200), "{waited:?}");
    }
}

thread_local! {
    /// Whether this thread's events go into `captured_log()`.
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Everything the capturing threads log, at trace level: what `tenantgate` would log at its
/// most verbose (with the `log` records of tokio-postgres bridged in), through the same filter
/// as the binary. The subscriber is global but writes only events of threads that capture, so
/// the other tests running in this binary do not write into the buffer.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{Layer as _, filter};
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    Arc::clone(LOG.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || common::LogWriter(Arc::clone(&sink)))
            .with_filter(tenantgate::config::log_filter("trace", false))
            // Dynamic: asked on every event (a plain filter_fn caches its answer per callsite).
            .with_filter(filter::dynamic_filter_fn(|_, _| CAPTURING.get()));
        tracing_subscriber::registry()
            .with(layer)
            .try_init()
            .expect("one global subscriber");
        buffer
    }))
}

/// A runtime whose threads (workers and blocking) capture their log.
fn capturing_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| CAPTURING.set(true))
        .build()
        .unwrap()
}

/// Issue 6: every login and admin command leaves one `tenantgate::audit` line, and nothing
/// logged at any level, by any crate, contains a client or backend password.
#[test]
fn audit_lines_name_logins_and_admin_commands_and_no_password_is_logged() {
    let log = captured_log();
    CAPTURING.set(true);
    capturing_runtime().block_on(audit_lines_and_no_password(&log));
    CAPTURING.set(false);
}

#[allow(
    clippy::too_many_lines,
    reason = "one scenario: logins and admin commands, then every check of the log"
)]
async fn audit_lines_and_no_password(log: &Mutex<Vec<u8>>) {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("audit").await;
    let slug = t.slug.as_str();
    env.add_user(slug, "auditor", "Cl1ent-Pw-7781").await;
    let backend_password = env
        .key
        .decrypt(&t.backend_password_enc, &Binding::backend_password(slug))
        .unwrap();

    let client = env
        .connect(slug, "auditor", "Cl1ent-Pw-7781")
        .await
        .unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let err = env
        .connect(slug, "auditor", "Wr0ng-Pw-7781")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    let admin = env.admin().await;
    admin
        .simple_query(&format!(
            "CREATE USER bob FOR TENANT {slug} PASSWORD 'Cr3ated-Pw-7781'"
        ))
        .await
        .unwrap();
    admin
        .execute(
            "ALTER USER bob FOR TENANT $1 PASSWORD $2",
            &[&slug, &"Alt3red-Pw-7781"],
        )
        .await
        .unwrap();
    env.connect(slug, "bob", "Alt3red-Pw-7781").await.unwrap();
    // Provisioning inside the proxy: CREATE ROLE ... PASSWORD with a new backend password.
    let fresh = common::unique("auditnew");
    admin
        .simple_query(&format!("CREATE TENANT {fresh}"))
        .await
        .unwrap();
    let fresh_record = env
        .registry
        .tenant(&tenantgate::registry::TenantSlug::parse(&fresh).unwrap())
        .await
        .unwrap()
        .unwrap();
    let fresh_password = env
        .key
        .decrypt(
            &fresh_record.backend_password_enc,
            &Binding::backend_password(&fresh),
        )
        .unwrap();
    drop(client);
    drop(admin);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let audit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tenantgate::audit") && l.contains(slug))
        .collect();
    let has = |parts: &[&str]| audit.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        has(&[
            "login",
            "user=auditor",
            "outcome=\"ok\"",
            "source=127.0.0.1:"
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&["login", "user=auditor", "outcome=\"failed auth\""]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "admin command",
            "admin_user=root",
            "command=\"create user\"",
            "outcome=\"ok\""
        ]),
        "{audit:#?}"
    );
    assert!(has(&["command=\"alter user\""]), "{audit:#?}");
    assert!(
        text.lines().any(|l| l.contains("tenantgate::audit")
            && l.contains("kind=\"admin\"")
            && l.contains("user=root")
            && l.contains("outcome=\"ok\"")),
        "no admin login audit line"
    );
    for secret in [
        "Cl1ent-Pw-7781",
        "Wr0ng-Pw-7781",
        "Cr3ated-Pw-7781",
        "Alt3red-Pw-7781",
        "root-secret",
        backend_password.expose(),
        fresh_password.expose(),
    ] {
        assert!(
            !text.contains(secret),
            "the log contains a password: {secret}"
        );
    }
}
