-- Lanes and endpoints an operator paused: every worker reads this and holds their work.
-- `target` is 'lane:<name>' or 'endpoint:<name>'.
CREATE TABLE pauses (
    target      TEXT PRIMARY KEY,
    paused_by   TEXT NOT NULL,
    paused_at   TEXT NOT NULL
) STRICT;
