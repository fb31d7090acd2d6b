-- tenantgate registry schema, version 3: client-certificate auth and custom domains.
--
-- auth_method per user, as PostgreSQL's pg_hba methods: 'scram' (SCRAM-SHA-256, what every
-- user had before), 'cert' (a client certificate that chains to [tls] client_ca_file and whose
-- subject CN is the user name; no password asked), 'cert+scram' (both). A 'cert' user created
-- without a password holds the SCRAM verifier of a random password nobody knows.
ALTER TABLE tenant_users
    ADD COLUMN auth_method text NOT NULL DEFAULT 'scram'
        CHECK (auth_method IN ('scram', 'cert', 'cert+scram'));
ALTER TABLE admin_users
    ADD COLUMN auth_method text NOT NULL DEFAULT 'scram'
        CHECK (auth_method IN ('scram', 'cert', 'cert+scram'));

-- Custom domains: a client whose TLS server name (SNI) is exactly one of these reaches the
-- tenant, whatever database name it sends. Lower-case DNS names; one tenant per domain.
CREATE TABLE tenant_domains (
    domain       text PRIMARY KEY
                 CHECK (domain ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$'
                        AND length(domain) <= 253),
    tenant_slug  text NOT NULL REFERENCES tenants (slug) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_domains_tenant ON tenant_domains (tenant_slug);

-- Running instances forget the tenant's cached entries (and their domain cache) on a change.
CREATE TRIGGER tenant_domains_notify AFTER INSERT OR UPDATE OR DELETE ON tenant_domains
    FOR EACH ROW EXECUTE FUNCTION tenantgate_notify_change();
