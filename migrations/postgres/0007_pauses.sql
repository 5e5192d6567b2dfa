-- Lanes and endpoints an operator paused: every worker reads this and holds their work.
-- `target` is 'lane:<name>' or 'endpoint:<name>'.
CREATE TABLE pauses (
    target      text PRIMARY KEY,
    paused_by   text NOT NULL,
    paused_at   timestamptz NOT NULL DEFAULT now()
);
