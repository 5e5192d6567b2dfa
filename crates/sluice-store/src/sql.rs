//! What both backends' statements share: macros that run one text on whichever pool the store
//! holds, the store's one timestamp type [`Ts`], and small SQL helpers.

use crate::StoreError;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, PgPool, Postgres, Sqlite, SqlitePool, Transaction, Type};
use std::time::Duration;

// Statements written once use `$1`, `$2`, ... placeholders, which PostgreSQL and SQLite both
// read (SQLite takes `$NNN` as the parameter numbered NNN). `reading!` and `writing!` expand
// their body once per backend, so the same text is type-checked and compiled for each driver.

/// Call the same method, with the same arguments, on whichever backend the store holds: for
/// what each backend writes its own way (in `postgres::*` and `sqlite::*`).
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match &$self.db {
            $crate::Db::Postgres(pg) => pg.$method($($arg),*).await,
            $crate::Db::Sqlite(lite) => lite.$method($($arg),*).await,
        }
    };
}

/// Run `$body` with `$pool` bound to the pool that reads: statements written once, compiled for
/// each backend. On SQLite reads have a pool of their own, which in WAL mode never waits for
/// the writer.
macro_rules! reading {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::Db::Postgres(pg) => {
                let $pool = &pg.pool;
                $body
            }
            $crate::Db::Sqlite(lite) => {
                let $pool = &lite.read;
                $body
            }
        }
    };
}

/// Like `reading!`, with the pool that writes (on SQLite its one write connection, so writers
/// in this process queue instead of failing busy). The second form also binds `$now` to the
/// backend's SQL for the current time, in its timestamp encoding (see [`Ts`]): for statements
/// that differ in nothing else.
macro_rules! writing {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::Db::Postgres(pg) => {
                let $pool = &pg.pool;
                $body
            }
            $crate::Db::Sqlite(lite) => {
                let $pool = &lite.write;
                $body
            }
        }
    };
    ($store:expr, |$pool:ident, $now:ident| $body:expr) => {
        match &$store.db {
            $crate::Db::Postgres(pg) => {
                let $pool = &pg.pool;
                let $now = $crate::sql::PG_NOW;
                $body
            }
            $crate::Db::Sqlite(lite) => {
                let $pool = &lite.write;
                let $now = $crate::sql::SQLITE_NOW;
                $body
            }
        }
    };
}

pub(crate) use {dispatch, reading, writing};

/// PostgreSQL's current time: the transaction's start, as `timestamptz`.
pub(crate) const PG_NOW: &str = "now()";

/// SQLite's current time in the store's encoding (see [`Ts`]), the same text `Ts` writes.
pub(crate) const SQLITE_NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// A transaction that writes: PostgreSQL's ordinary one, SQLite's `BEGIN IMMEDIATE`.
pub(crate) trait WritePool {
    type Db: sqlx::Database;
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, StoreError>;
}

impl WritePool for PgPool {
    type Db = Postgres;
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.begin().await?)
    }
}

impl WritePool for SqlitePool {
    type Db = Sqlite;
    /// Holds SQLite's write lock from the first statement, so the transaction can never fail
    /// half-way to upgrade a read lock (which `busy_timeout` does not retry).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// A list of fixed words (states, statuses) as SQL: `'a', 'b', 'c'`, for `IN (...)` on either
/// backend. Only for the store's own constants, never for input.
pub(crate) fn quoted(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A timestamp as the store writes and reads it, one encoding per backend:
/// - PostgreSQL: `timestamptz`.
/// - SQLite: TEXT, UTC with milliseconds and `Z` (`2026-01-02T03:04:05.678Z`), always 24
///   characters, so comparing the text (in `WHERE`, `ORDER BY`, `min`, `max`) compares the
///   instants; SQLite's `strftime('%Y-%m-%dT%H:%M:%fZ')` (the tables' defaults, [`SQLITE_NOW`])
///   writes the same shape.
///
/// Every timestamp the store binds or reads is a `Ts`, so no other shape reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Ts(pub(crate) DateTime<Utc>);

/// Longest span added to or taken from a timestamp: far beyond any lease or backoff, and keeps
/// the result a four-digit year, so SQLite's fixed-width text order holds.
const MAX_SPAN: chrono::Duration = chrono::Duration::days(365 * 100);

fn span(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).map_or(MAX_SPAN, |d| d.min(MAX_SPAN))
}

impl Ts {
    pub(crate) fn now() -> Ts {
        Ts(Utc::now())
    }

    /// `self + d` (at most a century on).
    pub(crate) fn after(self, d: Duration) -> Ts {
        Ts(self.0 + span(d))
    }

    /// `self - d` (at most a century back).
    pub(crate) fn before(self, d: Duration) -> Ts {
        Ts(self.0 - span(d))
    }

    /// The UTC day, `YYYY-MM-DD`, as SQLite's `tenant_spend.day` holds it.
    pub(crate) fn day(self) -> String {
        self.0.format("%Y-%m-%d").to_string()
    }

    /// SQLite's text for this instant.
    fn text(self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Read SQLite's text back.
    fn parse(s: &str) -> Result<Ts, StoreError> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| Ts(t.with_timezone(&Utc)))
            .map_err(|e| StoreError::Corrupt(format!("bad timestamp {s:?}: {e}")))
    }
}

impl From<Ts> for DateTime<Utc> {
    fn from(t: Ts) -> Self {
        t.0
    }
}

/// An optional timestamp as callers see it.
pub(crate) fn opt(t: Option<Ts>) -> Option<DateTime<Utc>> {
    t.map(|t| t.0)
}

impl Type<Postgres> for Ts {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for Ts {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Ts {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Ts(<DateTime<Utc> as Decode<Postgres>>::decode(value)?))
    }
}

impl Type<Sqlite> for Ts {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Ts {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(self.text(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Ts {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Ts::parse(<&str as Decode<Sqlite>>::decode(value)?)?)
    }
}

/// How long a pooled connection may sit idle before it is pinged when next taken.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Pool options for every store pool: a connection is pinged when taken only after it sat idle.
///
/// sqlx's default pings on every acquire, a round trip before each statement on top of the one
/// it makes on every release; under load connections are idle for microseconds, and one that
/// broke while busy is already closed by that release ping. After a database restart every
/// connection has been idle longer than this, so each is still checked before use.
pub(crate) fn pool_options<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_timestamps_have_one_fixed_width_shape_and_round_trip() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678901+00:00")
            .map(|t| Ts(t.with_timezone(&Utc)))
            .unwrap_or(Ts(DateTime::UNIX_EPOCH));
        assert_eq!(t.text(), "2026-01-02T03:04:05.678Z");
        let whole = Ts::parse("2026-01-02T03:04:05Z").unwrap_or(t);
        assert_eq!(whole.text(), "2026-01-02T03:04:05.000Z");
        assert!(Ts::parse(&t.text()).is_ok_and(|back| back.text() == t.text()));
        assert!(whole.text() < t.text(), "text order is time order");
        assert_eq!(t.day(), "2026-01-02");
    }

    #[test]
    fn lists_are_quoted() {
        assert_eq!(quoted(&["queued", "retrying"]), "'queued', 'retrying'");
    }
}
