//! Lanes are the queues jobs wait in, one per service class plus `retry` and `dead`.
//! Weights say how large a share of dequeues each consuming lane gets under contention.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The queue a job waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Priority,
    Standard,
    Batch,
    Retry,
    Dead,
}

impl Lane {
    /// Every lane, in a stable order.
    pub const ALL: [Lane; 5] = [
        Lane::Priority,
        Lane::Standard,
        Lane::Batch,
        Lane::Retry,
        Lane::Dead,
    ];

    /// The lanes workers consume; `dead` is only inspected and replayed by operators.
    pub const CONSUMED: [Lane; 4] = [Lane::Priority, Lane::Standard, Lane::Batch, Lane::Retry];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Priority => "priority",
            Lane::Standard => "standard",
            Lane::Batch => "batch",
            Lane::Retry => "retry",
            Lane::Dead => "dead",
        }
    }

    /// The lane a job enters when its tier gives `self` and its caller asks for `requested`:
    /// a request may move a job down to a slower service lane, never up, and never into
    /// `retry` or `dead`, which only Sluice fills.
    pub fn lowered_to(self, requested: Lane) -> Lane {
        let service = matches!(requested, Lane::Priority | Lane::Standard | Lane::Batch);
        if service && requested > self {
            requested
        } else {
            self
        }
    }

    /// Position in [`Lane::ALL`], handy for fixed-size per-lane arrays.
    pub fn index(self) -> usize {
        match self {
            Lane::Priority => 0,
            Lane::Standard => 1,
            Lane::Batch => 2,
            Lane::Retry => 3,
            Lane::Dead => 4,
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown lane {0:?} (expected priority, standard, batch, retry or dead)")]
pub struct ParseLaneError(pub String);

impl FromStr for Lane {
    type Err = ParseLaneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Lane::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| ParseLaneError(s.to_owned()))
    }
}

/// Relative dequeue shares of the consumed lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LaneWeights {
    pub priority: u32,
    pub standard: u32,
    pub batch: u32,
    pub retry: u32,
}

impl Default for LaneWeights {
    fn default() -> Self {
        Self {
            priority: 10,
            standard: 5,
            batch: 1,
            retry: 5,
        }
    }
}

impl LaneWeights {
    /// The weight of a lane; `dead` is never scheduled and weighs 0.
    pub fn of(&self, lane: Lane) -> u32 {
        match lane {
            Lane::Priority => self.priority,
            Lane::Standard => self.standard,
            Lane::Batch => self.batch,
            Lane::Retry => self.retry,
            Lane::Dead => 0,
        }
    }
}

#[cfg(test)]
mod lowering {
    use super::Lane;

    #[test]
    fn a_request_lowers_its_lane_but_never_raises_it() {
        assert_eq!(Lane::Priority.lowered_to(Lane::Batch), Lane::Batch);
        assert_eq!(Lane::Standard.lowered_to(Lane::Batch), Lane::Batch);
        assert_eq!(Lane::Batch.lowered_to(Lane::Priority), Lane::Batch);
        assert_eq!(Lane::Standard.lowered_to(Lane::Priority), Lane::Standard);
        assert_eq!(Lane::Priority.lowered_to(Lane::Priority), Lane::Priority);
        for inner in [Lane::Retry, Lane::Dead] {
            for tier in [Lane::Priority, Lane::Standard, Lane::Batch] {
                assert_eq!(tier.lowered_to(inner), tier);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_round_trip_through_strings() {
        for lane in Lane::ALL {
            assert_eq!(lane.as_str().parse::<Lane>(), Ok(lane));
            assert_eq!(Lane::ALL[lane.index()], lane);
        }
        assert!("fast".parse::<Lane>().is_err());
    }
}
