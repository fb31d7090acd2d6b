-- tenantgate registry schema, version 8: each backend server's connection budget shared among
-- the tenantgate instances (issue 15).
--
-- One row per (server, instance): a lease on `share` backend connections to `server`, renewed by
-- the instance's heartbeat (`renewed_at`, registry clock). A row older than [instance]
-- heartbeat_ttl_seconds has lapsed: its instance is gone or cut off from the registry, has
-- stopped using the share by then (crate::instance::budget), and any instance deletes the row.
-- The invariant, kept by every writer under a transaction-scoped advisory lock keyed by the
-- server: the shares of the live rows of a server sum to at most its [[server]] max_connections.
-- A share only grows under that lock; it may shrink at any time (that cannot break the sum).
-- `demand` is what the instance wanted at its last renewal (connections in use plus connects
-- waiting for room): the others read it to move spare shares toward it.
CREATE TABLE budget_shares (
    server      text NOT NULL,
    instance_id text NOT NULL,
    share       integer NOT NULL CHECK (share >= 0),
    demand      integer NOT NULL CHECK (demand >= 0),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server, instance_id)
);
