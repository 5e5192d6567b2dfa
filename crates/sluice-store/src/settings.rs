//! Values every process of a deployment must share without being configured with them: the
//! first process that needs one makes it, every later one reads the same.

use crate::sql::{reading, writing};
use crate::{Store, StoreError};

/// Shared values.
impl Store {
    /// The value named `name`: the one stored, or else `fresh`, stored now. Processes racing
    /// to store one all get the one that won.
    pub async fn shared_value(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        let sql =
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
        writing!(self, |pool| {
            sqlx::query(sql)
                .bind(name)
                .bind(fresh)
                .execute(pool)
                .await?
                .rows_affected()
        });
        let (value,): (String,) = reading!(self, |pool| {
            sqlx::query_as("SELECT value FROM settings WHERE name = $1")
                .bind(name)
                .fetch_one(pool)
                .await?
        });
        Ok(value)
    }
}
