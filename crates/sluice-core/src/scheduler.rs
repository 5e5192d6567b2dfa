//! Weighted fair dequeueing across lanes (stride scheduling) with round-robin across tenants inside a lane.
//! Work-conserving: an empty lane's share goes to the others, and it earns no credit while idle.

use crate::lane::{Lane, LaneWeights};
use std::collections::{HashMap, VecDeque};

/// Stride numerator; large so that integer division by any weight up to 1,000 loses < 0.1%.
const STRIDE: u64 = 1 << 32;

/// Items waiting per consumed lane, handed out by lane weight and tenant turn.
#[derive(Debug)]
pub struct FairQueue<T> {
    lanes: [LaneQueue<T>; 4],
    strides: [u64; 4],
    passes: [u64; 4],
    /// The pass of the last pick: a lane that wakes up starts here, so idle time earns no burst.
    virtual_time: u64,
    len: usize,
}

#[derive(Debug)]
struct LaneQueue<T> {
    /// Tenants with waiting items, in turn order.
    turns: VecDeque<String>,
    items: HashMap<String, VecDeque<T>>,
    len: usize,
}

impl<T> Default for LaneQueue<T> {
    fn default() -> Self {
        Self {
            turns: VecDeque::new(),
            items: HashMap::new(),
            len: 0,
        }
    }
}

impl<T> LaneQueue<T> {
    fn push(&mut self, tenant: &str, item: T) {
        match self.items.get_mut(tenant) {
            Some(queue) => queue.push_back(item),
            None => {
                self.items.insert(tenant.to_owned(), VecDeque::from([item]));
                self.turns.push_back(tenant.to_owned());
            }
        }
        self.len += 1;
    }

    /// The first ready item of the first tenant in turn order that has one. Skipped tenants
    /// keep their turn, and a tenant's ready item may pass its own items that are not ready.
    fn pop_where(&mut self, ready: &mut impl FnMut(&T) -> bool) -> Option<(String, T)> {
        let (k, at) = self.turns.iter().enumerate().find_map(|(k, tenant)| {
            let at = self.items.get(tenant)?.iter().position(&mut *ready)?;
            Some((k, at))
        })?;
        let tenant = self.turns.remove(k)?;
        let queue = self.items.get_mut(&tenant)?;
        let item = queue.remove(at)?;
        if queue.is_empty() {
            self.items.remove(&tenant);
        } else {
            self.turns.push_back(tenant.clone());
        }
        self.len -= 1;
        Some((tenant, item))
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.values().flatten()
    }

    fn remove_where(&mut self, matches: &mut impl FnMut(&T) -> bool, out: &mut Vec<T>) {
        let before = out.len();
        for queue in self.items.values_mut() {
            let mut kept = VecDeque::with_capacity(queue.len());
            for item in queue.drain(..) {
                if matches(&item) {
                    out.push(item);
                } else {
                    kept.push_back(item);
                }
            }
            *queue = kept;
        }
        self.items.retain(|_, queue| !queue.is_empty());
        let items = &self.items;
        self.turns.retain(|tenant| items.contains_key(tenant));
        self.len -= out.len() - before;
    }
}

fn slot(lane: Lane) -> Option<usize> {
    match lane {
        Lane::Dead => None,
        other => Some(other.index()),
    }
}

impl<T> FairQueue<T> {
    /// A weight of 0 means the lane is served only when every other lane is empty.
    pub fn new(weights: LaneWeights) -> Self {
        let strides = Lane::CONSUMED.map(|lane| match weights.of(lane) {
            0 => u64::MAX / 4,
            w => STRIDE / u64::from(w),
        });
        Self {
            lanes: Default::default(),
            strides,
            passes: [0; 4],
            virtual_time: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items waiting in one lane.
    pub fn lane_len(&self, lane: Lane) -> usize {
        slot(lane).map_or(0, |i| self.lanes[i].len)
    }

    /// Add an item; returns it back if the lane is `dead`, which is never scheduled.
    pub fn push(&mut self, lane: Lane, tenant: &str, item: T) -> Result<(), T> {
        let Some(i) = slot(lane) else {
            return Err(item);
        };
        if self.lanes[i].len == 0 {
            self.passes[i] = self.passes[i].max(self.virtual_time);
        }
        self.lanes[i].push(tenant, item);
        self.len += 1;
        Ok(())
    }

    /// The next item by lane weight, then tenant turn; `None` only when every lane is empty.
    pub fn pop(&mut self) -> Option<(Lane, String, T)> {
        self.pop_where(|_| true)
    }

    /// The next item that is `ready` (say, whose provider pool can serve now), by lane weight
    /// and tenant turn. A lane with nothing ready is treated as idle: it earns no credit
    /// while it waits, so it cannot burst ahead of the others once its pool frees up.
    pub fn pop_where(&mut self, mut ready: impl FnMut(&T) -> bool) -> Option<(Lane, String, T)> {
        let mut order: Vec<usize> = (0..self.lanes.len())
            .filter(|&i| self.lanes[i].len > 0)
            .collect();
        order.sort_by_key(|&i| (self.passes[i], i));
        for (rank, &i) in order.iter().enumerate() {
            let Some((tenant, item)) = self.lanes[i].pop_where(&mut ready) else {
                continue;
            };
            self.virtual_time = self.passes[i];
            self.passes[i] = self.passes[i].saturating_add(self.strides[i]);
            for &skipped in &order[..rank] {
                self.passes[skipped] = self.passes[skipped].max(self.virtual_time);
            }
            self.len -= 1;
            return Some((Lane::CONSUMED[i], tenant, item));
        }
        None
    }

    /// Every waiting item, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.lanes.iter().flat_map(LaneQueue::iter)
    }

    /// Take out every item that `matches`, leaving lane credit and tenant turns as they were:
    /// taking items out is not a scheduling decision.
    pub fn remove_where(&mut self, mut matches: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for lane in &mut self.lanes {
            lane.remove_where(&mut matches, &mut out);
        }
        self.len -= out.len();
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn backlogged(weights: LaneWeights, per_lane: usize) -> FairQueue<usize> {
        let mut q = FairQueue::new(weights);
        for lane in Lane::CONSUMED {
            for n in 0..per_lane {
                q.push(lane, "t", n).unwrap();
            }
        }
        q
    }

    #[test]
    fn removed_items_are_gone_and_the_rest_keep_their_order() {
        let mut q = FairQueue::new(LaneWeights::default());
        for n in 0..10 {
            q.push(Lane::Standard, if n % 2 == 0 { "a" } else { "b" }, n)
                .unwrap();
        }
        q.push(Lane::Batch, "c", 100).unwrap();
        let mut removed = q.remove_where(|&n| n % 2 == 1 || n == 100);
        removed.sort_unstable();
        assert_eq!(removed, [1, 3, 5, 7, 9, 100]);
        assert_eq!((q.len(), q.lane_len(Lane::Batch)), (5, 0));
        let rest: Vec<usize> = std::iter::from_fn(|| q.pop().map(|(_, _, n)| n)).collect();
        assert_eq!(rest, [0, 2, 4, 6, 8]);
        assert!(q.is_empty());
    }

    #[test]
    fn dead_is_never_scheduled() {
        let mut q = FairQueue::new(LaneWeights::default());
        assert_eq!(q.push(Lane::Dead, "t", 1), Err(1));
        assert!(q.pop().is_none());
    }

    #[test]
    fn default_weights_give_10_5_1_5() {
        let mut q = backlogged(LaneWeights::default(), 10_000);
        let mut counts = [0usize; 4];
        for _ in 0..2_100 {
            let (lane, _, _) = q.pop().unwrap();
            counts[lane.index()] += 1;
        }
        assert_eq!(counts, [1_000, 500, 100, 500]);
    }

    #[test]
    fn idle_lane_earns_no_burst() {
        let mut q = FairQueue::new(LaneWeights::default());
        for n in 0..1_000 {
            q.push(Lane::Batch, "t", n).unwrap();
        }
        for _ in 0..500 {
            q.pop().unwrap();
        }
        // Priority was idle for 500 picks; when it wakes it gets its share, not 500 picks in a row.
        for n in 0..100 {
            q.push(Lane::Priority, "t", n).unwrap();
        }
        let firsts: Vec<Lane> = (0..22).map(|_| q.pop().unwrap().0).collect();
        let batch = firsts.iter().filter(|l| **l == Lane::Batch).count();
        assert!(
            (1..=3).contains(&batch),
            "batch got {batch} of 22: {firsts:?}"
        );
    }

    #[test]
    fn tenants_take_turns_inside_a_lane() {
        let mut q = FairQueue::new(LaneWeights::default());
        for n in 0..100 {
            q.push(Lane::Standard, "flood", n).unwrap();
        }
        q.push(Lane::Standard, "small", 0).unwrap();
        let first_two: Vec<String> = (0..2).map(|_| q.pop().unwrap().1).collect();
        assert!(first_two.contains(&"small".to_owned()), "{first_two:?}");
    }

    #[test]
    fn items_that_are_not_ready_wait_without_blocking_others() {
        let mut q = FairQueue::new(LaneWeights::default());
        // Priority holds jobs for a saturated pool "a"; batch holds jobs for pool "b".
        for n in 0..10 {
            q.push(Lane::Priority, "t1", ("a", n)).unwrap();
            q.push(Lane::Batch, "t2", ("b", n)).unwrap();
        }
        let got: Vec<&str> = (0..5)
            .map(|_| q.pop_where(|(pool, _)| *pool == "b").unwrap().2 .0)
            .collect();
        assert_eq!(got, vec!["b"; 5]);
        assert!(q.pop_where(|(pool, _)| *pool == "c").is_none());
        assert_eq!(q.len(), 15);
        // Once "a" is ready again, priority gets its share, not the picks it missed.
        let next: Vec<&str> = (0..11).map(|_| q.pop().unwrap().2 .0).collect();
        let b = next.iter().filter(|p| **p == "b").count();
        assert!(b >= 1, "blocked lane burst ahead: {next:?}");
    }

    #[test]
    fn a_tenant_whose_item_is_not_ready_keeps_its_turn() {
        let mut q = FairQueue::new(LaneWeights::default());
        q.push(Lane::Standard, "blocked", "a").unwrap();
        q.push(Lane::Standard, "other", "b1").unwrap();
        q.push(Lane::Standard, "other", "b2").unwrap();
        assert_eq!(q.pop_where(|i| i.starts_with('b')).unwrap().2, "b1");
        assert_eq!(q.pop().unwrap().1, "blocked", "the skipped tenant is next");
        assert_eq!(q.iter().count(), 1);
    }

    fn weights_strategy() -> impl Strategy<Value = LaneWeights> {
        (1u32..=20, 1u32..=20, 1u32..=20, 1u32..=20).prop_map(|(p, s, b, r)| LaneWeights {
            priority: p,
            standard: s,
            batch: b,
            retry: r,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// With all lanes backlogged, 10,000 picks split by weight within 2%.
        #[test]
        fn shares_match_weights(weights in weights_strategy()) {
            let mut q = backlogged(weights, 10_000);
            let mut counts = [0f64; 4];
            for _ in 0..10_000 {
                counts[q.pop().unwrap().0.index()] += 1.0;
            }
            let total: f64 = Lane::CONSUMED.iter().map(|l| f64::from(weights.of(*l))).sum();
            for lane in Lane::CONSUMED {
                let expected = 10_000.0 * f64::from(weights.of(lane)) / total;
                prop_assert!(
                    (counts[lane.index()] - expected).abs() <= expected * 0.02 + 1.0,
                    "{lane}: got {} expected {expected:.1}", counts[lane.index()]
                );
            }
        }

        /// Any non-empty lane is served within one stride round of the others.
        #[test]
        fn no_lane_starves(weights in weights_strategy(), pushes in prop::collection::vec((0usize..4, 0usize..5), 1..400)) {
            let mut q = FairQueue::new(weights);
            for (n, (lane, tenant)) in pushes.iter().enumerate() {
                q.push(Lane::CONSUMED[*lane], &format!("t{tenant}"), n).unwrap();
            }
            let mut since_served = [0u32; 4];
            while let Some((lane, _, _)) = q.pop() {
                for l in Lane::CONSUMED {
                    if l == lane {
                        since_served[l.index()] = 0;
                    } else if q.lane_len(l) > 0 {
                        since_served[l.index()] += 1;
                        // Each other lane j may go at most w_j / w_l + 1 times per turn of l.
                        let bound: u32 = Lane::CONSUMED.iter().filter(|j| **j != l).map(|j| weights.of(*j) / weights.of(l) + 1).sum();
                        prop_assert!(since_served[l.index()] <= bound, "{l} waited {} picks (bound {bound})", since_served[l.index()]);
                    }
                }
            }
            prop_assert_eq!(q.len(), 0);
        }

        /// Inside a lane, no tenant is served twice while another tenant with waiting items is skipped.
        #[test]
        fn tenant_round_robin(pushes in prop::collection::vec(0usize..6, 1..300)) {
            let mut q = FairQueue::new(LaneWeights::default());
            let mut waiting: HashMap<String, usize> = HashMap::new();
            for (n, tenant) in pushes.iter().enumerate() {
                let t = format!("t{tenant}");
                *waiting.entry(t.clone()).or_default() += 1;
                q.push(Lane::Batch, &t, n).unwrap();
            }
            // Picks since each tenant was last served; a waiting tenant must be served
            // before any other tenant is served a second time.
            let mut served_since: HashMap<String, usize> = HashMap::new();
            while let Some((_, tenant, _)) = q.pop() {
                for (other, count) in served_since.iter_mut() {
                    if *other != tenant && waiting.get(other).copied().unwrap_or(0) > 0 {
                        *count += 1;
                        prop_assert!(*count <= waiting.len(), "{other} skipped {count} times");
                    }
                }
                served_since.insert(tenant.clone(), 0);
                *waiting.get_mut(&tenant).unwrap() -= 1;
            }
        }

        /// `pop_where` hands out only ready items, and finds one whenever one exists.
        #[test]
        fn pop_where_finds_exactly_the_ready(pushes in prop::collection::vec((0usize..4, 0usize..3, 0u8..3), 0..200), ready_pool in 0u8..3) {
            let mut q = FairQueue::new(LaneWeights::default());
            for (lane, tenant, pool) in &pushes {
                q.push(Lane::CONSUMED[*lane], &format!("t{tenant}"), *pool).unwrap();
            }
            let ready = pushes.iter().filter(|p| p.2 == ready_pool).count();
            let mut served = 0;
            while let Some((_, _, pool)) = q.pop_where(|p| *p == ready_pool) {
                prop_assert_eq!(pool, ready_pool);
                served += 1;
            }
            prop_assert_eq!(served, ready);
            prop_assert_eq!(q.len(), pushes.len() - ready);
            prop_assert!(q.iter().all(|p| *p != ready_pool));
        }

        /// Items keep FIFO order per tenant and lane (when all are ready), and none is lost or duplicated.
        #[test]
        fn nothing_lost_and_fifo_per_tenant(pushes in prop::collection::vec((0usize..4, 0usize..3), 0..300)) {
            let mut q = FairQueue::new(LaneWeights::default());
            for (n, (lane, tenant)) in pushes.iter().enumerate() {
                q.push(Lane::CONSUMED[*lane], &format!("t{tenant}"), n).unwrap();
            }
            let mut last: HashMap<(Lane, String), usize> = HashMap::new();
            let mut seen = 0;
            while let Some((lane, tenant, n)) = q.pop() {
                if let Some(prev) = last.insert((lane, tenant), n) {
                    prop_assert!(prev < n);
                }
                seen += 1;
            }
            prop_assert_eq!(seen, pushes.len());
        }
    }
}
