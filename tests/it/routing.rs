//! Routing and isolation: the database name picks the tenant, each tenant reaches only its own
//! database, and every way of being refused ends in the right SQLSTATE.

use crate::common;
use tenantgate::crypto::Binding;

use std::time::Duration;

use common::query::current_database;
use common::wire;
use common::{TestEnv, eventually};
use tenantgate::provision;
use tenantgate::registry::TenantState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_reach_two_databases_and_see_only_their_own_tables() {
    let env = TestEnv::start().await;
    let a = env.tenant_with_user("iso-a").await;
    let b = env.tenant_with_user("iso-b").await;

    let ca = env.app(a.slug.as_str()).await;
    let cb = env.app(b.slug.as_str()).await;
    let db_a = current_database(&ca).await;
    let db_b = current_database(&cb).await;
    assert_eq!(db_a, a.database);
    assert_eq!(db_b, b.database);
    assert_ne!(db_a, db_b);

    ca.batch_execute("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('a only')")
        .await
        .unwrap();
    let err = cb.query("SELECT * FROM secrets", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    let rows = ca.query("SELECT v FROM secrets", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);

    // A's backend role cannot even connect to B's database: CONNECT is revoked from PUBLIC.
    let a_password = env
        .key
        .decrypt(
            &a.backend_password_enc,
            &Binding::backend_password(a.slug.as_str()),
        )
        .unwrap();
    let pg = common::cluster();
    let direct = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        pg.port(),
        a.backend_role,
        a_password.expose(),
        b.database
    );
    let err = common::connect_str(&direct).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_and_unknown_tenant_all_fail_alike() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("auth").await;
    let slug = t.slug.as_str();

    let cases = [
        (slug, "app", "wrong"),
        (slug, "nobody", "secret"),
        ("no-such-tenant", "app", "secret"),
        ("Not_A_Slug!", "app", "secret"),
    ];
    let mut messages = Vec::new();
    for (db, user, password) in cases {
        let err = env.connect(db, user, password).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{db} {user}: {err}"
        );
        let db_err = err.as_db_error().unwrap();
        messages.push(db_err.message().replace(user, "USER"));
    }
    // Same words for every failure, so a caller learns nothing about which tenants exist.
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    // And the right password still works.
    env.app(slug).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_tenant_is_refused_with_57p03_and_resume_lets_clients_back() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("susp").await;
    let slug = t.slug.as_str();
    // Cache the record first, so the change must arrive by NOTIFY.
    env.app(slug).await.simple_query("SELECT 1").await.unwrap();

    provision::set_state(&env.registry, slug, TenantState::Suspended)
        .await
        .unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        match env.connect(slug, "app", "secret").await {
            Err(e) => e.code() == Some(&SqlState::CANNOT_CONNECT_NOW),
            Ok(_) => false,
        }
    })
    .await;
    assert!(refused, "suspension did not take effect");
    let err = env.connect(slug, "app", "secret").await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("suspended"));

    provision::set_state(&env.registry, slug, TenantState::Active)
        .await
        .unwrap();
    let back = eventually(Duration::from_secs(5), || async {
        env.connect(slug, "app", "secret").await.is_ok()
    })
    .await;
    assert!(back, "resume did not take effect");
}

/// Reads whatever the proxy answers until it closes (bounded).
async fn answer_to(bytes: &[u8], port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy must answer and close, not hang")
        .ok();
    out
}

/// The SQLSTATE of the ErrorResponse the proxy's answer begins with.
async fn sqlstate_of(answer: &[u8]) -> Option<SqlState> {
    let mut bytes = answer;
    let (tag, body) = wire::read_message(&mut bytes).await.unwrap();
    assert_eq!(tag, b'E', "{answer:?}");
    wire::error_code(tag, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_startup_packets_get_08p01_and_the_proxy_keeps_serving() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("bad").await;
    let port = env.port();

    // 1 GiB length prefix: refused without reading (or allocating) it.
    let oversized = answer_to(&[0x40, 0, 0, 0, 0, 3, 0, 0], port).await;
    assert_eq!(
        sqlstate_of(&oversized).await,
        Some(SqlState::PROTOCOL_VIOLATION)
    );
    // Too short to hold a code.
    let short = answer_to(&[0, 0, 0, 4], port).await;
    assert_eq!(
        sqlstate_of(&short).await,
        Some(SqlState::PROTOCOL_VIOLATION)
    );
    // Parameters without terminators.
    let mut garbage = vec![0, 0, 0, 16, 0, 3, 0, 0];
    garbage.extend_from_slice(b"user\0abc");
    let unterminated = answer_to(&garbage, port).await;
    assert_eq!(
        sqlstate_of(&unterminated).await,
        Some(SqlState::PROTOCOL_VIOLATION)
    );
    // Protocol 2.0 is not spoken.
    let v2 = answer_to(&[0, 0, 0, 8, 0, 2, 0, 0], port).await;
    assert_eq!(
        sqlstate_of(&v2).await,
        Some(SqlState::FEATURE_NOT_SUPPORTED)
    );
    // An HTTP request is not a startup packet.
    let http = answer_to(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", port).await;
    assert_eq!(sqlstate_of(&http).await, Some(SqlState::PROTOCOL_VIOLATION));

    // SSLRequest gets 'N' and the connection goes on.
    let (answer, _connection) = wire::ssl_request(port).await;
    assert_eq!(answer, b'N');

    // Others are still served.
    let c = env.app(t.slug.as_str()).await;
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_protocol_minor_version_is_negotiated_down_to_3_0() {
    let env = TestEnv::start().await;
    let port = env.port();
    let mut packet = Vec::new();
    let mut body = vec![0, 3, 0, 2];
    body.extend_from_slice(b"user\0app\0database\0x\0_pq_.test\0on\0\0");
    packet.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    packet.extend_from_slice(&body);
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&packet).await.unwrap();
    let (tag, rest) = wire::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'v', "NegotiateProtocolVersion first");
    // Newest minor version we speak (0), then one unrecognized option.
    assert_eq!(&rest[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&rest[8..], b"_pq_.test\0");
    // Then authentication starts.
    let (tag, _) = wire::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'R');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_startup_is_cut_off_at_the_login_timeout() {
    let env = TestEnv::start_with(|c| c.proxy.login_timeout_ms = 500).await;
    let mut s = TcpStream::connect(("127.0.0.1", env.port())).await.unwrap();
    s.write_all(&[0, 0, 0]).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed at the login timeout")
        .unwrap();
    assert_eq!(sqlstate_of(&out).await, Some(SqlState::PROTOCOL_VIOLATION));
}
