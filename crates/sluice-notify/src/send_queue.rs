//! One subscriber's outbound messages, bounded in bytes: the hub appends shared frames without
//! ever waiting, and the first append that would pass the bound cuts the subscriber off at once.

use crate::hub::Outgoing;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// What one queued frame is charged beyond its JSON: the slot and the shared allocation's
/// header, so a flood of tiny messages cannot hide behind their small size.
pub const FRAME_OVERHEAD: usize = 64;

/// A message as every subscriber receives it, encoded once and shared by all of them.
#[derive(Debug)]
pub struct Frame {
    message: Outgoing,
    json: Bytes,
}

impl Frame {
    /// Encode `message` once. Every field of [`Outgoing`] is plain data, so this cannot fail
    /// in practice; a failure gives an empty object rather than a panic.
    pub fn new(message: Outgoing) -> Arc<Frame> {
        let json = serde_json::to_vec(&message).unwrap_or_else(|_| b"{}".to_vec());
        Arc::new(Frame {
            message,
            json: Bytes::from(json),
        })
    }

    /// The message.
    pub fn message(&self) -> &Outgoing {
        &self.message
    }

    /// The message as JSON (UTF-8); cloning it shares the bytes.
    pub fn json(&self) -> Bytes {
        self.json.clone()
    }

    /// What holding this frame counts against a subscriber's bound.
    pub fn cost(&self) -> usize {
        self.json.len() + FRAME_OVERHEAD
    }
}

/// What [`SendQueue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// This frame would have passed the bound: the queue is now cut off and emptied.
    Overflowed,
    /// Cut off or closed earlier; nothing was queued.
    Gone,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Arc<Frame>>,
    /// Sum of the queued frames' [`Frame::cost`].
    bytes: usize,
    /// Set once the bound was passed; for good.
    cut: bool,
    /// Set when the hub dropped the subscriber (the reader is told by an empty receive).
    closed: bool,
}

/// A single-consumer queue of frames holding at most `limit` bytes (see [`Frame::cost`]). A
/// frame bigger than the whole bound is still taken into an empty queue, so a big event
/// cannot wedge a subscriber that keeps up.
#[derive(Debug)]
pub struct SendQueue {
    limit: usize,
    state: Mutex<State>,
    /// Wakes the one reader: a frame, a cut-off or the close.
    ready: Notify,
    /// Wakes whoever waits in [`SendQueue::cut_off`].
    cut: Notify,
}

impl SendQueue {
    pub fn new(limit: usize) -> SendQueue {
        SendQueue {
            limit,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            cut: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is a single step: nothing to repair after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append `frame` without waiting. On overflow the queued frames are dropped right away:
    /// they are stale for a subscriber that is cut off, and holding them is what the bound
    /// is there to prevent.
    pub fn push(&self, frame: &Arc<Frame>) -> Pushed {
        let pushed = {
            let mut state = self.lock();
            if state.cut || state.closed {
                return Pushed::Gone;
            }
            let cost = frame.cost();
            if !state.frames.is_empty() && state.bytes + cost > self.limit {
                state.cut = true;
                state.frames = VecDeque::new();
                state.bytes = 0;
                Pushed::Overflowed
            } else {
                state.frames.push_back(Arc::clone(frame));
                state.bytes += cost;
                Pushed::Queued
            }
        };
        // One consumer: a stored permit wakes it even if it is not waiting yet.
        self.ready.notify_one();
        if pushed == Pushed::Overflowed {
            self.cut.notify_waiters();
        }
        pushed
    }

    /// No more frames will come (the subscriber was dropped by the hub).
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next frame if one is waiting.
    pub fn try_pop(&self) -> Option<Arc<Frame>> {
        let mut state = self.lock();
        let frame = state.frames.pop_front()?;
        state.bytes -= frame.cost();
        Some(frame)
    }

    /// The next frame, waiting for one; `None` once cut off or closed and empty.
    pub async fn pop(&self) -> Option<Arc<Frame>> {
        loop {
            {
                let mut state = self.lock();
                if let Some(frame) = state.frames.pop_front() {
                    state.bytes -= frame.cost();
                    return Some(frame);
                }
                if state.cut || state.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Wait until the queue is cut off (its bound was passed); for a writer busy with a
    /// blocked connection that must stop and say why.
    pub async fn cut_off(&self) {
        loop {
            // Registered before the check: an overflow in between still wakes it.
            let notified = self.cut.notified();
            if self.is_cut() {
                return;
            }
            notified.await;
        }
    }

    /// True once the bound was passed.
    pub fn is_cut(&self) -> bool {
        self.lock().cut
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use sluice_core::RequestId;

    fn frame(text_len: usize) -> Arc<Frame> {
        Frame::new(Outgoing::Delta {
            request_id: RequestId::new(),
            attempt: 1,
            index: 0,
            text: "x".repeat(text_len),
        })
    }

    #[test]
    fn a_frame_is_encoded_once_and_shared() {
        let f = frame(10);
        let json: serde_json::Value = serde_json::from_slice(&f.json()).unwrap();
        assert_eq!(json["type"], "delta");
        assert_eq!(json["text"], "xxxxxxxxxx");
        assert_eq!(f.cost(), f.json().len() + FRAME_OVERHEAD);
        assert_eq!(f.json().as_ptr(), f.json().as_ptr());
    }

    #[test]
    fn the_first_push_past_the_bound_cuts_off_and_frees_everything() {
        let one = frame(100);
        let queue = SendQueue::new(one.cost() * 3);
        for _ in 0..3 {
            assert_eq!(queue.push(&one), Pushed::Queued);
        }
        assert_eq!(queue.bytes(), one.cost() * 3);
        assert_eq!(queue.push(&one), Pushed::Overflowed);
        assert!(queue.is_cut());
        assert_eq!((queue.len(), queue.bytes()), (0, 0));
        assert_eq!(queue.push(&one), Pushed::Gone);
        assert!(queue.try_pop().is_none());
        // The queue shares the frame: only our handle is left.
        assert_eq!(Arc::strong_count(&one), 1);
    }

    #[test]
    fn a_frame_bigger_than_the_bound_fits_an_empty_queue_only() {
        let big = frame(10_000);
        let queue = SendQueue::new(1_000);
        assert_eq!(queue.push(&big), Pushed::Queued);
        assert!(queue.try_pop().is_some());
        assert_eq!(queue.push(&frame(10)), Pushed::Queued);
        assert_eq!(queue.push(&big), Pushed::Overflowed);
    }

    #[tokio::test]
    async fn pop_waits_for_a_push_and_ends_when_cut_off_or_closed() {
        let queue = Arc::new(SendQueue::new(10_000));
        let reader = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.pop().await.map(|f| f.json().len()) })
        };
        tokio::task::yield_now().await;
        let f = frame(5);
        queue.push(&f);
        assert_eq!(reader.await.unwrap(), Some(f.json().len()));

        let cut = Arc::new(SendQueue::new(f.cost()));
        cut.push(&f);
        let watcher = {
            let cut = Arc::clone(&cut);
            tokio::spawn(async move { cut.cut_off().await })
        };
        tokio::task::yield_now().await;
        cut.push(&f);
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
            .await
            .expect("cut_off wakes on the overflow")
            .unwrap();
        assert!(cut.pop().await.is_none());

        let closed = SendQueue::new(10_000);
        closed.close();
        assert!(closed.pop().await.is_none());
        assert_eq!(closed.push(&f), Pushed::Gone);
    }

    proptest! {
        /// Whatever the pushes and pops, the bytes held never pass the bound (but for one
        /// oversized frame alone), the count matches what is queued, frames come out in the
        /// order they went in, and after a cut-off nothing is held or taken.
        #[test]
        fn the_bound_holds_and_order_is_kept(
            limit in 1usize..4_000,
            steps in proptest::collection::vec((any::<bool>(), 0usize..600), 1..200),
        ) {
            let queue = SendQueue::new(limit);
            let mut model: VecDeque<Arc<Frame>> = VecDeque::new();
            let mut cut = false;
            for (is_push, size) in steps {
                if is_push {
                    let f = frame(size);
                    let held: usize = model.iter().map(|f| f.cost()).sum();
                    let pushed = queue.push(&f);
                    if cut {
                        prop_assert_eq!(pushed, Pushed::Gone);
                    } else if !model.is_empty() && held + f.cost() > limit {
                        prop_assert_eq!(pushed, Pushed::Overflowed);
                        cut = true;
                        model.clear();
                    } else {
                        prop_assert_eq!(pushed, Pushed::Queued);
                        model.push_back(f);
                    }
                } else {
                    let popped = queue.try_pop();
                    let expected = model.pop_front();
                    prop_assert_eq!(popped.map(|f| f.json()), expected.map(|f| f.json()));
                }
                let held: usize = model.iter().map(|f| f.cost()).sum();
                prop_assert_eq!(queue.bytes(), held);
                prop_assert_eq!(queue.len(), model.len());
                prop_assert!(held <= limit || model.len() == 1);
                prop_assert_eq!(queue.is_cut(), cut);
            }
        }
    }
}
