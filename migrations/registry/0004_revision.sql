-- tenantgate registry schema, version 4: a revision number per tenant row.
--
-- Every insert and update of a tenant row takes the next number of one sequence. The trigger runs
-- after PostgreSQL has locked the row, so of two updates of the same row the one that commits
-- later always has the larger number: a larger revision is a newer row, whichever registry
-- connection read it and whenever the read finished. tenantgate keeps, per tenant, the newest
-- revision it has seen and never builds a backend pool from an older one.
CREATE SEQUENCE tenant_revisions;

ALTER TABLE tenants
    ADD COLUMN revision bigint NOT NULL DEFAULT nextval('tenant_revisions');

CREATE FUNCTION tenantgate_next_revision() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := nextval('tenant_revisions');
    RETURN NEW;
END
$$;

CREATE TRIGGER tenants_revision BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenantgate_next_revision();
