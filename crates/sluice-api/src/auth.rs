//! Bearer API keys to principals. Known keys are cached briefly so the hot path does not
//! hit the database on every request; a revoked key stops working within the cache TTL.

use crate::{ApiError, ApiState};
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sluice_core::Principal;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CACHE_TTL: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 10_000;

#[derive(Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<Vec<u8>, (Principal, Instant)>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8]) -> Option<Principal> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(p, _)| p.clone())
    }

    fn put(&self, hash: Vec<u8>, principal: Principal) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(hash, (principal, Instant::now()));
    }
}

/// The authenticated caller.
pub(crate) struct Caller(pub Principal);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized("send an API key as Authorization: Bearer sk_sluice_...")
        })?;
        authenticate(state, key).await.map(Caller)
    }
}

/// The API key of an `Authorization: Bearer ...` header, if there is one. The scheme is
/// case-insensitive (RFC 7235): `Bearer`, `bearer` and `BEARER` are one.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim_start().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|key| !key.is_empty())
}

/// The principal an API key stands for (cached briefly), or 401.
pub(crate) async fn authenticate(state: &ApiState, key: &str) -> Result<Principal, ApiError> {
    let hash = sluice_store::hash_key(key);
    if let Some(principal) = state.keys.get(&hash) {
        return Ok(principal);
    }
    match state.store.principal_for_key(key).await {
        Ok(Some(principal)) => {
            state.keys.put(hash, principal.clone());
            Ok(principal)
        }
        Ok(None) => Err(ApiError::unauthorized("unknown or revoked API key")),
        Err(error) => Err(ApiError::internal(error)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let key = |value: &'static str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            bearer(&headers).map(str::to_owned)
        };
        for value in ["Bearer sk_1", "bearer sk_1", "BEARER sk_1", "bEaReR  sk_1 "] {
            assert_eq!(key(value).as_deref(), Some("sk_1"), "{value}");
        }
        for value in ["Basic sk_1", "Bearer", "Bearer ", "Bearersk_1"] {
            assert_eq!(key(value), None, "{value}");
        }
    }
}
