//! Live registry changes: what another instance (or an operator) changes in the registry
//! reaches running proxies within a second, with no restart.

use crate::common;
use tenantgate::crypto::Binding;

use std::time::Duration;

use common::activity::{activity_on, let_in, lock_out};
use common::query::{current_database, query_value};
use common::{TestEnv, admin_client, connect_str, eventually, eventually_some};
use tenantgate::crypto::Secret;
use tokio_postgres::error::SqlState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_backend_password_and_a_moved_database_take_effect_without_restart() {
    let env = TestEnv::start().await;
    let t = env.tenant_with_user("moving").await;
    let other = env.tenant_with_user("target").await;
    let slug = t.slug.as_str();
    let c = env.app(slug).await;
    c.batch_execute("CREATE TABLE marker (v text); INSERT INTO marker VALUES ('original')")
        .await
        .unwrap();
    drop(c);

    // Rotate the tenant's backend password on the server and in the registry.
    let new_password = Secret::new("rotated-Pw-1");
    admin_client("postgres")
        .await
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD '{}'",
            t.backend_role,
            new_password.expose()
        ))
        .await
        .unwrap();
    env.registry
        .set_target(
            &t.slug,
            &t.database,
            &t.backend_role,
            &env.key
                .encrypt(&new_password, &Binding::backend_password(t.slug.as_str())),
        )
        .await
        .unwrap();
    // The old pool's idle connection is still logged in; new connections need the new
    // password. Connecting several times at once forces new backend logins.
    let works = eventually(Duration::from_secs(5), || async {
        let clients =
            futures_util::future::join_all((0..3).map(|_| env.connect(slug, "app", "secret")))
                .await;
        clients.into_iter().all(|c| c.is_ok())
    })
    .await;
    assert!(works, "clients fail after a password rotation");

    // Move the tenant to another database (with that database's role and password).
    env.move_tenant(&t.slug, &other).await;
    let moved = eventually(Duration::from_secs(5), || async {
        let Ok(c) = env.connect(slug, "app", "secret").await else {
            return false;
        };
        current_database(&c).await == other.database
    })
    .await;
    assert!(moved, "new clients did not land on the new database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_a_tenant_disconnects_its_clients_after_the_grace_period() {
    for mode in [
        tenantgate::pool::PoolMode::Session,
        tenantgate::pool::PoolMode::Transaction,
    ] {
        // A grace of 3 s: the query below, 300 ms after the suspension, must land inside it,
        // and the grace starts only when the session has handled the NOTIFY (with 1 s, a
        // loaded machine closed the client first).
        let env = TestEnv::start_with(|c| {
            c.pool.mode = mode;
            c.proxy.suspend_grace_seconds = 3;
        })
        .await;
        let t = env.tenant_with_user("susp-live").await;
        let bystander = env.tenant_with_user("bystander").await;
        let slug = t.slug.as_str();
        let c = env.app(slug).await;
        let other = env.app(bystander.slug.as_str()).await;
        c.simple_query("SELECT 1").await.unwrap();

        tenantgate::provision::set_state(
            &env.registry,
            slug,
            tenantgate::registry::TenantState::Suspended,
        )
        .await
        .unwrap();
        // Within the grace period the client still works...
        tokio::time::sleep(Duration::from_millis(300)).await;
        if mode == tenantgate::pool::PoolMode::Session {
            c.simple_query("SELECT 1").await.unwrap();
        }
        // ...then it is disconnected with 57P03.
        let gone = eventually(Duration::from_secs(10), || async { c.is_closed() }).await;
        assert!(
            gone,
            "{mode:?}: the suspended tenant's client stayed connected"
        );
        let err = c.simple_query("SELECT 1").await.unwrap_err();
        assert!(err.is_closed() || err.code() == Some(&SqlState::CANNOT_CONNECT_NOW));
        // Other tenants are untouched.
        other.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tenants_keep_working_while_the_registry_is_down_and_it_recovers_by_itself() {
    let env = TestEnv::start_with(|c| c.registry.cache_ttl_seconds = 1).await;
    let warm = env.tenant_with_user("warm").await;
    let cold = env.tenant_with_user("cold").await;
    env.app(warm.slug.as_str())
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();

    // Take the registry away: no new connections, existing ones terminated.
    let registry_db = env.registry_database();
    lock_out(&registry_db, None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The warm tenant's records are stale now and cannot be refreshed: they keep serving.
    for _ in 0..3 {
        let c = env.app(warm.slug.as_str()).await;
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A tenant never seen gets a clear error.
    let err = env
        .connect(cold.slug.as_str(), "app", "secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err}");
    assert!(err.as_db_error().unwrap().message().contains("registry"));

    // The registry comes back: tenantgate recovers without help.
    let_in(&registry_db).await;
    let back = eventually(Duration::from_secs(10), || async {
        env.connect(cold.slug.as_str(), "app", "secret")
            .await
            .is_ok()
    })
    .await;
    assert!(
        back,
        "the cold tenant is still refused after the registry came back"
    );
}

/// Issue 11: a NOTIFY sent while the change listener was disconnected is lost. After it
/// reconnects, the running sessions of the tenants it knew must check their tenant again,
/// or a tenant suspended during the outage keeps its clients for as long as they stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_missed_while_the_listener_was_away_still_closes_running_clients() {
    let env = TestEnv::start_with(|c| c.proxy.suspend_grace_seconds = 1).await;
    let t = env.tenant_with_user("missed").await;
    let running = env.app(t.slug.as_str()).await;
    running.simple_query("SELECT 1").await.unwrap();

    let registry_db = env.registry_database();
    assert!(
        eventually(Duration::from_secs(5), || async {
            listeners(&registry_db).await == 1
        })
        .await,
        "the change listener never connected"
    );
    // This connection outlives the lockout below; the listener's does not.
    let direct = connect_str(&env.config.registry.url).await.unwrap();
    lock_out(&registry_db, Some("tenantgate-listener")).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            listeners(&registry_db).await == 0
        })
        .await,
        "the change listener was not disconnected"
    );
    // Suspended while nobody listens: the NOTIFY goes nowhere.
    direct
        .execute(
            "UPDATE tenants SET state = 'suspended', updated_at = now() WHERE slug = $1",
            &[&t.slug.as_str()],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!running.is_closed(), "closed before the listener came back");
    let_in(&registry_db).await;

    // The listener reconnects (back-off at most 5 s), then the client goes after the grace.
    let closed = eventually(Duration::from_secs(15), || async { running.is_closed() }).await;
    assert!(
        closed,
        "a client of a tenant suspended while the listener was away stayed connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_plan_and_overrides_apply_and_a_plan_change_needs_no_restart() {
    let env = TestEnv::start_with(|c| {
        c.plans.insert(
            "tiny".to_owned(),
            tenantgate::pool::PlanConfig {
                pool_size: Some(1),
                checkout_timeout_ms: Some(300),
                statement_timeout_ms: Some(2500),
                ..Default::default()
            },
        );
        c.plans.insert(
            "big".to_owned(),
            tenantgate::pool::PlanConfig {
                pool_size: Some(5),
                ..Default::default()
            },
        );
    })
    .await;
    let t = env.tenant_with_user("planned").await;
    let slug = t.slug.as_str();
    env.registry.set_plan(&t.slug, "tiny", "{}").await.unwrap();
    // The client that sees the plan is kept: it holds the tiny pool's only backend. (Dropping
    // it and connecting again raced with its session giving that backend back.)
    let holder = eventually_some(Duration::from_secs(5), || async {
        let c = env.connect(slug, "app", "secret").await.ok()?;
        (query_value::<String>(&c, "SHOW statement_timeout").await == "2500ms").then_some(c)
    })
    .await
    .expect("the plan's statement_timeout did not apply");

    // Pool of 1 in session mode: a second client waits 300 ms, then 53300.
    let err = env.connect(slug, "app", "secret").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");

    // Move to the big plan with an override: new clients get the new pool at once.
    env.registry
        .set_plan(&t.slug, "big", r#"{"statement_timeout_ms": 4321}"#)
        .await
        .unwrap();
    let upgraded = eventually(Duration::from_secs(5), || async {
        let Ok(c) = env.connect(slug, "app", "secret").await else {
            return false;
        };
        query_value::<String>(&c, "SHOW statement_timeout").await == "4321ms"
    })
    .await;
    assert!(upgraded, "the plan change did not take effect");
    drop(holder);
}

/// Change listeners connected to `registry_db`.
async fn listeners(registry_db: &str) -> i64 {
    activity_on(
        common::cluster(),
        &format!("datname = '{registry_db}' AND application_name = 'tenantgate-listener'"),
    )
    .await
}

/// Issue 11, defect 6: a pool is only ever built from the newest registry row seen of its
/// tenant. A long-lived client holds the row of its login (or a registry read that crossed a
/// newer one between two registry connections); once the tenant moved and a newer row was
/// seen, that old row reaches the new database through the cached pool, after RELOAD rebuilt
/// the pools, and after the pool was evicted. It never builds a pool to the old database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_registry_row_never_builds_its_tenants_pool_again() {
    let env = TestEnv::start().await;
    let t = env.tenant("rev-moving").await;
    let other = env.tenant("rev-target").await;
    let third = env.tenant("rev-evictor").await;
    let old = env.registry.tenant(&t.slug).await.unwrap().unwrap();
    env.move_tenant(&t.slug, &other).await;
    let new = env.registry.tenant(&t.slug).await.unwrap().unwrap();
    assert!(
        new.revision > old.revision,
        "an update must give the row a larger revision ({} then {})",
        old.revision,
        new.revision
    );

    let pool_config = tenantgate::pool::PoolConfig {
        // One pool at a time: a second tenant's pool evicts the first.
        max_pools: 1,
        ..env.config.pool.clone()
    };
    let pools = tenantgate::pool::PoolMap::new(
        &pool_config,
        &env.config.servers,
        &env.config.plans,
        env.key.clone(),
        tenantgate::stats::Stats::new(),
    );
    let database =
        |pool: std::sync::Arc<tenantgate::pool::TenantPool>| pool.target().database.clone();
    assert_eq!(
        database(pools.pool_for(&new).await.unwrap()),
        other.database
    );
    assert_eq!(
        database(pools.pool_for(&old).await.unwrap()),
        other.database,
        "an old row must get the newest row's pool"
    );

    pools.reconfigure(&pool_config, &env.config.plans);
    assert_eq!(
        database(pools.pool_for(&old).await.unwrap()),
        other.database,
        "after RELOAD an old row rebuilt its tenant's pool to the old database"
    );

    pools.pool_for(&third).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            pools.get(&t.slug).await.is_none()
        })
        .await,
        "the first pool was never evicted"
    );
    assert_eq!(
        database(pools.pool_for(&old).await.unwrap()),
        other.database,
        "after an eviction an old row rebuilt its tenant's pool to the old database"
    );
    // A checkout through the old row lands on the new database.
    let lease = pools.checkout(&old).await.unwrap();
    assert_eq!(database(lease.pool().unwrap()), other.database);
}
