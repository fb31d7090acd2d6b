//! PROXY protocol (issue 15): a load balancer in `[proxy] proxy_protocol_from` writes a v1 or v2
//! header before its client's startup, and the address it names is the client's for SHOW
//! CLIENTS, the audit line, the log's `peer` and the failed-login throttle. A header from
//! anywhere else, no header from the balancer, and a header that stalls are refused.
//!
//! Loopback plays the hosts: the balancer is 127.0.0.2 (the only trusted address), a stranger
//! 127.0.0.3, the test itself 127.0.0.1; the headers name documentation addresses
//! (203.0.113.0/24, 198.51.100.0/24) that no socket here has.

use crate::common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestEnv;
use common::query::rows;
use common::wire::{error_code, error_message, read_message};
use ppp::v2;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

const BALANCER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// The proxy's own address as the balancer would name it (any value does).
fn destination() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 5], 6432))
}

/// A v2 PROXY header naming `client`, built by the crate the proxy parses with.
fn v2_proxy(client: &str) -> Vec<u8> {
    let source: SocketAddr = client.parse().unwrap();
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (source, destination()),
    )
    .build()
    .unwrap()
}

/// A v2 LOCAL header: the balancer's own connection (a health check).
fn v2_local() -> Vec<u8> {
    v2::Builder::new(
        v2::Version::Two | v2::Command::Local,
        v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
    )
    .build()
    .unwrap()
}

/// A connection from `source` whose first bytes are `header`.
async fn with_header(env: &TestEnv, source: Ipv4Addr, header: &[u8]) -> TcpStream {
    let mut stream = common::connect_from(env, source).await;
    stream.write_all(header).await.unwrap();
    stream
}

/// Logs in through the balancer, which sends `header` first.
async fn login_via_balancer(
    env: &TestEnv,
    header: &[u8],
    database: &str,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let stream = with_header(env, BALANCER, header).await;
    common::login_over(env, stream, database, user, password).await
}

/// What the proxy answered a connection it refused: the ErrorResponse's SQLSTATE and
/// message, and how long until it hung up. Panics if it sent anything else or did not hang up
/// within 10 s.
async fn refusal(mut stream: TcpStream) -> (SqlState, String, Duration) {
    let started = Instant::now();
    let (code, message) = tokio::time::timeout(Duration::from_secs(10), async {
        let (tag, body) = read_message(&mut stream).await.unwrap();
        let code = error_code(tag, &body).unwrap_or_else(|| panic!("not an error: {tag}"));
        assert!(read_message(&mut stream).await.is_err(), "not closed");
        (code, error_message(tag, &body).unwrap_or_default())
    })
    .await
    .expect("refused within 10 s");
    (code, message, started.elapsed())
}

/// The proxy's log, for this test's thread only: the runtime is current-thread, so every task
/// of the proxy it starts logs through this subscriber (no global one is set, so the other
/// tests' capture is untouched).
#[derive(Clone, Default)]
struct ThreadLog(Arc<Mutex<Vec<u8>>>);

impl ThreadLog {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(tenantgate::config::log_filter("info", false))
            .with_writer(move || common::LogWriter(Arc::clone(&sink.0)))
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Issue 15: through a trusted balancer, a v2 header's and a v1 header's client address is
/// what SHOW CLIENTS lists, what the audit line and the log's `peer` name, and what the
/// failed-login throttle counts: a spoofed source locks itself out, another one behind the same
/// balancer still logs in. A LOCAL header keeps the balancer's own address.
#[tokio::test]
async fn a_trusted_balancers_header_sets_the_client_address() {
    let log = ThreadLog::default();
    let _capture = log.install();
    let env = TestEnv::start_with(|c| {
        c.proxy.proxy_protocol_from = vec!["127.0.0.2/32".to_owned()].try_into().unwrap();
        c.proxy.auth_failures_before_delay = 2;
        c.proxy.auth_failures_before_lockout = 3;
        c.proxy.auth_max_delay_ms = 100;
    })
    .await;
    let t = env.tenant_with_user("pp").await;
    let slug = t.slug.as_str();

    let v2_client = login_via_balancer(&env, &v2_proxy("203.0.113.7:40001"), slug, "app", "secret")
        .await
        .unwrap();
    let v1_header = b"PROXY TCP4 198.51.100.4 10.0.0.5 40002 6432\r\n";
    let v1_client = login_via_balancer(&env, v1_header, slug, "app", "secret")
        .await
        .unwrap();
    // The header's bytes are gone and the session is whole: a query runs.
    assert_eq!(common::query::value(&v1_client, "SELECT 1").await, "1");
    let health = login_via_balancer(
        &env,
        &v2_local(),
        &env.config.admin.database,
        "root",
        "root-secret",
    )
    .await
    .unwrap();
    // SHOW CLIENTS: id, tenant, user, addr, ...
    let shown: Vec<(String, String)> = rows(&health.simple_query("SHOW CLIENTS").await.unwrap())
        .into_iter()
        .map(|row| (row[2].clone(), row[3].clone()))
        .collect();
    let addr = |user: &str, prefix: &str| {
        shown
            .iter()
            .any(|(u, a)| u == user && a.starts_with(prefix))
    };
    assert!(addr("app", "203.0.113.7:40001"), "{shown:?}");
    assert!(addr("app", "198.51.100.4:40002"), "{shown:?}");
    // LOCAL: the balancer itself.
    assert!(addr("root", "127.0.0.2:"), "{shown:?}");
    assert!(
        !shown
            .iter()
            .any(|(u, a)| u == "app" && a.starts_with("127.")),
        "{shown:?}"
    );

    // Three wrong passwords from one spoofed source lock that source out of the tenant...
    for _ in 0..3 {
        let err = login_via_balancer(&env, &v2_proxy("203.0.113.66:5000"), slug, "app", "guess")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    }
    let locked = login_via_balancer(&env, &v2_proxy("203.0.113.66:5001"), slug, "app", "secret")
        .await
        .unwrap_err();
    assert_eq!(
        locked.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{locked}"
    );
    // ...but not another client of the same balancer, nor the balancer's own address.
    login_via_balancer(&env, &v2_proxy("203.0.113.67:5000"), slug, "app", "secret")
        .await
        .unwrap();
    login_via_balancer(&env, &v2_local(), slug, "app", "secret")
        .await
        .unwrap();
    drop((v2_client, v1_client, health));

    let text = log.text();
    let line = |parts: &[&str]| text.lines().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        line(&[
            "tenantgate::audit",
            "outcome=\"ok\"",
            "source=203.0.113.7:40001"
        ]),
        "{text}"
    );
    assert!(
        line(&[
            "tenantgate::audit",
            "outcome=\"failed auth\"",
            "source=203.0.113.66:5000"
        ]),
        "{text}"
    );
    // The client's span names the client as `peer` and the balancer apart.
    assert!(
        line(&[
            "tenantgate::audit",
            "balancer=127.0.0.2:",
            "peer=198.51.100.4:40002"
        ]),
        "{text}"
    );
}

/// Issue 15: a PROXY header from an address not in `proxy_protocol_from` is refused (v2 and
/// v1), and so is the trusted balancer's connection when it sends a plain startup without a
/// header, or stops in the middle of one (closed within the login timeout). A plain client
/// from elsewhere still logs in.
#[tokio::test]
async fn untrusted_missing_and_stalled_headers_are_refused() {
    let env = TestEnv::start_with(|c| {
        c.proxy.proxy_protocol_from = vec!["127.0.0.2/32".to_owned()].try_into().unwrap();
        c.proxy.login_timeout_ms = 1000;
        c.proxy.auth_max_delay_ms = 500;
    })
    .await;
    let t = env.tenant_with_user("ppno").await;
    let slug = t.slug.as_str();

    // A stranger claiming to be 203.0.113.7, in binary and in text.
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "app"), ("database", slug)],
        &mut startup,
    )
    .unwrap();
    for header in [
        v2_proxy("203.0.113.7:40001"),
        b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2\r\n".to_vec(),
    ] {
        let stream = with_header(&env, STRANGER, &[&header[..], &startup[..]].concat()).await;
        let (code, message, _) = refusal(stream).await;
        assert_eq!(code, SqlState::PROTOCOL_VIOLATION);
        // Any garbage gets 08P01; this says the header was seen and not trusted.
        assert!(message.contains("PROXY protocol header"), "{message}");
    }

    // The balancer without a header: the client hears why, at once.
    let started = Instant::now();
    let err = common::login_from(&env, BALANCER, slug, "app", "secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::PROTOCOL_VIOLATION), "{err}");
    assert!(started.elapsed() < Duration::from_millis(800), "{err}");

    // Half a v2 header, then nothing: closed at the login timeout.
    let header = v2_proxy("203.0.113.7:40001");
    let stream = with_header(&env, BALANCER, header.get(..10).unwrap()).await;
    let (code, _, waited) = refusal(stream).await;
    assert_eq!(code, SqlState::PROTOCOL_VIOLATION);
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "{waited:?}"
    );

    // Nothing above disturbed an ordinary client.
    let app = common::login_from(&env, STRANGER, slug, "app", "secret")
        .await
        .unwrap();
    assert_eq!(common::query::value(&app, "SELECT 1").await, "1");
}
