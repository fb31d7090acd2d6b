-- tenantgate registry schema, version 6: which tenants' databases tenantgate did not create.
--
-- REGISTER TENANT adopts an existing database and role. DROP TENANT keeps those unless told to
-- drop them (DROP DATABASE), so it never drops what someone else made. Tenants registered before
-- this version are found in the activity log.
ALTER TABLE tenants ADD COLUMN registered boolean NOT NULL DEFAULT false;

UPDATE tenants SET registered = true
WHERE slug IN (SELECT tenant_slug FROM activity_log WHERE action = 'register');
