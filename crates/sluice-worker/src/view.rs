//! The dispatcher's view of this worker's world: its router's pools as they are now and the
//! lanes operators paused; and broker deliveries as the buffered messages it schedules.

use crate::dispatch::{Buffered, PoolState, PoolView};
use sluice_broker::Delivery;
use sluice_core::{JobRef, Lane};
use sluice_providers::{Pool, Router};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Each question reads the pool's state at the moment it is asked (its limiters run on their
/// own clock), so answers within one decision may be microseconds apart.
impl PoolState for Arc<Pool> {
    fn wait_for(&self, tokens: u32) -> Duration {
        self.wait_time_for(tokens)
    }

    fn pace(&self) -> f64 {
        self.capacity_per_sec()
    }

    fn is_down(&self) -> bool {
        Pool::is_down(self)
    }
}

pub(crate) struct RouterView<'a> {
    pub(crate) router: &'a Router,
    pub(crate) paused_lanes: &'a [AtomicBool; Lane::ALL.len()],
}

impl PoolView for RouterView<'_> {
    type Pool = Arc<Pool>;

    fn route(&self, model: &str) -> &[Arc<Pool>] {
        self.router.route(model)
    }

    fn lane_paused(&self, lane: Lane) -> bool {
        self.paused_lanes[lane.index()].load(Ordering::Relaxed)
    }
}

impl Buffered for Delivery {
    fn lane(&self) -> Lane {
        self.lane
    }

    fn job(&self) -> &JobRef {
        &self.job
    }
}
