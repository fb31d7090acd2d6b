//! Tenant schema migrations and the provisioning workflow on a real PostgreSQL: new tenants get
//! the migrations (as their own role) and a seed, a failure leaves nothing behind, migrate_all
//! survives a broken tenant, edited files are refused, two runners never apply a file twice,
//! and drop_tenant / remove_user clean up. Also the CLI commands.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestEnv, admin_client, connect_str, unique};
use futures_util::StreamExt as _;
use tenantgate::pool::ServerBudget;
use tenantgate::provision::{
    self, Budgets, CreateTenant, DatabaseOnDrop, MigrateAll, MigrateProgress, ProvisionError,
};
use tenantgate::registry::TenantState;
use tenantgate::registry::migrate::checksum;

const ORDERS: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric NOT NULL);";
const ITEMS: &str = "CREATE TABLE items (order_id bigint REFERENCES orders, sku text);\n\
                     CREATE INDEX items_order ON items (order_id);";

/// Compile-time check: the admin console spawns these futures on tokio.
fn send<F: std::future::Future + Send>(f: F) -> F {
    f
}

/// A fresh directory holding `files`.
fn migrations_dir(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tenantgate-test-{}-{}",
        std::process::id(),
        unique("migrations-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).unwrap();
    }
    dir
}

async fn env_with(dir: &Path) -> TestEnv {
    let dir = dir.to_path_buf();
    TestEnv::start_with(move |c| c.provision.migrations_dir = dir).await
}

async fn create(
    env: &TestEnv,
    slug: &str,
) -> Result<tenantgate::registry::TenantRecord, ProvisionError> {
    provision::create_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        slug,
        &CreateTenant::default(),
    )
    .await
}

/// A direct connection to the test's registry database.
async fn registry_db(env: &TestEnv) -> tokio_postgres::Client {
    connect_str(&env.config.registry.url).await.unwrap()
}

async fn ledger(env: &TestEnv, slug: &str) -> Vec<(i32, String)> {
    registry_db(env)
        .await
        .query(
            "SELECT version, checksum FROM tenant_migrations WHERE tenant_slug = $1 ORDER BY version",
            &[&slug],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn actions(env: &TestEnv, slug: &str) -> Vec<String> {
    registry_db(env)
        .await
        .query(
            "SELECT action FROM activity_log WHERE tenant_slug = $1 ORDER BY id",
            &[&slug],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn exists_on_server(database: &str) -> (bool, bool) {
    let admin = admin_client("postgres").await;
    let db = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await
        .unwrap()
        .is_some();
    let role = admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&database])
        .await
        .unwrap()
        .is_some();
    (db, role)
}

async fn table_owners(database: &str) -> Vec<(String, String)> {
    admin_client(database)
        .await
        .query(
            "SELECT tablename::text, tableowner::text FROM pg_tables WHERE schemaname = 'public' \
             ORDER BY tablename",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tenant_gets_the_migrations_as_its_own_role_and_the_seed() {
    let dir = migrations_dir(&[
        ("0001_orders.sql", ORDERS),
        ("0002_items.sql", ITEMS),
        ("README.md", "not a migration"),
    ]);
    let seed = dir.join("seed.sql.txt");
    std::fs::write(&seed, "INSERT INTO orders VALUES (1, 9.5), (2, 3);").unwrap();
    let env = TestEnv::start_with({
        let dir = dir.clone();
        move |c| {
            c.provision.migrations_dir = dir;
            c.provision.seed_file = Some(seed);
        }
    })
    .await;
    let slug = unique("mig-");
    let t = create(&env, &slug).await.unwrap();
    assert_eq!(t.state, TenantState::Active);

    let owners = table_owners(&t.database).await;
    assert_eq!(
        owners,
        [
            ("items".to_owned(), t.backend_role.clone()),
            ("orders".to_owned(), t.backend_role.clone())
        ]
    );
    let seeded: i64 = admin_client(&t.database)
        .await
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seeded, 2);

    assert_eq!(
        ledger(&env, &slug).await,
        [(1, checksum(ORDERS)), (2, checksum(ITEMS))]
    );
    assert_eq!(env.registry.schema_version(&t.slug).await.unwrap(), Some(2));
    let durations: Vec<i64> = registry_db(&env)
        .await
        .query(
            "SELECT duration_ms FROM tenant_migrations WHERE tenant_slug = $1",
            &[&slug],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(durations.iter().all(|d| *d >= 0), "{durations:?}");
    assert_eq!(
        actions(&env, &slug).await,
        [
            "provision.start",
            "provision.database",
            "provision.migrating",
            "migrate.apply",
            "migrate.apply",
            "provision.seed",
            "provision.done"
        ]
    );

    // Nothing is pending now.
    let again = provision::migrate_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        &slug,
        None,
    )
    .await
    .unwrap();
    assert!(again.applied.is_empty());
    assert_eq!(again.already_applied, 2);
    assert_eq!(again.schema_version, Some(2));
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_provisioning_leaves_nothing_and_can_be_retried() {
    let dir = migrations_dir(&[
        ("0001_orders.sql", ORDERS),
        ("0002_items.sql", "CREATE TABLE items (sku text,);"),
        ("0003_more.sql", "CREATE TABLE more (x int);"),
    ]);
    let env = env_with(&dir).await;
    let slug = unique("broken-");
    let err = create(&env, &slug).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ProvisionError::MigrationFailed { .. }),
        "{err:?}"
    );
    assert!(
        text.contains(&slug) && text.contains("0002_items.sql") && text.contains("syntax error"),
        "{text}"
    );

    let database = provision::database_name("tenant_{slug}", &slug);
    assert_eq!(exists_on_server(&database).await, (false, false));
    let t = env
        .registry
        .tenant(&tenantgate::registry::TenantSlug::parse(&slug).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.state, TenantState::Failed);
    let message = t.error_message.unwrap_or_default();
    assert!(
        message.contains("0002_items.sql") && message.contains("syntax error"),
        "{message}"
    );
    assert!(ledger(&env, &slug).await.is_empty());
    let log = actions(&env, &slug).await;
    assert!(
        log.ends_with(&[
            "migrate.apply".to_owned(),
            "migrate.failed".to_owned(),
            "provision.failed".to_owned()
        ]),
        "{log:?}"
    );

    // Fix the file; the retry starts from scratch (the old database and role are gone).
    std::fs::write(dir.join("0002_items.sql"), ITEMS).unwrap();
    let t = create(&env, &slug).await.unwrap();
    assert_eq!(t.state, TenantState::Active);
    assert_eq!(t.error_message, None);
    assert_eq!(ledger(&env, &slug).await.len(), 3);
    assert_eq!(env.registry.schema_version(&t.slug).await.unwrap(), Some(3));
    assert_eq!(table_owners(&t.database).await.len(), 3);
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr, reason = "timings, shown with --nocapture")]
async fn migrate_all_carries_on_past_a_broken_tenant() {
    let dir = migrations_dir(&[("0001_orders.sql", ORDERS)]);
    let mut env = env_with(&dir).await;
    let started = Instant::now();
    let slugs: Vec<String> = (0..50).map(|_| unique("many-")).collect();
    let created: Vec<_> = futures_util::stream::iter(&slugs)
        .map(|slug| create(&env, slug))
        .buffer_unordered(4)
        .collect()
        .await;
    let records: Vec<_> = created.into_iter().map(Result::unwrap).collect();
    eprintln!("50 tenants provisioned in {:?}", started.elapsed());

    // The next migration; one tenant already has a table of that name.
    std::fs::write(dir.join("0002_items.sql"), ITEMS).unwrap();
    let broken = &records[17];
    admin_client(&broken.database)
        .await
        .batch_execute("CREATE TABLE items (x int)")
        .await
        .unwrap();
    // A suspended tenant is migrated too; a deleted one is not.
    provision::set_state(
        &env.registry,
        records[3].slug.as_str(),
        TenantState::Suspended,
    )
    .await
    .unwrap();
    let deleted = unique("gone-");
    create(&env, &deleted).await.unwrap();
    provision::drop_tenant(
        env.config.provisioning(),
        &env.registry,
        &deleted,
        DatabaseOnDrop::Keep,
        None,
    )
    .await
    .unwrap();

    let seen: Arc<Mutex<Vec<MigrateProgress>>> = Arc::default();
    let started = Instant::now();
    let results = {
        let seen = seen.clone();
        send(provision::migrate_all(
            env.config.provisioning(),
            &env.registry,
            &env.key,
            MigrateAll {
                concurrency: Some(8),
                budgets: None,
            },
            move |p| seen.lock().unwrap().push(p),
        ))
        .await
        .unwrap()
    };
    eprintln!("50 tenants migrated in {:?}", started.elapsed());

    assert_eq!(results.len(), 50);
    let failed: Vec<_> = results.iter().filter(|r| r.result.is_err()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].slug, broken.slug);
    let message = failed[0].result.as_ref().unwrap_err();
    assert!(
        message.contains(broken.slug.as_str())
            && message.contains("0002_items.sql")
            && message.contains("already exists"),
        "{message}"
    );
    for r in results.iter().filter(|r| r.slug != broken.slug) {
        let outcome = r.result.as_ref().unwrap();
        assert_eq!(outcome.applied.len(), 1, "{}", r.slug);
        assert_eq!(outcome.already_applied, 1);
        assert_eq!(outcome.schema_version, Some(2));
    }
    assert_eq!(ledger(&env, broken.slug.as_str()).await.len(), 1);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 50);
    assert!(
        seen.iter()
            .enumerate()
            .all(|(i, p)| p.done == i + 1 && p.total == 50)
    );
    assert_eq!(
        seen.last().copied(),
        Some(MigrateProgress {
            done: 50,
            total: 50,
            failed: 1
        })
    );
    env.stop().await;
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_migration_is_refused_and_nothing_is_applied() {
    let dir = migrations_dir(&[("0001_orders.sql", ORDERS)]);
    let env = env_with(&dir).await;
    let slug = unique("edited-");
    let t = create(&env, &slug).await.unwrap();

    let edited = format!("{ORDERS}\n-- changed later\n");
    std::fs::write(dir.join("0001_orders.sql"), &edited).unwrap();
    std::fs::write(dir.join("0002_items.sql"), ITEMS).unwrap();
    let err = provision::migrate_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        &slug,
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ProvisionError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("0001_orders.sql")
            && text.contains(&checksum(ORDERS))
            && text.contains(&checksum(&edited)),
        "{text}"
    );
    assert_eq!(table_owners(&t.database).await.len(), 1);
    assert_eq!(ledger(&env, &slug).await, [(1, checksum(ORDERS))]);
    assert_eq!(actions(&env, &slug).await.last().unwrap(), "migrate.failed");
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_on_one_tenant_apply_each_file_once() {
    let dir = migrations_dir(&[("0001_orders.sql", ORDERS)]);
    let env = env_with(&dir).await;
    let slug = unique("race-");
    create(&env, &slug).await.unwrap();
    // Slow and not idempotent: applying it twice would fail.
    std::fs::write(
        dir.join("0002_items.sql"),
        format!("SELECT pg_sleep(0.3);\n{ITEMS}"),
    )
    .unwrap();
    std::fs::write(dir.join("0003_more.sql"), "CREATE TABLE more (x int);").unwrap();

    let run = || {
        provision::migrate_tenant(
            env.config.provisioning(),
            &env.registry,
            &env.key,
            &slug,
            None,
        )
    };
    let (a, b) = tokio::join!(run(), run());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.applied.len() + b.applied.len(), 2, "{a:?} {b:?}");
    assert!(a.applied.is_empty() || b.applied.is_empty(), "{a:?} {b:?}");
    assert_eq!(a.schema_version, Some(3));
    assert_eq!(b.schema_version, Some(3));
    assert_eq!(ledger(&env, &slug).await.len(), 3);
    let applies = actions(&env, &slug)
        .await
        .iter()
        .filter(|a| *a == "migrate.apply")
        .count();
    assert_eq!(applies, 3);
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_tenant_removes_the_database_unless_kept_and_remove_user_works() {
    let dir = migrations_dir(&[("0001_orders.sql", ORDERS)]);
    let env = env_with(&dir).await;
    let gone = create(&env, &unique("drop-")).await.unwrap();
    env.add_user(gone.slug.as_str(), "app", "secret").await;
    // A connected client does not stop the drop (WITH (FORCE)).
    let client = admin_client(&gone.database).await;
    provision::drop_tenant(
        env.config.provisioning(),
        &env.registry,
        gone.slug.as_str(),
        DatabaseOnDrop::Drop,
        None,
    )
    .await
    .unwrap();
    drop(client);
    assert_eq!(exists_on_server(&gone.database).await, (false, false));
    let row = env.registry.tenant(&gone.slug).await.unwrap().unwrap();
    assert_eq!(row.state, TenantState::Deleted);
    assert!(ledger(&env, gone.slug.as_str()).await.is_empty());
    let log = actions(&env, gone.slug.as_str()).await;
    assert!(
        log.ends_with(&["drop".to_owned(), "drop.database".to_owned()]),
        "{log:?}"
    );

    let err = provision::drop_tenant(
        env.config.provisioning(),
        &env.registry,
        gone.slug.as_str(),
        DatabaseOnDrop::Drop,
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProvisionError::AlreadyDeleted(_)), "{err:?}");
    let err = provision::set_state(&env.registry, gone.slug.as_str(), TenantState::Active)
        .await
        .unwrap_err();
    assert!(matches!(err, ProvisionError::StateChange { .. }), "{err:?}");
    let err = provision::drop_tenant(
        env.config.provisioning(),
        &env.registry,
        "no-such-tenant",
        DatabaseOnDrop::Drop,
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProvisionError::NoSuchTenant(_)), "{err:?}");

    let kept = create(&env, &unique("keep-")).await.unwrap();
    provision::drop_tenant(
        env.config.provisioning(),
        &env.registry,
        kept.slug.as_str(),
        DatabaseOnDrop::Keep,
        None,
    )
    .await
    .unwrap();
    assert_eq!(exists_on_server(&kept.database).await, (true, true));
    let row = env.registry.tenant(&kept.slug).await.unwrap().unwrap();
    assert_eq!(row.state, TenantState::Deleted);

    provision::remove_user(&env.registry, gone.slug.as_str(), "app")
        .await
        .unwrap();
    let err = provision::remove_user(&env.registry, gone.slug.as_str(), "app")
        .await
        .unwrap_err();
    assert!(matches!(err, ProvisionError::NoSuchUser { .. }), "{err:?}");
    assert_eq!(
        actions(&env, gone.slug.as_str()).await.last().unwrap(),
        "user.remove"
    );
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_connections_count_in_the_server_budget() {
    let dir = migrations_dir(&[("0001_orders.sql", ORDERS)]);
    let env = env_with(&dir).await;
    let budget = Arc::new(ServerBudget::new("local", 2));
    let budgets = Budgets::new([budget.clone()], Duration::from_millis(300));

    // Spent: provisioning waits, then fails without creating anything.
    let held: Vec<_> = [budget.try_acquire().unwrap(), budget.try_acquire().unwrap()].into();
    let slug = unique("budget-");
    let options = CreateTenant {
        budgets: Some(budgets.clone()),
        ..CreateTenant::default()
    };
    let err = send(provision::create_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        &slug,
        &options,
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(err, ProvisionError::BudgetExhausted { .. }),
        "{err:?}"
    );
    assert_eq!(
        exists_on_server(&provision::database_name("tenant_{slug}", &slug)).await,
        (false, false)
    );
    drop(held);

    // Free: it works, and every permit is back afterwards.
    let t = provision::create_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        &slug,
        &options,
    )
    .await
    .unwrap();
    assert_eq!(t.state, TenantState::Active);
    assert_eq!(budget.in_use(), 0);
    std::fs::write(dir.join("0002_items.sql"), ITEMS).unwrap();
    send(provision::migrate_tenant(
        env.config.provisioning(),
        &env.registry,
        &env.key,
        &slug,
        Some(&budgets),
    ))
    .await
    .unwrap();
    assert_eq!(budget.in_use(), 0);
    send(provision::drop_tenant(
        env.config.provisioning(),
        &env.registry,
        &slug,
        DatabaseOnDrop::ByOrigin,
        Some(&budgets),
    ))
    .await
    .unwrap();
    assert_eq!(budget.in_use(), 0);
    drop(std::fs::remove_dir_all(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_migrates_drops_and_removes_users() {
    const BIN: &str = env!("CARGO_BIN_EXE_tenantgate");
    let dir = migrations_dir(&[("0001_orders.sql", ORDERS)]);
    let env = env_with(&dir).await;
    let ok = create(&env, &unique("cli-ok-")).await.unwrap();
    let bad = create(&env, &unique("cli-bad-")).await.unwrap();
    env.add_user(ok.slug.as_str(), "bob", "pw").await;
    std::fs::write(dir.join("0002_items.sql"), ITEMS).unwrap();
    admin_client(&bad.database)
        .await
        .batch_execute("CREATE TABLE items (x int)")
        .await
        .unwrap();

    let pg = common::cluster();
    let config_path = env.dir.join("migrate-cli.toml");
    std::fs::write(
        &config_path,
        format!(
            "[registry]\nurl = \"{}\"\n\n[secrets]\nmaster_key_env = \"TENANTGATE_TEST_KEY_IS_IN_THE_FILE\"\nmaster_key_file = \"master.key\"\n\n[provision]\nmigrations_dir = \"{}\"\nmigrate_concurrency = 2\n\n[[server]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nadmin_user = \"{}\"\nadmin_password_env = \"TG_TEST_ADMIN_PW\"\n",
            env.config.registry.url,
            dir.display(),
            pg.port(),
            pg.superuser()
        ),
    )
    .unwrap();
    let cli = move |args: Vec<String>| {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("TG_TEST_ADMIN_PW", pg.password())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run = |args: &[&str]| {
        let cli = cli.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || cli(args))
    };

    let (code, out, err) = run(&["tenant", "migrate", ok.slug.as_str()]).await.unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("applied 0002_items.sql"), "{out}");
    assert!(out.contains("schema version 2"), "{out}");

    let (code, out, err) = run(&["tenant", "migrate", "--all", "--concurrency", "3"])
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("migrated 2/2 tenants, 1 failed"), "{err}");
    assert!(
        out.contains(&format!("{}: FAILED", bad.slug)) && out.contains("1 failed"),
        "{out}"
    );
    let (code, _, err) = run(&["tenant", "migrate"]).await.unwrap();
    assert_eq!(code, Some(2), "{err}");

    let (code, out, err) = run(&["user", "remove", "--tenant", ok.slug.as_str(), "bob"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = run(&["user", "remove", "--tenant", ok.slug.as_str(), "bob"])
        .await
        .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("has no user"), "{err}");

    let (code, out, err) = run(&["tenant", "drop", bad.slug.as_str(), "--keep-database"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(exists_on_server(&bad.database).await, (true, true));
    let (code, out, err) = run(&["tenant", "drop", ok.slug.as_str()]).await.unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(exists_on_server(&ok.database).await, (false, false));
    let (code, _, err) = run(&["tenant", "drop", ok.slug.as_str()]).await.unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("already deleted"), "{err}");
    drop(std::fs::remove_dir_all(dir));
}
