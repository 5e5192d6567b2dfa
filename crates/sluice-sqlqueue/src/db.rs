//! Every statement the queue runs, once for PostgreSQL and once for SQLite.
//! PostgreSQL keeps time with the server's clock (`now()`), so processes with skewed
//! clocks still agree; SQLite is used by one process, whose clock is the database's.

use std::time::{SystemTime, UNIX_EPOCH};

use sluice_broker::Lane;
use sqlx::{Acquire, Executor, PgPool, Row, SqlitePool};

use crate::{SqlQueueConfig, TABLE};

/// Serialises concurrent `declare()` calls across processes: concurrent
/// `CREATE TABLE IF NOT EXISTS` can still fail on PostgreSQL's catalog unique indexes.
const DECLARE_LOCK_KEY: i64 = 0x736c_7569_6365_7171; // "sluiceqq"

pub(crate) enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// One message on its way in.
pub(crate) struct Outgoing {
    pub lane: Lane,
    pub body: String,
    pub reason: Option<String>,
    /// Not available before this many microseconds from now.
    pub delay_us: i64,
}

/// One row a claim took.
pub(crate) struct ClaimedRow {
    pub id: i64,
    pub body: String,
    pub reason: Option<String>,
    pub receive_count: i64,
    pub requeue_count: i64,
}

/// `(id, claim_token)` pairs: the claims a statement applies to.
pub(crate) type Claims = [(i64, i64)];

/// The table's name as statements spell it: schema-qualified when a schema is configured.
fn table(config: &SqlQueueConfig) -> String {
    match &config.schema {
        Some(schema) => format!("{schema}.{TABLE}"),
        None => TABLE.to_owned(),
    }
}

/// Wall-clock microseconds since the Unix epoch: SQLite's notion of time here.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(crate::micros)
        .unwrap_or(0)
}

fn claims_json(claims: &Claims) -> String {
    // Integers only, so this cannot fail; the fallback matches nothing.
    serde_json::to_string(claims).unwrap_or_else(|_| "[]".to_owned())
}

impl Db {
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    pub async fn declare(&self, config: &SqlQueueConfig) -> Result<(), sqlx::Error> {
        let t = table(config);
        match self {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(DECLARE_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                if let Some(schema) = &config.schema {
                    // DDL takes no bind parameters; the name was validated with the config.
                    tx.execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
                        .await?;
                }
                tx.execute(
                    format!(
                        "CREATE TABLE IF NOT EXISTS {t} (
                            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                            namespace TEXT NOT NULL,
                            lane TEXT NOT NULL,
                            body TEXT NOT NULL,
                            reason TEXT,
                            available_at TIMESTAMPTZ NOT NULL,
                            receive_count INTEGER NOT NULL DEFAULT 0,
                            requeue_count INTEGER NOT NULL DEFAULT 0,
                            claim_token BIGINT,
                            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
                        )"
                    )
                    .as_str(),
                )
                .await?;
                // Claims and depth read exactly this range: one namespace and lane, ready first.
                tx.execute(
                    format!(
                        "CREATE INDEX IF NOT EXISTS {TABLE}_next
                         ON {t} (namespace, lane, available_at, id)"
                    )
                    .as_str(),
                )
                .await?;
                tx.commit().await
            }
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                // Persistent in the file; a pool from elsewhere may not have set it.
                conn.execute("PRAGMA journal_mode = WAL").await?;
                let mut tx = conn.begin().await?;
                // AUTOINCREMENT: ids never come back after a delete, so they keep FIFO order.
                tx.execute(
                    format!(
                        "CREATE TABLE IF NOT EXISTS {t} (
                            id INTEGER PRIMARY KEY AUTOINCREMENT,
                            namespace TEXT NOT NULL,
                            lane TEXT NOT NULL,
                            body TEXT NOT NULL,
                            reason TEXT,
                            available_at INTEGER NOT NULL, -- Unix microseconds
                            receive_count INTEGER NOT NULL DEFAULT 0,
                            requeue_count INTEGER NOT NULL DEFAULT 0,
                            claim_token INTEGER,
                            created_at INTEGER NOT NULL -- Unix microseconds
                        )"
                    )
                    .as_str(),
                )
                .await?;
                tx.execute(
                    format!(
                        "CREATE INDEX IF NOT EXISTS {TABLE}_next
                         ON {t} (namespace, lane, available_at, id)"
                    )
                    .as_str(),
                )
                .await?;
                tx.commit().await
            }
        }
    }

    pub async fn delete_all(&self, config: &SqlQueueConfig) -> Result<(), sqlx::Error> {
        let sql = format!("DELETE FROM {} WHERE namespace = $1", table(config));
        match self {
            Db::Postgres(pool) => {
                sqlx::query(&sql)
                    .bind(&config.namespace)
                    .execute(pool)
                    .await?;
            }
            Db::Sqlite(pool) => {
                sqlx::query(&sql)
                    .bind(&config.namespace)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Inserts all items in one statement (PostgreSQL) or one transaction (SQLite).
    /// On PostgreSQL the same statement notifies each lane it filled; the notification
    /// goes out at commit, so a woken consumer finds the rows.
    pub async fn insert(
        &self,
        config: &SqlQueueConfig,
        channel: &str,
        items: &[Outgoing],
    ) -> Result<(), sqlx::Error> {
        let t = table(config);
        match self {
            Db::Postgres(pool) => {
                let lanes: Vec<&str> = items.iter().map(|i| i.lane.as_str()).collect();
                let bodies: Vec<&str> = items.iter().map(|i| i.body.as_str()).collect();
                let reasons: Vec<Option<&str>> =
                    items.iter().map(|i| i.reason.as_deref()).collect();
                let delays: Vec<i64> = items.iter().map(|i| i.delay_us).collect();
                let sql = format!(
                    "WITH ins AS (
                        INSERT INTO {t} (namespace, lane, body, reason, available_at)
                        SELECT $1, x.lane, x.body, x.reason, now() + x.delay_us * interval '1 microsecond'
                        FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[])
                            WITH ORDINALITY AS x(lane, body, reason, delay_us, n)
                        ORDER BY x.n
                        RETURNING lane
                    )
                    SELECT pg_notify($6, lanes.lane) FROM (SELECT DISTINCT lane FROM ins) AS lanes"
                );
                sqlx::query(&sql)
                    .bind(&config.namespace)
                    .bind(lanes)
                    .bind(bodies)
                    .bind(reasons)
                    .bind(delays)
                    .bind(channel)
                    .execute(pool)
                    .await?;
                Ok(())
            }
            Db::Sqlite(pool) => {
                let now = now_us();
                let sql = format!(
                    "INSERT INTO {t} (namespace, lane, body, reason, available_at, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)"
                );
                // The first statement writes, so the transaction takes the write lock up
                // front (waiting out the busy timeout) instead of failing on an upgrade.
                let mut tx = pool.begin().await?;
                for item in items {
                    sqlx::query(&sql)
                        .bind(&config.namespace)
                        .bind(item.lane.as_str())
                        .bind(&item.body)
                        .bind(&item.reason)
                        .bind(now.saturating_add(item.delay_us))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            }
        }
    }

    /// Claims up to `limit` ready messages of a lane, oldest first: hides them for
    /// `visibility_us`, counts the receive and stamps them with `token`.
    pub async fn claim(
        &self,
        config: &SqlQueueConfig,
        lane: Lane,
        limit: i64,
        visibility_us: i64,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        let t = table(config);
        let rows = match self {
            Db::Postgres(pool) => {
                // SKIP LOCKED: competing consumers pass over each other's rows instead of
                // queueing behind them, and no row is claimed by two of them.
                let sql = format!(
                    "WITH picked AS (
                        SELECT id, available_at FROM {t}
                        WHERE namespace = $1 AND lane = $2 AND available_at <= now()
                        ORDER BY available_at, id
                        LIMIT $3
                        FOR UPDATE SKIP LOCKED
                    ), claimed AS (
                        UPDATE {t} AS m
                        SET available_at = now() + $4 * interval '1 microsecond',
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
                );
                sqlx::query(&sql)
                    .bind(&config.namespace)
                    .bind(lane.as_str())
                    .bind(limit)
                    .bind(visibility_us)
                    .bind(token)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(pg_claimed)
                    .collect::<Result<Vec<_>, _>>()?
            }
            Db::Sqlite(pool) => {
                // One statement is one write transaction: SQLite's single writer makes it atomic.
                let now = now_us();
                let sql = format!(
                    "UPDATE {t}
                     SET available_at = $1, receive_count = receive_count + 1, claim_token = $2
                     WHERE id IN (
                        SELECT id FROM {t}
                        WHERE namespace = $3 AND lane = $4 AND available_at <= $5
                        ORDER BY available_at, id
                        LIMIT $6
                     )
                     RETURNING id, body, reason, receive_count, requeue_count"
                );
                let mut rows = sqlx::query(&sql)
                    .bind(now.saturating_add(visibility_us))
                    .bind(token)
                    .bind(&config.namespace)
                    .bind(lane.as_str())
                    .bind(now)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| {
                        Ok(ClaimedRow {
                            id: row.try_get("id")?,
                            body: row.try_get("body")?,
                            reason: row.try_get("reason")?,
                            receive_count: row.try_get("receive_count")?,
                            requeue_count: row.try_get("requeue_count")?,
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()?;
                // RETURNING has no order; ids follow publication order.
                rows.sort_by_key(|r| r.id);
                rows
            }
        };
        Ok(rows)
    }

    /// How long until the lane's next message becomes available (a delayed one, or a
    /// claim that may expire), if it has any. Negative or zero means now.
    pub async fn next_available_in_us(
        &self,
        config: &SqlQueueConfig,
        lane: Lane,
    ) -> Result<Option<i64>, sqlx::Error> {
        let t = table(config);
        match self {
            Db::Postgres(pool) => {
                let sql = format!(
                    "SELECT (EXTRACT(EPOCH FROM (min(available_at) - now())) * 1000000)::int8
                     FROM {t} WHERE namespace = $1 AND lane = $2"
                );
                sqlx::query_scalar::<_, Option<i64>>(&sql)
                    .bind(&config.namespace)
                    .bind(lane.as_str())
                    .fetch_one(pool)
                    .await
            }
            Db::Sqlite(pool) => {
                let sql =
                    format!("SELECT min(available_at) FROM {t} WHERE namespace = $1 AND lane = $2");
                let next: Option<i64> = sqlx::query_scalar(&sql)
                    .bind(&config.namespace)
                    .bind(lane.as_str())
                    .fetch_one(pool)
                    .await?;
                Ok(next.map(|at| at.saturating_sub(now_us())))
            }
        }
    }

    /// Heartbeat: pushes the claims' visibility out to `visibility_us` from now.
    /// Claims that were lost (re-claimed under another token, settled) are left alone.
    pub async fn extend(
        &self,
        config: &SqlQueueConfig,
        claims: &Claims,
        visibility_us: i64,
    ) -> Result<u64, sqlx::Error> {
        let t = table(config);
        let done = match self {
            Db::Postgres(pool) => {
                let (ids, tokens): (Vec<i64>, Vec<i64>) = claims.iter().copied().unzip();
                let sql = format!(
                    "UPDATE {t} AS m SET available_at = now() + $1 * interval '1 microsecond'
                     FROM unnest($2::int8[], $3::int8[]) AS c(id, token)
                     WHERE m.id = c.id AND m.claim_token = c.token"
                );
                sqlx::query(&sql)
                    .bind(visibility_us)
                    .bind(ids)
                    .bind(tokens)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Db::Sqlite(pool) => {
                let sql = format!(
                    "UPDATE {t} SET available_at = $1
                     WHERE (id, claim_token) IN (
                        SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
                        FROM json_each($2)
                     )"
                );
                sqlx::query(&sql)
                    .bind(now_us().saturating_add(visibility_us))
                    .bind(claims_json(claims))
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(done)
    }

    /// Hands back claims whose messages were never given to anyone (a consumer dropped
    /// with deliveries still buffered): ready now, and the receive does not count.
    pub async fn unclaim(
        &self,
        config: &SqlQueueConfig,
        claims: &Claims,
    ) -> Result<u64, sqlx::Error> {
        let t = table(config);
        let done = match self {
            Db::Postgres(pool) => {
                let (ids, tokens): (Vec<i64>, Vec<i64>) = claims.iter().copied().unzip();
                let sql = format!(
                    "UPDATE {t} AS m
                     SET available_at = now(), receive_count = m.receive_count - 1, claim_token = NULL
                     FROM unnest($1::int8[], $2::int8[]) AS c(id, token)
                     WHERE m.id = c.id AND m.claim_token = c.token"
                );
                sqlx::query(&sql)
                    .bind(ids)
                    .bind(tokens)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Db::Sqlite(pool) => {
                let sql = format!(
                    "UPDATE {t}
                     SET available_at = $1, receive_count = receive_count - 1, claim_token = NULL
                     WHERE (id, claim_token) IN (
                        SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
                        FROM json_each($2)
                     )"
                );
                sqlx::query(&sql)
                    .bind(now_us())
                    .bind(claims_json(claims))
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(done)
    }

    /// Deletes a claimed message; false when the claim is no longer ours.
    pub async fn delete(
        &self,
        config: &SqlQueueConfig,
        id: i64,
        token: i64,
    ) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "DELETE FROM {} WHERE id = $1 AND claim_token = $2",
            table(config)
        );
        let done = match self {
            Db::Postgres(pool) => sqlx::query(&sql)
                .bind(id)
                .bind(token)
                .execute(pool)
                .await?
                .rows_affected(),
            Db::Sqlite(pool) => sqlx::query(&sql)
                .bind(id)
                .bind(token)
                .execute(pool)
                .await?
                .rows_affected(),
        };
        Ok(done == 1)
    }

    /// Makes a claimed message ready again now; false when the claim is no longer ours.
    /// Counts the hand-back so it does not count towards `max_receive_count`.
    pub async fn requeue(
        &self,
        config: &SqlQueueConfig,
        channel: &str,
        id: i64,
        token: i64,
    ) -> Result<bool, sqlx::Error> {
        let t = table(config);
        match self {
            Db::Postgres(pool) => {
                let sql = format!(
                    "WITH back AS (
                        UPDATE {t}
                        SET available_at = now(), claim_token = NULL,
                            requeue_count = requeue_count + 1
                        WHERE id = $1 AND claim_token = $2
                        RETURNING id, lane
                    )
                    SELECT id, pg_notify($3, lane) FROM back"
                );
                let row = sqlx::query(&sql)
                    .bind(id)
                    .bind(token)
                    .bind(channel)
                    .fetch_optional(pool)
                    .await?;
                Ok(row.is_some())
            }
            Db::Sqlite(pool) => {
                let sql = format!(
                    "UPDATE {t}
                     SET available_at = $1, claim_token = NULL, requeue_count = requeue_count + 1
                     WHERE id = $2 AND claim_token = $3"
                );
                let done = sqlx::query(&sql)
                    .bind(now_us())
                    .bind(id)
                    .bind(token)
                    .execute(pool)
                    .await?
                    .rows_affected();
                Ok(done == 1)
            }
        }
    }

    /// Moves a claimed message to the dead lane with a reason, as a fresh message
    /// (ready, never received); false when the claim is no longer ours.
    pub async fn dead_letter(
        &self,
        config: &SqlQueueConfig,
        channel: &str,
        id: i64,
        token: i64,
        reason: &str,
    ) -> Result<bool, sqlx::Error> {
        let t = table(config);
        let dead = Lane::Dead.as_str();
        match self {
            Db::Postgres(pool) => {
                let sql = format!(
                    "WITH moved AS (
                        UPDATE {t}
                        SET lane = $1, reason = $2, available_at = now(), receive_count = 0,
                            requeue_count = 0, claim_token = NULL
                        WHERE id = $3 AND claim_token = $4
                        RETURNING id, lane
                    )
                    SELECT id, pg_notify($5, lane) FROM moved"
                );
                let row = sqlx::query(&sql)
                    .bind(dead)
                    .bind(reason)
                    .bind(id)
                    .bind(token)
                    .bind(channel)
                    .fetch_optional(pool)
                    .await?;
                Ok(row.is_some())
            }
            Db::Sqlite(pool) => {
                let sql = format!(
                    "UPDATE {t}
                     SET lane = $1, reason = $2, available_at = $3, receive_count = 0,
                         requeue_count = 0, claim_token = NULL
                     WHERE id = $4 AND claim_token = $5"
                );
                let done = sqlx::query(&sql)
                    .bind(dead)
                    .bind(reason)
                    .bind(now_us())
                    .bind(id)
                    .bind(token)
                    .execute(pool)
                    .await?
                    .rows_affected();
                Ok(done == 1)
            }
        }
    }

    /// Messages of a lane that are ready now.
    pub async fn depth(&self, config: &SqlQueueConfig, lane: Lane) -> Result<i64, sqlx::Error> {
        let t = table(config);
        match self {
            Db::Postgres(pool) => {
                let sql = format!(
                    "SELECT count(*) FROM {t}
                     WHERE namespace = $1 AND lane = $2 AND available_at <= now()"
                );
                sqlx::query_scalar(&sql)
                    .bind(&config.namespace)
                    .bind(lane.as_str())
                    .fetch_one(pool)
                    .await
            }
            Db::Sqlite(pool) => {
                let sql = format!(
                    "SELECT count(*) FROM {t}
                     WHERE namespace = $1 AND lane = $2 AND available_at <= $3"
                );
                sqlx::query_scalar(&sql)
                    .bind(&config.namespace)
                    .bind(lane.as_str())
                    .bind(now_us())
                    .fetch_one(pool)
                    .await
            }
        }
    }
}

fn pg_claimed(row: &sqlx::postgres::PgRow) -> Result<ClaimedRow, sqlx::Error> {
    Ok(ClaimedRow {
        id: row.try_get("id")?,
        body: row.try_get("body")?,
        reason: row.try_get("reason")?,
        receive_count: row.try_get("receive_count")?,
        requeue_count: row.try_get("requeue_count")?,
    })
}
