-- Admission and cost control, as migrations/postgres/0005_admission.sql: answers reused from
-- earlier identical jobs, routing choices, cost per job and the daily spend per tenant.

ALTER TABLE jobs ADD COLUMN request_hash BLOB;
ALTER TABLE jobs ADD COLUMN leader BLOB;
ALTER TABLE jobs ADD COLUMN cached TEXT CHECK (cached IN ('exact', 'semantic', 'dedup'));
ALTER TABLE jobs ADD COLUMN route_reason TEXT;
ALTER TABLE jobs ADD COLUMN cost_usd REAL;

CREATE INDEX jobs_answers ON jobs (tenant, request_hash, finished_at)
    WHERE request_hash IS NOT NULL AND state = 'succeeded' AND leader IS NULL;
CREATE UNIQUE INDEX jobs_in_flight_request ON jobs (tenant, request_hash)
    WHERE request_hash IS NOT NULL AND leader IS NULL AND idempotency_key IS NULL
      AND state IN ('queued', 'running', 'retrying');
CREATE INDEX jobs_followers ON jobs (leader) WHERE leader IS NOT NULL AND state = 'queued';
CREATE INDEX jobs_queued_in_lane ON jobs (lane, id) WHERE state = 'queued' AND leader IS NULL;
CREATE INDEX jobs_started ON jobs (started_at) WHERE started_at IS NOT NULL;

-- `day` is 'YYYY-MM-DD' in UTC.
CREATE TABLE tenant_spend (
    tenant  TEXT NOT NULL,
    day     TEXT NOT NULL,
    usd     REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day)
) STRICT;

CREATE TABLE semantic_entries (
    job_id      BLOB PRIMARY KEY,
    tenant      TEXT NOT NULL,
    model       TEXT NOT NULL,
    embedding   BLOB NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;
CREATE INDEX semantic_entries_recent ON semantic_entries (tenant, model, created_at);
