//! Publishing to the lanes: publisher confirms awaited per batch, the whole set retried after
//! connection trouble, and delays through TTL holding queues (one per lane and delay bucket).

use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tracing::warn;

use super::{delay_bucket_ms, durable, timed, Shared, REASON_HEADER};
use crate::{Backoff, BrokerError, JobRef, Lane, PublishOptions};

const PUBLISH_ATTEMPTS: u32 = 3;
/// Publishing does not count as "use" for `x-expires`, so a holding queue is
/// redeclared (renewing its lease) at least this often while we publish into it.
const REDECLARE_HOLDING_AFTER: Duration = Duration::from_secs(30);

/// One message on its way out.
pub(super) struct Outgoing {
    pub(super) lane: Lane,
    pub(super) body: Vec<u8>,
    pub(super) message_id: Option<String>,
    pub(super) opts: PublishOptions,
}

impl Outgoing {
    /// The messages for a batch: jobs bound for a lane now, with no reason, share messages of
    /// up to `pack` jobs (a JSON array), in the order given; the rest go one per message.
    /// A group of one stays a plain job, which any worker reads.
    pub(super) fn packed(
        items: Vec<(Lane, JobRef, PublishOptions)>,
        pack: usize,
    ) -> Result<Vec<Self>, BrokerError> {
        let mut out = Vec::with_capacity(items.len());
        let mut now: [Vec<JobRef>; Lane::ALL.len()] = Default::default();
        for (lane, job, opts) in items {
            if pack > 1 && opts.delay.is_none() && opts.reason.is_none() {
                now[lane.index()].push(job);
            } else {
                out.push(Self::job(lane, &job, opts)?);
            }
        }
        for (lane, jobs) in Lane::ALL.into_iter().zip(now) {
            for chunk in jobs.chunks(pack.max(1)) {
                match chunk {
                    [job] => out.push(Self::job(lane, job, PublishOptions::default())?),
                    jobs => out.push(Self::pack(lane, jobs)?),
                }
            }
        }
        Ok(out)
    }

    fn pack(lane: Lane, jobs: &[JobRef]) -> Result<Self, BrokerError> {
        let body = serde_json::to_vec(jobs)
            .map_err(|e| BrokerError::Malformed(format!("cannot encode jobs: {e}")))?;
        Ok(Self {
            lane,
            body,
            message_id: None,
            opts: PublishOptions::default(),
        })
    }

    pub(super) fn job(lane: Lane, job: &JobRef, opts: PublishOptions) -> Result<Self, BrokerError> {
        let body = serde_json::to_vec(job)
            .map_err(|e| BrokerError::Malformed(format!("cannot encode job: {e}")))?;
        Ok(Self {
            lane,
            body,
            message_id: Some(job.request_id.to_string()),
            opts,
        })
    }
}

impl Shared {
    pub(super) fn holding_names(&self) -> Vec<String> {
        match self.holding.lock() {
            Ok(map) => map.keys().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().keys().cloned().collect(),
        }
    }

    pub(super) fn forget_holding(&self, queue: &str) {
        let mut map = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(queue);
    }

    /// Declares (or renews the lease of) the holding queue for `lane` and `ms`.
    async fn holding_queue(&self, lane: Lane, ms: u64) -> Result<String, BrokerError> {
        let target = self.queue_name(lane);
        let queue = format!("{}.delay.{}.{ms}", self.config.prefix, lane.as_str());
        let fresh = {
            let map = self.holding.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&queue)
                .is_some_and(|at| at.elapsed() < REDECLARE_HOLDING_AFTER)
        };
        if fresh {
            return Ok(queue);
        }
        let mut args = FieldTable::default();
        let ttl =
            i64::try_from(ms).map_err(|_| BrokerError::DelayTooLong(Duration::from_millis(ms)))?;
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(2 * ttl + 60_000));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(target.into()),
        );
        let declared_at = Instant::now();
        self.admin_op(&queue, |ch| {
            let queue = queue.clone();
            async move { ch.queue_declare(&queue, durable(), args).await }
        })
        .await?;
        let mut map = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(queue.clone(), declared_at);
        Ok(queue)
    }

    /// Publishes with confirms, retrying the whole set after connection trouble.
    /// A retry may duplicate messages that did arrive; consumers fence duplicates.
    pub(super) async fn publish_items(&self, items: &[Outgoing]) -> Result<(), BrokerError> {
        let mut backoff = Backoff::default();
        let mut attempt = 1;
        loop {
            match self.publish_once(items).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < PUBLISH_ATTEMPTS && retryable(&e) => {
                    warn!(error = %e, attempt, "publish failed; retrying");
                    if let BrokerError::Unroutable { queue } = &e {
                        // A holding queue may have expired or been purged: redeclare it.
                        self.forget_holding(queue);
                    }
                    Self::discard(&self.publisher).await;
                    tokio::time::sleep(backoff.next_delay()).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn publish_once(&self, items: &[Outgoing]) -> Result<(), BrokerError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut targets = Vec::with_capacity(items.len());
        for item in items {
            let target = match item.opts.delay.map(delay_bucket_ms).transpose()?.flatten() {
                Some(ms) => self.holding_queue(item.lane, ms).await?,
                None => self.queue_name(item.lane),
            };
            targets.push(target);
        }
        let publish_error = |queue: &str, source| BrokerError::Publish {
            queue: queue.to_owned(),
            source,
        };
        let first = targets.first().map_or("", String::as_str);
        let ch = self
            .channel(&self.publisher, true)
            .await
            .map_err(|e| publish_error(first, e))?;

        // Send everything first, then wait for the confirms together: one round trip per batch.
        let mut pending = Vec::with_capacity(items.len());
        for (item, queue) in items.iter().zip(&targets) {
            let confirm = timed(ch.basic_publish(
                "",
                queue,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &item.body,
                properties(item),
            ))
            .await
            .map_err(|e| publish_error(queue, e))?;
            pending.push(timed(confirm));
        }
        let confirms = futures::future::join_all(pending).await;
        for (confirm, queue) in confirms.into_iter().zip(&targets) {
            match confirm.map_err(|e| publish_error(queue, e))? {
                Confirmation::Ack(None) => {}
                // With `mandatory`, an unroutable message comes back attached to its ack.
                Confirmation::Ack(Some(_)) => {
                    return Err(BrokerError::Unroutable {
                        queue: queue.clone(),
                    })
                }
                Confirmation::Nack(_) => {
                    return Err(BrokerError::NotConfirmed {
                        queue: queue.clone(),
                    })
                }
                Confirmation::NotRequested => {
                    return Err(publish_error(
                        queue,
                        "the publish channel is not in confirm mode".into(),
                    ))
                }
            }
        }
        Ok(())
    }
}

fn retryable(e: &BrokerError) -> bool {
    matches!(
        e,
        BrokerError::Connection(_)
            | BrokerError::Publish { .. }
            | BrokerError::Unroutable { .. }
            | BrokerError::Admin { .. }
    )
}

fn properties(item: &Outgoing) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(id) = &item.message_id {
        props = props.with_message_id(id.as_str().into());
    }
    if let Some(reason) = &item.opts.reason {
        let mut headers = FieldTable::default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
        props = props.with_headers(headers);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::super::test_job as job;
    use super::*;
    use std::time::Duration;

    fn jobs_in(item: &Outgoing) -> Vec<JobRef> {
        if item.body.first() == Some(&b'[') {
            serde_json::from_slice(&item.body).unwrap_or_default()
        } else {
            serde_json::from_slice(&item.body).map_or_else(|_| vec![], |j| vec![j])
        }
    }

    #[test]
    fn jobs_for_a_lane_now_share_messages_of_at_most_pack_jobs() {
        let standard: Vec<JobRef> = (0..5).map(|_| job("s")).collect();
        let delayed = job("d");
        let dead = job("x");
        let priority = job("p");
        let mut items: Vec<_> = standard
            .iter()
            .map(|j| (Lane::Standard, j.clone(), PublishOptions::default()))
            .collect();
        items.insert(
            2,
            (
                Lane::Standard,
                delayed.clone(),
                PublishOptions::delayed(Duration::from_secs(1)),
            ),
        );
        items.push((Lane::Dead, dead.clone(), PublishOptions::reason("why")));
        items.push((Lane::Priority, priority.clone(), PublishOptions::default()));

        let out = Outgoing::packed(items, 2).unwrap_or_default();
        let summary: Vec<(Lane, Vec<JobRef>, bool)> = out
            .iter()
            .map(|o| (o.lane, jobs_in(o), o.body.first() == Some(&b'[')))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Lane::Standard, vec![delayed.clone()], false),
                (Lane::Dead, vec![dead.clone()], false),
                (Lane::Priority, vec![priority.clone()], false),
                (Lane::Standard, standard[0..2].to_vec(), true),
                (Lane::Standard, standard[2..4].to_vec(), true),
                (Lane::Standard, standard[4..].to_vec(), false),
            ]
        );
        assert!(out[0].opts.delay.is_some() && out[1].opts.reason.is_some());
        assert_eq!(
            out[2].message_id.as_deref(),
            Some(priority.request_id.to_string().as_str())
        );
    }

    #[test]
    fn pack_one_keeps_one_message_per_job() {
        let items: Vec<_> = (0..3)
            .map(|_| (Lane::Batch, job("b"), PublishOptions::default()))
            .collect();
        let out = Outgoing::packed(items, 1).unwrap_or_default();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|o| o.body.first() == Some(&b'{')));
    }
}
