//! The monitoring endpoint (issue 14): `/metrics` scraped with a real HTTP client while
//! clients work, parsed with a Prometheus parser, and checked against what the clients did;
//! `/healthz` and `/readyz` through a drain and a registry outage.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{TestEnv, eventually};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use prometheus_parse::{Sample, Scrape, Value};
use tenantgate::localpg::{LocalPg, LocalPgOptions};
use tenantgate::pool::PoolMode;

/// One HTTP/1.1 request with hyper's client: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("a valid exposition")
}

/// The value of the sample `name` whose labels include `labels`, as a whole number (every
/// series compared here counts something).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(sample_value)
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counts, checked whole and non-negative"
)]
fn whole(v: f64) -> Option<u64> {
    (v >= 0.0 && v.fract() == 0.0).then_some(v as u64)
}

fn sample_value(s: &Sample) -> Option<u64> {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => whole(*v),
        Value::Histogram(_) | Value::Summary(_) => None,
    }
}

fn tenant_labels(scrape: &Scrape) -> BTreeSet<String> {
    scrape
        .samples
        .iter()
        .filter_map(|s| s.labels.get("tenant").map(str::to_owned))
        .collect()
}

fn metrics_addr(env: &TestEnv) -> SocketAddr {
    env.proxy
        .as_ref()
        .unwrap()
        .metrics_addr()
        .expect("metrics are on")
}

/// Six clients of `busy` (more than its two backends: some wait) run `SELECT 1`s while the
/// endpoint is scraped; each scrape must parse and its client states add up to the 7
/// connected (the six and `quiet`'s one). Returns the queries `busy` ran and its clients,
/// still connected.
async fn load_while_scraping(
    env: &TestEnv,
    addr: SocketAddr,
    busy: &str,
) -> (u64, Vec<tokio_postgres::Client>) {
    let mut workers = Vec::new();
    for i in 0..6 {
        let client = env.app(busy).await;
        workers.push(tokio::spawn(async move {
            let rounds = 150 + i;
            for _ in 0..rounds {
                client.simple_query("SELECT 1").await.unwrap();
            }
            (rounds, client)
        }));
    }
    let mut scrapes = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        let s = scrape(addr).await;
        let states: u64 = ["active", "waiting", "idle"]
            .iter()
            .map(|st| value(&s, "tenantgate_clients", &[("state", st)]).unwrap())
            .sum();
        assert_eq!(
            states, 7,
            "tenant clients by state must add up to the 7 connected"
        );
        let used = value(&s, "tenantgate_server_connections", &[("state", "used")]).unwrap();
        let idle = value(&s, "tenantgate_server_connections", &[("state", "idle")]).unwrap();
        assert!(
            used + idle <= 3,
            "two backends for busy, one for quiet: {used} + {idle}"
        );
        scrapes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        scrapes >= 2,
        "the load ended before it could be scraped twice"
    );
    let mut queries = 0;
    let mut clients = Vec::new();
    for w in workers {
        let (rounds, client) = w.await.unwrap();
        queries += rounds;
        clients.push(client);
    }
    (queries, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_under_load_parse_and_match_what_clients_did() {
    let env = TestEnv::start_with(|c| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pool_size = 2;
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        c.metrics.tenant_series = 1;
    })
    .await;
    let addr = metrics_addr(&env);
    let busy = env.tenant_with_user("busy").await;
    let quiet = env.tenant_with_user("quiet").await;
    let quiet_client = env.app(quiet.slug.as_str()).await;
    for _ in 0..5 {
        quiet_client.simple_query("SELECT 1").await.unwrap();
    }
    let (busy_queries, _busy_clients) = load_while_scraping(&env, addr, busy.slug.as_str()).await;
    // A failed login and admin commands, one refused.
    assert!(
        env.connect(busy.slug.as_str(), "app", "wrong")
            .await
            .is_err()
    );
    let admin = env.admin().await;
    admin.simple_query("SHOW POOLS").await.unwrap();
    assert!(admin.simple_query("SHOW NOTHING_LIKE_THIS").await.is_err());

    let s = scrape(addr).await;
    // The busiest tenant has its own series; the other is summed under `_other`.
    assert_eq!(
        tenant_labels(&s),
        BTreeSet::from([busy.slug.as_str().to_owned(), "_other".to_owned()]),
    );
    let busy_label = [("tenant", busy.slug.as_str())];
    let other = [("tenant", "_other")];
    // Each simple query outside a block is one query and one transaction.
    for name in [
        "tenantgate_tenant_queries_total",
        "tenantgate_tenant_transactions_total",
    ] {
        assert_eq!(value(&s, name, &busy_label), Some(busy_queries), "{name}");
        assert_eq!(value(&s, name, &other), Some(5), "{name}");
    }
    assert_eq!(value(&s, "tenantgate_tenant_clients", &busy_label), Some(6));
    assert_eq!(
        value(&s, "tenantgate_tenant_logins_total", &busy_label),
        Some(6)
    );
    assert_eq!(
        value(&s, "tenantgate_tenant_backend_connects_total", &busy_label),
        Some(2)
    );
    // Every transaction-mode transaction took one checkout.
    let waits = value(&s, "tenantgate_checkout_wait_seconds_count", &[]).unwrap();
    assert!(waits >= busy_queries + 5, "{waits} checkouts");
    let buckets = s
        .samples
        .iter()
        .find_map(|x| match &x.value {
            Value::Histogram(b) if x.metric == "tenantgate_checkout_wait_seconds" => Some(b),
            _ => None,
        })
        .expect("the checkout wait histogram");
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "buckets are cumulative"
    );
    let last = buckets.last().unwrap();
    assert!(
        last.less_than.is_infinite() && whole(last.count) == Some(waits),
        "{buckets:?}"
    );
    // 7 tenant logins and 1 admin; 1 wrong password.
    let outcome = |o| [("outcome", o)];
    assert_eq!(
        value(&s, "tenantgate_logins_total", &outcome("ok")),
        Some(8)
    );
    assert_eq!(
        value(&s, "tenantgate_logins_total", &outcome("auth_failed")),
        Some(1)
    );
    assert_eq!(
        value(&s, "tenantgate_clients", &[("state", "admin")]),
        Some(1)
    );
    assert_eq!(
        value(&s, "tenantgate_admin_commands_total", &outcome("ok")),
        Some(1)
    );
    assert_eq!(
        value(&s, "tenantgate_admin_commands_total", &outcome("error")),
        Some(1)
    );
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(value(&s, "tenantgate_build_info", &version), Some(1));
    let budget = value(
        &s,
        "tenantgate_server_connection_budget",
        &[("server", "local")],
    );
    assert!(budget.is_some_and(|b| b > 0));
    same_label_names_per_family(&s);
}

/// Every sample of a family has the same label names: no series is written twice with
/// different labels.
fn same_label_names_per_family(s: &Scrape) {
    let mut label_names: BTreeMap<&str, BTreeSet<Vec<&str>>> = BTreeMap::new();
    for sample in &s.samples {
        let mut names: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
        names.sort_unstable();
        label_names.entry(&sample.metric).or_default().insert(names);
    }
    for (metric, sets) in label_names {
        assert_eq!(
            sets.len(),
            1,
            "{metric} has samples with different label names"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_draining_once_shutdown_starts_and_healthz_stays_up() {
    let mut env = TestEnv::start_with(|c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        c.proxy.shutdown_grace_seconds = 30;
    })
    .await;
    let addr = metrics_addr(&env);
    let t = env.tenant_with_user("drain").await;
    assert_eq!(
        http(addr, "GET", "/healthz").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        http(addr, "GET", "/readyz").await,
        (200, "ready\n".to_owned())
    );
    assert_eq!(http(addr, "GET", "/nope").await.0, 404);
    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);
    assert_eq!(http(addr, "HEAD", "/readyz").await.0, 200);

    // A session holds the drain open (session mode: its backend stays with it).
    let client = env.app(t.slug.as_str()).await;
    let proxy = env.proxy.take().unwrap();
    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(30)));
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (status, body) = http(addr, "GET", "/readyz").await;
            status == 503 && body.contains("draining")
        })
        .await,
        "/readyz did not report the drain"
    );
    assert_eq!(http(addr, "GET", "/healthz").await.0, 200);
    // The running session still works during the drain, and its end lets shutdown finish.
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finished once the last client left")
        .unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_the_registry_is_gone_longer_than_its_stale_window() {
    let dir = common::cluster()
        .data_dir()
        .parent()
        .unwrap()
        .join(common::unique("readyz-registry-"));
    let mut options = LocalPgOptions::new(dir.join("pgdata"));
    let start = |options: LocalPgOptions| async move {
        tokio::task::spawn_blocking(move || LocalPg::start(options))
            .await
            .unwrap()
            .expect("start the registry's PostgreSQL")
    };
    let pg = start(options.clone()).await;
    options.port = Some(pg.port());
    let url = pg.connection_string("postgres");
    let env = TestEnv::start_with(|c| {
        c.registry.url = url;
        c.registry.stale_ttl_seconds = 2;
        c.registry.timeout_ms = 500;
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = metrics_addr(&env);
    assert_eq!(http(addr, "GET", "/readyz").await.0, 200);

    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    // Within the stale window: still ready, and it says why it might not be soon.
    let (status, body) = http(addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("registry has not answered"), "{body}");
    // Past it: not ready, with the reason.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (status, body) = http(addr, "GET", "/readyz").await;
            status == 503 && body.contains("registry") && body.contains("stale window")
        })
        .await,
        "/readyz stayed ready with the registry gone"
    );
    assert_eq!(http(addr, "GET", "/healthz").await.0, 200);

    let _pg = start(options).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            http(addr, "GET", "/readyz").await.0 == 200
        })
        .await,
        "/readyz did not recover with the registry"
    );
}
