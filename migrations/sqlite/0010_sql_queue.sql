-- The SQL queue's lanes ([queue] backend = "sql"), as migrations/postgres/0010_sql_queue.sql:
-- one row per message, every lane and namespace (a column) in one table. Timestamps are the
-- store's fixed-width UTC TEXT (0001_init.sql), so text order is time order.
--
-- Sluice before 0010 created this table at run time (the queue's `declare()`), with its
-- timestamps as integer microseconds. Its messages are carried over, re-encoded, into the new
-- table, which then takes the old one's name: a delay or claim keeps its instant, rounded up
-- to the millisecond, and ids keep counting from where they were.

-- An empty stand-in in the old shape where the queue never ran, so the copy below has a source.
CREATE TABLE IF NOT EXISTS sluice_lane_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    lane TEXT NOT NULL,
    body TEXT NOT NULL,
    reason TEXT,
    available_at INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    requeue_count INTEGER NOT NULL DEFAULT 0,
    claim_token INTEGER,
    created_at INTEGER NOT NULL
);

-- AUTOINCREMENT: ids are never reused after a delete, so they keep publication order.
CREATE TABLE sluice_lane_messages_0010 (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace      TEXT NOT NULL,
    lane           TEXT NOT NULL,
    body           TEXT NOT NULL,
    -- Why the message is in the dead lane.
    reason         TEXT,
    -- Not claimable before this: a delay, or the visibility timeout of a claim.
    available_at   TEXT NOT NULL,
    receive_count  INTEGER NOT NULL DEFAULT 0,
    -- Receives handed back on purpose (nack with requeue): they do not count as failures.
    requeue_count  INTEGER NOT NULL DEFAULT 0,
    -- The random token of the claim holding the message; fences its ack.
    claim_token    INTEGER,
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

-- The id counter first, so the copy's explicit ids only ever raise it.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'sluice_lane_messages_0010', seq FROM sqlite_sequence
    WHERE name = 'sluice_lane_messages';

INSERT INTO sluice_lane_messages_0010
    (id, namespace, lane, body, reason, available_at, receive_count, requeue_count,
     claim_token, created_at)
SELECT id, namespace, lane, body, reason,
       -- Up to the next millisecond, so nothing becomes claimable sooner than it was.
       strftime('%Y-%m-%dT%H:%M:%fZ', ((available_at + 999) / 1000) / 1000.0, 'unixepoch'),
       receive_count, requeue_count, claim_token,
       strftime('%Y-%m-%dT%H:%M:%fZ', (created_at / 1000) / 1000.0, 'unixepoch')
FROM sluice_lane_messages
ORDER BY id;

-- Takes the old table's index (sluice_lane_messages_next) and id counter with it.
DROP TABLE sluice_lane_messages;
ALTER TABLE sluice_lane_messages_0010 RENAME TO sluice_lane_messages;

-- Claims and depth read exactly this range: one namespace and lane, ready first.
CREATE INDEX sluice_lane_messages_next ON sluice_lane_messages (namespace, lane, available_at, id);
