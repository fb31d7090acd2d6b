//! Benchmarks of tenantgate's per-connection and per-byte hot paths, with no database running.
//!
//! - `route/cache_hit/{N}`: slug → tenant record (`TenantDirectory::tenant` on a primed cache) →
//!   tenant pool (`PoolMap::pool_for` on an existing pool), for N tenants and pseudo-random slugs.
//!   `pool_for` compares the record with the pool's source (no decryption on a hit).
//! - `route/record_only/{N}`: the directory lookup alone, to show the split.
//! - `frame_scan/result_set`: `FrameScanner` over a 10,000-row result set fed in 16 KiB reads the
//!   way the relay feeds it (unforwarded tail kept at the front of one reused buffer).
//! - `frame_scan/small_messages`: the same over 100,000 tiny frames, for the per-frame cost.
//! - `relay/result_set`: the whole relay loop (both directions, inspectors, transaction
//!   tracking, usage counting) over in-memory pipes: one Query, the 10,000-row result set back,
//!   Terminate.
//! - `relay/round_trips_1000`: 1,000 Query → answer round trips through the relay, for the
//!   per-message and per-wakeup cost.
//!
//! The registry URL points at a closed port: its pool is lazy and is never used on a cache hit
//! (a miss would fail and panic the bench). Backend pools are built unchecked and open nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark setup")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use tenantgate::crypto::{Binding, MasterKey, Secret};
use tenantgate::pool::{PoolConfig, PoolMap, ServerConfig};
use tenantgate::protocol::frame::{FrameScanner, Scan};
use tenantgate::registry::{
    Registry, RegistryConfig, TenantDirectory, TenantRecord, TenantSlug, TenantState,
};
use tenantgate::session::ceilings::PhaseClock;
use tenantgate::session::relay::{RelayBuffers, RelayEnd, TxTracker, relay};
use tenantgate::stats::{Stats, TenantStats};

/// Same as the relay's `RELAY_BUFFER_BYTES`.
const READ_BYTES: usize = 16 * 1024;
/// Length of the precomputed lookup order (a power of two, so cycling is a mask).
const ORDER_LEN: usize = 1 << 16;

fn configure() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

/// xorshift64: deterministic, cheap, good enough for a lookup order.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

struct Routing {
    directory: TenantDirectory,
    pools: PoolMap,
    /// Slugs in pseudo-random order, cycled by the benchmarks.
    order: Vec<TenantSlug>,
}

async fn routing(tenants: usize, max_pools: u64) -> Routing {
    let registry_config = RegistryConfig {
        url: "host=127.0.0.1 port=1 dbname=x user=bench".to_owned(),
        pool_size: 1,
        timeout_ms: 1000,
        cache_ttl_seconds: 3600,
        stale_ttl_seconds: 3600,
        negative_cache_ttl_seconds: 2,
        cache_capacity: 100_000,
    };
    let registry = Registry::connect(&registry_config).await.unwrap();
    let directory = TenantDirectory::new(registry, &registry_config);

    let key = MasterKey::decode(&MasterKey::generate_encoded(), "bench").unwrap();
    let server = ServerConfig {
        name: "main".to_owned(),
        host: "127.0.0.1".to_owned(),
        port: 1,
        admin_user: "postgres".to_owned(),
        admin_password: None,
        admin_password_env: None,
        admin_database: "postgres".to_owned(),
        max_connections: 80,
        tls: tenantgate::pool::BackendTlsMode::default(),
        ca_file: None,
    };
    let pool_config = PoolConfig {
        max_pools,
        ..PoolConfig::default()
    };
    let pools = PoolMap::new(
        &pool_config,
        &[server],
        &std::collections::BTreeMap::new(),
        key.clone(),
        Stats::new(),
    );

    let mut slugs = Vec::with_capacity(tenants);
    for i in 0..tenants {
        let slug = TenantSlug::parse(&format!("t{i}")).unwrap();
        let record = TenantRecord {
            slug: slug.clone(),
            display_name: Some(format!("Tenant {i}")),
            state: TenantState::Active,
            plan: "standard".to_owned(),
            server: "main".to_owned(),
            database: format!("tenant_t{i}"),
            backend_role: format!("tenant_t{i}_owner"),
            backend_password_enc: key.encrypt(
                &Secret::new(format!("pw-{i}-0123456789abcdef")),
                &Binding::backend_password(slug.as_str()),
            ),
            error_message: None,
            overrides: "{}".to_owned(),
            revision: 0,
            registered: false,
        };
        directory.prime(record.clone()).await;
        pools.pool_for(&record).await.unwrap();
        slugs.push(slug);
    }
    assert_eq!(directory.cached_records().await, tenants as u64);
    if (tenants as u64) <= max_pools {
        assert_eq!(pools.pool_count().await, tenants as u64);
    }

    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let order = (0..ORDER_LEN)
        .map(|_| {
            let pick = usize::try_from(next(&mut seed) % tenants as u64).unwrap();
            slugs[pick].clone()
        })
        .collect();
    Routing {
        directory,
        pools,
        order,
    }
}

fn route(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut group = c.benchmark_group("route");
    for tenants in [10_usize, 10_000, 100_000] {
        let setup = rt.block_on(routing(tenants, 100_000));
        let Routing {
            directory,
            pools,
            order,
        } = &setup;

        group.bench_with_input(BenchmarkId::new("cache_hit", tenants), &tenants, |b, _| {
            let mut i = 0_usize;
            b.to_async(&rt).iter(|| {
                let slug = &order[i & (ORDER_LEN - 1)];
                i = i.wrapping_add(1);
                async move {
                    let record = directory.tenant(black_box(slug)).await.unwrap().unwrap();
                    pools.pool_for(&record).await.unwrap()
                }
            });
        });

        group.bench_with_input(
            BenchmarkId::new("record_only", tenants),
            &tenants,
            |b, _| {
                let mut i = 0_usize;
                b.to_async(&rt).iter(|| {
                    let slug = &order[i & (ORDER_LEN - 1)];
                    i = i.wrapping_add(1);
                    async move { directory.tenant(black_box(slug)).await.unwrap().unwrap() }
                });
            },
        );

        // Every lookup hit: no record was reloaded, no pool was rebuilt or evicted.
        rt.block_on(async {
            assert_eq!(directory.cached_records().await, tenants as u64);
            assert_eq!(pools.pool_count().await, tenants as u64);
        });
    }
    group.finish();
}

/// A cold tenant's first connection when the pool map is full: build a pool (decrypt the
/// backend password, set up bb8) and evict the least recently used one (closing nothing here:
/// the evicted pools hold no connections). 10,000 tenants cycle through a map of 1,000 pools,
/// so about nine lookups in ten miss.
fn eviction(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let setup = rt.block_on(routing(10_000, 1_000));
    let Routing {
        directory,
        pools,
        order,
    } = &setup;
    let mut group = c.benchmark_group("pool");
    group.bench_function("cold_create_and_evict/10000_over_1000", |b| {
        let mut i = 0_usize;
        b.to_async(&rt).iter(|| {
            let slug = &order[i & (ORDER_LEN - 1)];
            i = i.wrapping_add(1);
            async move {
                let record = directory.tenant(black_box(slug)).await.unwrap().unwrap();
                pools.pool_for(&record).await.unwrap()
            }
        });
    });
    group.finish();
}

fn frame(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
}

/// A DataRow body: column count, then (length, bytes) per column.
fn data_row(columns: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(columns.len()).unwrap().to_be_bytes());
    for col in columns {
        body.extend_from_slice(&i32::try_from(col.len()).unwrap().to_be_bytes());
        body.extend_from_slice(col);
    }
    body
}

/// RowDescription (5 columns), 10,000 DataRows, CommandComplete, ReadyForQuery `I`.
fn result_set() -> (Vec<u8>, usize) {
    const ROWS: usize = 10_000;
    let mut out = Vec::new();
    let mut desc = Vec::new();
    desc.extend_from_slice(&5_u16.to_be_bytes());
    // (name, type oid, type size)
    for (name, oid, size) in [
        ("id", 20_u32, 8_i16),
        ("account_id", 23, 4),
        ("note", 25, -1),
        ("amount", 20, 8),
        ("created_at", 1184, 8),
    ] {
        desc.extend_from_slice(name.as_bytes());
        desc.push(0);
        desc.extend_from_slice(&16_384_u32.to_be_bytes()); // table oid
        desc.extend_from_slice(&1_i16.to_be_bytes()); // column number
        desc.extend_from_slice(&oid.to_be_bytes());
        desc.extend_from_slice(&size.to_be_bytes());
        desc.extend_from_slice(&(-1_i32).to_be_bytes()); // type modifier
        desc.extend_from_slice(&0_i16.to_be_bytes()); // text format
    }
    frame(&mut out, b'T', &desc);

    let filler = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor";
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for row in 0..ROWS {
        let r = next(&mut seed);
        let id = (row + 1).to_string();
        let account = (r % 5000).to_string();
        let note_len = 20 + usize::try_from(r % 61).unwrap();
        let note = format!("{row}:{filler}{filler}");
        let amount = ((r >> 16) % 10_000_000).to_string();
        let ts = format!(
            "2025-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
            1 + (r >> 8) % 12,
            1 + (r >> 12) % 28,
            (r >> 20) % 24,
            (r >> 26) % 60,
            (r >> 32) % 60,
            (r >> 40) % 1_000_000
        );
        let body = data_row(&[
            id.as_bytes(),
            account.as_bytes(),
            &note.as_bytes()[..note_len],
            amount.as_bytes(),
            ts.as_bytes(),
        ]);
        frame(&mut out, b'D', &body);
    }
    frame(&mut out, b'C', b"SELECT 10000\0");
    frame(&mut out, b'Z', b"I");
    (out, ROWS + 3)
}

/// 100,000 DataRow frames with 4-byte bodies, then ReadyForQuery `I`.
fn small_messages() -> (Vec<u8>, usize) {
    const FRAMES: usize = 100_000;
    let mut out = Vec::with_capacity(FRAMES * 9 + 6);
    for i in 0..FRAMES {
        frame(&mut out, b'D', &u32::try_from(i).unwrap().to_be_bytes());
    }
    frame(&mut out, b'Z', b"I");
    (out, FRAMES + 1)
}

/// Feeds `stream` to a scanner as the relay does: each "read" fills the free end of one 16 KiB
/// buffer; what was scanned is forwarded, and an incomplete header moves to the front to be
/// scanned again with the next read. Returns (frames seen, last ReadyForQuery status).
fn relay_scan(stream: &[u8], buf: &mut [u8]) -> (usize, u8) {
    let mut scanner = FrameScanner::new(usize::MAX);
    let mut frames = 0_usize;
    let mut status = 0_u8;
    let mut filled = 0;
    let mut rest = stream;
    while !rest.is_empty() {
        let n = (buf.len() - filled).min(rest.len());
        let (read, after) = rest.split_at(n);
        buf[filled..filled + n].copy_from_slice(read);
        rest = after;
        filled += n;
        let run = scanner
            .scan(&buf[..filled], |head| {
                frames += 1;
                if head.tag == b'Z' {
                    status = head.status;
                }
                Scan::Continue
            })
            .unwrap();
        // Everything up to `forward` is written out; the tail waits for the next read.
        buf.copy_within(run.forward..filled, 0);
        filled -= run.forward;
    }
    assert_eq!(filled, 0);
    assert!(scanner.at_boundary());
    (frames, status)
}

fn frame_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_scan");
    let mut buf = vec![0_u8; READ_BYTES].into_boxed_slice();
    for (name, (stream, expected)) in [
        ("result_set", result_set()),
        ("small_messages", small_messages()),
    ] {
        assert_eq!(relay_scan(&stream, &mut buf), (expected, b'I'));
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let (frames, status) = relay_scan(black_box(&stream), &mut buf);
                assert_eq!(frames, expected);
                assert_eq!(status, b'I');
                frames
            });
        });
    }
    group.finish();
}

/// Runs one relay from the client's first message to its Terminate: the client sends
/// `rounds` times `query` and reads `answer` back, the backend reads each query and writes
/// `answer`.
async fn relay_rounds(query: &[u8], answer: &[u8], rounds: usize, sink: &mut [u8]) {
    let (mut client_far, mut client_near) = tokio::io::duplex(64 * 1024);
    let (mut backend_near, mut backend_far) = tokio::io::duplex(64 * 1024);
    let mut buffers = RelayBuffers::new(1 << 20);
    let mut tracker = TxTracker::default();
    let stats = TenantStats::default();
    let clock = PhaseClock::default();
    let relayed = relay(
        &mut client_near,
        &mut backend_near,
        &mut buffers,
        &mut tracker,
        None,
        &stats,
        &clock,
    );
    let client = async {
        for _ in 0..rounds {
            client_far.write_all(query).await.unwrap();
            let mut left = answer.len();
            while left > 0 {
                let n = sink.len().min(left);
                client_far.read_exact(&mut sink[..n]).await.unwrap();
                left -= n;
            }
        }
        client_far.write_all(b"X\0\0\0\x04").await.unwrap();
    };
    let backend = async {
        let mut got = vec![0_u8; query.len()];
        for _ in 0..rounds {
            backend_far.read_exact(&mut got).await.unwrap();
            backend_far.write_all(answer).await.unwrap();
        }
    };
    let (end, (), ()) = tokio::join!(relayed, client, backend);
    assert_eq!(end.unwrap(), RelayEnd::ClientTerminated);
    assert!(tracker.is_clean());
    let rounds = u64::try_from(rounds).unwrap();
    assert_eq!(stats.counters().queries, rounds);
    assert_eq!(stats.counters().transactions, rounds);
}

fn relay_loop(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("relay");
    let mut sink = vec![0_u8; READ_BYTES];

    let mut query = Vec::new();
    frame(&mut query, b'Q', b"SELECT * FROM ledger\0");
    let (answer, _) = result_set();
    group.throughput(Throughput::Bytes(answer.len() as u64));
    group.bench_function("result_set", |b| {
        b.iter(|| rt.block_on(relay_rounds(&query, black_box(&answer), 1, &mut sink)));
    });

    let mut query = Vec::new();
    frame(&mut query, b'Q', b"SELECT 1\0");
    let mut answer = Vec::new();
    let mut desc = b"\0\x01?column?\0".to_vec();
    desc.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
    ]);
    frame(&mut answer, b'T', &desc);
    frame(&mut answer, b'D', &data_row(&[b"1"]));
    frame(&mut answer, b'C', b"SELECT 1\0");
    frame(&mut answer, b'Z', b"I");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("round_trips_1000", |b| {
        b.iter(|| rt.block_on(relay_rounds(&query, black_box(&answer), 1000, &mut sink)));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = configure();
    targets = route, eviction, frame_scan, relay_loop
}
criterion_main!(benches);
