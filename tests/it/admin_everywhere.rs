//! Admin commands apply on every instance (issue 15 part 3, issue 14 part 4): three instances
//! over one registry, a tenant's clients on each. PAUSE/RESUME, KILL, RELOAD and SUSPEND
//! TENANT given to one console act on all three; ALTER TENANT ... SET (pool_size = ...) given
//! to one reaches another, whose running client keeps its backend while its new clients get
//! the new pool.

use std::path::PathBuf;
use std::time::Duration;

use tenantgate::pool::PoolMode;
use tenantgate::server::Proxy;
use tokio_postgres::{Client, NoTls};

use crate::common::query::rows;
use crate::common::{TestEnv, eventually, unique};

/// A client of `dbname` on the instance listening on `port`.
async fn connect(port: u16, dbname: &str, user: &str, password: &str) -> Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(5))
        .connect(NoTls)
        .await
        .expect("connect through an instance");
    tokio::spawn(connection);
    client
}

async fn admin_on(env: &TestEnv, port: u16) -> Client {
    connect(port, &env.config.admin.database, "root", "root-secret").await
}

/// `show` on `admin` as rows of text.
async fn show(admin: &Client, show: &str) -> Vec<Vec<String>> {
    rows(&admin.simple_query(show).await.expect(show))
}

/// The `paused` column of the tenant's pool (POOLS column 12), or None without a pool.
async fn paused(admin: &Client, slug: &str) -> Option<String> {
    show(admin, &format!("SHOW POOLS {slug}"))
        .await
        .first()
        .map(|r| r[12].clone())
}

/// Whether the client was disconnected (its next query fails) within `within`.
async fn gone(client: &Client, within: Duration) -> bool {
    eventually(within, || async {
        client.simple_query("SELECT 1").await.is_err()
    })
    .await
}

/// A proxy (transaction pooling, 1 s suspend grace, quick heartbeats) whose config is on disk,
/// for RELOAD; the returned instances share its registry, key, server and file.
async fn three_instances() -> (TestEnv, PathBuf, Proxy, Proxy) {
    let file = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}.toml",
        std::process::id(),
        unique("everywhere-")
    ));
    let source = file.clone();
    let env = TestEnv::start_with(move |c| {
        c.source = Some(source);
        c.pool.mode = PoolMode::Transaction;
        c.proxy.suspend_grace_seconds = 1;
        c.instance.heartbeat_seconds = 1;
    })
    .await;
    std::fs::write(&file, toml::to_string(&env.config).unwrap()).unwrap();
    let b = Proxy::start(env.config.clone()).await.expect("instance B");
    let c = Proxy::start(env.config.clone()).await.expect("instance C");
    (env, file, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_kill_reload_and_suspend_on_one_instance_act_on_all_three() {
    let (env, file, b, c) = three_instances().await;
    let ports = [env.port(), b.local_addr().port(), c.local_addr().port()];
    let t = env.tenant_with_user("everywhere").await;
    let slug = t.slug.as_str();
    let mut admins = Vec::new();
    for port in ports {
        admins.push(admin_on(&env, port).await);
    }
    let mut apps = Vec::new();
    for port in ports {
        let app = connect(port, slug, "app", "secret").await;
        app.simple_query("SELECT 1").await.expect("a first query");
        apps.push(app);
    }
    // Every instance is live in the registry, so A's commands wait for B's and C's answers.
    assert!(
        eventually(Duration::from_secs(5), || async {
            show(&admins[0], "SHOW INSTANCES").await.len() == 3
        })
        .await,
        "three live instances"
    );

    // PAUSE on A closes the gate on B and C too; RESUME on A opens all three.
    admins[0]
        .simple_query(&format!("PAUSE {slug}"))
        .await
        .expect("PAUSE");
    for admin in &admins {
        assert_eq!(paused(admin, slug).await.as_deref(), Some("t"), "paused");
    }
    let held =
        tokio::time::timeout(Duration::from_millis(300), apps[2].simple_query("SELECT 1")).await;
    assert!(held.is_err(), "a transaction on C waits while paused");
    admins[0]
        .simple_query(&format!("RESUME {slug}"))
        .await
        .expect("RESUME");
    for admin in &admins {
        assert_eq!(paused(admin, slug).await.as_deref(), Some("f"), "resumed");
    }
    apps[2]
        .simple_query("SELECT 1")
        .await
        .expect("C serves again after RESUME");

    // KILL on B disconnects the tenant's clients on all three at once.
    admins[1]
        .simple_query(&format!("KILL {slug}"))
        .await
        .expect("KILL");
    for (i, app) in apps.iter().enumerate() {
        assert!(
            gone(app, Duration::from_secs(2)).await,
            "KILL on B disconnected instance {i}'s client"
        );
    }

    // RELOAD on A: C applies the changed live key from its own (here: the same) file.
    let mut config = env.config.clone();
    config.proxy.login_timeout_ms = 12_345;
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    admins[0].simple_query("RELOAD").await.expect("RELOAD");
    let on_c = show(&admins[2], "SHOW CONFIG").await;
    assert!(
        on_c.iter()
            .any(|r| r[0] == "proxy.login_timeout_ms" && r[1] == "12345"),
        "C reloaded: {on_c:?}"
    );

    // SUSPEND TENANT on C: the clients on all three are disconnected after the 1 s grace.
    let mut apps = Vec::new();
    for port in ports {
        apps.push(connect(port, slug, "app", "secret").await);
    }
    admins[2]
        .simple_query(&format!("SUSPEND TENANT {slug}"))
        .await
        .expect("SUSPEND TENANT");
    for (i, app) in apps.iter().enumerate() {
        assert!(
            gone(app, Duration::from_secs(4)).await,
            "SUSPEND on C disconnected instance {i}'s client after the grace"
        );
    }
    drop(std::fs::remove_file(&file));
    b.shutdown(Duration::from_secs(1)).await;
    c.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_size_set_on_one_instance_reaches_another_whose_running_client_keeps_its_backend() {
    let env = TestEnv::start_with(|c| c.pool.mode = PoolMode::Transaction).await;
    let b = Proxy::start(env.config.clone()).await.expect("instance B");
    let b_port = b.local_addr().port();
    let t = env.tenant_with_user("size").await;
    let slug = t.slug.as_str();
    let admin_b = admin_on(&env, b_port).await;

    // A client on B inside a transaction holds a backend of the pool built to pool_size 10.
    let running = connect(b_port, slug, "app", "secret").await;
    running
        .batch_execute("BEGIN; CREATE TEMP TABLE kept (x int); INSERT INTO kept VALUES (1)")
        .await
        .expect("a running transaction on B");
    let before = show(&admin_b, &format!("SHOW POOLS {slug}")).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0][4], "10", "pool_size before: {before:?}");

    env.admin()
        .await
        .simple_query(&format!("ALTER TENANT {slug} SET (pool_size = 3)"))
        .await
        .expect("ALTER TENANT on A");

    // B's new clients get a pool built to the new size.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let fresh = connect(b_port, slug, "app", "secret").await;
            fresh.simple_query("SELECT 1").await.is_ok()
                && show(&admin_b, &format!("SHOW POOLS {slug}"))
                    .await
                    .iter()
                    .any(|r| r[4] == "3")
        })
        .await,
        "B's SHOW POOLS shows the new pool_size"
    );

    // The running client kept its backend: its transaction and temp table are still there.
    let rows = running
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .expect("the running client keeps working");
    assert_eq!(rows.get::<_, i64>(0), 1);
    running.batch_execute("COMMIT").await.expect("COMMIT");
    b.shutdown(Duration::from_secs(1)).await;
}
