-- Managed API keys (sluice/identity/keys.py). The key itself is never stored: only its HMAC-SHA256
-- digest under auth.key_secret, and a short display prefix so people can tell keys apart.
CREATE TABLE api_keys (
    id                  text PRIMARY KEY,
    name                text NOT NULL,
    digest              bytea NOT NULL UNIQUE,
    prefix              text NOT NULL,
    models              jsonb,              -- a JSON array of model names; NULL: every model
    tenant              text,
    requests_per_minute integer CHECK (requests_per_minute >= 1),
    tokens_per_minute   integer CHECK (tokens_per_minute >= 1),
    max_concurrency     integer CHECK (max_concurrency >= 1),
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz,
    revoked_at          timestamptz,
    rotated_at          timestamptz
);

-- A name belongs to one live key at a time; revoked keys keep theirs for the record.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
