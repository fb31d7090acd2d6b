//! The failed-login throttle across instances (issue 15 part 4): two instances over one
//! registry count a password spray together, so one split over them is refused as if it hit
//! one instance, while other addresses keep logging in.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tenantgate::server::Proxy;
use tokio_postgres::error::SqlState;

use crate::common::{self, TestEnv};

/// Sharing interval of the test instances.
const SHARE_MS: u64 = 100;
/// Failures of one (source, tenant) before the lock-out.
const LOCKOUT_AFTER: u32 = 4;

/// A login from `source` to the instance on `port`.
async fn login(
    env: &TestEnv,
    port: u16,
    source: Ipv4Addr,
    slug: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    common::login_over(env, stream, slug, "app", password).await
}

/// Two instances on one registry, locking out after `LOCKOUT_AFTER` failures for 60 s,
/// sharing every `share_ms` (0: not at all); and their ports.
async fn two_instances(share_ms: u64) -> (TestEnv, Proxy, [u16; 2]) {
    let env = TestEnv::start_with(|c| {
        c.proxy.auth_failures_before_delay = 3;
        c.proxy.auth_failures_before_lockout = LOCKOUT_AFTER;
        c.proxy.auth_lockout_seconds = 60;
        c.proxy.auth_max_delay_ms = 100;
        c.proxy.auth_failure_share_ms = share_ms;
    })
    .await;
    let b = Proxy::start(env.config.clone())
        .await
        .expect("start a second instance");
    let ports = [env.port(), b.local_addr().port()];
    (env, b, ports)
}

/// Issue 15: a spray from one address alternating between instances A and B is refused with
/// 53300 on both after `LOCKOUT_AFTER` failures in total (each instance saw only half), even
/// with the right password; another address logs in on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_split_over_instances_is_locked_out_on_all() {
    let (env, b, ports) = two_instances(SHARE_MS).await;
    let tenant = env.tenant_with_user("spray").await;
    let slug = tenant.slug.as_str();
    let attacker = Ipv4Addr::new(127, 0, 0, 41);
    let honest = Ipv4Addr::new(127, 0, 0, 42);

    // The sharing tasks LISTEN shortly after start: give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut codes = Vec::new();
    for i in 0..LOCKOUT_AFTER {
        let port = ports[usize::try_from(i % 2).unwrap()];
        let err = login(&env, port, attacker, slug, "guess")
            .await
            .unwrap_err();
        codes.push(err.code().cloned());
        // Each failure reaches the other instance within a few flushes.
        tokio::time::sleep(Duration::from_millis(SHARE_MS * 4)).await;
    }
    assert_eq!(
        codes,
        vec![Some(SqlState::INVALID_PASSWORD); 4],
        "no instance refused before the threshold"
    );
    for port in ports {
        let err = login(&env, port, attacker, slug, "secret")
            .await
            .expect_err("locked out on every instance, right password or not");
        assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    }
    for port in ports {
        let client = login(&env, port, honest, slug, "secret")
            .await
            .expect("another address logs in");
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    b.shutdown(Duration::from_secs(1)).await;
}

/// With sharing off each instance counts alone: the same split spray is not refused yet (the
/// control of the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sharing_each_instance_counts_alone() {
    let (env, b, ports) = two_instances(0).await;
    let tenant = env.tenant_with_user("alone").await;
    let attacker = Ipv4Addr::new(127, 0, 0, 43);
    for i in 0..LOCKOUT_AFTER {
        let port = ports[usize::try_from(i % 2).unwrap()];
        let err = login(&env, port, attacker, tenant.slug.as_str(), "guess")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    }
    tokio::time::sleep(Duration::from_millis(SHARE_MS * 4)).await;
    login(&env, ports[0], attacker, tenant.slug.as_str(), "secret")
        .await
        .expect("2 failures here: not locked");
    b.shutdown(Duration::from_secs(1)).await;
}
