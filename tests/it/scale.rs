//! Issue 4, "10,000 tenants on one server", scaled to this suite: 2,000 tenants registered
//! against four physical databases share a server budget of 40 backend connections while
//! many clients connect to random tenants, first uniformly, then skewed onto a few hot ones.
//! Pools are evicted (small `max_pools`, short idle timeout) and built again as the load
//! moves; the registry goes away and comes back under load.

use crate::common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::activity::{PeakBackends, activity_on, let_in, lock_out};
use common::{TestEnv, admin_client, eventually};
use tenantgate::crypto::Binding;
use tenantgate::registry::TenantState;
use tokio_postgres::error::SqlState;

const TENANTS: usize = 2000;
const PHYSICAL: usize = 4;
const BUDGET: u32 = 40;
const HOT: usize = 20;
const WORKERS: usize = 48;
const MAX_POOLS: u64 = 150;

/// How a worker picks its next tenant.
#[derive(Clone, Copy)]
enum Pick {
    /// Any of the tenants.
    Uniform,
    /// Four connects in five go to the `HOT` first tenants.
    Skewed,
    /// Only the hot tenants (they are cached).
    HotOnly,
}

/// xorshift64.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn pick(seed: &mut u64, how: Pick, tenants: usize) -> usize {
    let r = usize::try_from(next(seed) % 1_000_000).unwrap();
    match how {
        Pick::Skewed if r % 5 != 0 => (r / 5) % HOT,
        Pick::Uniform | Pick::Skewed => r % tenants,
        Pick::HotOnly => r % HOT,
    }
}

/// What one phase of load did.
#[derive(Default)]
struct Outcome {
    connects: AtomicU64,
    queries: AtomicU64,
    errors: Mutex<Vec<String>>,
    touched: Mutex<HashSet<usize>>,
}

/// `WORKERS` clients loop until `stop`: connect to a tenant, run a query (one in five keeps
/// the connection for three queries), disconnect.
async fn load(
    env: Arc<TestEnv>,
    slugs: Arc<Vec<String>>,
    how: Pick,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let outcome = Arc::new(Outcome::default());
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let (env, slugs, stop, outcome) =
            (env.clone(), slugs.clone(), stop.clone(), outcome.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ ((worker as u64 + 1) * 0x1000_0001);
            while !stop.load(Ordering::Relaxed) {
                let index = pick(&mut seed, how, slugs.len());
                outcome.touched.lock().unwrap().insert(index);
                let slug = &slugs[index];
                let result = async {
                    let client = env.connect(slug, "app", "secret").await?;
                    outcome.connects.fetch_add(1, Ordering::Relaxed);
                    let rounds = if next(&mut seed) % 5 == 0 { 3 } else { 1 };
                    for round in 0..rounds {
                        if round > 0 {
                            tokio::time::sleep(Duration::from_millis(15)).await;
                        }
                        let row = client.query_one("SELECT current_database()", &[]).await?;
                        let db: String = row.get(0);
                        assert!(db.starts_with("tenant_phys"), "{slug} landed on {db}");
                        outcome.queries.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok::<_, tokio_postgres::Error>(())
                }
                .await;
                if let Err(e) = result {
                    outcome
                        .errors
                        .lock()
                        .unwrap()
                        .push(format!("{slug}: {:?} {e}", e.code().map(SqlState::code)));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::into_inner(outcome).unwrap()
}

/// Runs `load` for `duration`.
async fn load_for(
    env: &Arc<TestEnv>,
    slugs: &Arc<Vec<String>>,
    how: Pick,
    duration: Duration,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(env.clone(), slugs.clone(), how, stop.clone()));
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    running.await.unwrap()
}

fn assert_no_errors(phase: &str, outcome: &Outcome) {
    let errors = outcome.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{phase}: {} client errors in {} connects, first: {:?}",
        errors.len(),
        outcome.connects.load(Ordering::Relaxed),
        errors.iter().take(5).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines, reason = "one scenario, phase after phase")]
async fn two_thousand_tenants_share_a_budget_of_forty_through_moving_load_and_a_registry_outage() {
    let env = TestEnv::start_with(|c| {
        c.pool.pool_size = 2;
        c.pool.checkout_timeout_ms = 30_000;
        c.pool.pool_idle_timeout_seconds = 1;
        c.pool.max_pools = MAX_POOLS;
        c.servers[0].max_connections = BUDGET;
        // Records go stale quickly, so the outage exercises serving stale records.
        c.registry.cache_ttl_seconds = 1;
        c.proxy.suspend_grace_seconds = 1;
        // Every other tenant pools by transaction: both modes share the budget.
        c.plans.insert(
            "tx".to_owned(),
            tenantgate::pool::PlanConfig {
                mode: Some(tenantgate::pool::PoolMode::Transaction),
                ..Default::default()
            },
        );
    })
    .await;

    // Four physical databases; 2,000 tenants registered against them in two statements (odd
    // ones on the transaction-pooling plan), all sharing the first tenant's `app` verifier (no
    // provisioning, no PBKDF2 per tenant).
    let mut physical = Vec::new();
    for _ in 0..PHYSICAL {
        physical.push(env.tenant_with_user("phys").await);
    }
    let databases: Vec<String> = physical.iter().map(|t| t.database.clone()).collect();
    let registry_db = env.registry_database();
    let prefix = common::unique("scale");
    {
        let registry = admin_client(&registry_db).await;
        let phys_slugs: Vec<String> = physical
            .iter()
            .map(|t| t.slug.as_str().to_owned())
            .collect();
        // Each row's password encrypted for that row (ciphertexts are bound to their row).
        let passwords: Vec<_> = physical
            .iter()
            .map(|p| {
                env.key
                    .decrypt(
                        &p.backend_password_enc,
                        &Binding::backend_password(p.slug.as_str()),
                    )
                    .unwrap()
            })
            .collect();
        let (slugs, blobs): (Vec<String>, Vec<Vec<u8>>) = (0..TENANTS)
            .map(|i| {
                let slug = format!("{prefix}-{i}");
                let blob = env
                    .key
                    .encrypt(&passwords[i % PHYSICAL], &Binding::backend_password(&slug));
                (slug, blob)
            })
            .unzip();
        let inserted = registry
            .execute(
                "INSERT INTO tenants (slug, state, plan, server, database_name, backend_role, \
                                      backend_password_enc) \
                 SELECT u.slug, 'active', \
                        CASE WHEN (u.n - 1) % 2 = 1 THEN 'tx' ELSE p.plan END, p.server, \
                        p.database_name, p.backend_role, u.enc \
                 FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(slug, enc, n) \
                 JOIN tenants p ON p.slug = ($3::text[])[(1 + (u.n - 1) % $4)::int]",
                &[
                    &slugs,
                    &blobs,
                    &phys_slugs,
                    &i64::try_from(PHYSICAL).unwrap(),
                ],
            )
            .await
            .unwrap();
        assert_eq!(inserted, TENANTS as u64);
        registry
            .execute(
                "INSERT INTO tenant_users (tenant_slug, username, scram_verifier) \
                 SELECT t.slug, 'app', u.scram_verifier FROM tenants t, tenant_users u \
                 WHERE t.slug LIKE $1 || '-%' AND u.tenant_slug = $2 AND u.username = 'app'",
                &[&prefix, &phys_slugs[0]],
            )
            .await
            .unwrap();
    }
    let slugs: Arc<Vec<String>> = Arc::new((0..TENANTS).map(|i| format!("{prefix}-{i}")).collect());
    let env = Arc::new(env);
    let pools = env.proxy.as_ref().unwrap().state().pools.clone();

    // Sampler: backend connections to the tenant databases every 20 ms, on one direct
    // connection to the `postgres` database (not a tenant database: it is not counted, and
    // it is not in the budget).
    let sampler = PeakBackends::start(databases.clone(), Duration::from_millis(20)).await;

    // Phase 1: uniform over 2,000 tenants; the pool map holds 150, so pools are evicted
    // (least recently used) and built again all the time.
    let uniform = load_for(&env, &slugs, Pick::Uniform, Duration::from_secs(5)).await;
    assert_no_errors("uniform", &uniform);
    let pools_after_uniform = pools.pool_count().await;
    assert!(pools_after_uniform > 0);
    assert!(
        pools_after_uniform <= MAX_POOLS,
        "{pools_after_uniform} pools"
    );

    // Quiet: every pool is idle past its TTL and goes, with its connections.
    let drained = eventually(Duration::from_secs(10), || async {
        pools.pool_count().await == 0
    })
    .await;
    assert!(drained, "idle pools were not evicted");
    let built_before_skew = pools.pools_built();

    // Phase 2: four connects in five on 20 hot tenants; their pools are built again.
    let skewed = load_for(&env, &slugs, Pick::Skewed, Duration::from_secs(5)).await;
    assert_no_errors("skewed", &skewed);
    let built = pools.pools_built();
    assert!(pools.pool_count().await > 0, "the skewed load has pools");
    let touched: HashSet<usize> = uniform
        .touched
        .lock()
        .unwrap()
        .union(&skewed.touched.lock().unwrap())
        .copied()
        .collect();
    assert!(
        built > touched.len() as u64,
        "pools were built {built} times for {} tenants: none was re-created",
        touched.len()
    );
    assert!(
        built - built_before_skew >= HOT as u64,
        "hot pools re-created after eviction"
    );

    // Phase 3: load on the hot (cached) tenants while the registry goes away and comes back.
    // A client of another tenant stays connected throughout, to be suspended afterwards.
    let watched = &slugs[HOT + 1];
    let held = env.app(watched).await;
    held.simple_query("SELECT 1").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let during_outage = tokio::spawn(load(
        env.clone(),
        slugs.clone(),
        Pick::HotOnly,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock_out(&registry_db, None).await;
    // Longer than the cache TTL: the hot tenants' records are stale and cannot be refreshed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let_in(&registry_db).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let outage = during_outage.await.unwrap();
    assert_no_errors("registry outage", &outage);
    assert!(outage.connects.load(Ordering::Relaxed) > 0);

    // The change listener is back: it holds a LISTEN session on the registry again.
    let listening = eventually(Duration::from_secs(15), || async {
        activity_on(
            common::cluster(),
            &format!(
                "datname = '{registry_db}' \
                 AND application_name = 'tenantgate-listener' AND query LIKE 'LISTEN%'"
            ),
        )
        .await
            > 0
    })
    .await;
    assert!(
        listening,
        "the change listener did not reconnect to the registry"
    );

    // Suspend through the registry: the NOTIFY reaches the proxy (the connected client is
    // told to leave; only a notification does that) and new clients are refused with 57P03.
    let suspended = eventually(Duration::from_secs(10), || async {
        tenantgate::provision::set_state(&env.registry, watched, TenantState::Suspended)
            .await
            .is_ok()
    })
    .await;
    assert!(suspended, "the test's registry handle did not recover");
    let refused = eventually(Duration::from_secs(5), || async {
        matches!(
            env.connect(watched, "app", "secret").await,
            Err(e) if e.code() == Some(&SqlState::CANNOT_CONNECT_NOW)
        )
    })
    .await;
    assert!(
        refused,
        "a new client of the suspended tenant was not refused with 57P03"
    );
    let gone = eventually(Duration::from_secs(5), || async { held.is_closed() }).await;
    assert!(
        gone,
        "the suspended tenant's connected client was not disconnected"
    );

    let peak = sampler.stop();
    let sample_total = sampler.samples();
    assert!(
        peak <= i64::from(BUDGET),
        "backend connections peaked at {peak} over a budget of {BUDGET} ({sample_total} samples)"
    );
    assert!(peak >= 20, "the load did not use the budget (peak {peak})");
    assert!(pools.budget("local").unwrap().in_use() <= BUDGET);
    #[allow(
        clippy::print_stderr,
        reason = "the size of the load, for whoever reads the run"
    )]
    {
        eprintln!(
            "scale: uniform {} connects, skewed {} connects, outage {} connects; \
             {} tenants touched, {built} pool builds; peak {peak} backends in {sample_total} samples",
            uniform.connects.load(Ordering::Relaxed),
            skewed.connects.load(Ordering::Relaxed),
            outage.connects.load(Ordering::Relaxed),
            touched.len(),
        );
    }
}
