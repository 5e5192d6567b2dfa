-- OpenAI's Files and Batch API, held chat completions and provider statuses, as
-- migrations/postgres/0009_files_batches.sql. Types as in 0001_init.sql (uuid BLOB, timestamps
-- fixed-width UTC TEXT, JSON TEXT). Expand only: existing rows keep their meaning.

ALTER TABLE jobs ADD COLUMN error_status INTEGER;
ALTER TABLE jobs ADD COLUMN hold_hash BLOB;
ALTER TABLE jobs ADD COLUMN detached_until TEXT;
CREATE INDEX jobs_detached ON jobs (detached_until) WHERE detached_until IS NOT NULL;
CREATE INDEX jobs_held ON jobs (tenant, hold_hash) WHERE detached_until IS NOT NULL;

-- Ids are `file-<uuidv7 hex>`: in text order they sort by time, which pages the listing.
CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    purpose     TEXT NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    TEXT NOT NULL,
    bytes       INTEGER NOT NULL DEFAULT 0,
    lines       INTEGER NOT NULL DEFAULT 0,
    status      TEXT NOT NULL DEFAULT 'uploading' CHECK (status IN ('uploading', 'processed')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    deleted_at  TEXT
) STRICT;
CREATE INDEX files_listed ON files (tenant, id) WHERE status = 'processed' AND deleted_at IS NULL;
CREATE INDEX files_uploading ON files (updated_at) WHERE status = 'uploading';

CREATE TABLE file_chunks (
    file_id  TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (file_id, seq)
) STRICT;

CREATE TABLE batches (
    id                 TEXT PRIMARY KEY,
    tenant             TEXT NOT NULL,
    user_id            TEXT NOT NULL,
    tier               TEXT NOT NULL,
    input_file_id      TEXT NOT NULL,
    endpoint           TEXT NOT NULL,
    completion_window  TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress',
                           'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    metadata           TEXT,
    errors             TEXT,
    output_file_id     TEXT,
    error_file_id      TEXT,
    total              INTEGER NOT NULL DEFAULT 0,
    completed          INTEGER NOT NULL DEFAULT 0,
    failed             INTEGER NOT NULL DEFAULT 0,
    notify_email       TEXT,
    created_at         TEXT NOT NULL,
    in_progress_at     TEXT,
    expires_at         TEXT NOT NULL,
    finalizing_at      TEXT,
    completed_at       TEXT,
    failed_at          TEXT,
    expired_at         TEXT,
    cancelling_at      TEXT,
    cancelled_at       TEXT,
    locked_until       TEXT
) STRICT;
CREATE INDEX batches_listed ON batches (tenant, id);
CREATE INDEX batches_open ON batches (tenant)
    WHERE status IN ('validating', 'in_progress', 'cancelling', 'finalizing');
CREATE INDEX batches_due ON batches (locked_until)
    WHERE status IN ('in_progress', 'cancelling', 'finalizing');

CREATE TABLE batch_lines (
    batch_id   TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    line       INTEGER NOT NULL,
    custom_id  TEXT NOT NULL,
    job_id     BLOB NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (batch_id, line)
) STRICT;
CREATE INDEX batch_lines_job ON batch_lines (job_id);

-- One email per batch beside one per job. SQLite cannot relax NOT NULL nor add a CHECK in
-- place, so the table is rebuilt with its rows and ids (this runs in the migration's
-- transaction: all of it or none).
CREATE TABLE notifications_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           BLOB UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    batch_id         TEXT UNIQUE REFERENCES batches (id) ON DELETE CASCADE,
    email            TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    locked_until     TEXT,
    last_error       TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_at          TEXT,
    CHECK ((job_id IS NULL) <> (batch_id IS NULL))
) STRICT;
INSERT INTO notifications_new (id, job_id, email, state, attempts, next_attempt_at,
                               locked_until, last_error, created_at, sent_at)
SELECT id, job_id, email, state, attempts, next_attempt_at, locked_until, last_error,
       created_at, sent_at
FROM notifications;
-- AUTOINCREMENT never hands out an id again: carry the old table's high-water mark over, so
-- rows deleted before the rebuild (purged jobs) do not get their ids reused.
INSERT INTO sqlite_sequence (name, seq)
SELECT 'notifications_new', 0
WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'notifications_new');
UPDATE sqlite_sequence
SET seq = (SELECT max(seq) FROM sqlite_sequence
           WHERE name IN ('notifications', 'notifications_new'))
WHERE name = 'notifications_new';
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';

-- A key may opt in to reusing answers to sampled requests (by default only deterministic
-- requests, temperature 0 or a seed, are answered from another job).
ALTER TABLE api_keys ADD COLUMN reuse_samples INTEGER NOT NULL DEFAULT 0;
