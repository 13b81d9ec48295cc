-- Managed API keys (sluice/identity/keys.py). The key itself is never stored: only its HMAC-SHA256
-- digest under auth.key_secret, and a short display prefix so people can tell keys apart.
-- TIMESTAMPTZ columns hold ISO-8601 UTC text (sluice/store/sqlite.py reads them back as datetimes).
CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    digest              BLOB NOT NULL UNIQUE,
    prefix              TEXT NOT NULL,
    models              TEXT,               -- a JSON array of model names; NULL: every model
    tenant              TEXT,
    requests_per_minute INTEGER CHECK (requests_per_minute >= 1),
    tokens_per_minute   INTEGER CHECK (tokens_per_minute >= 1),
    max_concurrency     INTEGER CHECK (max_concurrency >= 1),
    created_at          TIMESTAMPTZ NOT NULL,
    expires_at          TIMESTAMPTZ,
    revoked_at          TIMESTAMPTZ,
    rotated_at          TIMESTAMPTZ
);

-- A name belongs to one live key at a time; revoked keys keep theirs for the record.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
