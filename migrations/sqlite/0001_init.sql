-- Sluice's durable state on SQLite: the tables and columns of migrations/postgres/0001_init.sql,
-- with types SQLite has. The store writes every value in one representation:
--   uuid        -> BLOB, the 16 bytes (so ids sort by time, like PostgreSQL's uuid)
--   timestamptz -> TEXT, UTC as 'YYYY-MM-DDTHH:MM:SS.SSSZ', fixed width so text order is time
--                  order; the store always binds these itself, the defaults are a fallback
--   jsonb       -> TEXT holding JSON
--   bytea       -> BLOB
-- STRICT tables refuse a value of the wrong type instead of storing it silently.

CREATE TABLE api_keys (
    id          BLOB PRIMARY KEY,
    key_hash    BLOB NOT NULL UNIQUE,
    -- First characters of the key, so operators can tell keys apart without the secret.
    key_prefix  TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    tier        TEXT NOT NULL CHECK (tier IN ('enterprise', 'pro', 'basic', 'free')),
    email       TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    revoked_at  TEXT
) STRICT;

CREATE TABLE jobs (
    id              BLOB PRIMARY KEY,
    tenant          TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    tier            TEXT NOT NULL,
    lane            TEXT NOT NULL,
    model           TEXT NOT NULL,
    request         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled', 'dead')),
    -- Claims ever made; fences completion so a stale duplicate cannot overwrite a newer outcome.
    attempt         INTEGER NOT NULL DEFAULT 0,
    -- Claims since the job was last (re)queued by a client or operator; what the retry budget counts.
    tries           INTEGER NOT NULL DEFAULT 0,
    lease_until     TEXT,
    result          TEXT,
    error           TEXT,
    endpoint        TEXT,
    notify_email    TEXT,
    idempotency_key TEXT,
    body_hash       BLOB,
    event_seq       INTEGER NOT NULL DEFAULT 1,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at      TEXT,
    finished_at     TEXT
) STRICT;

CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_expired_leases ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_dead ON jobs (updated_at) WHERE state = 'dead';

CREATE TABLE job_events (
    job_id  BLOB NOT NULL,
    seq     INTEGER NOT NULL,
    state   TEXT NOT NULL,
    at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    detail  TEXT,
    PRIMARY KEY (job_id, seq)
) STRICT;

-- Lane messages written in the same transaction as the state change that needs them;
-- deleted once the broker confirmed them, republished by the relay if that never happened.
-- AUTOINCREMENT, like bigserial, never hands out an id again: a late `mark_published` of a
-- deleted row must not delete a newer row that reused its id.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        BLOB NOT NULL,
    lane          TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    deliver_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    reason        TEXT,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    locked_until  TEXT
) STRICT;

CREATE INDEX outbox_created ON outbox (created_at);
