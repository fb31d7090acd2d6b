//! Usage per tenant and hour (`tenant_usage`): what each instance flushes from its counters
//! (`crate::stats`). This module adds rows; it must not count (`stats` does).

use super::{Registry, RegistryError, TenantSlug};

/// Usage one tenantgate instance adds to a tenant's current hour in `tenant_usage`: the
/// growth of the tenant's counters (`crate::stats`) since the instance's last flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// Client logins.
    pub clients: i64,
    pub transactions: i64,
    pub queries: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub wait_us: i64,
    pub backend_connects: i64,
    pub backend_connect_errors: i64,
    pub pool_evictions: i64,
    pub reclaimed_connections: i64,
}

impl Registry {
    /// Adds usage to each tenant's row of the current hour (UTC, registry clock), in one
    /// statement: all of it is recorded or none.
    pub async fn add_usage(&self, usage: &[(TenantSlug, UsageDelta)]) -> Result<(), RegistryError> {
        if usage.is_empty() {
            return Ok(());
        }
        let column =
            |f: fn(&UsageDelta) -> i64| usage.iter().map(|(_, d)| f(d)).collect::<Vec<i64>>();
        let slugs: Vec<&str> = usage.iter().map(|(slug, _)| slug.as_str()).collect();
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO tenant_usage AS u (tenant_slug, period_start, clients, transactions, \
             queries, bytes_in, bytes_out, wait_us, backend_connects, backend_connect_errors, \
             pool_evictions, reclaimed_connections) \
             SELECT d.slug, date_trunc('hour', now(), 'UTC'), d.clients, d.transactions, \
             d.queries, d.bytes_in, d.bytes_out, d.wait_us, d.backend_connects, \
             d.backend_connect_errors, d.pool_evictions, d.reclaimed_connections \
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], \
             $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[]) \
             AS d(slug, clients, transactions, queries, bytes_in, bytes_out, wait_us, \
             backend_connects, backend_connect_errors, pool_evictions, reclaimed_connections) \
             ON CONFLICT (tenant_slug, period_start) DO UPDATE SET \
             clients = u.clients + EXCLUDED.clients, \
             transactions = u.transactions + EXCLUDED.transactions, \
             queries = u.queries + EXCLUDED.queries, \
             bytes_in = u.bytes_in + EXCLUDED.bytes_in, \
             bytes_out = u.bytes_out + EXCLUDED.bytes_out, \
             wait_us = u.wait_us + EXCLUDED.wait_us, \
             backend_connects = u.backend_connects + EXCLUDED.backend_connects, \
             backend_connect_errors = u.backend_connect_errors + EXCLUDED.backend_connect_errors, \
             pool_evictions = u.pool_evictions + EXCLUDED.pool_evictions, \
             reclaimed_connections = u.reclaimed_connections + EXCLUDED.reclaimed_connections, \
             updated_at = now()",
            &[
                &slugs,
                &column(|d| d.clients),
                &column(|d| d.transactions),
                &column(|d| d.queries),
                &column(|d| d.bytes_in),
                &column(|d| d.bytes_out),
                &column(|d| d.wait_us),
                &column(|d| d.backend_connects),
                &column(|d| d.backend_connect_errors),
                &column(|d| d.pool_evictions),
                &column(|d| d.reclaimed_connections),
            ],
        )
        .await?;
        Ok(())
    }
}
