-- tenantgate registry schema, version 2: usage per tenant and hour.
-- Each tenantgate instance adds what its tenants used since its last flush to the row of the
-- current hour (UTC) every [stats] flush_interval_seconds, so rows sum over instances. Columns
-- mean what the counters of the same name mean (see src/stats.rs); `clients` counts client
-- logins. No foreign key to tenants: usage of a deleted tenant stays billable.

CREATE TABLE tenant_usage (
    tenant_slug             text NOT NULL,
    -- Start of the hour, UTC, on the registry's clock at flush time.
    period_start            timestamptz NOT NULL,
    clients                 bigint NOT NULL DEFAULT 0,
    transactions            bigint NOT NULL DEFAULT 0,
    queries                 bigint NOT NULL DEFAULT 0,
    bytes_in                bigint NOT NULL DEFAULT 0,
    bytes_out               bigint NOT NULL DEFAULT 0,
    wait_us                 bigint NOT NULL DEFAULT 0,
    backend_connects        bigint NOT NULL DEFAULT 0,
    backend_connect_errors  bigint NOT NULL DEFAULT 0,
    pool_evictions          bigint NOT NULL DEFAULT 0,
    reclaimed_connections   bigint NOT NULL DEFAULT 0,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_slug, period_start)
);
CREATE INDEX tenant_usage_period ON tenant_usage (period_start);
