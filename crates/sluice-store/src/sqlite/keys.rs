//! SQLite storage of API keys, mirroring `crate::keys`: only the SHA-256 of a key is stored,
//! and a key resolves to the principal it stands for.

use super::{ts, SqliteBackend};
use crate::keys::{hash_key, new_api_key, KEY_PREFIX};
use crate::StoreError;
use chrono::Utc;
use sluice_core::Principal;
use uuid::Uuid;

impl SqliteBackend {
    pub(crate) async fn create_api_key(&self, principal: &Principal) -> Result<String, StoreError> {
        let key = new_api_key();
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, email, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(Uuid::now_v7())
        .bind(hash_key(&key))
        .bind(&key[..KEY_PREFIX.len() + 4])
        .bind(&principal.tenant)
        .bind(&principal.user)
        .bind(principal.tier.as_str())
        .bind(&principal.email)
        .bind(ts(Utc::now()))
        .execute(&self.write)
        .await?;
        Ok(key)
    }

    pub(crate) async fn principal_for_key(
        &self,
        key: &str,
    ) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query(
            "SELECT tenant, user_id, tier, email FROM api_keys
             WHERE key_hash = ?1 AND revoked_at IS NULL",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.read)
        .await?;
        row.as_ref()
            .map(crate::keys::principal_from_row)
            .transpose()
    }
}
