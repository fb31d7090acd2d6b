-- Example tenant schema, applied to every new tenant and by `tenantgate tenant migrate`
-- (src/provision/migrations.rs), as the tenant's own role. Each file runs in its own
-- transaction; a file must not be edited once applied (its checksum is recorded).
CREATE TABLE IF NOT EXISTS notes (
    id          bigserial PRIMARY KEY,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
