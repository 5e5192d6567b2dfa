//! Who submitted a job: tenant, user and tier, always derived from the API key.
//! Also the tier -> lane mapping.

use crate::lane::Lane;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A customer's service class; decides the lane its jobs wait in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Enterprise,
    Pro,
    Basic,
    Free,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Enterprise, Tier::Pro, Tier::Basic, Tier::Free];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Enterprise => "enterprise",
            Tier::Pro => "pro",
            Tier::Basic => "basic",
            Tier::Free => "free",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown tier {0:?} (expected enterprise, pro, basic or free)")]
pub struct ParseTierError(pub String);

impl FromStr for Tier {
    type Err = ParseTierError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ParseTierError(s.to_owned()))
    }
}

/// The authenticated submitter of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub tenant: String,
    pub user: String,
    pub tier: Tier,
    pub email: Option<String>,
    /// The key opted in to reusing answers to sampled requests (temperature above 0, no
    /// seed), which by default are fresh samples each time.
    #[serde(default)]
    pub reuse_samples: bool,
}

/// Which lane each tier's jobs wait in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierLanes {
    pub enterprise: Lane,
    pub pro: Lane,
    pub basic: Lane,
    pub free: Lane,
}

impl Default for TierLanes {
    fn default() -> Self {
        Self {
            enterprise: Lane::Priority,
            pro: Lane::Priority,
            basic: Lane::Standard,
            free: Lane::Batch,
        }
    }
}

impl TierLanes {
    pub fn lane_for(&self, tier: Tier) -> Lane {
        match tier {
            Tier::Enterprise => self.enterprise,
            Tier::Pro => self.pro,
            Tier::Basic => self.basic,
            Tier::Free => self.free,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tier_lanes_follow_the_design() {
        let m = TierLanes::default();
        assert_eq!(m.lane_for(Tier::Enterprise), Lane::Priority);
        assert_eq!(m.lane_for(Tier::Pro), Lane::Priority);
        assert_eq!(m.lane_for(Tier::Basic), Lane::Standard);
        assert_eq!(m.lane_for(Tier::Free), Lane::Batch);
    }

    #[test]
    fn tiers_parse() {
        assert_eq!("pro".parse::<Tier>(), Ok(Tier::Pro));
        assert!("gold".parse::<Tier>().is_err());
    }
}
