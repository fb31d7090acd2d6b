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
//! - `pool_checkout/checkout_return/warm_attached`: like `warm`, through
//!   `PoolMap::checkout_attached` (what a transaction-pooling session does: its pool without a
//!   map lookup).
//! - `routing/map_lookup_100k` and `routing/attached_100k`: routing alone, with 100,000 tenant
//!   pools in the map (no backend: pools open connections lazily): a map lookup per
//!   checkout (`PoolMap::pool_for`) against the attached client's check
//!   (`PoolMap::still_routes_to`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::Runtime;

use tenantgate::crypto::{Binding, MasterKey, Secret};
use tenantgate::localpg::{LocalPg, LocalPgOptions};
use tenantgate::pool::{PoolConfig, PoolMap, ServerConfig, TenantPool};
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

    let attached = rt.block_on(pools.pool_for(tenant)).unwrap();
    group.bench_function("checkout_return/warm_attached", |b| {
        b.to_async(&rt).iter(|| async {
            let mut lease = pools
                .checkout_attached(&attached, black_box(tenant))
                .await
                .unwrap();
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

/// A pool map of `n` tenants on an unreachable server, each with its pool built.
fn many_tenants(rt: &Runtime, n: usize) -> (PoolMap, Vec<(TenantRecord, Arc<TenantPool>)>) {
    let key = MasterKey::decode(&MasterKey::generate_encoded(), "bench").unwrap();
    let server = ServerConfig {
        name: "main".to_owned(),
        host: "127.0.0.1".to_owned(),
        port: 9,
        admin_user: "nobody".to_owned(),
        admin_password: None,
        admin_password_env: None,
        admin_database: "postgres".to_owned(),
        max_connections: 80,
        tls: tenantgate::pool::BackendTlsMode::default(),
        ca_file: None,
    };
    let pool_config = PoolConfig {
        max_pools: u64::try_from(n).unwrap() + 1,
        ..PoolConfig::default()
    };
    let pools = PoolMap::new(
        &pool_config,
        &[server],
        &std::collections::BTreeMap::new(),
        key.clone(),
        tenantgate::stats::Stats::new(),
    );
    let tenants = rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let slug = format!("t{i}");
            let tenant = TenantRecord {
                slug: TenantSlug::parse(&slug).unwrap(),
                display_name: None,
                state: TenantState::Active,
                plan: "default".to_owned(),
                server: "main".to_owned(),
                database: slug.clone(),
                backend_role: slug.clone(),
                backend_password_enc: key
                    .encrypt(&Secret::new("x"), &Binding::backend_password(&slug)),
                error_message: None,
                overrides: "{}".to_owned(),
                revision: 0,
                registered: false,
            };
            let pool = pools.pool_for(&tenant).await.unwrap();
            out.push((tenant, pool));
        }
        out
    });
    (pools, tenants)
}

fn routing(c: &mut Criterion) {
    const TENANTS: usize = 100_000;
    let rt = Runtime::new().unwrap();
    let (pools, tenants) = many_tenants(&rt, TENANTS);
    let mut group = c.benchmark_group("routing");
    let mut next = 0usize;
    let mut pick = move || {
        // A stride through the tenants: every lookup misses the CPU cache like a real mix.
        next = (next + 7_919) % TENANTS;
        next
    };
    group.bench_function("map_lookup_100k", |b| {
        b.to_async(&rt).iter(|| {
            let (tenant, _) = &tenants[pick()];
            let pools = &pools;
            async move { black_box(pools.pool_for(black_box(tenant)).await.unwrap()) }
        });
    });
    group.bench_function("attached_100k", |b| {
        b.iter(|| {
            let (tenant, pool) = &tenants[pick()];
            black_box(pools.still_routes_to(black_box(pool), black_box(tenant)))
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = configure();
    targets = checkout, routing
}
criterion_main!(benches);
