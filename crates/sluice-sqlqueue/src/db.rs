//! Runs the queue's statements (`sql.rs`) on either pool, written once: only the SQL and
//! the binding of lists differ between PostgreSQL and SQLite, not the Rust around them.

use serde_json::Value;
use sluice_broker::Lane;
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteArguments};
use sqlx::{PgPool, Row, SqlitePool};

use crate::sql::{self, Backend, Statements};
use crate::{SqlQueueConfig, SqlQueueError};

/// The pool the queue's table is reached through.
pub(crate) enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Evaluates `$body` with `$pool` bound to whichever pool it is. Both arms are the same
/// code; they are compiled twice because the pool types (and so the row types) differ.
macro_rules! on_pool {
    ($pool_enum:expr, $pool:ident => $body:expr) => {
        match $pool_enum {
            Pool::Postgres($pool) => $body,
            Pool::Sqlite($pool) => $body,
        }
    };
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
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimedRow {
    pub id: i64,
    pub body: String,
    pub reason: Option<String>,
    pub receive_count: i64,
    pub requeue_count: i64,
}

/// `(id, claim_token)` pairs: the claims a statement applies to.
pub(crate) type Claims = [(i64, i64)];

/// Binds the lists a statement takes: PostgreSQL gets arrays, one per field; SQLite, which
/// has no arrays, one JSON array with an array per element.
trait BindLists<'q>: Sized {
    fn bind_items(self, items: &'q [Outgoing]) -> Self;
    fn bind_claims(self, claims: &'q Claims) -> Self;
}

impl<'q> BindLists<'q> for Query<'q, Postgres, PgArguments> {
    fn bind_items(self, items: &'q [Outgoing]) -> Self {
        let lanes: Vec<&str> = items.iter().map(|i| i.lane.as_str()).collect();
        let bodies: Vec<&str> = items.iter().map(|i| i.body.as_str()).collect();
        let reasons: Vec<Option<&str>> = items.iter().map(|i| i.reason.as_deref()).collect();
        let delays: Vec<i64> = items.iter().map(|i| i.delay_us).collect();
        self.bind(lanes).bind(bodies).bind(reasons).bind(delays)
    }

    fn bind_claims(self, claims: &'q Claims) -> Self {
        let (ids, tokens): (Vec<i64>, Vec<i64>) = claims.iter().copied().unzip();
        self.bind(ids).bind(tokens)
    }
}

impl<'q> BindLists<'q> for Query<'q, Sqlite, SqliteArguments<'q>> {
    fn bind_items(self, items: &'q [Outgoing]) -> Self {
        // Built as a `Value`, whose encoding cannot fail (unlike `serde_json::to_string`).
        let rows = items.iter().map(|i| {
            Value::Array(vec![
                i.lane.as_str().into(),
                i.body.as_str().into(),
                i.reason.as_deref().into(),
                i.delay_us.into(),
            ])
        });
        self.bind(Value::Array(rows.collect()).to_string())
    }

    fn bind_claims(self, claims: &'q Claims) -> Self {
        let rows = claims
            .iter()
            .map(|&(id, token)| Value::Array(vec![id.into(), token.into()]));
        self.bind(Value::Array(rows.collect()).to_string())
    }
}

/// The queue's table in one database, for one namespace.
pub(crate) struct Db {
    pool: Pool,
    sql: Statements,
    /// The table as statements spell it.
    table: String,
    namespace: String,
}

impl Db {
    pub fn new(pool: Pool, config: &SqlQueueConfig, channel: &str) -> Self {
        let backend = match pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        };
        let table = sql::table(config.schema.as_deref());
        Db {
            sql: Statements::new(backend, &table, channel),
            pool,
            table,
            namespace: config.namespace.clone(),
        }
    }

    pub fn backend(&self) -> &'static str {
        self.sql.backend.name()
    }

    /// The PostgreSQL pool, for the `LISTEN` connection.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            Pool::Sqlite(_) => None,
        }
    }

    /// Checks that the store's migrations made the table: it exists, and on SQLite it is
    /// not the table earlier versions made at run time, whose timestamps are integers.
    pub async fn check(&self) -> Result<(), SqlQueueError> {
        if let Pool::Sqlite(pool) = &self.pool {
            // Persistent in the file; a pool from elsewhere may not have set it.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(pool)
                .await?;
        }
        let found: Option<String> = on_pool!(&self.pool, pool => {
            sqlx::query_scalar(self.sql.available_at_type)
                .bind(&self.table)
                .fetch_optional(pool)
                .await
        })?;
        match found {
            Some(found) if found.eq_ignore_ascii_case(self.sql.migrated_type) => Ok(()),
            Some(found) => Err(SqlQueueError::NotMigrated(format!(
                "predates migration 0010 (its available_at is {found}, not {})",
                self.sql.migrated_type
            ))),
            None => Err(SqlQueueError::NotMigrated("does not exist".into())),
        }
    }

    pub async fn delete_all(&self) -> Result<(), sqlx::Error> {
        on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.delete_all)
                .bind(&self.namespace)
                .execute(pool)
                .await
                .map(drop)
        })
    }

    /// Makes every claimed message of the namespace claimable now; how many there were.
    pub async fn release_claims(&self) -> Result<u64, sqlx::Error> {
        on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.release_claims)
                .bind(&self.namespace)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
    }

    /// Inserts all items in one statement, in order. On PostgreSQL the same statement
    /// notifies each lane it filled.
    pub async fn insert(&self, items: &[Outgoing]) -> Result<(), sqlx::Error> {
        on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.insert)
                .bind(&self.namespace)
                .bind_items(items)
                .execute(pool)
                .await
                .map(drop)
        })
    }

    /// Claims up to `limit` ready messages of a lane, oldest first: hides them for
    /// `visibility_us`, counts the receive and stamps them with `token`.
    pub async fn claim(
        &self,
        lane: Lane,
        limit: i64,
        visibility_us: i64,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        let mut rows: Vec<ClaimedRow> = on_pool!(&self.pool, pool => {
            sqlx::query_as(&self.sql.claim)
                .bind(&self.namespace)
                .bind(lane.as_str())
                .bind(limit)
                .bind(visibility_us)
                .bind(token)
                .fetch_all(pool)
                .await
        })?;
        if self.sql.claim_unordered {
            // Ids follow publication order.
            rows.sort_by_key(|r| r.id);
        }
        Ok(rows)
    }

    /// How long until the lane's next message becomes available (a delayed one, or a
    /// claim that may expire), if it has any. Negative or zero means now.
    pub async fn next_available_in_us(&self, lane: Lane) -> Result<Option<i64>, sqlx::Error> {
        on_pool!(&self.pool, pool => {
            sqlx::query_scalar(&self.sql.next_due_us)
                .bind(&self.namespace)
                .bind(lane.as_str())
                .fetch_one(pool)
                .await
        })
    }

    /// Heartbeat: pushes the claims' visibility out to `visibility_us` from now.
    /// Claims that were lost (re-claimed under another token, settled) are left alone.
    pub async fn extend(&self, claims: &Claims, visibility_us: i64) -> Result<u64, sqlx::Error> {
        let done = on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.extend)
                .bind(visibility_us)
                .bind_claims(claims)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done)
    }

    /// Hands back claims whose messages were never given to anyone (a consumer dropped
    /// with deliveries still buffered): ready now, and the receive does not count.
    pub async fn unclaim(&self, claims: &Claims) -> Result<u64, sqlx::Error> {
        let done = on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.unclaim)
                .bind_claims(claims)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done)
    }

    /// Deletes claimed messages; the ids of those whose claim was still ours.
    pub async fn delete(&self, claims: &Claims) -> Result<Vec<i64>, sqlx::Error> {
        let deleted = on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.delete)
                .bind_claims(claims)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<Vec<i64>, _>>()?
        });
        Ok(deleted)
    }

    /// Makes a claimed message ready again now; false when the claim is no longer ours.
    /// Counts the hand-back so it does not count towards `max_receive_count`.
    pub async fn requeue(&self, id: i64, token: i64) -> Result<bool, sqlx::Error> {
        let row = on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.requeue)
                .bind(id)
                .bind(token)
                .fetch_optional(pool)
                .await?
                .is_some()
        });
        Ok(row)
    }

    /// Moves a claimed message to the dead lane with a reason, as a fresh message
    /// (ready, never received); false when the claim is no longer ours.
    pub async fn dead_letter(
        &self,
        id: i64,
        token: i64,
        reason: &str,
    ) -> Result<bool, sqlx::Error> {
        let row = on_pool!(&self.pool, pool => {
            sqlx::query(&self.sql.dead_letter)
                .bind(Lane::Dead.as_str())
                .bind(reason)
                .bind(id)
                .bind(token)
                .fetch_optional(pool)
                .await?
                .is_some()
        });
        Ok(row)
    }

    /// Messages of a lane that are ready now.
    pub async fn depth(&self, lane: Lane) -> Result<i64, sqlx::Error> {
        on_pool!(&self.pool, pool => {
            sqlx::query_scalar(&self.sql.depth)
                .bind(&self.namespace)
                .bind(lane.as_str())
                .fetch_one(pool)
                .await
        })
    }
}
