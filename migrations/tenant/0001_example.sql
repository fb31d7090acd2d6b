-- Example tenant schema, applied to every tenant by the tenant migration runner (admin
-- console issue). Each file runs in its own transaction.
CREATE TABLE IF NOT EXISTS notes (
    id          bigserial PRIMARY KEY,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
