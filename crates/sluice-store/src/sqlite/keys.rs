//! SQLite storage of API keys, mirroring `crate::keys`: only the SHA-256 of a key is stored,
//! and a key resolves to the principal it stands for.

use super::jobs::{opt_ts, req_ts};
use super::{ts, SqliteBackend};
use crate::keys::{hash_key, new_api_key, KeyInfo, KEY_PREFIX};
use crate::StoreError;
use chrono::Utc;
use sluice_core::Principal;
use sqlx::Row;
use uuid::Uuid;

impl SqliteBackend {
    pub(crate) async fn create_api_key(&self, principal: &Principal) -> Result<String, StoreError> {
        let key = new_api_key();
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, email, created_at,
                                   reuse_samples)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(Uuid::now_v7())
        .bind(hash_key(&key))
        .bind(&key[..KEY_PREFIX.len() + 4])
        .bind(&principal.tenant)
        .bind(&principal.user)
        .bind(principal.tier.as_str())
        .bind(&principal.email)
        .bind(ts(Utc::now()))
        .bind(principal.reuse_samples)
        .execute(&self.write)
        .await?;
        Ok(key)
    }

    pub(crate) async fn principal_for_key(
        &self,
        key: &str,
    ) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query(
            "SELECT tenant, user_id, tier, email, reuse_samples FROM api_keys
             WHERE key_hash = ?1 AND revoked_at IS NULL AND role = 'tenant'",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.read)
        .await?;
        row.as_ref()
            .map(crate::keys::principal_from_row)
            .transpose()
    }

    pub(crate) async fn create_admin_key(&self, name: &str) -> Result<String, StoreError> {
        let key = new_api_key();
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, role, created_at)
             VALUES (?1, ?2, ?3, '', ?4, 'enterprise', 'admin', ?5)",
        )
        .bind(Uuid::now_v7())
        .bind(hash_key(&key))
        .bind(&key[..KEY_PREFIX.len() + 4])
        .bind(name)
        .bind(ts(Utc::now()))
        .execute(&self.write)
        .await?;
        Ok(key)
    }

    pub(crate) async fn admin_for_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT user_id FROM api_keys
             WHERE key_hash = ?1 AND revoked_at IS NULL AND role = 'admin'",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|(name,)| name))
    }

    pub(crate) async fn api_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, key_prefix, tenant, user_id, tier, role, email, reuse_samples, created_at, revoked_at
             FROM api_keys ORDER BY created_at",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.try_get("id")?,
                    prefix: r.try_get("key_prefix")?,
                    admin: r.try_get::<String, _>("role")? == "admin",
                    principal: crate::keys::principal_from_row(r)?,
                    created_at: req_ts(r, "created_at")?,
                    revoked_at: opt_ts(r, "revoked_at")?,
                })
            })
            .collect()
    }

    pub(crate) async fn revoke_api_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
                .bind(id)
                .bind(ts(Utc::now()))
                .execute(&self.write)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}
