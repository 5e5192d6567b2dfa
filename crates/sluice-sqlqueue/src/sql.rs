//! The queue's SQL for PostgreSQL and SQLite, side by side: written once where the dialects
//! agree, twice where they must differ, and formatted once per queue (table and channel in).
//!
//! Time is the database's: PostgreSQL's `now()` (so processes with skewed clocks agree),
//! and on SQLite the store's encoding, UTC text `YYYY-MM-DDTHH:MM:SS.SSSZ` of fixed width so
//! text order is time order (see `migrations/sqlite/0001_init.sql`). Every statement binds
//! the same parameters in the same order on both backends, except lists (see `db.rs`).

use crate::TABLE;

/// Which database the statements are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }

    /// The current time, in the column encoding.
    fn now(self) -> &'static str {
        match self {
            Backend::Postgres => "now()",
            Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        }
    }

    /// The time `us` microseconds from now (`us` is an SQL expression), never earlier.
    fn later(self, us: &str) -> String {
        match self {
            Backend::Postgres => format!("now() + {us} * interval '1 microsecond'"),
            // Whole milliseconds, rounded up, plus one: SQLite's `now` has millisecond steps,
            // so it may lag the true time by up to one. Zero stays now, so an undelayed
            // message can be claimed in the same millisecond it was published.
            Backend::Sqlite => format!(
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('%+.3f seconds', \
                 (CASE WHEN {us} > 0 THEN ({us} + 1999) / 1000 ELSE 0 END) / 1000.0))"
            ),
        }
    }

    /// What a statement's `RETURNING` adds to wake consumers in other processes: a
    /// `NOTIFY` (sent at commit, so a woken consumer finds the row) on PostgreSQL; nothing
    /// on SQLite, where only this process's consumers are woken, in memory.
    fn notify(self, channel: &str) -> String {
        match self {
            Backend::Postgres => format!(", pg_notify('{channel}', lane)"),
            Backend::Sqlite => String::new(),
        }
    }
}

/// Every statement the queue runs, for one backend, table and channel.
pub(crate) struct Statements {
    pub backend: Backend,
    /// `(namespace, items)`: inserts a batch of messages in the order given.
    pub insert: String,
    /// `(namespace, lane, limit, visibility_us, token)`: claims the oldest ready messages.
    pub claim: String,
    /// True when the claim returns its rows in no particular order (SQLite's `RETURNING`).
    pub claim_unordered: bool,
    /// `(namespace, lane)`: microseconds until the lane's next message is due, or NULL.
    pub next_due_us: String,
    /// `(visibility_us, claims)`: pushes the claims' visibility out.
    pub extend: String,
    /// `(claims)`: hands claims back unreceived.
    pub unclaim: String,
    /// `(claims)`: deletes claimed messages; returns the id of each it deleted.
    pub delete: String,
    /// `(id, token)`: makes a claimed message ready again; returns a row when it did.
    pub requeue: String,
    /// `(lane, reason, id, token)`: moves a claimed message to `lane`; returns a row when it did.
    pub dead_letter: String,
    /// `(namespace, lane)`: how many messages are ready.
    pub depth: String,
    /// `(namespace)`: deletes every message of the namespace.
    pub delete_all: String,
    pub release_claims: String,
    /// `(table)`: the declared type of `available_at`, no row when the table is missing.
    pub available_at_type: &'static str,
    /// The type [`Statements::available_at_type`] finds once migration 0010 ran.
    pub migrated_type: &'static str,
}

impl Statements {
    /// `table` is the table as statements spell it (schema-qualified or not); `channel`
    /// is the namespace's `LISTEN/NOTIFY` channel, a generated identifier safe to inline.
    pub fn new(backend: Backend, table: &str, channel: &str) -> Self {
        let t = table;
        let now = backend.now();
        let notify = backend.notify(channel);
        let pg = backend == Backend::Postgres;
        Statements {
            backend,
            insert: if pg {
                let later = backend.later("x.delay_us");
                format!(
                    "WITH ins AS (
                        INSERT INTO {t} (namespace, lane, body, reason, available_at)
                        SELECT $1, x.lane, x.body, x.reason, {later}
                        FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[])
                            WITH ORDINALITY AS x(lane, body, reason, delay_us, n)
                        ORDER BY x.n
                        RETURNING lane
                    )
                    SELECT pg_notify('{channel}', lanes.lane)
                    FROM (SELECT DISTINCT lane FROM ins) AS lanes"
                )
            } else {
                // One statement, so the batch is atomic without a transaction; the items
                // come as a JSON array of `[lane, body, reason, delay_us]`.
                let later = backend.later("value ->> 3");
                format!(
                    "INSERT INTO {t} (namespace, lane, body, reason, available_at)
                     SELECT $1, value ->> 0, value ->> 1, value ->> 2, {later}
                     FROM json_each($2)
                     ORDER BY key"
                )
            },
            claim: if pg {
                // SKIP LOCKED: competing consumers pass over each other's rows instead of
                // queueing behind them, and no row is claimed by two of them.
                let later = backend.later("$4");
                format!(
                    "WITH picked AS (
                        SELECT id, available_at FROM {t}
                        WHERE namespace = $1 AND lane = $2 AND available_at <= now()
                        ORDER BY available_at, id
                        LIMIT $3
                        FOR UPDATE SKIP LOCKED
                    ), claimed AS (
                        UPDATE {t} AS m
                        SET available_at = {later},
                            receive_count = m.receive_count + 1,
                            claim_token = $5
                        FROM picked
                        WHERE m.id = picked.id
                        RETURNING m.id, m.body, m.reason, m.receive_count, m.requeue_count,
                                  picked.available_at AS was_available_at
                    )
                    SELECT id, body, reason, receive_count::int8 AS receive_count,
                           requeue_count::int8 AS requeue_count
                    FROM claimed ORDER BY was_available_at, id"
                )
            } else {
                // One statement is one write transaction: SQLite's single writer makes it atomic.
                let later = backend.later("$4");
                format!(
                    "UPDATE {t}
                     SET available_at = {later}, receive_count = receive_count + 1,
                         claim_token = $5
                     WHERE id IN (
                        SELECT id FROM {t}
                        WHERE namespace = $1 AND lane = $2 AND available_at <= {now}
                        ORDER BY available_at, id
                        LIMIT $3
                     )
                     RETURNING id, body, reason, receive_count, requeue_count"
                )
            },
            claim_unordered: !pg,
            next_due_us: if pg {
                format!(
                    "SELECT (EXTRACT(EPOCH FROM (min(available_at) - now())) * 1000000)::int8
                     FROM {t} WHERE namespace = $1 AND lane = $2"
                )
            } else {
                format!(
                    "SELECT CAST((julianday(min(available_at)) - julianday('now'))
                                 * 86400000000.0 AS INTEGER)
                     FROM {t} WHERE namespace = $1 AND lane = $2"
                )
            },
            extend: if pg {
                let later = backend.later("$1");
                format!(
                    "UPDATE {t} AS m SET available_at = {later}
                     FROM unnest($2::int8[], $3::int8[]) AS c(id, token)
                     WHERE m.id = c.id AND m.claim_token = c.token"
                )
            } else {
                let later = backend.later("$1");
                format!(
                    "UPDATE {t} SET available_at = {later}
                     WHERE (id, claim_token) IN (
                        SELECT value ->> 0, value ->> 1 FROM json_each($2)
                     )"
                )
            },
            unclaim: if pg {
                format!(
                    "UPDATE {t} AS m
                     SET available_at = now(), receive_count = m.receive_count - 1,
                         claim_token = NULL
                     FROM unnest($1::int8[], $2::int8[]) AS c(id, token)
                     WHERE m.id = c.id AND m.claim_token = c.token"
                )
            } else {
                format!(
                    "UPDATE {t}
                     SET available_at = {now}, receive_count = receive_count - 1,
                         claim_token = NULL
                     WHERE (id, claim_token) IN (
                        SELECT value ->> 0, value ->> 1 FROM json_each($1)
                     )"
                )
            },
            delete: if pg {
                format!(
                    "DELETE FROM {t} AS m
                     USING unnest($1::int8[], $2::int8[]) AS c(id, token)
                     WHERE m.id = c.id AND m.claim_token = c.token
                     RETURNING m.id"
                )
            } else {
                format!(
                    "DELETE FROM {t}
                     WHERE (id, claim_token) IN (
                        SELECT value ->> 0, value ->> 1 FROM json_each($1)
                     )
                     RETURNING id"
                )
            },
            requeue: format!(
                "UPDATE {t}
                 SET available_at = {now}, claim_token = NULL, requeue_count = requeue_count + 1
                 WHERE id = $1 AND claim_token = $2
                 RETURNING id{notify}"
            ),
            // A fresh message in the dead lane: ready, never received.
            dead_letter: format!(
                "UPDATE {t}
                 SET lane = $1, reason = $2, available_at = {now}, receive_count = 0,
                     requeue_count = 0, claim_token = NULL
                 WHERE id = $3 AND claim_token = $4
                 RETURNING id{notify}"
            ),
            depth: format!(
                "SELECT count(*) FROM {t}
                 WHERE namespace = $1 AND lane = $2 AND available_at <= {now}"
            ),
            delete_all: format!("DELETE FROM {t} WHERE namespace = $1"),
            // Claims of a consumer known to be gone: their messages are claimable now, and
            // the dead claims' tokens no longer settle anything.
            release_claims: format!(
                "UPDATE {t} SET available_at = {now}, claim_token = NULL
                 WHERE namespace = $1 AND claim_token IS NOT NULL"
            ),
            available_at_type: if pg {
                // `to_regclass` resolves the name as the statements will (search_path).
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = to_regclass($1) AND attname = 'available_at'
                   AND NOT attisdropped"
            } else {
                "SELECT type FROM pragma_table_info($1) WHERE name = 'available_at'"
            },
            migrated_type: if pg {
                "timestamp with time zone"
            } else {
                "TEXT"
            },
        }
    }
}

/// The table's name as statements spell it: schema-qualified when a schema is configured.
pub(crate) fn table(schema: Option<&str>) -> String {
    match schema {
        Some(schema) => format!("{schema}.{TABLE}"),
        None => TABLE.to_owned(),
    }
}
