-- The SQL queue's lanes ([queue] backend = "sql"): one row per message, every lane and
-- namespace (a column, not a table per namespace) in one table of the store's schema.
--
-- Sluice before 0010 created this table at run time (the queue's `declare()`), in this shape
-- and under these names. IF NOT EXISTS adopts such a table as it is, with the messages waiting
-- in it, so an upgrade rewrites nothing and processes of both versions can share it meanwhile.
CREATE TABLE IF NOT EXISTS sluice_lane_messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace      text NOT NULL,
    lane           text NOT NULL,
    body           text NOT NULL,
    -- Why the message is in the dead lane.
    reason         text,
    -- Not claimable before this: a delay, or the visibility timeout of a claim.
    available_at   timestamptz NOT NULL,
    receive_count  integer NOT NULL DEFAULT 0,
    -- Receives handed back on purpose (nack with requeue): they do not count as failures.
    requeue_count  integer NOT NULL DEFAULT 0,
    -- The random token of the claim holding the message; fences its ack.
    claim_token    bigint,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Claims and depth read exactly this range: one namespace and lane, ready first.
CREATE INDEX IF NOT EXISTS sluice_lane_messages_next
    ON sluice_lane_messages (namespace, lane, available_at, id);
