//! The metrics admission records, names and labels in one place (alert rules depend on them).
//! Recorded through the `metrics` facade; the binary installs the recorder that renders them.

use sluice_core::shedding::LoadLevel;
use sluice_core::{Lane, LaneLoad, Tier};
use std::collections::BTreeMap;

/// `sluice_jobs_total{event, tier}` for what admission decided: `accepted` (queued in a lane),
/// `cached` (answered from the exact or semantic cache, or attached to an identical job in
/// flight), `shed` (refused under load), `refused` (quota or budget); and `cancelled`.
pub fn job(event: &'static str, tier: Tier) {
    metrics::counter!("sluice_jobs_total", "event" => event, "tier" => tier.as_str()).increment(1);
}

/// `sluice_cache_lookups_total{kind=exact|semantic, result=hit|miss}`.
pub fn cache_lookup(kind: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("sluice_cache_lookups_total", "kind" => kind, "result" => result)
        .increment(1);
}

/// `sluice_lane_depth{lane}`, `sluice_lane_oldest_age_seconds{lane}` for every consumed lane
/// (0 when the read found none queued) and `sluice_load_level` (0 normal, 1 heavy, 2 critical).
pub fn lane_load(lanes: &BTreeMap<Lane, LaneLoad>, level: LoadLevel) {
    for lane in Lane::CONSUMED {
        let (depth, oldest) = lanes.get(&lane).map_or((0.0, 0.0), |l| {
            (l.depth as f64, l.oldest_wait.as_secs_f64())
        });
        metrics::gauge!("sluice_lane_depth", "lane" => lane.as_str()).set(depth);
        metrics::gauge!("sluice_lane_oldest_age_seconds", "lane" => lane.as_str()).set(oldest);
    }
    let level = match level {
        LoadLevel::Normal => 0.0,
        LoadLevel::Heavy => 1.0,
        LoadLevel::Critical => 2.0,
    };
    metrics::gauge!("sluice_load_level").set(level);
}
