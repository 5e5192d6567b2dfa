//! The [`Router`]: model alias -> its pools (primary, then fallbacks), and each pool by name.
//! Built once from `[[pools]]` and `[routes]`; workers look up every job's route key in it.

use crate::config::{ConfigError, PoolConfig};
use crate::pool::{Pool, PoolOptions};
use sluice_core::route::{RouteKey, RouteTarget};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Model alias -> pools (primary, then fallbacks), and every pool by name for the
/// [`RouteKey::Pool`] keys admission gives jobs. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Router {
    aliases: BTreeMap<String, Vec<Arc<Pool>>>,
    pools: BTreeMap<String, Arc<Pool>>,
}

impl Router {
    /// Build every pool and the routes. Pool names and endpoint names must be unique across the
    /// router, since an endpoint's name identifies it on jobs and in metrics.
    pub fn new(
        pools: &[PoolConfig],
        routes: &BTreeMap<String, RouteTarget>,
        http: reqwest::Client,
    ) -> Result<Router, ConfigError> {
        Router::with_options(pools, routes, http, &PoolOptions::default())
    }

    /// [`Router::new`] with the endpoints' adaptive, breaker and shared-limit options. Of each
    /// route the router serves its pools; it also checks that the pools admission may choose
    /// (cheaper, classified) exist, so a job is never sent to a pool no worker has.
    pub fn with_options(
        pools: &[PoolConfig],
        routes: &BTreeMap<String, RouteTarget>,
        http: reqwest::Client,
        options: &PoolOptions,
    ) -> Result<Router, ConfigError> {
        let mut by_name = BTreeMap::new();
        let mut endpoint_names = BTreeSet::new();
        for config in pools {
            for e in &config.endpoints {
                if !endpoint_names.insert(e.name.as_str()) {
                    return Err(ConfigError::DuplicateEndpoint(e.name.clone()));
                }
            }
            let pool = Arc::new(Pool::with_options(config, http.clone(), options)?);
            if by_name.insert(config.name.clone(), pool).is_some() {
                return Err(ConfigError::DuplicatePool(config.name.clone()));
            }
        }
        let mut aliases = BTreeMap::new();
        for (alias, target) in routes {
            if RouteKey::is_reserved(alias) {
                return Err(ConfigError::ReservedAlias(alias.clone()));
            }
            for pool in target.all_pools() {
                if !by_name.contains_key(pool) {
                    return Err(ConfigError::UnknownPool {
                        alias: alias.clone(),
                        pool: pool.to_owned(),
                    });
                }
            }
            let names = target.pools();
            if names.is_empty() {
                return Err(ConfigError::UnknownPool {
                    alias: alias.clone(),
                    pool: String::new(),
                });
            }
            let chain = names
                .into_iter()
                .map(|pool| {
                    by_name
                        .get(pool)
                        .cloned()
                        .ok_or_else(|| ConfigError::UnknownPool {
                            alias: alias.clone(),
                            pool: pool.to_owned(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            aliases.insert(alias.clone(), chain);
        }
        Ok(Router {
            aliases,
            pools: by_name,
        })
    }

    /// The primary pool serving a model alias.
    pub fn pool(&self, alias: &str) -> Option<&Pool> {
        self.route(alias).first().map(|p| &**p)
    }

    /// Every pool of a route, primary first, then the fallbacks in order. `key` is a job's
    /// routing key as stored (see [`RouteKey`]): a model alias, or `pool:NAME` for one pool.
    pub fn route(&self, key: &str) -> &[Arc<Pool>] {
        match RouteKey::pool_name(key) {
            Some(name) => self.pools.get(name).map_or(&[], std::slice::from_ref),
            None => self.aliases.get(key).map_or(&[], Vec::as_slice),
        }
    }

    /// Pause the named endpoints in every pool and resume all others.
    pub fn set_paused_endpoints(&self, paused: &std::collections::HashSet<String>) {
        self.pools().for_each(|pool| pool.set_paused(paused));
    }

    /// Every pool once, by name.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values().map(|p| &**p)
    }

    /// The model aliases this router serves, sorted (not the `pool:NAME` keys).
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.aliases.keys().map(String::as_str)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::EndpointConfig;
    use crate::Permit;
    use sluice_core::route::{ClassifyPools, RouteSpec};

    #[test]
    fn pools_are_routable_by_name_and_aliases_may_not_take_that_form() {
        let pool = |name: &str| PoolConfig {
            name: name.into(),
            endpoints: vec![EndpointConfig::new(
                format!("{name}-1"),
                "http://x/v1",
                "m",
                60,
            )],
        };
        let pools = vec![pool("large"), pool("small")];
        let auto = RouteTarget::Spec(RouteSpec {
            classify: Some(ClassifyPools {
                simple: "small".into(),
                complex: "large".into(),
            }),
            ..RouteSpec::default()
        });
        let routes = BTreeMap::from([("auto".to_owned(), auto.clone())]);
        let router = Router::new(&pools, &routes, reqwest::Client::new()).unwrap();
        assert_eq!(
            router.route(&RouteKey::pool("small").to_string())[0].name(),
            "small"
        );
        assert_eq!(router.route("auto")[0].name(), "large");
        assert_eq!(router.aliases().collect::<Vec<_>>(), ["auto"]);

        let reserved = BTreeMap::from([("pool:x".to_owned(), auto)]);
        assert!(matches!(
            Router::new(&pools, &reserved, reqwest::Client::new()),
            Err(ConfigError::ReservedAlias(_))
        ));
        let unknown = RouteTarget::Spec(RouteSpec {
            pools: vec!["large".into()],
            cheaper: Some("tiny".into()),
            ..RouteSpec::default()
        });
        let routes = BTreeMap::from([("x".to_owned(), unknown)]);
        assert!(matches!(
            Router::new(&pools, &routes, reqwest::Client::new()),
            Err(ConfigError::UnknownPool { pool, .. }) if pool == "tiny"
        ));
    }

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Router>();
        check::<Pool>();
        check::<Permit>();
    }
}
