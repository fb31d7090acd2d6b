//! Several tenantgate instances over one registry (issue 15): a cancel reaches the instance
//! that issued its key whichever instance the load balancer sends it to, a forward without
//! the master key's MAC does nothing, and SHOW INSTANCES on any instance lists the live ones
//! and forgets one that stopped (at once when it stops cleanly, after the heartbeat TTL when it
//! is killed).

use std::net::SocketAddr;
use std::time::Duration;

use tenantgate::instance::forward_mac;
use tenantgate::protocol::startup::forwarded_cancel;
use tenantgate::server::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, NoTls};

use crate::common::activity::until_running;
use crate::common::query::rows;
use crate::common::serve::ServeProcess;
use crate::common::{TestEnv, admin_client, cluster, eventually, eventually_some};

const SLEEP: &str = "SELECT pg_sleep(30)";

/// A proxy whose instance beats every second and is gone 3 s after its last beat.
async fn quick_env() -> TestEnv {
    TestEnv::start_with(|c| {
        c.instance.heartbeat_seconds = 1;
        c.instance.heartbeat_ttl_seconds = Some(3);
    })
    .await
}

/// A second instance on `env`'s registry, master key and server.
async fn second_instance(env: &TestEnv) -> Proxy {
    Proxy::start(env.config.clone())
        .await
        .expect("start a second instance")
}

/// The (pid, secret) the client was given, read from the CancelRequest its token sends to a
/// listener of ours.
async fn cancel_key(token: &CancelToken) -> (i32, i32) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let send = async {
        let stream = TcpStream::connect(addr).await.unwrap();
        drop(token.cancel_query_raw(stream, NoTls).await);
    };
    let read = async {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 16];
        socket.read_exact(&mut request).await.unwrap();
        request
    };
    let ((), request) = tokio::join!(send, read);
    let word = |at: usize| i32::from_be_bytes(request[at..at + 4].try_into().unwrap());
    assert_eq!(word(4), 80_877_102, "a CancelRequest");
    (word(8), word(12))
}

/// Sends a forwarded cancel request to `to`; returns what came back before the instance
/// closed the connection (within 5 s).
async fn send_forward(to: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream.write_all(packet).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the instance closes a forward")
        .unwrap();
    answer
}

/// SHOW INSTANCES as rows of text: id, tag, address, started_at, last_heartbeat, clients,
/// backends, budget_share, version, local.
async fn show_instances(admin: &Client) -> Vec<Vec<String>> {
    rows(&admin.simple_query("SHOW INSTANCES").await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_instance_cancels_the_query_there_and_forged_or_misdirected_forwards_do_nothing()
 {
    let env = quick_env().await;
    let b = second_instance(&env).await;
    let t = env.tenant_with_user("fwd").await;
    let client = env.app(t.slug.as_str()).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.batch_execute(SLEEP).await });
    assert!(
        until_running(cluster(), &[&t.database], SLEEP, 1).await,
        "the query to cancel never ran"
    );
    let (pid, secret) = cancel_key(&token).await;
    assert_ne!(secret.to_be_bytes()[0], 0, "the key carries A's tag");

    // A forward whose MAC is not the master key's: A answers nothing and cancels nothing.
    let a_addr = SocketAddr::from(([127, 0, 0, 1], env.port()));
    let answer = send_forward(a_addr, &forwarded_cancel(pid, secret, &[0x5a; 32])).await;
    assert!(
        answer.is_empty(),
        "no answer to a forged forward: {answer:?}"
    );

    // A genuine forward sent to the wrong instance (B): B looks the key up itself, answers
    // "unknown" and does not forward it again.
    let mac = forward_mac(&env.key, pid, secret);
    let answer = send_forward(b.local_addr(), &forwarded_cancel(pid, secret, &mac)).await;
    assert_eq!(answer, b"U", "B holds no such key and forwards nothing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sleeper.is_finished(),
        "a forged or misdirected forward cancelled the query"
    );

    // The client's own token, sent to B: B forwards it to A, which cancels the query.
    let to_b = TcpStream::connect(b.local_addr()).await.unwrap();
    token.cancel_query_raw(to_b, NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the cancel sent to B stops the query on A within 5 s")
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_instances_lists_the_live_instances_everywhere_and_forgets_stopped_ones() {
    let env = quick_env().await;
    let c = second_instance(&env).await;
    let mut killed = ServeProcess::start(&env, |_| {}, &[]);
    killed.wait_accepting().await;
    let a_addr = SocketAddr::from(([127, 0, 0, 1], env.port())).to_string();
    let c_addr = c.local_addr().to_string();
    let killed_addr = format!("127.0.0.1:{}", killed.port);

    let admin_a = env.admin().await;
    // The killed process registers once it is up; A's console client shows in A's counters
    // from its next heartbeat.
    let listed = eventually_some(Duration::from_secs(5), || async {
        let rows = show_instances(&admin_a).await;
        let a_row = rows.iter().find(|r| r[2] == a_addr)?;
        (rows.len() == 3 && a_row[5] != "0").then_some(rows)
    })
    .await
    .expect("SHOW INSTANCES on A lists A (with its console client), C and the process");
    let mut addresses: Vec<&str> = listed.iter().map(|r| r[2].as_str()).collect();
    addresses.sort_unstable();
    let mut expected = vec![a_addr.as_str(), c_addr.as_str(), killed_addr.as_str()];
    expected.sort_unstable();
    assert_eq!(addresses, expected);
    let mut tags: Vec<u8> = listed.iter().map(|r| r[1].parse().unwrap()).collect();
    tags.sort_unstable();
    tags.dedup();
    assert_eq!(tags.len(), 3, "every instance has its own tag: {listed:?}");
    assert!(tags.iter().all(|t| *t > 0));
    for row in &listed {
        assert!(
            row[3] <= row[4],
            "started no later than the last heartbeat: {row:?}"
        );
        let share: i64 = row[7].parse().unwrap();
        assert!(
            (0..=80).contains(&share),
            "budget_share: a share of the [[server]] budget of 80: {row:?}"
        );
        assert_eq!(row[8], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            row[9] == "t",
            row[2] == a_addr,
            "only A's row is local on A: {row:?}"
        );
    }

    // C's console lists the same instances, its own row marked local.
    let (admin_c, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(c.local_addr().port())
        .user("root")
        .password("root-secret")
        .dbname(&env.config.admin.database)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let on_c = show_instances(&admin_c).await;
    assert_eq!(on_c.len(), 3, "{on_c:?}");
    assert!(on_c.iter().all(|r| (r[9] == "t") == (r[2] == c_addr)));
    drop(admin_c);

    // A clean shutdown removes C's row at once.
    c.shutdown(Duration::from_secs(1)).await;
    let rows = show_instances(&admin_a).await;
    assert!(
        !rows.iter().any(|r| r[2] == c_addr),
        "C left cleanly: {rows:?}"
    );

    // A killed instance stops beating: its row is gone within the 3 s TTL (and a beat).
    killed.signal("KILL");
    assert!(
        eventually(Duration::from_secs(6), || async {
            let rows = show_instances(&admin_a).await;
            rows.len() == 1 && rows[0][2] == a_addr
        })
        .await,
        "the killed instance disappears after its heartbeat TTL"
    );
    // Hidden at once; deleted by the next instance to look (A's next beat, 1 s).
    let registry = admin_client(&env.registry_database()).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            registry
                .query_one("SELECT count(*) FROM instances", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        })
        .await,
        "the stale row was deleted, not only hidden"
    );
}
