//! Route configuration (`[routes]`): where each model alias goes, as plain data that the router
//! (its pools) and admission (cheaper and classified pools, caches, reuse) each read; and the key.
//!
//! A job is routed by a [`RouteKey`]: its model alias, or `pool:NAME` when admission sent it to
//! one pool alone. That text is stored on jobs and carried in lane messages, so it never changes.

use serde::Deserialize;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// Where a model alias goes: one pool, a pool and then fallbacks in order, or a table that
/// also names where admission may send a job instead (see [`RouteSpec`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RouteTarget {
    Pool(String),
    Chain(Vec<String>),
    Spec(RouteSpec),
}

/// A route as a table: its pools, plus the choices admission makes per job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The pool, then fallbacks in order. A classified route may leave it out: its jobs then
    /// go to the pool the classifier picks.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Where jobs go once their tenant has spent `[budgets] cheaper_at` of its daily budget.
    #[serde(default)]
    pub cheaper: Option<String>,
    /// Complexity routing: a rule-based classifier sends each job to one of these pools.
    #[serde(default)]
    pub classify: Option<ClassifyPools>,
    /// Answer from an earlier job of the tenant whose prompt means the same (`[semantic_cache]`).
    #[serde(default)]
    pub semantic_cache: bool,
    /// Reuse answers to sampled requests too (temperature above 0 or unset, no seed): by
    /// default only deterministic requests are answered from the cache or an identical job.
    #[serde(default)]
    pub reuse_samples: bool,
}

/// The pools a classified route chooses between.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyPools {
    pub simple: String,
    pub complex: String,
}

impl RouteTarget {
    /// Pool names, primary first: the chain the router serves the alias from.
    pub fn pools(&self) -> Vec<&str> {
        match self {
            RouteTarget::Pool(p) => vec![p.as_str()],
            RouteTarget::Chain(ps) => ps.iter().map(String::as_str).collect(),
            RouteTarget::Spec(spec) => match (&spec.classify, spec.pools.is_empty()) {
                (Some(classify), true) => vec![classify.complex.as_str()],
                _ => spec.pools.iter().map(String::as_str).collect(),
            },
        }
    }

    /// Every pool the route may send a job to: its pools, the cheaper one, the classified ones.
    pub fn all_pools(&self) -> Vec<&str> {
        let mut all = self.pools();
        if let RouteTarget::Spec(spec) = self {
            all.extend(spec.cheaper.as_deref());
            if let Some(classify) = &spec.classify {
                all.extend([classify.simple.as_str(), classify.complex.as_str()]);
            }
        }
        all
    }

    /// The table form's options (admission's part); the plain forms have none.
    pub fn spec(&self) -> Option<&RouteSpec> {
        match self {
            RouteTarget::Spec(spec) => Some(spec),
            _ => None,
        }
    }
}

impl From<&str> for RouteTarget {
    fn from(pool: &str) -> Self {
        RouteTarget::Pool(pool.to_owned())
    }
}

/// What workers route a job by: a model alias (its route's pools, fallbacks included), or one
/// pool alone, chosen by admission (the cheaper pool, a classified pool).
///
/// Written and parsed as text: the alias itself, or `pool:NAME`. Aliases may not start with
/// `pool:` ([`RouteKey::is_reserved`]), so the two never meet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    Alias(String),
    Pool(String),
}

impl RouteKey {
    /// What starts the text of a [`RouteKey::Pool`].
    pub const POOL_PREFIX: &'static str = "pool:";

    /// The key that sends a job to pool `name` alone.
    pub fn pool(name: impl Into<String>) -> RouteKey {
        RouteKey::Pool(name.into())
    }

    /// Read a stored or queued key. Every text is a key: one that does not name a pool is an
    /// alias (unknown aliases are the router's to refuse).
    pub fn parse(key: &str) -> RouteKey {
        match RouteKey::pool_name(key) {
            Some(pool) => RouteKey::Pool(pool.to_owned()),
            None => RouteKey::Alias(key.to_owned()),
        }
    }

    /// The pool a key's text names, without allocating; `None` for a model alias.
    pub fn pool_name(key: &str) -> Option<&str> {
        key.strip_prefix(RouteKey::POOL_PREFIX)
    }

    /// Whether `alias` would read as a pool key, which configured aliases may not.
    pub fn is_reserved(alias: &str) -> bool {
        alias.starts_with(RouteKey::POOL_PREFIX)
    }

    /// The pool this key names alone; `None` for an alias.
    pub fn as_pool(&self) -> Option<&str> {
        match self {
            RouteKey::Pool(pool) => Some(pool),
            RouteKey::Alias(_) => None,
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteKey::Alias(alias) => f.write_str(alias),
            RouteKey::Pool(pool) => write!(f, "{}{pool}", RouteKey::POOL_PREFIX),
        }
    }
}

impl FromStr for RouteKey {
    type Err = Infallible;

    fn from_str(key: &str) -> Result<RouteKey, Infallible> {
        Ok(RouteKey::parse(key))
    }
}

impl From<RouteKey> for String {
    fn from(key: RouteKey) -> String {
        key.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn routes_take_one_pool_or_a_chain() {
        let one: RouteTarget = serde_json::from_str("\"a\"").unwrap();
        let chain: RouteTarget = serde_json::from_str("[\"a\", \"b\"]").unwrap();
        assert_eq!(one.pools(), ["a"]);
        assert_eq!(chain.pools(), ["a", "b"]);
        assert_eq!(one, RouteTarget::from("a"));
        assert!(one.spec().is_none());
    }

    #[test]
    fn a_route_table_names_its_cheaper_and_classified_pools() {
        let spec: RouteTarget = serde_json::from_str(
            r#"{"pools": ["large", "backup"], "cheaper": "small", "semantic_cache": true}"#,
        )
        .unwrap();
        assert_eq!(spec.pools(), ["large", "backup"]);
        assert_eq!(spec.all_pools(), ["large", "backup", "small"]);
        assert!(spec.spec().unwrap().semantic_cache);
        let auto: RouteTarget =
            serde_json::from_str(r#"{"classify": {"simple": "small", "complex": "large"}}"#)
                .unwrap();
        assert_eq!(
            auto.pools(),
            ["large"],
            "unclassified jobs go to the complex pool"
        );
        assert_eq!(auto.all_pools(), ["large", "small", "large"]);
        assert!(serde_json::from_str::<RouteTarget>(r#"{"pools": ["a"], "cheap": "b"}"#).is_err());
    }

    #[test]
    fn route_keys_keep_their_stored_text() {
        let pool = RouteKey::pool("small");
        assert_eq!(pool.to_string(), "pool:small");
        assert_eq!(String::from(pool.clone()), "pool:small");
        assert_eq!(RouteKey::parse("pool:small"), pool);
        assert_eq!(pool.as_pool(), Some("small"));
        assert_eq!("pool:small".parse::<RouteKey>(), Ok(pool));

        let alias = RouteKey::parse("gpt-large");
        assert_eq!(alias, RouteKey::Alias("gpt-large".into()));
        assert_eq!(alias.to_string(), "gpt-large");
        assert_eq!(alias.as_pool(), None);

        assert_eq!(RouteKey::pool_name("pool:a:b"), Some("a:b"));
        assert_eq!(RouteKey::pool_name("pool"), None);
        assert_eq!(RouteKey::pool_name("Pool:x"), None);
        assert!(RouteKey::is_reserved("pool:x"));
        assert!(!RouteKey::is_reserved("pools"));
    }
}
