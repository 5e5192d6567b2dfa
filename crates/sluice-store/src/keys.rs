//! API keys: generated with a recognisable prefix, stored only as a SHA-256 hash,
//! and resolved to the principal (tenant, user, tier, email) they stand for.
//! Key generation and the PostgreSQL statements; SQLite's are in `sqlite::keys`.

use crate::postgres::PgBackend;
use crate::StoreError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sluice_core::{Principal, Tier};
use sqlx::Row;
use uuid::Uuid;

/// Every key starts with this, so secret scanners can spot a leaked one.
pub const KEY_PREFIX: &str = "sk_sluice_";

/// A fresh key: the prefix and 32 URL-safe characters (192 random bits).
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

impl PgBackend {
    /// Create a key for a principal; returns the plaintext key, which is never stored.
    pub(crate) async fn create_api_key(&self, principal: &Principal) -> Result<String, StoreError> {
        let key = new_api_key();
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, email,
                                   reuse_samples)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(Uuid::now_v7())
        .bind(hash_key(&key))
        .bind(&key[..KEY_PREFIX.len() + 4])
        .bind(&principal.tenant)
        .bind(&principal.user)
        .bind(principal.tier.as_str())
        .bind(&principal.email)
        .bind(principal.reuse_samples)
        .execute(&self.pool)
        .await?;
        Ok(key)
    }

    /// The principal behind a key, if the key exists and is not revoked.
    pub(crate) async fn principal_for_key(
        &self,
        key: &str,
    ) -> Result<Option<Principal>, StoreError> {
        if !key.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT tenant, user_id, tier, email, reuse_samples FROM api_keys
             WHERE key_hash = $1 AND revoked_at IS NULL AND role = 'tenant'",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(principal_from_row).transpose()
    }

    pub(crate) async fn create_admin_key(&self, name: &str) -> Result<String, StoreError> {
        let key = new_api_key();
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, role)
             VALUES ($1, $2, $3, '', $4, 'enterprise', 'admin')",
        )
        .bind(Uuid::now_v7())
        .bind(hash_key(&key))
        .bind(&key[..KEY_PREFIX.len() + 4])
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(key)
    }

    pub(crate) async fn admin_for_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT user_id FROM api_keys
             WHERE key_hash = $1 AND revoked_at IS NULL AND role = 'admin'",
        )
        .bind(hash_key(key))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(name,)| name))
    }

    pub(crate) async fn api_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, key_prefix, tenant, user_id, tier, role, email, reuse_samples, created_at, revoked_at
             FROM api_keys ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.try_get("id")?,
                    prefix: r.try_get("key_prefix")?,
                    admin: r.try_get::<String, _>("role")? == "admin",
                    principal: principal_from_row(r)?,
                    created_at: r.try_get("created_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    pub(crate) async fn revoke_api_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// An API key as operators list it; the secret itself is never stored.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: Uuid,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    /// An operator key for `/admin/v1`; its principal's `user` is the operator's name.
    pub admin: bool,
    pub principal: Principal,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A key's owner from an `api_keys` row (`tenant`, `user_id`, `tier`, `email`,
/// `reuse_samples`), on either database.
pub(crate) fn principal_from_row<R: sqlx::Row>(r: &R) -> Result<Principal, StoreError>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'v> String: sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
    for<'v> bool: sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
{
    let tier: String = r.try_get("tier")?;
    Ok(Principal {
        tenant: r.try_get("tenant")?,
        user: r.try_get("user_id")?,
        tier: tier
            .parse::<Tier>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        email: r.try_get("email")?,
        reuse_samples: r.try_get("reuse_samples")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let key = new_api_key();
        assert!(key.starts_with("sk_sluice_"));
        let rest = &key[KEY_PREFIX.len()..];
        assert!(rest.len() >= 24);
        assert!(rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(key, new_api_key());
    }

    #[test]
    fn hashes_differ_per_key() {
        assert_eq!(hash_key("a").len(), 32);
        assert_ne!(hash_key("a"), hash_key("b"));
    }
}
