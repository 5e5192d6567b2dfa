//! Load shedding: how loaded the system is, judged by each lane's estimated queue wait against
//! the wait its tiers were promised, and which new jobs to refuse at that level.

use crate::lane::Lane;
use crate::principal::{Tier, TierLanes};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Shortest retry-after on a refusal, so a client never retries in a tight loop.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest retry-after on a refusal: estimates further out are too uncertain to promise.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How loaded the system is, from least to most severe (the `Ord` follows severity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadLevel {
    /// Every lane is within its tiers' wait targets.
    Normal,
    /// Only the free tier's lane is over its target: free work and optional work are shed.
    Heavy,
    /// A paying tier's lane is over its target: only priority-lane jobs are accepted.
    Critical,
}

impl LoadLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadLevel::Normal => "normal",
            LoadLevel::Heavy => "heavy",
            LoadLevel::Critical => "critical",
        }
    }
}

impl fmt::Display for LoadLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest queue wait, in seconds, each tier should see before the system counts as loaded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WaitTargets {
    pub enterprise: f64,
    pub pro: f64,
    pub basic: f64,
    pub free: f64,
}

impl Default for WaitTargets {
    fn default() -> Self {
        Self {
            enterprise: 1.0,
            pro: 2.0,
            basic: 5.0,
            free: 60.0,
        }
    }
}

impl WaitTargets {
    /// The tier's target. Meant for validated targets; a non-finite or huge one reads as
    /// [`Duration::MAX`] (never over), a negative or NaN one as zero (always over).
    pub fn for_tier(&self, tier: Tier) -> Duration {
        let secs = match tier {
            Tier::Enterprise => self.enterprise,
            Tier::Pro => self.pro,
            Tier::Basic => self.basic,
            Tier::Free => self.free,
        };
        // `f64::max` ignores NaN, so NaN becomes 0; `try_from` only fails on overflow here.
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// Every target must be a finite number of seconds above zero.
    pub fn validate(&self) -> Result<(), String> {
        for tier in Tier::ALL {
            let secs = match tier {
                Tier::Enterprise => self.enterprise,
                Tier::Pro => self.pro,
                Tier::Basic => self.basic,
                Tier::Free => self.free,
            };
            if !(secs.is_finite() && secs > 0.0) {
                return Err(format!(
                    "wait target for the {tier} tier must be a number of seconds above 0, got {secs}"
                ));
            }
        }
        Ok(())
    }
}

/// What is known about one lane's queue right now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LaneLoad {
    /// Jobs queued in the lane.
    pub depth: u64,
    /// How long the lane's oldest queued job has waited so far.
    pub oldest_wait: Duration,
    /// Jobs that left the lane per second over a recent window.
    pub drained_per_sec: f64,
}

/// How long a job at `position` in a lane draining `drained_per_sec` jobs a second will wait,
/// or `None` when nothing has been draining (no rate to extrapolate from).
pub fn estimated_wait(position: u64, drained_per_sec: f64) -> Option<Duration> {
    if !(drained_per_sec.is_finite() && drained_per_sec > 0.0) {
        return None;
    }
    // A wait too long for a Duration is, for every purpose here, forever.
    Some(Duration::try_from_secs_f64(position as f64 / drained_per_sec).unwrap_or(Duration::MAX))
}

/// One lane's load and the wait a job joining it now should expect.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LaneEstimate {
    pub lane: Lane,
    pub depth: u64,
    pub drained_per_sec: f64,
    /// The larger of the drain-rate extrapolation and the oldest job's wait: with no drain
    /// measured, the oldest job's wait is all we know, and a stalled lane shows up through it.
    #[serde(rename = "wait_secs", serialize_with = "as_secs")]
    pub wait: Duration,
}

impl LaneEstimate {
    pub fn new(lane: Lane, load: &LaneLoad) -> LaneEstimate {
        let projected = estimated_wait(load.depth, load.drained_per_sec).unwrap_or_default();
        LaneEstimate {
            lane,
            depth: load.depth,
            drained_per_sec: load.drained_per_sec,
            wait: projected.max(load.oldest_wait),
        }
    }
}

/// A tier whose lane's estimated wait exceeds the tier's target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OverTarget {
    pub tier: Tier,
    pub lane: Lane,
    #[serde(rename = "wait_secs", serialize_with = "as_secs")]
    pub wait: Duration,
    #[serde(rename = "target_secs", serialize_with = "as_secs")]
    pub target: Duration,
}

impl OverTarget {
    /// How many times over its target the wait is; ranks offenders across tiers.
    fn ratio(&self) -> f64 {
        self.wait.as_secs_f64() / self.target.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Whether this tier being over makes the load critical (any paying tier).
    fn is_critical(&self) -> bool {
        self.tier != Tier::Free
    }
}

impl fmt::Display for OverTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lane: estimated wait {} exceeds the {} tier's {} target",
            self.lane,
            secs_text(self.wait, true),
            self.tier,
            secs_text(self.target, false)
        )
    }
}

/// The load level and how it was reached; serializes as the `/readyz` load report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub level: LoadLevel,
    /// The worst offender in plain words, or that every lane is within its targets.
    pub reason: String,
    /// Every lane that was reported or that some tier waits in, in lane order.
    pub lanes: Vec<LaneEstimate>,
    /// Every tier over its target, worst first (paying tiers before free, then by how far over).
    pub over: Vec<OverTarget>,
    /// The targets judged against; refusals compute their retry-after from them.
    pub targets: WaitTargets,
}

/// Whether to take a new job in, and if not, when to come back and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Accept,
    Refuse {
        retry_after: Duration,
        reason: String,
    },
}

/// Judge the load: a tier is over when its lane's estimated wait exceeds its target. Critical if
/// enterprise, pro or basic is over; heavy if only free is; else normal. Missing lanes are empty.
pub fn assess(
    loads: &BTreeMap<Lane, LaneLoad>,
    tiers: &TierLanes,
    targets: &WaitTargets,
) -> Assessment {
    let mut lanes: BTreeMap<Lane, LaneEstimate> = loads
        .iter()
        .map(|(&lane, load)| (lane, LaneEstimate::new(lane, load)))
        .collect();
    for tier in Tier::ALL {
        let lane = tiers.lane_for(tier);
        lanes
            .entry(lane)
            .or_insert_with(|| LaneEstimate::new(lane, &LaneLoad::default()));
    }

    let mut over: Vec<OverTarget> = Tier::ALL
        .into_iter()
        .filter_map(|tier| {
            let lane = tiers.lane_for(tier);
            let wait = lanes.get(&lane).map(|e| e.wait).unwrap_or_default();
            let target = targets.for_tier(tier);
            (wait > target).then_some(OverTarget {
                tier,
                lane,
                wait,
                target,
            })
        })
        .collect();
    over.sort_by(|a, b| {
        b.is_critical()
            .cmp(&a.is_critical())
            .then(b.ratio().total_cmp(&a.ratio()))
    });

    let level = match over.first() {
        None => LoadLevel::Normal,
        Some(worst) if worst.is_critical() => LoadLevel::Critical,
        Some(_) => LoadLevel::Heavy,
    };
    let reason = match over.first() {
        None => "every lane within its tiers' wait targets".to_owned(),
        Some(worst) => worst.to_string(),
    };
    Assessment {
        level,
        reason,
        lanes: lanes.into_values().collect(),
        over,
        targets: *targets,
    }
}

impl Assessment {
    /// The estimated wait of `lane`; a lane not in the assessment is empty.
    pub fn wait_of(&self, lane: Lane) -> Duration {
        self.lanes
            .iter()
            .find(|e| e.lane == lane)
            .map(|e| e.wait)
            .unwrap_or_default()
    }

    /// Admit a new job of `tier` bound for `lane`? Normal accepts all; heavy refuses the free
    /// tier; critical accepts only priority-lane jobs.
    ///
    /// The retry-after is how far the job's lane is over the tier's target, clamped to 1..=300 s.
    /// When the job's own lane is within the target (the overload is in another lane), it is
    /// how far the offender named in the reason is over its target instead, so that a client
    /// is not told to come back in a second while the cause has minutes to drain.
    pub fn admit(&self, tier: Tier, lane: Lane) -> Admission {
        let (refused, who) = match self.level {
            LoadLevel::Normal => (false, ""),
            LoadLevel::Heavy => (tier == Tier::Free, "free-tier jobs are refused"),
            LoadLevel::Critical => (
                lane != Lane::Priority,
                "only priority-lane jobs are accepted",
            ),
        };
        if !refused {
            return Admission::Accept;
        }
        let own = OverTarget {
            tier,
            lane,
            wait: self.wait_of(lane),
            target: self.targets.for_tier(tier),
        };
        // Name the job's own lane when it is the one over; else the worst offender. For a heavy
        // level the worst offender is the free tier's lane; for critical, a paying tier's.
        let cause = if own.wait > own.target {
            own
        } else {
            match self.over.first() {
                Some(worst) => *worst,
                // Unreachable for an assessment from `assess`; refuse briefly rather than panic.
                None => own,
            }
        };
        let excess = cause.wait.saturating_sub(cause.target);
        let retry_after = excess.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER);
        let reason = format!(
            "load is {}: {} lane's estimated wait {} exceeds the {} tier's {} target; {who} until it drains",
            self.level,
            cause.lane,
            secs_text(cause.wait, true),
            cause.tier,
            secs_text(cause.target, false),
        );
        Admission::Refuse {
            retry_after,
            reason,
        }
    }

    /// Whether optional work (the semantic cache) may run: only at normal load.
    pub fn allows_optional_work(&self) -> bool {
        self.level == LoadLevel::Normal
    }
}

/// Seconds for people: whole seconds from 10 s up, one decimal below. A wait is rounded up so
/// that "exceeds" never reads as "61 s exceeds 61 s"; a target is shown as configured.
fn secs_text(d: Duration, round_up: bool) -> String {
    if d == Duration::MAX {
        return "unbounded".to_owned();
    }
    let secs = d.as_secs_f64();
    let tenths = if round_up {
        (secs * 10.0).ceil()
    } else {
        (secs * 10.0).round()
    };
    if secs >= 10.0 || tenths % 10.0 == 0.0 {
        let whole = if round_up { secs.ceil() } else { secs.round() };
        format!("{whole:.0} s")
    } else {
        format!("{:.1} s", tenths / 10.0)
    }
}

fn as_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn load(depth: u64, oldest_secs: u64, drained_per_sec: f64) -> LaneLoad {
        LaneLoad {
            depth,
            oldest_wait: Duration::from_secs(oldest_secs),
            drained_per_sec,
        }
    }

    fn assess_default(loads: &[(Lane, LaneLoad)]) -> Assessment {
        assess(
            &loads.iter().copied().collect(),
            &TierLanes::default(),
            &WaitTargets::default(),
        )
    }

    #[test]
    fn estimated_wait_needs_a_drain_rate() {
        assert_eq!(estimated_wait(10, 2.0), Some(Duration::from_secs(5)));
        assert_eq!(estimated_wait(0, 2.0), Some(Duration::ZERO));
        assert_eq!(estimated_wait(10, 0.0), None);
        assert_eq!(estimated_wait(10, -1.0), None);
        assert_eq!(estimated_wait(10, f64::NAN), None);
        assert_eq!(estimated_wait(10, f64::INFINITY), None);
        assert_eq!(estimated_wait(u64::MAX, 1e-300), Some(Duration::MAX));
    }

    #[test]
    fn lane_wait_is_the_larger_of_projection_and_oldest() {
        let e = LaneEstimate::new(Lane::Batch, &load(100, 3, 10.0));
        assert_eq!(e.wait, Duration::from_secs(10));
        let e = LaneEstimate::new(Lane::Batch, &load(100, 30, 10.0));
        assert_eq!(e.wait, Duration::from_secs(30));
        // Nothing drained: only the oldest job's wait is known.
        let e = LaneEstimate::new(Lane::Batch, &load(100, 7, 0.0));
        assert_eq!(e.wait, Duration::from_secs(7));
    }

    #[test]
    fn empty_or_missing_lanes_are_normal() {
        let a = assess_default(&[]);
        assert_eq!(a.level, LoadLevel::Normal);
        assert_eq!(a.reason, "every lane within its tiers' wait targets");
        assert!(a.allows_optional_work());
        let lanes: Vec<Lane> = a.lanes.iter().map(|e| e.lane).collect();
        assert_eq!(lanes, [Lane::Priority, Lane::Standard, Lane::Batch]);
        for tier in Tier::ALL {
            assert_eq!(a.admit(tier, Lane::Batch), Admission::Accept);
        }
    }

    #[test]
    fn a_wait_equal_to_the_target_is_not_over() {
        // 120 jobs at 2/s = 60 s, exactly the free target.
        let a = assess_default(&[(Lane::Batch, load(120, 0, 2.0))]);
        assert_eq!(a.level, LoadLevel::Normal);
        let a = assess_default(&[(Lane::Batch, load(121, 0, 2.0))]);
        assert_eq!(a.level, LoadLevel::Heavy);
    }

    #[test]
    fn heavy_refuses_only_free_and_turns_optional_work_off() {
        let a = assess_default(&[(Lane::Batch, load(150, 10, 2.0))]);
        assert_eq!(a.level, LoadLevel::Heavy);
        assert_eq!(
            a.reason,
            "batch lane: estimated wait 75 s exceeds the free tier's 60 s target"
        );
        assert!(!a.allows_optional_work());
        assert_eq!(
            a.admit(Tier::Free, Lane::Batch),
            Admission::Refuse {
                retry_after: Duration::from_secs(15),
                reason: "load is heavy: batch lane's estimated wait 75 s exceeds the free tier's \
                         60 s target; free-tier jobs are refused until it drains"
                    .to_owned(),
            }
        );
        for tier in [Tier::Enterprise, Tier::Pro, Tier::Basic] {
            let lane = TierLanes::default().lane_for(tier);
            assert_eq!(a.admit(tier, lane), Admission::Accept);
            assert_eq!(a.admit(tier, Lane::Batch), Admission::Accept);
        }
    }

    #[test]
    fn critical_accepts_only_the_priority_lane() {
        // Standard: 60 jobs at 5/s = 12 s against basic's 5 s.
        let a = assess_default(&[(Lane::Standard, load(60, 1, 5.0))]);
        assert_eq!(a.level, LoadLevel::Critical);
        assert_eq!(
            a.reason,
            "standard lane: estimated wait 12 s exceeds the basic tier's 5 s target"
        );
        assert_eq!(a.admit(Tier::Enterprise, Lane::Priority), Admission::Accept);
        // The lane decides, not the tier.
        assert_eq!(a.admit(Tier::Free, Lane::Priority), Admission::Accept);
        match a.admit(Tier::Basic, Lane::Standard) {
            Admission::Refuse {
                retry_after,
                reason,
            } => {
                assert_eq!(retry_after, Duration::from_secs(7));
                assert_eq!(
                    reason,
                    "load is critical: standard lane's estimated wait 12 s exceeds the basic \
                     tier's 5 s target; only priority-lane jobs are accepted until it drains"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A free job whose own lane is empty is refused for the standard lane's sake, and told
        // to come back when that has drained, not in a second.
        match a.admit(Tier::Free, Lane::Batch) {
            Admission::Refuse {
                retry_after,
                reason,
            } => {
                assert_eq!(retry_after, Duration::from_secs(7));
                assert!(
                    reason.contains("standard lane's estimated wait 12 s"),
                    "{reason}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn worst_offender_is_a_paying_tier_then_the_furthest_over() {
        let a = assess_default(&[
            (Lane::Priority, load(3, 0, 1.0)), // 3 s: enterprise 3x over, pro 1.5x
            (Lane::Standard, load(40, 0, 4.0)), // 10 s: basic 2x over
            (Lane::Batch, load(1000, 0, 1.0)), // 1000 s: free 16x over
        ]);
        assert_eq!(a.level, LoadLevel::Critical);
        let order: Vec<Tier> = a.over.iter().map(|o| o.tier).collect();
        assert_eq!(
            order,
            [Tier::Enterprise, Tier::Basic, Tier::Pro, Tier::Free]
        );
        assert_eq!(
            a.reason,
            "priority lane: estimated wait 3 s exceeds the enterprise tier's 1 s target"
        );
    }

    #[test]
    fn retry_after_is_clamped() {
        // Barely over: at least a second.
        let a = assess_default(&[(Lane::Batch, load(1, 61, 0.0))]);
        assert_eq!(
            a.admit(Tier::Free, Lane::Batch),
            Admission::Refuse {
                retry_after: Duration::from_secs(1),
                reason: "load is heavy: batch lane's estimated wait 61 s exceeds the free tier's \
                         60 s target; free-tier jobs are refused until it drains"
                    .to_owned(),
            }
        );
        // Hours over: at most five minutes.
        let a = assess_default(&[(Lane::Batch, load(100_000, 0, 1.0))]);
        let Admission::Refuse { retry_after, .. } = a.admit(Tier::Free, Lane::Batch) else {
            panic!("expected a refusal");
        };
        assert_eq!(retry_after, Duration::from_secs(300));
    }

    #[test]
    fn custom_lanes_and_targets_are_used() {
        let tiers = TierLanes {
            free: Lane::Standard,
            ..TierLanes::default()
        };
        let targets = WaitTargets {
            free: 3.0,
            basic: 30.0,
            ..WaitTargets::default()
        };
        // Standard at 4 s: over free's 3 s, within basic's 30 s.
        let loads = [(Lane::Standard, load(8, 0, 2.0))].into_iter().collect();
        let a = assess(&loads, &tiers, &targets);
        assert_eq!(a.level, LoadLevel::Heavy);
        assert_eq!(
            a.reason,
            "standard lane: estimated wait 4 s exceeds the free tier's 3 s target"
        );
    }

    #[test]
    fn short_waits_show_a_decimal() {
        let loads = [(Lane::Priority, load(3, 0, 2.0))].into_iter().collect();
        let a = assess(&loads, &TierLanes::default(), &WaitTargets::default());
        assert_eq!(
            a.reason,
            "priority lane: estimated wait 1.5 s exceeds the enterprise tier's 1 s target"
        );
    }

    #[test]
    fn serializes_for_readyz() {
        let a = assess_default(&[(Lane::Batch, load(150, 10, 2.0))]);
        let v = serde_json::to_value(&a).expect("serializes");
        assert_eq!(v["level"], "heavy");
        assert_eq!(v["lanes"][2]["lane"], "batch");
        assert_eq!(v["lanes"][2]["wait_secs"], 75.0);
        assert_eq!(v["over"][0]["tier"], "free");
        assert_eq!(v["over"][0]["target_secs"], 60.0);
    }

    #[test]
    fn targets_validate_and_parse() {
        assert!(WaitTargets::default().validate().is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let t = WaitTargets {
                pro: bad,
                ..WaitTargets::default()
            };
            let err = t.validate().expect_err("invalid target");
            assert!(err.contains("pro tier"), "{err}");
        }
        let t: WaitTargets = serde_json::from_str(r#"{"free": 30}"#).expect("parses");
        assert_eq!(t.for_tier(Tier::Free), Duration::from_secs(30));
        assert_eq!(t.for_tier(Tier::Basic), Duration::from_secs(5));
        assert!(serde_json::from_str::<WaitTargets>(r#"{"gold": 1}"#).is_err());
        assert!(LoadLevel::Normal < LoadLevel::Heavy && LoadLevel::Heavy < LoadLevel::Critical);
        assert_eq!(LoadLevel::Critical.to_string(), "critical");
    }

    fn any_load() -> impl Strategy<Value = LaneLoad> {
        (
            0u64..10_000,
            0u64..1_000,
            prop_oneof![Just(0.0), 0.01f64..1000.0],
        )
            .prop_map(|(depth, oldest, drain)| LaneLoad {
                depth,
                oldest_wait: Duration::from_millis(oldest * 100),
                drained_per_sec: drain,
            })
    }

    proptest! {
        #[test]
        fn admission_follows_the_level(
            loads in prop::collection::btree_map(
                prop::sample::select(Lane::CONSUMED.to_vec()), any_load(), 0..4),
        ) {
            let tiers = TierLanes::default();
            let targets = WaitTargets::default();
            let a = assess(&loads, &tiers, &targets);
            // The level is exactly what the over-target set says.
            let over = |tier: Tier| a.wait_of(tiers.lane_for(tier)) > targets.for_tier(tier);
            let paying_over = [Tier::Enterprise, Tier::Pro, Tier::Basic].into_iter().any(over);
            let expected = if paying_over {
                LoadLevel::Critical
            } else if over(Tier::Free) {
                LoadLevel::Heavy
            } else {
                LoadLevel::Normal
            };
            prop_assert_eq!(a.level, expected);
            for tier in Tier::ALL {
                for lane in Lane::CONSUMED {
                    let accepted = a.admit(tier, lane) == Admission::Accept;
                    match a.level {
                        LoadLevel::Normal => prop_assert!(accepted),
                        LoadLevel::Heavy => prop_assert_eq!(accepted, tier != Tier::Free),
                        LoadLevel::Critical => prop_assert_eq!(accepted, lane == Lane::Priority),
                    }
                    if let Admission::Refuse { retry_after, reason } = a.admit(tier, lane) {
                        prop_assert!(retry_after >= MIN_RETRY_AFTER && retry_after <= MAX_RETRY_AFTER);
                        let prefix = format!("load is {}", a.level);
                        prop_assert!(reason.starts_with(&prefix));
                    }
                }
            }
            // More load never lowers the level.
            let heavier: BTreeMap<Lane, LaneLoad> = Lane::CONSUMED
                .into_iter()
                .map(|lane| {
                    let l = loads.get(&lane).copied().unwrap_or_default();
                    (lane, LaneLoad { depth: l.depth * 2 + 1, ..l })
                })
                .collect();
            prop_assert!(assess(&heavier, &tiers, &targets).level >= a.level);
        }
    }
}
