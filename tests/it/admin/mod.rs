//! The admin console through real clients: psql and tokio-postgres (simple and extended
//! protocol) against the virtual admin database of a running proxy, with tenants provisioned
//! on the test cluster.

mod plans;
pub(crate) mod verifiers;

use crate::common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::psql::Psql;
use common::{TestEnv, eventually, unique};
use tokio_postgres::error::SqlState;

fn admin_uri(env: &TestEnv) -> String {
    env.uri(&env.config.admin.database, "root", "root-secret")
}

#[tokio::test]
async fn psql_shows_tenants_pools_and_servers() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("show").await;
    let app = env.app(t.slug.as_str()).await;
    app.simple_query("SELECT 1").await.expect("query");

    let psql = Psql::new(&admin_uri(&env)).aligned();
    let (ok, out) = psql.run_text("SHOW TENANTS").await;
    assert!(
        ok && out.contains(t.slug.as_str()) && out.contains("active"),
        "{out}"
    );
    let (ok, out) = psql.run_text(&format!("SHOW POOLS {}", t.slug)).await;
    assert!(
        ok && out.contains(t.slug.as_str()) && out.contains("(1 row)"),
        "{out}"
    );
    let (ok, out) = psql.run_text("SHOW SERVERS").await;
    assert!(
        ok && out.contains("local") && out.contains("budget"),
        "{out}"
    );
    let (ok, out) = psql.run_text("SHOW CONFIG").await;
    assert!(ok && out.contains("admin.database"), "{out}");
    assert!(
        !out.contains("root-secret") && out.contains("password=********"),
        "SHOW CONFIG leaks a password: {out}"
    );
    let (ok, out) = psql.run_text("SHOW CLIENTS").await;
    assert!(
        ok && out.contains(t.slug.as_str()) && out.contains("admin"),
        "{out}"
    );
    let (ok, out) = psql.run_text("SHOW STATS").await;
    assert!(
        ok && out.contains(t.slug.as_str()) && out.contains("avg_wait_us"),
        "{out}"
    );
    let admin = env.admin().await;
    let row = admin
        .query_one(
            "SELECT queries, transactions, clients_now, bytes_out FROM stats WHERE tenant = $1",
            &[&t.slug.as_str()],
        )
        .await
        .expect("stats");
    let (queries, transactions, now, bytes_out): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((queries, transactions, now), (1, 1, 1));
    assert!(bytes_out > 0);
    let (ok, out) = psql.run_text("SHOW HELP").await;
    assert!(ok && out.contains("MIGRATE ALL TENANTS"), "{out}");
    let (ok, out) = psql.run_text("VACUUM").await;
    assert!(
        !ok && out.contains("unsupported admin command") && out.contains("HINT"),
        "{out}"
    );
    drop(app);
}

#[tokio::test]
async fn select_filters_orders_and_limits_with_typed_columns() {
    let env = TestEnv::start().await;
    let prefix = unique("sel");
    let mut slugs = Vec::new();
    for i in 0..3 {
        let slug = format!("{prefix}-{i}");
        tenantgate::provision::create_tenant(
            env.config.provisioning(),
            &env.registry,
            &env.key,
            &slug,
            &tenantgate::provision::CreateTenant::default(),
        )
        .await
        .expect("create tenant");
        slugs.push(slug);
    }
    let admin = env.admin().await;

    // Extended protocol, a bound parameter, typed columns.
    let rows = admin
        .query(
            "SELECT slug, created_at, pool_loaded FROM tenants \
             WHERE slug LIKE $1 AND state IN ('active', 'suspended') ORDER BY slug DESC LIMIT 2",
            &[&format!("{prefix}%")],
        )
        .await
        .expect("select");
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, [slugs[2].clone(), slugs[1].clone()]);
    let created: DateTime<Utc> = rows[0].get(1);
    assert!(created <= Utc::now());
    let loaded: bool = rows[0].get(2);
    assert!(!loaded);

    let count: i64 = admin
        .query_one(
            "SELECT count(*) FROM tenants WHERE NOT (slug = $1) AND slug LIKE $2",
            &[&slugs[0], &format!("{prefix}%")],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2);

    // Simple protocol, several statements.
    let messages = admin
        .simple_query("SHOW VERSION; SELECT name, budget FROM servers WHERE budget > 0")
        .await
        .expect("simple query");
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].get(0).is_some_and(|v| v.starts_with("tenantgate")));
    assert_eq!(rows[1].get(0), Some("local"));
}

#[tokio::test]
async fn create_tenant_with_bound_parameters_then_connect() {
    let env = TestEnv::start().await;
    let admin = env.admin().await;
    let slug = unique("signup");
    admin
        .execute(
            "CREATE TENANT $1 WITH (name = $2, server = 'local')",
            &[&slug, &"Signup Co"],
        )
        .await
        .expect("create tenant");
    admin
        .execute(
            "CREATE USER $1 FOR TENANT $2 PASSWORD $3",
            &[&"web", &slug, &"web-pass"],
        )
        .await
        .expect("create user");
    let client = env
        .connect(&slug, "web", "web-pass")
        .await
        .expect("connect");
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .expect("query");
    let database: String = row.get(0);
    assert_eq!(database, format!("tenant_{}", slug.replace('-', "_")));

    let again = admin
        .execute("CREATE TENANT $1", &[&slug])
        .await
        .expect_err("second create");
    assert_eq!(again.code(), Some(&SqlState::DUPLICATE_OBJECT));
    let dup = admin
        .execute(
            &format!("CREATE USER web FOR TENANT {slug} PASSWORD 'x'"),
            &[],
        )
        .await
        .expect_err("duplicate user");
    assert_eq!(
        dup.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    admin
        .execute(
            &format!("ALTER USER web FOR TENANT {slug} PASSWORD 'new-pass'"),
            &[],
        )
        .await
        .expect("alter user");
    assert!(env.connect(&slug, "web", "new-pass").await.is_ok());
    admin
        .execute(&format!("DROP USER web FOR TENANT {slug}"), &[])
        .await
        .expect("drop user");
    let gone = env
        .connect(&slug, "web", "new-pass")
        .await
        .expect_err("dropped user");
    assert_eq!(gone.code(), Some(&SqlState::INVALID_PASSWORD));

    let activity = admin
        .query(
            "SELECT action FROM activity WHERE tenant = $1 ORDER BY id",
            &[&slug],
        )
        .await
        .expect("activity");
    let actions: Vec<String> = activity.iter().map(|r| r.get(0)).collect();
    assert!(
        actions.contains(&"provision.done".to_owned()),
        "{actions:?}"
    );
    assert!(actions.contains(&"user.drop".to_owned()), "{actions:?}");
}

#[tokio::test]
async fn only_admin_users_reach_the_console() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("nonadmin").await;
    let db = env.config.admin.database.clone();

    let tenant_user = env
        .connect(&db, "app", "secret")
        .await
        .expect_err("tenant user");
    assert_eq!(
        tenant_user.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    let wrong = env
        .connect(&db, "root", "wrong")
        .await
        .expect_err("wrong password");
    assert_eq!(wrong.code(), Some(&SqlState::INVALID_PASSWORD));
    // An admin is not a user of any tenant.
    let admin_as_tenant = env
        .connect(t.slug.as_str(), "root", "root-secret")
        .await
        .expect_err("admin on a tenant");
    assert_eq!(admin_as_tenant.code(), Some(&SqlState::INVALID_PASSWORD));
}

#[tokio::test]
async fn suspend_resume_and_kill_reach_connected_clients() {
    // A grace of 5 s, so that FORCE (allowed 3 s below: this runtime has one thread, which
    // the proxy shares with the test) is still seen to come well before the grace ends.
    let env = TestEnv::start_with(|c| c.proxy.suspend_grace_seconds = 5).await;
    let t = env.tenant_with_user("lifecycle").await;
    let slug = t.slug.as_str();
    let admin = env.admin().await;

    // KILL drops a connected client at once.
    let victim = env.app(slug).await;
    victim.simple_query("SELECT 1").await.expect("before kill");
    admin
        .batch_execute(&format!("KILL {slug}"))
        .await
        .expect("kill");
    assert!(
        eventually(Duration::from_secs(5), || async {
            victim.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "killed client still works"
    );

    // SUSPEND: new connections refused with 57P03, connected ones leave after the grace.
    let connected = env.app(slug).await;
    admin
        .batch_execute(&format!("SUSPEND TENANT {slug}"))
        .await
        .expect("suspend");
    let refused = env
        .connect(slug, "app", "secret")
        .await
        .expect_err("suspended");
    assert_eq!(refused.code(), Some(&SqlState::CANNOT_CONNECT_NOW));
    assert!(
        eventually(Duration::from_secs(15), || async {
            connected.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "suspended tenant's client still connected"
    );
    let state: String = admin
        .query_one("SELECT state FROM tenants WHERE slug = $1", &[&slug])
        .await
        .expect("state")
        .get(0);
    assert_eq!(state, "suspended");

    admin
        .batch_execute(&format!("RESUME TENANT {slug}"))
        .await
        .expect("resume");
    let back = env.app(slug).await;
    back.simple_query("SELECT 1").await.expect("after resume");
    let not_suspended = admin
        .batch_execute(&format!("RESUME TENANT {slug}"))
        .await
        .expect_err("resume twice");
    assert_eq!(
        not_suspended.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );

    // FORCE disconnects at once, without the grace period: within 3 s, where the grace is
    // 5 s (900 ms was too short for a loaded machine on this one-thread runtime).
    admin
        .batch_execute(&format!("SUSPEND TENANT {slug} FORCE"))
        .await
        .expect("suspend force");
    assert!(
        eventually(Duration::from_secs(3), || async {
            back.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "FORCE did not disconnect at once"
    );
}

#[tokio::test]
async fn errors_carry_sqlstates() {
    let env = TestEnv::start().await;
    let admin = env.admin().await;
    for (sql, code) in [
        ("VACUUM", SqlState::FEATURE_NOT_SUPPORTED),
        ("CREATE TENANT", SqlState::SYNTAX_ERROR),
        ("SELECT * FROM nowhere", SqlState::UNDEFINED_TABLE),
        ("SELECT nope FROM tenants", SqlState::UNDEFINED_COLUMN),
        (
            "SELECT slug FROM tenants GROUP BY slug",
            SqlState::FEATURE_NOT_SUPPORTED,
        ),
        ("SUSPEND TENANT no-such-tenant", SqlState::UNDEFINED_OBJECT),
        ("SHOW TENANT no-such-tenant", SqlState::UNDEFINED_OBJECT),
        ("CREATE TENANT Bad_Slug!", SqlState::SYNTAX_ERROR),
        ("CREATE TENANT -bad", SqlState::SYNTAX_ERROR),
        (
            "CREATE TENANT ok WITH (plan = 'gold')",
            SqlState::INVALID_PARAMETER_VALUE,
        ),
    ] {
        let e = admin.batch_execute(sql).await.expect_err(sql);
        assert_eq!(e.code(), Some(&code), "{sql}: {e}");
    }
    // The session is still usable after errors.
    admin
        .batch_execute("SHOW VERSION")
        .await
        .expect("still usable");
}

/// An admin connection whose NOTICE messages are collected.
async fn admin_with_notices(
    env: &TestEnv,
) -> (
    tokio_postgres::Client,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let (client, mut connection) = env
        .client_config(&env.config.admin.database, "root", "root-secret")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("admin connect");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&notices);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notice(n) = message {
                sink.lock().unwrap().push(n.message().to_owned());
            }
        }
    });
    (client, notices)
}

#[tokio::test]
async fn migrate_all_reports_progress_and_one_row_per_tenant() {
    let dir = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}",
        std::process::id(),
        unique("admin-migrations-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001_base.sql"), "CREATE TABLE base (id int);").unwrap();
    let migrations = dir.clone();
    let env = TestEnv::start_with(move |c| c.provision.migrations_dir = migrations).await;
    let (admin, notices) = admin_with_notices(&env).await;
    let prefix = unique("mig");
    let slugs: Vec<String> = (0..50).map(|i| format!("{prefix}-{i}")).collect();
    for slug in &slugs {
        admin
            .batch_execute(&format!("CREATE TENANT {slug}"))
            .await
            .expect("create tenant");
    }
    // A new migration; one tenant's database already has the table it creates.
    std::fs::write(dir.join("0002_orders.sql"), "CREATE TABLE orders (id int);").unwrap();
    let broken = &slugs[3];
    let broken_db = format!("tenant_{}", broken.replace('-', "_"));
    common::connect_str(&common::cluster().connection_string(&broken_db))
        .await
        .expect("connect to the broken tenant's database")
        .batch_execute("CREATE TABLE orders (id int)")
        .await
        .expect("conflicting table");

    let rows = admin
        .query("MIGRATE ALL TENANTS CONCURRENCY 2", &[])
        .await
        .expect("migrate all");
    let mine: Vec<_> = rows
        .iter()
        .filter(|r| r.get::<_, String>("tenant").starts_with(&prefix))
        .collect();
    assert_eq!(mine.len(), 50);
    for r in &mine {
        let slug: String = r.get("tenant");
        let status: String = r.get("status");
        if &slug == broken {
            assert_eq!(status, "failed");
            let error: String = r.get("error");
            assert!(error.contains("orders"), "{error}");
        } else {
            assert_eq!(status, "ok", "{slug}");
            assert_eq!(r.get::<_, Option<i64>>("version"), Some(2));
        }
    }
    let seen = notices.lock().unwrap().clone();
    assert!(
        seen.iter().any(|n| n == "migrated 50/50 tenants, 1 failed"),
        "{seen:?}"
    );
    assert!(seen.len() >= 50, "{seen:?}");

    let ledger: i64 = admin
        .query_one(
            "SELECT count(*) FROM migrations WHERE tenant LIKE $1",
            &[&format!("{prefix}%")],
        )
        .await
        .expect("ledger")
        .get(0);
    assert_eq!(ledger, 50 + 49);

    // A changed checksum is refused for that tenant.
    std::fs::write(dir.join("0001_base.sql"), "CREATE TABLE base (id bigint);").unwrap();
    let changed = admin
        .query(&format!("MIGRATE TENANT {}", slugs[0]), &[])
        .await
        .expect_err("checksum changed");
    assert_eq!(
        changed.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    assert!(
        changed.to_string().contains("checksum") || format!("{changed:?}").contains("checksum")
    );

    // DROP TENANT removes the database and marks the tenant deleted.
    admin
        .batch_execute(&format!("DROP TENANT {}", slugs[5]))
        .await
        .expect("drop tenant");
    let state: String = admin
        .query_one("SELECT state FROM tenants WHERE slug = $1", &[&slugs[5]])
        .await
        .expect("state")
        .get(0);
    assert_eq!(state, "deleted");
    let exists = common::admin_client("postgres")
        .await
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&format!("tenant_{}", slugs[5].replace('-', "_"))],
        )
        .await
        .expect("pg_database");
    assert!(exists.is_none());
}

#[tokio::test]
async fn pause_waits_for_running_transactions_and_holds_new_ones() {
    let env = TestEnv::start_with(|c| c.pool.mode = tenantgate::pool::PoolMode::Transaction).await;
    let t = env.tenant_with_user("pause").await;
    let slug = t.slug.to_string();
    let running = env.app(&slug).await;
    let waiting = env.app(&slug).await;
    running
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");

    let admin = env.admin().await;
    let pause = tokio::spawn({
        let sql = format!("PAUSE {slug}");
        async move { admin.batch_execute(&sql).await.map(|()| admin) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned while a transaction was running"
    );

    // The running transaction finishes; PAUSE then returns.
    running.batch_execute("COMMIT").await.expect("commit");
    let admin = tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("PAUSE returns once the transaction ended")
        .expect("join")
        .expect("pause");

    // A new transaction waits at the gate until RESUME.
    let held = tokio::spawn(async move { waiting.simple_query("SELECT 42").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a paused tenant ran a new transaction");
    let paused: bool = admin
        .query_one("SELECT paused FROM pools WHERE tenant = $1", &[&slug])
        .await
        .expect("pools")
        .get(0);
    assert!(paused);
    admin
        .batch_execute(&format!("RESUME {slug}"))
        .await
        .expect("resume");
    tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held query runs after RESUME")
        .expect("join")
        .expect("query");
    let again = admin
        .batch_execute(&format!("RESUME {slug}"))
        .await
        .expect_err("not paused");
    assert_eq!(
        again.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
}

#[tokio::test]
async fn reload_applies_pool_and_plan_changes_and_lists_what_needs_a_restart() {
    let file = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}.toml",
        std::process::id(),
        unique("reload-")
    ));
    let source = file.clone();
    let env = TestEnv::start_with(move |c| c.source = Some(source)).await;
    let t = env.tenant_with_user("reload").await;
    let slug = t.slug.to_string();
    let first = env.app(&slug).await;
    first.simple_query("SELECT 1").await.expect("query");
    let admin = env.admin().await;
    let size: i64 = admin
        .query_one("SELECT pool_size FROM pools WHERE tenant = $1", &[&slug])
        .await
        .expect("pools")
        .get(0);
    assert_eq!(size, 10);

    // A broken file changes nothing.
    std::fs::write(&file, "[pool]\npool_size = \"many\"\n").unwrap();
    let broken = admin.query("RELOAD", &[]).await.expect_err("broken config");
    assert!(format!("{broken:?}").contains("not reloaded"), "{broken:?}");

    let mut changed = env.config.clone();
    changed.pool.pool_size = 3;
    changed.proxy.suspend_grace_seconds = 7;
    changed.proxy.listen = "127.0.0.1:1".parse().unwrap();
    std::fs::write(&file, toml::to_string(&changed).unwrap()).unwrap();
    let rows = admin.query("RELOAD", &[]).await.expect("reload");
    let reported: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(3))).collect();
    assert!(
        reported.contains(&("pool.pool_size".to_owned(), true)),
        "{reported:?}"
    );
    assert!(
        reported.contains(&("proxy.suspend_grace_seconds".to_owned(), true)),
        "{reported:?}"
    );
    assert!(
        reported.contains(&("proxy.listen".to_owned(), false)),
        "{reported:?}"
    );

    // The tenant's next client gets a pool built with the new size; the old one drains.
    drop(first);
    let second = env.app(&slug).await;
    second
        .simple_query("SELECT 1")
        .await
        .expect("query after reload");
    let size: i64 = admin
        .query_one("SELECT pool_size FROM pools WHERE tenant = $1", &[&slug])
        .await
        .expect("pools")
        .get(0);
    assert_eq!(size, 3);
    let grace: String = admin
        .query_one(
            "SELECT value FROM config WHERE key = 'proxy.suspend_grace_seconds'",
            &[],
        )
        .await
        .expect("config")
        .get(0);
    assert_eq!(grace, "7");
    let listen: String = admin
        .query_one("SELECT value FROM config WHERE key = 'proxy.listen'", &[])
        .await
        .expect("config")
        .get(0);
    assert_ne!(
        listen, "127.0.0.1:1",
        "a restart-only key must not look applied"
    );
}

#[tokio::test]
async fn a_failed_provisioning_leaves_nothing_but_a_failed_row() {
    let dir = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}",
        std::process::id(),
        unique("admin-broken-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001_ok.sql"), "CREATE TABLE ok (id int);").unwrap();
    std::fs::write(dir.join("0002_broken.sql"), "CREATE TABLE oops (id int").unwrap();
    let migrations = dir.clone();
    let env = TestEnv::start_with(move |c| c.provision.migrations_dir = migrations).await;
    let admin = env.admin().await;
    let slug = unique("broken");
    let failed = admin
        .batch_execute(&format!("CREATE TENANT {slug}"))
        .await
        .expect_err("broken migration");
    let text = format!("{failed:?}");
    assert!(text.contains("0002_broken.sql"), "{text}");
    let row = admin
        .query_one("SELECT state, error FROM tenants WHERE slug = $1", &[&slug])
        .await
        .expect("tenant row");
    let (state, error): (String, Option<String>) = (row.get(0), row.get(1));
    assert_eq!(state, "failed");
    assert!(error.is_some_and(|e| e.contains("0002_broken.sql")));
    let name = format!("tenant_{}", slug.replace('-', "_"));
    let pg = common::admin_client("postgres").await;
    let leftovers: i64 = pg
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1) \
                  + (SELECT count(*) FROM pg_roles WHERE rolname = $1)",
            &[&name],
        )
        .await
        .expect("catalog")
        .get(0);
    assert_eq!(leftovers, 0);

    // Fixed, the same command retries.
    std::fs::write(dir.join("0002_broken.sql"), "CREATE TABLE oops (id int);").unwrap();
    admin
        .batch_execute(&format!("CREATE TENANT {slug}"))
        .await
        .expect("retry");
    let state: String = admin
        .query_one("SELECT state FROM tenants WHERE slug = $1", &[&slug])
        .await
        .expect("tenant row")
        .get(0);
    assert_eq!(state, "active");
}

#[tokio::test]
async fn create_tenant_without_a_server_picks_the_least_loaded() {
    let env = TestEnv::start_with(|c| {
        let mut second = c.servers[0].clone();
        second.name = "second".to_owned();
        c.servers.push(second);
    })
    .await;
    let admin = env.admin().await;
    let prefix = unique("spread");
    let mut placed = Vec::new();
    for i in 0..4 {
        let slug = format!("{prefix}-{i}");
        admin
            .batch_execute(&format!("CREATE TENANT {slug}"))
            .await
            .expect("create tenant");
        let server: String = admin
            .query_one("SELECT server FROM tenants WHERE slug = $1", &[&slug])
            .await
            .expect("tenant")
            .get(0);
        placed.push(server);
    }
    assert_eq!(placed, ["local", "second", "local", "second"]);
}

/// Issue 13, item 10: SHOW CONFIG hides the registry password in every spelling of a
/// connection string, here a URL with `?password=` (the old masking only knew `user:pw@`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_config_hides_a_password_given_as_a_url_parameter() {
    let pg = common::cluster();
    let env = TestEnv::start_with(|c| {
        let parsed: tokio_postgres::Config = c.registry.url.parse().unwrap();
        let db = parsed.get_dbname().unwrap().to_owned();
        c.registry.url = format!(
            "postgresql://{}@127.0.0.1:{}/{db}?password={}",
            pg.superuser(),
            pg.port(),
            pg.password()
        );
    })
    .await;
    let (ok, out) = Psql::new(&admin_uri(&env))
        .aligned()
        .run_text("SHOW CONFIG")
        .await;
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("registry.url"))
        .unwrap_or_default();
    assert!(ok && line.contains("password=********"), "{out}");
    let leaked = format!("password={}", pg.password());
    assert!(
        !line.contains(&leaked) && !line.contains("?password"),
        "SHOW CONFIG leaks the registry password: {line}"
    );
}

/// Issue 13, item 11: a tenant named like the admin console's database could never be
/// reached (that name routes to the console): creating or registering one is refused with
/// 42939 and leaves no registry row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_named_like_the_admin_database_is_refused() {
    let env = TestEnv::start().await;
    let admin = env.admin().await;
    let name = env.config.admin.database.clone();
    for sql in [
        format!("CREATE TENANT {name}"),
        format!(
            "REGISTER TENANT {name} DATABASE 'postgres' ROLE 'postgres' PASSWORD 'x' SERVER 'local'"
        ),
    ] {
        let e = admin.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(e.code(), Some(&SqlState::RESERVED_NAME), "{sql}: {e}");
    }
    let slug = tenantgate::registry::TenantSlug::parse(&name).unwrap();
    assert!(env.registry.tenant(&slug).await.unwrap().is_none());
}

/// Issue 13, item 11: REGISTER TENANT adopted any role and any database. A role that reaches
/// past its database (superuser, CREATEROLE, ...) and a database another tenant already has
/// are refused; DROP TENANT keeps a registered tenant's database and role unless told DROP
/// DATABASE, while a created tenant's go as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_powerful_roles_and_taken_databases_and_drop_keeps_what_it_adopted() {
    let env = TestEnv::start().await;
    let admin = env.admin().await;
    let pg = common::cluster();
    let direct = common::admin_client("postgres").await;
    // A superuser (the cluster's own) and a CREATEROLE role are refused.
    let mighty = common::unique("mighty_");
    for sql in [
        format!("CREATE ROLE {mighty} LOGIN CREATEROLE PASSWORD 'pw'"),
        format!("CREATE DATABASE {mighty} OWNER {mighty}"),
    ] {
        direct.batch_execute(&sql).await.unwrap();
    }
    for (role, password, attribute) in [
        (
            pg.superuser().to_owned(),
            pg.password().to_owned(),
            "SUPERUSER",
        ),
        (mighty.clone(), "pw".to_owned(), "CREATEROLE"),
    ] {
        let slug = common::unique("mighty-");
        let sql = format!(
            "REGISTER TENANT {slug} DATABASE '{mighty}' ROLE '{role}' PASSWORD '{password}'"
        );
        let e = admin.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(e.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{e}");
        let message = e.as_db_error().unwrap().message().to_owned();
        assert!(message.contains(attribute), "{message}");
    }

    // A plain role and its own database register once; a second tenant on it is refused.
    let plain = common::unique("plain_");
    for sql in [
        format!("CREATE ROLE {plain} LOGIN PASSWORD 'pw'"),
        format!("CREATE DATABASE {plain} OWNER {plain}"),
    ] {
        direct.batch_execute(&sql).await.unwrap();
    }
    let first = common::unique("adopted-");
    admin
        .batch_execute(&format!(
            "REGISTER TENANT {first} DATABASE '{plain}' ROLE '{plain}' PASSWORD 'pw'"
        ))
        .await
        .unwrap();
    let created = env.tenant("created-").await;
    for (slug, database) in [
        (common::unique("second-"), plain.clone()),
        (common::unique("thief-"), created.database.clone()),
    ] {
        let sql =
            format!("REGISTER TENANT {slug} DATABASE '{database}' ROLE '{plain}' PASSWORD 'pw'");
        let e = admin.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(e.code(), Some(&SqlState::DUPLICATE_OBJECT), "{e}");
    }

    let exists = |database: String| async move {
        common::admin_client("postgres")
            .await
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&database],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    };
    // DROP of the registered tenant keeps its database; DROP of the created one drops it.
    admin
        .batch_execute(&format!("DROP TENANT {first}"))
        .await
        .unwrap();
    assert!(
        exists(plain.clone()).await,
        "a registered database was dropped"
    );
    admin
        .batch_execute(&format!("DROP TENANT {}", created.slug))
        .await
        .unwrap();
    assert!(!exists(created.database.clone()).await);
    // Registered again (its old tenant is deleted), then dropped on request.
    let again = common::unique("again-");
    admin
        .batch_execute(&format!(
            "REGISTER TENANT {again} DATABASE '{plain}' ROLE '{plain}' PASSWORD 'pw'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP TENANT {again} DROP DATABASE"))
        .await
        .unwrap();
    assert!(
        !exists(plain).await,
        "DROP DATABASE drops a registered database"
    );
}
