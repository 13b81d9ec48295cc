-- The audit and usage log (sluice/audit/): one row per request; the same logical schema as PostgreSQL's
-- (see migrations/postgres/0002_requests.sql for what each column holds), without partitions: retention
-- deletes old rows instead of dropping daily partitions. TIMESTAMPTZ columns hold ISO-8601 UTC text.
CREATE TABLE requests (
    request_id        TEXT        NOT NULL,
    received_at       TIMESTAMPTZ NOT NULL,
    first_token_at    TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ NOT NULL,
    tenant            TEXT,
    key_id            TEXT,
    key_name          TEXT,
    user_id           TEXT,
    client_ip         TEXT,
    method            TEXT        NOT NULL,
    path              TEXT        NOT NULL,
    route             TEXT,
    model_requested   TEXT,
    model_served      TEXT,
    adapter           TEXT,
    backend           TEXT,
    stream            BOOLEAN     NOT NULL,
    status            INTEGER     NOT NULL,
    error_type        TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    ttft_ms           REAL,
    latency_ms        REAL        NOT NULL,
    attempts          INTEGER     NOT NULL,
    cache_result      TEXT,
    rate_limit        TEXT,
    prompt_body       TEXT,
    response_body     TEXT,
    PRIMARY KEY (request_id, received_at)
);

CREATE INDEX requests_key_time ON requests (key_id, received_at);
CREATE INDEX requests_model_time ON requests (model_requested, received_at);
CREATE INDEX requests_status_time ON requests (status, received_at);
CREATE INDEX requests_time ON requests (received_at);

CREATE TABLE usage_daily (
    day               TEXT    NOT NULL,  -- YYYY-MM-DD, UTC
    key_id            TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    requests          INTEGER NOT NULL,
    errors            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms_sum    REAL    NOT NULL,
    PRIMARY KEY (day, key_id, model)
);

ALTER TABLE api_keys ADD COLUMN log_bodies BOOLEAN NOT NULL DEFAULT 0;
