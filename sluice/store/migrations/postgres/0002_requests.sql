-- The audit and usage log (sluice/audit/): one row per request the gateway answered.
-- Written in batches by the audit writer, idempotently: a replayed record (after an outage or a crash)
-- hits the primary key and is skipped, so every request is recorded exactly once. The primary key holds
-- received_at because a partitioned table's unique keys must include the partition key; a record always
-- carries the same received_at, so (request_id, received_at) is as unique as request_id.
-- Partitioned by day on received_at. Daily partitions (requests_YYYYMMDD) are created ahead and dropped
-- after audit.retention_days by sluice/audit/partitions.py; the default partition only catches rows no
-- daily partition covers (a clock far off, a replay older than the retention) and is emptied into a
-- daily partition when one is created for its rows.
CREATE TABLE requests (
    request_id        text        NOT NULL,
    received_at       timestamptz NOT NULL,
    first_token_at    timestamptz,             -- streams and completions: when the first token left
    finished_at       timestamptz NOT NULL,
    tenant            text,
    key_id            text,                    -- the caller: key:<id>, static:<name>, jwt:<issuer>:<user>
    key_name          text,                    -- never the key itself
    user_id           text,                    -- the JWT user, else the request's OpenAI `user` field
    client_ip         text,
    method            text        NOT NULL,
    path              text        NOT NULL,
    route             text,                    -- chat, completions, embeddings, models, ...; NULL: unknown path
    model_requested   text,
    model_served      text,                    -- differs from model_requested when a fallback answered
    adapter           text,                    -- the LoRA adapter, when the model is one
    backend           text,
    stream            boolean     NOT NULL,
    status            smallint    NOT NULL,    -- 499: the client went away first
    error_type        text,                    -- the OpenAI error code of a refused or failed request
    prompt_tokens     integer,
    completion_tokens integer,
    ttft_ms           real,
    latency_ms        real        NOT NULL,
    attempts          smallint    NOT NULL,    -- backends tried
    cache_result      text,                    -- hit | miss | bypass; NULL: no cache in the path
    rate_limit        text,                    -- allowed | limited | fail_open | fail_closed; NULL: no limit applied
    prompt_body       text,                    -- only for keys that log bodies, cut at audit.body_max_bytes
    response_body     text,
    PRIMARY KEY (request_id, received_at)
) PARTITION BY RANGE (received_at);

CREATE TABLE requests_default PARTITION OF requests DEFAULT;

-- The questions people ask: one key over time, one model over time, errors over time.
CREATE INDEX requests_key_time ON requests (key_id, received_at);
CREATE INDEX requests_model_time ON requests (model_requested, received_at);
CREATE INDEX requests_status_time ON requests (status, received_at);

-- Daily totals per caller and model (UTC days), updated in the same statement as the rows they count,
-- from the rows actually inserted: a replayed record is counted once, like its row.
CREATE TABLE usage_daily (
    day               date             NOT NULL,
    key_id            text             NOT NULL,  -- '' for requests without a caller (refused before auth)
    model             text             NOT NULL,  -- the model requested; '' for requests without one
    requests          bigint           NOT NULL,
    errors            bigint           NOT NULL,  -- status >= 400
    prompt_tokens     bigint           NOT NULL,
    completion_tokens bigint           NOT NULL,
    latency_ms_sum    double precision NOT NULL,
    PRIMARY KEY (day, key_id, model)
);

-- Keys may have their prompts and responses stored with their audit rows (off unless set per key).
ALTER TABLE api_keys ADD COLUMN log_bodies boolean NOT NULL DEFAULT false;
