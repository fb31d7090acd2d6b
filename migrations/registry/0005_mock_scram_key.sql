-- tenantgate registry schema, version 5: the key that derives mock SCRAM salts.
--
-- An unknown user's login runs SCRAM against a mock verifier whose salt is derived from this key
-- and the (tenant, user) name. Kept here, not drawn at each start, so the salt a probe reads for
-- an unknown user is the same after a restart and from every instance, as a real user's is:
-- comparing salts over time or across instances tells nothing. 32 random bytes from two
-- version-4 UUIDs (built into PostgreSQL 13+; pgcrypto is not assumed).
CREATE TABLE proxy_keys (
    name text PRIMARY KEY,
    key bytea NOT NULL CHECK (length(key) >= 16)
);

INSERT INTO proxy_keys (name, key)
VALUES (
    'mock_scram',
    decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
);
