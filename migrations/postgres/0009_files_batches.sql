-- OpenAI's Files and Batch API, held chat completions and provider statuses. Expand only: new
-- tables, nullable columns, and notifications relaxed to hold a job's or a batch's email.

-- The provider's HTTP status of the failure that `error` describes (retry_later, dead_letter).
ALTER TABLE jobs ADD COLUMN error_status smallint;
-- A chat completion whose client went away: which request it answers (to hand it to the same
-- request sent again) and until when it waits for that before it is cancelled.
ALTER TABLE jobs ADD COLUMN hold_hash bytea;
ALTER TABLE jobs ADD COLUMN detached_until timestamptz;
CREATE INDEX jobs_detached ON jobs (detached_until) WHERE detached_until IS NOT NULL;
CREATE INDEX jobs_held ON jobs (tenant, hold_hash) WHERE detached_until IS NOT NULL;

-- Uploaded files (batch inputs) and the files batches write (outputs, errors). The bytes live
-- in `file_chunks`, so every API node serves every file. Ids are `file-<uuidv7 hex>`: in
-- byte order (COLLATE "C") they sort by time, which pages the listing.
CREATE TABLE files (
    id          text COLLATE "C" PRIMARY KEY,
    tenant      text NOT NULL,
    purpose     text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    text NOT NULL,
    bytes       bigint NOT NULL DEFAULT 0,
    lines       integer NOT NULL DEFAULT 0,
    -- 'uploading' until the last chunk is in; only 'processed' files are visible.
    status      text NOT NULL DEFAULT 'uploading' CHECK (status IN ('uploading', 'processed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Last chunk appended: an upload idle for long was left behind by a dead node.
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);
CREATE INDEX files_listed ON files (tenant, id) WHERE status = 'processed' AND deleted_at IS NULL;
CREATE INDEX files_uploading ON files (updated_at) WHERE status = 'uploading';

-- A file's content in order of `seq` (0, 1, 2, ...), each chunk written by its own statement.
CREATE TABLE file_chunks (
    file_id  text COLLATE "C" NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    seq      integer NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (file_id, seq)
);

-- Batches: one input file, one ordinary job per line, output and error files at the end.
CREATE TABLE batches (
    id                 text COLLATE "C" PRIMARY KEY,
    tenant             text NOT NULL,
    user_id            text NOT NULL,
    tier               text NOT NULL,
    input_file_id      text NOT NULL,
    endpoint           text NOT NULL,
    completion_window  text NOT NULL,
    status             text NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress',
                           'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    metadata           jsonb,
    errors             jsonb,
    output_file_id     text,
    error_file_id      text,
    total              integer NOT NULL DEFAULT 0,
    completed          integer NOT NULL DEFAULT 0,
    failed             integer NOT NULL DEFAULT 0,
    notify_email       text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    in_progress_at     timestamptz,
    expires_at         timestamptz NOT NULL,
    finalizing_at      timestamptz,
    completed_at       timestamptz,
    failed_at          timestamptz,
    expired_at         timestamptz,
    cancelling_at      timestamptz,
    cancelled_at       timestamptz,
    -- Held by a finalizer until then; NULL or past means any finalizer may take it.
    locked_until       timestamptz
);
CREATE INDEX batches_listed ON batches (tenant, id);
CREATE INDEX batches_open ON batches (tenant)
    WHERE status IN ('validating', 'in_progress', 'cancelling', 'finalizing');
CREATE INDEX batches_due ON batches (locked_until)
    WHERE status IN ('in_progress', 'cancelling', 'finalizing');

-- A batch's lines: `line` is the 1-based line number in the input file. A purged job takes
-- its line with it (the store refuses to purge jobs of batches still open).
CREATE TABLE batch_lines (
    batch_id   text COLLATE "C" NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    line       integer NOT NULL,
    custom_id  text NOT NULL,
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_lines_job ON batch_lines (job_id);

-- One email per batch beside one per job: a row names exactly one of the two.
ALTER TABLE notifications ALTER COLUMN job_id DROP NOT NULL;
ALTER TABLE notifications ADD COLUMN batch_id text COLLATE "C" UNIQUE
    REFERENCES batches (id) ON DELETE CASCADE;
ALTER TABLE notifications ADD CONSTRAINT notifications_one_subject
    CHECK ((job_id IS NULL) <> (batch_id IS NULL));

-- A key may opt in to reusing answers to sampled requests (by default only deterministic
-- requests, temperature 0 or a seed, are answered from another job).
ALTER TABLE api_keys ADD COLUMN reuse_samples boolean NOT NULL DEFAULT false;
