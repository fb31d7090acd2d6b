//! Pool checkout and return against a live PostgreSQL: the per-transaction cost of transaction
//! pooling (DESIGN §7), apart from the relay.
//!
//! The bench starts its own throwaway cluster (`LocalPg`, like the tests) and builds a
//! `PoolMap` whose one tenant points at it, with a warm pool (its backends are connected and
//! idle before measuring).
//!
//! - `pool_checkout/checkout_return/warm`: `PoolMap::checkout` (pool map hit, the pool's fair
//!   queue, bb8's idle list) and dropping the `Lease` (back to bb8, then the next waiter's
//!   turn). No I/O: a warm checkout touches no socket.
//! - `pool_checkout/checkout_return/warm_8_tasks`: eight tasks doing the same at once on a pool
//!   of four, so half of them wait in the queue; time per checkout.
//! - `pool_checkout/checkout_query_return/warm`: checkout, one `SELECT 1` round trip on the
//!   backend, return: puts the checkout cost next to the cheapest real work.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::Runtime;

use tenantgate::crypto::{Binding, MasterKey, Secret};
use tenantgate::localpg::{LocalPg, LocalPgOptions};
use tenantgate::pool::{PoolConfig, PoolMap, ServerConfig};
use tenantgate::registry::{TenantRecord, TenantSlug, TenantState};

const POOL_SIZE: u32 = 4;

fn configure() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

/// A running cluster and a pool map with one warm tenant pool on it.
struct Live {
    // Field order is drop order: the pools close their backends before the cluster stops.
    pools: PoolMap,
    tenant: TenantRecord,
    _pg: LocalPg,
}

fn live(rt: &Runtime) -> Live {
    let dir = std::env::temp_dir().join(format!(
        "tenantgate-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let pg = LocalPg::start(LocalPgOptions::new(dir.join("pgdata"))).expect("start PostgreSQL");
    let key = MasterKey::decode(&MasterKey::generate_encoded(), "bench").unwrap();
    let server = ServerConfig {
        name: "main".to_owned(),
        host: "127.0.0.1".to_owned(),
        port: pg.port(),
        admin_user: pg.superuser().to_owned(),
        admin_password: None,
        admin_password_env: None,
        admin_database: "postgres".to_owned(),
        max_connections: 80,
        tls: tenantgate::pool::BackendTlsMode::default(),
        ca_file: None,
    };
    let pool_config = PoolConfig {
        pool_size: POOL_SIZE,
        ..PoolConfig::default()
    };
    let pools = PoolMap::new(
        &pool_config,
        &[server],
        &std::collections::BTreeMap::new(),
        key.clone(),
        tenantgate::stats::Stats::new(),
    );
    let tenant = TenantRecord {
        slug: TenantSlug::parse("bench").unwrap(),
        display_name: None,
        state: TenantState::Active,
        plan: "default".to_owned(),
        server: "main".to_owned(),
        database: "postgres".to_owned(),
        backend_role: pg.superuser().to_owned(),
        backend_password_enc: key.encrypt(
            &Secret::new(pg.password()),
            &Binding::backend_password("bench"),
        ),
        error_message: None,
        overrides: "{}".to_owned(),
        revision: 0,
        registered: false,
    };
    rt.block_on(async {
        // Open every backend of the pool once, then give them all back: the pool is warm.
        let mut leases = Vec::new();
        for _ in 0..POOL_SIZE {
            leases.push(pools.checkout(&tenant).await.unwrap());
        }
        // Proven reusable (nothing was sent on them), so they go back instead of closing.
        for lease in &mut leases {
            lease.reusable();
        }
        drop(leases);
        let pool = pools.get(&tenant.slug).await.unwrap();
        assert_eq!(pool.state(), (POOL_SIZE, POOL_SIZE));
    });
    Live {
        pools,
        tenant,
        _pg: pg,
    }
}

fn checkout(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let setup = live(&rt);
    let Live { pools, tenant, .. } = &setup;
    let mut group = c.benchmark_group("pool_checkout");

    group.bench_function("checkout_return/warm", |b| {
        b.to_async(&rt).iter(|| async {
            let mut lease = pools.checkout(black_box(tenant)).await.unwrap();
            lease.reusable();
            drop(black_box(lease));
        });
    });

    group.bench_function("checkout_return/warm_8_tasks", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let start = Instant::now();
            let tasks: Vec<_> = (0..8_u64)
                .map(|t| {
                    // `iters` checkouts in all, split over the tasks.
                    let mine = iters / 8 + u64::from(t < iters % 8);
                    let (pools, tenant) = (pools.clone(), Arc::new(tenant.clone()));
                    tokio::spawn(async move {
                        for _ in 0..mine {
                            let mut lease = pools.checkout(&tenant).await.unwrap();
                            tokio::task::yield_now().await;
                            lease.reusable();
                            drop(lease);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            start.elapsed()
        });
    });

    group.bench_function("checkout_query_return/warm", |b| {
        b.to_async(&rt).iter(|| async {
            let mut lease = pools.checkout(black_box(tenant)).await.unwrap();
            lease
                .conn()
                .run_setup_query("SELECT 1", Duration::from_secs(5))
                .await
                .unwrap();
            lease.reusable();
            drop(lease);
        });
    });
    group.finish();

    rt.block_on(async {
        // Every checkout found the warm pool: nothing was rebuilt, no backend was added.
        assert_eq!(pools.pools_built(), 1);
        let pool = pools.get(&tenant.slug).await.unwrap();
        assert_eq!(pool.state(), (POOL_SIZE, POOL_SIZE));
    });
}

criterion_group! {
    name = benches;
    config = configure();
    targets = checkout
}
criterion_main!(benches);
