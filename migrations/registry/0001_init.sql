-- tenantgate registry schema, version 1.
-- Applied by tenantgate at start-up (see src/registry/migrate.rs); the ledger is
-- tenantgate_schema_migrations.

CREATE TABLE tenants (
    slug                  text PRIMARY KEY
                          CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    display_name          text,
    state                 text NOT NULL DEFAULT 'provisioning'
                          CHECK (state IN ('provisioning', 'migrating', 'active',
                                           'suspended', 'failed', 'deleted')),
    plan                  text NOT NULL DEFAULT 'default',
    server                text NOT NULL,
    database_name         text NOT NULL,
    backend_role          text NOT NULL,
    -- AES-256-GCM under the master key: version byte, nonce, ciphertext+tag.
    backend_password_enc  bytea NOT NULL,
    overrides             jsonb NOT NULL DEFAULT '{}'::jsonb,
    error_message         text,
    schema_version        integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Client credentials: SCRAM-SHA-256 verifiers only, never a password.
CREATE TABLE tenant_users (
    tenant_slug     text NOT NULL REFERENCES tenants (slug) ON DELETE CASCADE,
    username        text NOT NULL,
    scram_verifier  text NOT NULL CHECK (scram_verifier LIKE 'SCRAM-SHA-256$%'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_slug, username)
);

CREATE TABLE admin_users (
    username        text PRIMARY KEY,
    scram_verifier  text NOT NULL CHECK (scram_verifier LIKE 'SCRAM-SHA-256$%'),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE activity_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    tenant_slug  text,
    actor        text NOT NULL,
    action       text NOT NULL,
    detail       text
);
CREATE INDEX activity_log_tenant_at ON activity_log (tenant_slug, at);

CREATE TABLE tenant_migrations (
    tenant_slug  text NOT NULL REFERENCES tenants (slug) ON DELETE CASCADE,
    version      integer NOT NULL,
    name         text NOT NULL,
    checksum     text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    duration_ms  bigint NOT NULL,
    PRIMARY KEY (tenant_slug, version)
);

-- Every change to a tenant or its users tells running tenantgate instances which slug to
-- forget from their caches.
CREATE FUNCTION tenantgate_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'tenants' THEN
        PERFORM pg_notify('tenantgate_changes', COALESCE(NEW.slug, OLD.slug));
    ELSE
        PERFORM pg_notify('tenantgate_changes', COALESCE(NEW.tenant_slug, OLD.tenant_slug));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenantgate_notify_change();
CREATE TRIGGER tenant_users_notify AFTER INSERT OR UPDATE OR DELETE ON tenant_users
    FOR EACH ROW EXECUTE FUNCTION tenantgate_notify_change();
