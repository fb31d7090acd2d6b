//! Issue 14 part 4, plans from SQL: ALTER TENANT ... SET PLAN / SET (...) / RESET (...) and SHOW
//! PLANS through the console of a running proxy, observed from the pools table and from real
//! clients of the tenant.

use crate::common;

use common::query::query_value;
use common::{TestEnv, unique};
use tenantgate::pool::{PlanConfig, PoolMode};
use tokio_postgres::error::SqlState;

/// A proxy with two transaction-mode plans: `small` (2 backends) and `large` (6 backends, a
/// statement_timeout of 4321 ms).
async fn env_with_plans() -> TestEnv {
    TestEnv::start_with(|c| {
        c.plans.insert(
            "small".to_owned(),
            PlanConfig {
                pool_size: Some(2),
                mode: Some(PoolMode::Transaction),
                ..Default::default()
            },
        );
        c.plans.insert(
            "large".to_owned(),
            PlanConfig {
                pool_size: Some(6),
                mode: Some(PoolMode::Transaction),
                statement_timeout_ms: Some(4321),
                max_clients: Some(40),
                ..Default::default()
            },
        );
    })
    .await
}

/// The live (not parked) pool of `slug`: (pool_size, mode, max_clients).
async fn pool_of(admin: &tokio_postgres::Client, slug: &str) -> (i64, String, i64) {
    let row = admin
        .query_one(
            "SELECT pool_size, mode, max_clients FROM pools WHERE tenant = $1 AND NOT parked",
            &[&slug],
        )
        .await
        .expect("the tenant's pool");
    (row.get(0), row.get(1), row.get(2))
}

async fn overrides_of(admin: &tokio_postgres::Client, slug: &str) -> serde_json::Value {
    let text: String = admin
        .query_one("SELECT overrides FROM tenants WHERE slug = $1", &[&slug])
        .await
        .expect("tenant row")
        .get(0);
    serde_json::from_str(&text).expect("overrides are JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_plan_gives_new_clients_the_new_pool_while_a_running_client_keeps_working() {
    let env = env_with_plans().await;
    let t = env.tenant_with_user("plan-").await;
    let slug = t.slug.as_str();
    let admin = env.admin().await;
    admin
        .batch_execute(&format!("ALTER TENANT {slug} SET PLAN 'small'"))
        .await
        .expect("set plan small");
    let running = env.app(slug).await;
    running.simple_query("SELECT 1").await.expect("query");
    assert_eq!(
        pool_of(&admin, slug).await,
        (2, "transaction".to_owned(), 0)
    );
    assert_eq!(
        query_value::<String>(&running, "SHOW statement_timeout").await,
        "0"
    );

    // Extended protocol, bound parameters.
    admin
        .execute("ALTER TENANT $1 SET PLAN $2", &[&slug, &"large"])
        .await
        .expect("set plan large");
    let plan: String = admin
        .query_one("SELECT plan FROM tenants WHERE slug = $1", &[&slug])
        .await
        .unwrap()
        .get(0);
    assert_eq!(plan, "large");

    // The connected transaction-mode client goes on, transaction after transaction.
    for i in 0..5_i32 {
        let n: i32 = running
            .query_one("SELECT $1::int4 + 1", &[&i])
            .await
            .expect("the running client keeps working after the plan change")
            .get(0);
        assert_eq!(n, i + 1);
    }
    // A new client gets the new plan's pool and settings.
    let fresh = env.app(slug).await;
    assert_eq!(
        query_value::<String>(&fresh, "SHOW statement_timeout").await,
        "4321ms"
    );
    assert_eq!(
        pool_of(&admin, slug).await,
        (6, "transaction".to_owned(), 40)
    );
    // Six backends at once now: six clients each hold a transaction open together.
    let mut holders = Vec::new();
    for _ in 0..6 {
        let c = env.app(slug).await;
        c.batch_execute("BEGIN; SELECT 1").await.expect("begin");
        holders.push(c);
    }
    let active: i64 = admin
        .query_one(
            "SELECT active FROM pools WHERE tenant = $1 AND NOT parked",
            &[&slug],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, 6, "the new pool holds six backends at once");
    for c in &holders {
        c.batch_execute("COMMIT").await.expect("commit");
    }
    running
        .simple_query("SELECT 1")
        .await
        .expect("the first client is still fine");
    let logged: i64 = admin
        .query_one(
            "SELECT count(*) FROM activity WHERE tenant = $1 AND action = 'tenant.plan'",
            &[&slug],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_reset_overrides_change_what_new_clients_get() {
    let env = env_with_plans().await;
    let t = env.tenant_with_user("ovr-").await;
    let slug = t.slug.as_str();
    let admin = env.admin().await;
    admin
        .batch_execute(&format!(
            "ALTER TENANT {slug} SET (pool_size = 3, mode = 'transaction', max_clients = 100, \
             statement_timeout_ms = 5000, query_wait_timeout_ms = 2500)"
        ))
        .await
        .expect("set overrides");
    assert_eq!(
        overrides_of(&admin, slug).await,
        serde_json::json!({
            "pool_size": 3, "mode": "transaction", "max_clients": 100,
            "statement_timeout_ms": 5000, "checkout_timeout_ms": 2500
        })
    );
    let c = env.app(slug).await;
    assert_eq!(
        query_value::<String>(&c, "SHOW statement_timeout").await,
        "5s"
    );
    assert_eq!(
        pool_of(&admin, slug).await,
        (3, "transaction".to_owned(), 100)
    );
    drop(c);

    // A second SET changes one key and keeps the others.
    admin
        .execute(
            "ALTER TENANT $1 SET (statement_timeout_ms = $2)",
            &[&slug, &"4321"],
        )
        .await
        .expect("set one override");
    let c = env.app(slug).await;
    assert_eq!(
        query_value::<String>(&c, "SHOW statement_timeout").await,
        "4321ms"
    );
    assert_eq!(pool_of(&admin, slug).await.0, 3);
    drop(c);

    admin
        .batch_execute(&format!(
            "ALTER TENANT {slug} RESET (pool_size, statement_timeout_ms, query_wait_timeout_ms)"
        ))
        .await
        .expect("reset");
    assert_eq!(
        overrides_of(&admin, slug).await,
        serde_json::json!({"mode": "transaction", "max_clients": 100})
    );
    let c = env.app(slug).await;
    assert_eq!(
        query_value::<String>(&c, "SHOW statement_timeout").await,
        "0"
    );
    // Back to [pool] pool_size = 10 of the test config.
    assert_eq!(
        pool_of(&admin, slug).await,
        (10, "transaction".to_owned(), 100)
    );
    drop(c);

    admin
        .batch_execute(&format!("ALTER TENANT {slug} RESET ALL"))
        .await
        .expect("reset all");
    assert_eq!(overrides_of(&admin, slug).await, serde_json::json!({}));
    let c = env.app(slug).await;
    c.simple_query("SELECT 1").await.expect("query");
    assert_eq!(pool_of(&admin, slug).await, (10, "session".to_owned(), 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_plans_keys_and_bad_values_are_refused_by_name() {
    let env = env_with_plans().await;
    let t = env.tenant_with_user("bad-").await;
    let slug = t.slug.as_str();
    let admin = env.admin().await;
    admin
        .batch_execute(&format!("ALTER TENANT {slug} SET (pool_size = 4)"))
        .await
        .expect("a good override first");
    let invalid = SqlState::INVALID_PARAMETER_VALUE;
    for (sql, code, named) in [
        (
            format!("ALTER TENANT {slug} SET PLAN 'platinum'"),
            &invalid,
            "platinum",
        ),
        (
            format!("ALTER TENANT {slug} SET (pool_size = 8, pool_sise = 9)"),
            &invalid,
            "pool_sise",
        ),
        (
            format!("ALTER TENANT {slug} RESET (pool_size, max_connections)"),
            &invalid,
            "max_connections",
        ),
        (
            format!("ALTER TENANT {slug} SET (pool_size = 'many')"),
            &SqlState::INVALID_TEXT_REPRESENTATION,
            "pool_size",
        ),
        (
            format!("ALTER TENANT {slug} SET (pool_size = 0)"),
            &invalid,
            "pool_size",
        ),
        (
            format!("ALTER TENANT {slug} SET (max_clients = -1)"),
            &invalid,
            "max_clients",
        ),
        (
            format!("ALTER TENANT {slug} SET (mode = 'statement')"),
            &invalid,
            "statement",
        ),
        (
            "ALTER TENANT no-such-tenant SET PLAN 'small'".to_owned(),
            &SqlState::UNDEFINED_OBJECT,
            "no-such-tenant",
        ),
        (
            format!("ALTER TENANT {slug} SET (pool_size = 8"),
            &SqlState::SYNTAX_ERROR,
            "",
        ),
    ] {
        let e = admin.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(e.code(), Some(code), "{sql}: {e}");
        let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap();
        assert!(message.contains(named), "{sql}: {message}");
    }
    // Nothing changed: a refused command is all or nothing.
    assert_eq!(
        overrides_of(&admin, slug).await,
        serde_json::json!({"pool_size": 4})
    );
    let plan: String = admin
        .query_one("SELECT plan FROM tenants WHERE slug = $1", &[&slug])
        .await
        .unwrap()
        .get(0);
    assert_eq!(plan, "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_plans_lists_each_plan_with_its_values_and_tenants() {
    let env = env_with_plans().await;
    let admin = env.admin().await;
    let prefix = unique("sp-");
    for i in 0..2 {
        let slug = format!("{prefix}-{i}");
        admin
            .batch_execute(&format!("CREATE TENANT {slug} WITH (plan = 'large')"))
            .await
            .expect("create tenant on a plan");
    }
    let rows = common::query::rows(&admin.simple_query("SHOW PLANS").await.expect("show plans"));
    let by_name = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
    };
    // plan, pool_size, max_clients, mode, statement_timeout_ms, checkout_timeout_ms, ...,
    // tenants.
    let large = by_name("large");
    assert_eq!(&large[..5], ["large", "6", "40", "transaction", "4321"]);
    assert_eq!(large[9], "2");
    let small = by_name("small");
    assert_eq!(&small[..4], ["small", "2", "0", "transaction"]);
    // The default plan has no section: [pool]'s values.
    let default = by_name("default");
    assert_eq!(&default[..4], ["default", "10", "0", "session"]);
    assert_eq!(rows.len(), 3, "{rows:?}");

    // The same table through SELECT, typed.
    let size: i64 = admin
        .query_one("SELECT pool_size FROM plans WHERE plan = $1", &[&"small"])
        .await
        .expect("select from plans")
        .get(0);
    assert_eq!(size, 2);
}
