//! API keys: generated with a recognisable prefix, stored only as a SHA-256 hash, and resolved
//! to the principal (tenant, user, tier, email) they stand for. Written once for both backends.

use crate::sql::{reading, writing, Ts};
use crate::{Store, StoreError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sluice_core::{Principal, Tier};
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

/// A key's owner: the `api_keys` columns a principal is made of.
#[derive(sqlx::FromRow)]
struct PrincipalRow {
    tenant: String,
    user_id: String,
    tier: String,
    email: Option<String>,
    reuse_samples: bool,
}

impl PrincipalRow {
    fn into_principal(self) -> Result<Principal, StoreError> {
        Ok(Principal {
            tenant: self.tenant,
            user: self.user_id,
            tier: self
                .tier
                .parse::<Tier>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            email: self.email,
            reuse_samples: self.reuse_samples,
        })
    }
}

/// An `api_keys` row as operators list it.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    key_prefix: String,
    role: String,
    created_at: Ts,
    revoked_at: Option<Ts>,
    #[sqlx(flatten)]
    principal: PrincipalRow,
}

/// The characters of a key kept to tell it apart: the prefix and four more.
fn shown(key: &str) -> &str {
    &key[..KEY_PREFIX.len() + 4]
}

/// API keys. `created_at` is left to the column's default: the database's clock, in its
/// encoding.
impl Store {
    /// Create a key for a principal; returns the plaintext key, which is never stored.
    pub async fn create_api_key(&self, principal: &Principal) -> Result<String, StoreError> {
        let key = new_api_key();
        writing!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, email,
                                       reuse_samples)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(Uuid::now_v7())
            .bind(hash_key(&key))
            .bind(shown(&key))
            .bind(&principal.tenant)
            .bind(&principal.user)
            .bind(principal.tier.as_str())
            .bind(&principal.email)
            .bind(principal.reuse_samples)
            .execute(pool)
            .await?;
        });
        Ok(key)
    }

    /// Create an operator key for `/admin/v1`, named for whoever holds it; the plaintext key
    /// is returned once and never stored. It authenticates nothing else.
    pub async fn create_admin_key(&self, name: &str) -> Result<String, StoreError> {
        let key = new_api_key();
        writing!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, key_hash, key_prefix, tenant, user_id, tier, role)
                 VALUES ($1, $2, $3, '', $4, 'enterprise', 'admin')",
            )
            .bind(Uuid::now_v7())
            .bind(hash_key(&key))
            .bind(shown(&key))
            .bind(name)
            .execute(pool)
            .await?;
        });
        Ok(key)
    }

    /// The operator's name behind an admin key, if it exists and is not revoked.
    pub async fn admin_for_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        if !key.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        let row: Option<(String,)> = reading!(self, |pool| {
            sqlx::query_as(
                "SELECT user_id FROM api_keys
                 WHERE key_hash = $1 AND revoked_at IS NULL AND role = 'admin'",
            )
            .bind(hash_key(key))
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|(name,)| name))
    }

    /// Every key, tenant and admin, revoked or not, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let rows: Vec<KeyRow> = reading!(self, |pool| {
            sqlx::query_as(
                "SELECT id, key_prefix, tenant, user_id, tier, role, email, reuse_samples,
                        created_at, revoked_at
                 FROM api_keys ORDER BY created_at",
            )
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.id,
                    prefix: r.key_prefix,
                    admin: r.role == "admin",
                    principal: r.principal.into_principal()?,
                    created_at: r.created_at.into(),
                    revoked_at: crate::sql::opt(r.revoked_at),
                })
            })
            .collect()
    }

    /// Revoke a key by id; `false` if there is no such key or it was already revoked.
    pub async fn revoke_api_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = writing!(self, |pool, now| {
            sqlx::query(&format!(
                "UPDATE api_keys SET revoked_at = {now} WHERE id = $1 AND revoked_at IS NULL"
            ))
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// The principal behind a tenant key, if the key exists and is not revoked (admin keys
    /// stand for no tenant).
    pub async fn principal_for_key(&self, key: &str) -> Result<Option<Principal>, StoreError> {
        if !key.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        let row: Option<PrincipalRow> = reading!(self, |pool| {
            sqlx::query_as(
                "SELECT tenant, user_id, tier, email, reuse_samples FROM api_keys
                 WHERE key_hash = $1 AND revoked_at IS NULL AND role = 'tenant'",
            )
            .bind(hash_key(key))
            .fetch_optional(pool)
            .await?
        });
        row.map(PrincipalRow::into_principal).transpose()
    }
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
