-- tenantgate registry schema, version 7: the tenantgate instances that share this registry
-- (issue 15).
--
-- Each running instance keeps one row: written at start, its heartbeat_at (registry clock)
-- and counters updated every [instance] heartbeat_seconds, deleted at a clean shutdown. A row
-- whose heartbeat is older than [instance] heartbeat_ttl_seconds belongs to an instance that is
-- gone: SHOW INSTANCES leaves it out and any instance may delete it. `tag` is the byte every
-- cancel key the instance issues carries (the top byte of its secret), unique among the rows, so
-- that any instance can tell which one a CancelRequest belongs to and forward it there.
CREATE TABLE instances (
    id           text PRIMARY KEY,
    tag          smallint NOT NULL UNIQUE CHECK (tag BETWEEN 1 AND 255),
    -- host:port other instances reach this one at; NULL when it has none to give.
    address      text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- Clients connected and backend connections open, as of the last heartbeat.
    clients      bigint NOT NULL DEFAULT 0,
    backends     bigint NOT NULL DEFAULT 0,
    -- The backend connections this instance may open (its [[server]] budgets summed).
    budget       bigint,
    version      text NOT NULL
);
