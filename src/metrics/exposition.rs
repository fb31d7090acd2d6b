//! One scrape: reads every source once into a [`Snapshot`], then encodes it in the Prometheus
//! text format with prometheus-client (a `Collector` over the snapshot). Per-tenant series go
//! to the `tenant_series` most active tenants (by queries since start-up, then by name); the
//! rest are summed under `tenant="_other"`, so the label has at most `tenant_series + 1`
//! values however many tenants there are. A tenant that enters the named set moves its
//! counts out of `_other`, which then drops (PromQL's `rate()` reads that as a reset).
//!
//! It must not hold a lock across an await, nor read anything on the proxy's hot path but
//! atomics.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::info::Info;

use super::Sources;
use crate::stats::{Counters, LoginOutcome, TenantStatsRow, WaitSnapshot};

/// The label value that sums every tenant without series of its own.
pub const OTHER_TENANTS: &str = "_other";

/// Everything one scrape reports, read once.
#[derive(Debug, Default)]
struct Snapshot {
    /// (tenant label, counters): the named tenants, then `_other` if any tenant is left.
    tenants: Vec<(String, Counters)>,
    logins: Vec<(&'static str, u64)>,
    admin_commands: (u64, u64),
    /// (handed over, handovers failed, taken over).
    handovers: (u64, u64, u64),
    lockouts: u64,
    checkout_wait: Option<WaitSnapshot>,
    /// Per server: (budget, connections open, idle).
    servers: BTreeMap<String, (u32, u32, u64)>,
    pools: u64,
    clients_active: u64,
    clients_waiting: u64,
    clients_tenant: u64,
    clients_admin: u64,
}

/// The `/metrics` body.
pub async fn render(sources: &Sources) -> Result<String, fmt::Error> {
    let snapshot = snapshot(sources).await;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut body = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut body, &registry)?;
    Ok(body)
}

async fn snapshot(sources: &Sources) -> Snapshot {
    let mut snap = Snapshot::default();
    for server in sources.pools.servers() {
        let budget = sources.pools.budget(&server.name);
        snap.servers.insert(
            server.name.clone(),
            (server.max_connections, budget.map_or(0, |b| b.in_use()), 0),
        );
    }
    for (_, pool, _) in sources.pools.list().await {
        snap.pools += 1;
        let (_, idle) = pool.state();
        if let Some(server) = snap.servers.get_mut(&pool.target().server) {
            server.2 += u64::from(idle);
        }
        snap.clients_active += u64::from(pool.active());
        snap.clients_waiting += pool.waiting() as u64;
    }
    let (admin, tenant) = sources.clients.counts();
    snap.clients_admin = admin as u64;
    snap.clients_tenant = tenant as u64;
    let process = sources.stats.process();
    snap.logins = LoginOutcome::ALL
        .iter()
        .map(|o| (o.as_str(), process.logins(*o)))
        .collect();
    snap.admin_commands = process.admin_commands();
    snap.handovers = process.handovers();
    snap.lockouts = sources.throttle.lockouts();
    snap.checkout_wait = Some(process.checkout_wait.snapshot());
    snap.tenants = bounded_tenants(sources.stats.snapshot(), sources.tenant_series);
    snap
}

/// The `named` most active tenants by name, and the sum of the rest as `_other`.
fn bounded_tenants(mut rows: Vec<TenantStatsRow>, named: usize) -> Vec<(String, Counters)> {
    rows.sort_unstable_by(|a, b| {
        b.counters
            .queries
            .cmp(&a.counters.queries)
            .then_with(|| a.slug.as_str().cmp(b.slug.as_str()))
    });
    let rest = rows.split_off(named.min(rows.len()));
    let mut out: Vec<(String, Counters)> = rows
        .into_iter()
        .map(|row| (row.slug.as_str().to_owned(), row.counters))
        .collect();
    if !rest.is_empty() {
        let mut other = Counters::default();
        for row in &rest {
            other.accumulate(&row.counters);
        }
        out.push((OTHER_TENANTS.to_owned(), other));
    }
    out
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// One series family: name (without `_total` for counters), help, type.
fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, fmt::Error> {
    encoder.encode_descriptor(name, help, None, kind)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    family(encoder, name, help, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, f64>(&value, None)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &self.0;
        let info = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        info.encode(encoder.encode_descriptor(
            "tenantgate_build",
            "tenantgate's version",
            None,
            info.metric_type(),
        )?)?;
        encode_clients(&mut encoder, s)?;
        encode_logins(&mut encoder, s)?;
        encode_servers(&mut encoder, s)?;
        if let Some(wait) = &s.checkout_wait {
            family(
                &mut encoder,
                "tenantgate_checkout_wait_seconds",
                "Time clients waited for a backend checkout, including checkouts that failed",
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                wait.sum_seconds,
                wait.count,
                &wait.buckets,
                None,
            )?;
        }
        encode_tenants(&mut encoder, &s.tenants)
    }
}

fn encode_clients(encoder: &mut DescriptorEncoder<'_>, s: &Snapshot) -> Result<(), fmt::Error> {
    let active = s.clients_active.min(s.clients_tenant);
    let waiting = s.clients_waiting.min(s.clients_tenant - active);
    let idle = s.clients_tenant - active - waiting;
    let mut clients = family(
        encoder,
        "tenantgate_clients",
        "Connected clients: active (holding a backend or opening one), waiting (for a backend), idle (tenant clients between transactions), admin (console sessions)",
        MetricType::Gauge,
    )?;
    for (state, n) in [
        ("active", active),
        ("waiting", waiting),
        ("idle", idle),
        ("admin", s.clients_admin),
    ] {
        clients
            .encode_family(&[("state", state)])?
            .encode_gauge(&n)?;
    }
    Ok(())
}

fn encode_logins(encoder: &mut DescriptorEncoder<'_>, s: &Snapshot) -> Result<(), fmt::Error> {
    let mut logins = family(
        encoder,
        "tenantgate_logins",
        "Logins by outcome (ok, auth_failed, abandoned, throttled, tenant_unavailable, too_many_logins, timeout, refused)",
        MetricType::Counter,
    )?;
    for (outcome, n) in &s.logins {
        logins
            .encode_family(&[("outcome", *outcome)])?
            .encode_counter::<NoLabelSet, u64, f64>(n, None)?;
    }
    counter(
        encoder,
        "tenantgate_login_lockouts",
        "Failed-login lock-outs started (per source and target, and for unknown cancel keys)",
        s.lockouts,
    )?;
    let mut admin = family(
        encoder,
        "tenantgate_admin_commands",
        "Admin console commands, by outcome (ok, error)",
        MetricType::Counter,
    )?;
    for (outcome, n) in [("ok", s.admin_commands.0), ("error", s.admin_commands.1)] {
        admin
            .encode_family(&[("outcome", outcome)])?
            .encode_counter::<NoLabelSet, u64, f64>(&n, None)?;
    }
    let mut handovers = family(
        encoder,
        "tenantgate_handover_clients",
        "Clients moved by SIGUSR2 upgrades: sent to a newer process, failed (told 57P01), \
         received from an older one",
        MetricType::Counter,
    )?;
    let (sent, failed, received) = s.handovers;
    for (outcome, n) in [("sent", sent), ("failed", failed), ("received", received)] {
        handovers
            .encode_family(&[("outcome", outcome)])?
            .encode_counter::<NoLabelSet, u64, f64>(&n, None)?;
    }
    Ok(())
}

fn encode_servers(encoder: &mut DescriptorEncoder<'_>, s: &Snapshot) -> Result<(), fmt::Error> {
    let mut connections = family(
        encoder,
        "tenantgate_server_connections",
        "Backend connections open per server: used (serving a client) and idle (pooled)",
        MetricType::Gauge,
    )?;
    for (server, (_, open, idle)) in &s.servers {
        let used = u64::from(*open).saturating_sub(*idle);
        for (state, n) in [("used", used), ("idle", *idle)] {
            connections
                .encode_family(&[("server", server.as_str()), ("state", state)])?
                .encode_gauge(&n)?;
        }
    }
    let mut budget = family(
        encoder,
        "tenantgate_server_connection_budget",
        "Backend connections a server allows tenantgate (max_connections)",
        MetricType::Gauge,
    )?;
    for (server, (max, _, _)) in &s.servers {
        budget
            .encode_family(&[("server", server.as_str())])?
            .encode_gauge(&u64::from(*max))?;
    }
    family(
        encoder,
        "tenantgate_pools",
        "Tenant pools alive (in the pool map, or evicted while clients still use them)",
        MetricType::Gauge,
    )?
    .encode_gauge(&s.pools)
}

/// (name, help, the counter's value) of every per-tenant counter.
type TenantCounter = (&'static str, &'static str, fn(&Counters) -> u64);

const TENANT_COUNTERS: [TenantCounter; 9] = [
    (
        "tenantgate_tenant_logins",
        "Clients of the tenant that logged in",
        |c| c.clients_total,
    ),
    (
        "tenantgate_tenant_transactions",
        "Transactions completed (ReadyForQuery idle from the backend)",
        |c| c.transactions,
    ),
    (
        "tenantgate_tenant_queries",
        "Queries sent (simple Query and Execute messages)",
        |c| c.queries,
    ),
    (
        "tenantgate_tenant_received_bytes",
        "Bytes received from the tenant's clients after login",
        |c| c.bytes_in,
    ),
    (
        "tenantgate_tenant_sent_bytes",
        "Bytes the tenant's backends sent to its clients",
        |c| c.bytes_out,
    ),
    (
        "tenantgate_tenant_backend_connects",
        "Backend connections opened",
        |c| c.backend_connects,
    ),
    (
        "tenantgate_tenant_backend_connect_errors",
        "Backend connection attempts that failed",
        |c| c.backend_connect_errors,
    ),
    (
        "tenantgate_tenant_pool_evictions",
        "Times the tenant's pool was evicted (idle TTL or capacity)",
        |c| c.pool_evictions,
    ),
    (
        "tenantgate_tenant_reclaimed_connections",
        "Idle backend connections closed to make room for another tenant",
        |c| c.reclaimed_connections,
    ),
];

fn encode_tenants(
    encoder: &mut DescriptorEncoder<'_>,
    tenants: &[(String, Counters)],
) -> Result<(), fmt::Error> {
    let mut clients = family(
        encoder,
        "tenantgate_tenant_clients",
        "Clients of the tenant connected now",
        MetricType::Gauge,
    )?;
    for (tenant, c) in tenants {
        clients
            .encode_family(&[("tenant", tenant.as_str())])?
            .encode_gauge(&c.clients_now)?;
    }
    let mut wait = family(
        encoder,
        "tenantgate_tenant_checkout_wait_seconds",
        "Seconds the tenant's clients waited for backend checkouts",
        MetricType::Counter,
    )?;
    for (tenant, c) in tenants {
        #[allow(clippy::cast_precision_loss, reason = "seconds need no exactness")]
        let seconds = c.wait_us as f64 / 1e6;
        wait.encode_family(&[("tenant", tenant.as_str())])?
            .encode_counter::<NoLabelSet, f64, f64>(&seconds, None)?;
    }
    for (name, help, value) in TENANT_COUNTERS {
        let mut f = family(encoder, name, help, MetricType::Counter)?;
        for (tenant, c) in tenants {
            f.encode_family(&[("tenant", tenant.as_str())])?
                .encode_counter::<NoLabelSet, u64, f64>(&value(c), None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TenantSlug;

    fn rows(n: usize) -> Vec<TenantStatsRow> {
        (0..n)
            .map(|i| TenantStatsRow {
                slug: TenantSlug::parse(&format!("t{i:05}")).unwrap(),
                counters: Counters {
                    queries: i as u64,
                    transactions: 1,
                    ..Counters::default()
                },
            })
            .collect()
    }

    #[test]
    fn ten_thousand_tenants_give_at_most_n_plus_one_label_values() {
        let bounded = bounded_tenants(rows(10_000), 100);
        assert_eq!(bounded.len(), 101);
        // The busiest first; the rest summed.
        assert_eq!(bounded[0].0, "t09999");
        assert_eq!(bounded[99].0, "t09900");
        assert_eq!(bounded[100].0, OTHER_TENANTS);
        assert_eq!(bounded[100].1.transactions, 9_900);
        assert_eq!(bounded[100].1.queries, (0..9_900).sum::<u64>());
    }

    #[test]
    fn few_tenants_need_no_other() {
        let bounded = bounded_tenants(rows(3), 100);
        assert_eq!(bounded.len(), 3);
        assert!(bounded.iter().all(|(t, _)| t != OTHER_TENANTS));
        assert!(bounded_tenants(rows(3), 0).len() == 1);
    }
}
