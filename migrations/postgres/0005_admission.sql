-- Admission and cost control: answers reused from earlier identical jobs (exact cache, in-flight
-- dedup, semantic cache), the pool a job was routed to and why, what each job cost, and the
-- daily spend per tenant that budgets are held against.

-- Hash of tenant, model alias, messages and parameters; NULL when the request opted out of reuse.
ALTER TABLE jobs ADD COLUMN request_hash bytea;
-- Set on a job attached to an identical one in flight: it takes that job's outcome and is never
-- queued itself.
ALTER TABLE jobs ADD COLUMN leader uuid;
-- How a job was answered without its own provider call: 'exact', 'semantic' or 'dedup'.
ALTER TABLE jobs ADD COLUMN cached text CHECK (cached IN ('exact', 'semantic', 'dedup'));
-- Why the job went to the pool its `model` column names, when admission chose one.
ALTER TABLE jobs ADD COLUMN route_reason text;
-- US dollars: usage times the endpoint's price; 0 for answers reused without a call.
ALTER TABLE jobs ADD COLUMN cost_usd double precision;

-- Cache lookups: the tenant's newest successful job with this hash.
CREATE INDEX jobs_answers ON jobs (tenant, request_hash, finished_at)
    WHERE request_hash IS NOT NULL AND state = 'succeeded' AND leader IS NULL;
-- At most one job in flight per tenant and request: an identical one attaches to it instead.
-- Jobs with an Idempotency-Key keep their own identity and stay out of it.
CREATE UNIQUE INDEX jobs_in_flight_request ON jobs (tenant, request_hash)
    WHERE request_hash IS NOT NULL AND leader IS NULL AND idempotency_key IS NULL
      AND state IN ('queued', 'running', 'retrying');
CREATE INDEX jobs_followers ON jobs (leader) WHERE leader IS NOT NULL AND state = 'queued';
-- Lane depth, position and drain rate for load shedding and wait estimates.
CREATE INDEX jobs_queued_in_lane ON jobs (lane, id) WHERE state = 'queued' AND leader IS NULL;
CREATE INDEX jobs_started ON jobs (started_at) WHERE started_at IS NOT NULL;

CREATE TABLE tenant_spend (
    tenant  text NOT NULL,
    day     date NOT NULL,
    usd     double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day)
);

-- Prompt embeddings of jobs on routes with the semantic cache, compared by an exact scan.
CREATE TABLE semantic_entries (
    job_id      uuid PRIMARY KEY,
    tenant      text NOT NULL,
    model       text NOT NULL,
    -- Little-endian f32s.
    embedding   bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX semantic_entries_recent ON semantic_entries (tenant, model, created_at);
