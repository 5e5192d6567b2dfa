-- Sluice's durable state: API keys, jobs, their event log, and the outbox of lane messages.

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    key_hash    bytea NOT NULL UNIQUE,
    -- First characters of the key, so operators can tell keys apart without the secret.
    key_prefix  text NOT NULL,
    tenant      text NOT NULL,
    user_id     text NOT NULL,
    tier        text NOT NULL CHECK (tier IN ('enterprise', 'pro', 'basic', 'free')),
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    tenant          text NOT NULL,
    user_id         text NOT NULL,
    tier            text NOT NULL,
    lane            text NOT NULL,
    model           text NOT NULL,
    request         jsonb NOT NULL,
    state           text NOT NULL CHECK (state IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled', 'dead')),
    -- Claims ever made; fences completion so a stale duplicate cannot overwrite a newer outcome.
    attempt         integer NOT NULL DEFAULT 0,
    -- Claims since the job was last (re)queued by a client or operator; what the retry budget counts.
    tries           integer NOT NULL DEFAULT 0,
    lease_until     timestamptz,
    result          jsonb,
    error           text,
    endpoint        text,
    notify_email    text,
    idempotency_key text,
    body_hash       bytea,
    event_seq       integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);

CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_expired_leases ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_dead ON jobs (updated_at) WHERE state = 'dead';

CREATE TABLE job_events (
    job_id  uuid NOT NULL,
    seq     integer NOT NULL,
    state   text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    detail  jsonb,
    PRIMARY KEY (job_id, seq)
);

-- Lane messages written in the same transaction as the state change that needs them;
-- deleted once the broker confirmed them, republished by the relay if that never happened.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    job_id        uuid NOT NULL,
    lane          text NOT NULL,
    attempt       integer NOT NULL,
    deliver_at    timestamptz NOT NULL DEFAULT now(),
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz
);

CREATE INDEX outbox_created ON outbox (created_at);
