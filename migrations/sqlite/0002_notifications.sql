-- Completion emails: one row per finished job that asked for one, written in the transaction
-- that finished the job and sent by the mailer with retries, so no email is lost in a crash.
-- Types as in 0001_init.sql (uuid BLOB, timestamps fixed-width UTC TEXT).

CREATE TABLE notifications (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    -- One email per job: queueing the same job twice is a no-op.
    job_id           BLOB NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    email            TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    -- Sends tried so far, counted when a mailer claims the row.
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Set while a mailer holds the row; once it passes, the mailer is presumed dead.
    locked_until     TEXT,
    last_error       TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_at          TEXT
) STRICT;

-- What the mailer polls: pending rows by due time. Sent and failed rows stay out of it.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
