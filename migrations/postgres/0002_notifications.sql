-- Completion emails: one row per finished job that asked for one, written in the transaction
-- that finished the job and sent by the mailer with retries, so no email is lost in a crash.

CREATE TABLE notifications (
    id               bigserial PRIMARY KEY,
    -- One email per job: queueing the same job twice is a no-op.
    job_id           uuid NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    email            text NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
    -- Sends tried so far, counted when a mailer claims the row.
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- Set while a mailer holds the row; once it passes, the mailer is presumed dead.
    locked_until     timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);

-- What the mailer polls: pending rows by due time. Sent and failed rows stay out of it.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
