//! Issue 14 part 4, users moved over with their passwords: CREATE/ALTER USER and CREATE ADMIN
//! USER given a SCRAM-SHA-256 verifier that PostgreSQL itself made (read from the test
//! cluster's pg_authid) store it as it is, and a real client logs in through the proxy with
//! the password nobody gave tenantgate. Malformed verifiers and md5 hashes are refused.

use crate::common;

use common::{TestEnv, unique};
use tokio_postgres::error::SqlState;

/// The verifier PostgreSQL stores for a new role with `password`, read from pg_authid.
pub(crate) async fn postgres_verifier(role: &str, password: &str) -> String {
    let pg = common::admin_client("postgres").await;
    pg.batch_execute(&format!(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE {role} LOGIN PASSWORD '{password}'"
    ))
    .await
    .expect("create role");
    pg.query_one(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
        &[&role],
    )
    .await
    .expect("read pg_authid")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_made_by_postgresql_logs_the_user_in_with_its_password() {
    let env = TestEnv::start().await;
    let t = env.tenant("vrf-").await;
    let slug = t.slug.as_str();
    let first = postgres_verifier(&unique("vrf_a_"), "moved-pw").await;
    assert!(first.starts_with("SCRAM-SHA-256$4096:"), "{first}");
    let admin = env.admin().await;

    // A literal in the simple protocol.
    admin
        .batch_execute(&format!(
            "CREATE USER mover FOR TENANT {slug} PASSWORD '{first}'"
        ))
        .await
        .expect("create user with a verifier");
    let stored = env
        .registry
        .user_verifier(&t.slug, "mover")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(stored, first, "the verifier is stored as given");
    let c = env
        .connect(slug, "mover", "moved-pw")
        .await
        .expect("log in with the moved password");
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let wrong = env.connect(slug, "mover", "other").await.unwrap_err();
    assert_eq!(wrong.code(), Some(&SqlState::INVALID_PASSWORD));

    // ALTER USER with another role's verifier, as a bound parameter.
    let second = postgres_verifier(&unique("vrf_b_"), "second-pw").await;
    admin
        .execute(
            "ALTER USER $1 FOR TENANT $2 PASSWORD $3",
            &[&"mover", &slug, &second],
        )
        .await
        .expect("alter user with a verifier");
    env.connect(slug, "mover", "second-pw")
        .await
        .expect("log in with the new password");
    let old = env.connect(slug, "mover", "moved-pw").await.unwrap_err();
    assert_eq!(old.code(), Some(&SqlState::INVALID_PASSWORD));

    // A plaintext password works as before.
    admin
        .batch_execute(&format!(
            "CREATE USER plain FOR TENANT {slug} PASSWORD 'plain-pw'"
        ))
        .await
        .expect("create user with a password");
    env.connect(slug, "plain", "plain-pw")
        .await
        .expect("log in with a plaintext-given password");

    // An admin user from a verifier reaches the console.
    let third = postgres_verifier(&unique("vrf_c_"), "ops-pw").await;
    admin
        .execute("CREATE ADMIN USER ops PASSWORD $1", &[&third])
        .await
        .expect("create admin user with a verifier");
    let ops = env
        .connect(&env.config.admin.database, "ops", "ops-pw")
        .await
        .expect("admin login with the moved password");
    ops.simple_query("SHOW VERSION").await.expect("console");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_verifiers_and_md5_hashes_are_refused_clearly() {
    let env = TestEnv::start().await;
    let t = env.tenant("vrfbad-").await;
    let slug = t.slug.as_str();
    let good = postgres_verifier(&unique("vrf_d_"), "pw").await;
    let (head, keys) = good.rsplit_once('$').unwrap();
    let (stored_key, _) = keys.split_once(':').unwrap();
    let admin = env.admin().await;
    for (password, says) in [
        // ServerKey cut short.
        (format!("{head}${stored_key}:AAAA"), "ServerKey"),
        (format!("{head}$!!!:{stored_key}"), "StoredKey"),
        ("SCRAM-SHA-256$0:c2FsdA==$x:y".to_owned(), "iteration count"),
        ("SCRAM-SHA-256$4096:c2FsdA==".to_owned(), "of the form"),
        (format!("md5{}", "0123456789abcdef".repeat(2)), "md5"),
    ] {
        let e = admin
            .execute(
                "CREATE USER bad FOR TENANT $1 PASSWORD $2",
                &[&slug, &password],
            )
            .await
            .expect_err(&password);
        assert_eq!(
            e.code(),
            Some(&SqlState::INVALID_PARAMETER_VALUE),
            "{password}: {e}"
        );
        let message = e.as_db_error().unwrap().message().to_owned();
        assert!(message.contains(says), "{password}: {message}");
        assert!(
            !message.contains(&password),
            "the error repeats the secret: {message}"
        );
    }
    assert!(
        env.registry
            .user_verifier(&t.slug, "bad")
            .await
            .unwrap()
            .is_none(),
        "a refused user must not be stored"
    );
    let admin_bad = admin
        .execute(
            "CREATE ADMIN USER bad PASSWORD $1",
            &[&"SCRAM-SHA-256$4096:c2FsdA==$x:y"],
        )
        .await
        .expect_err("malformed admin verifier");
    assert_eq!(
        admin_bad.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{admin_bad}"
    );
}
