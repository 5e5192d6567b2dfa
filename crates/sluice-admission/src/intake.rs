//! The one intake every front door calls (the job API, OpenAI's chat completions, batch lines):
//! from an authenticated principal and a parsed request to a stored, queued or reused job.
//!
//! In order: the request's rules and model, the completion email, quotas, the load level, budget
//! and route, the semantic cache, then insert (which looks up the exact cache itself, and
//! attaches to an identical job in flight), publish after commit, and announce. Handlers only
//! translate wire formats.

use crate::policy::{Admission, SemanticLookup};
use crate::telemetry;
use crate::AdmitError;
use sha2::{Digest, Sha256};
use sluice_core::route::RouteKey;
use sluice_core::{JobRequest, JobState, Lane, Principal, RequestId, Tier, TierLanes};
use sluice_outbox::Publisher;
use sluice_store::{
    Accepted as StoreAccepted, BatchLine, Batcher, Ingested, JobRecord, JobWriter, NewBatch,
    NewJob, Reuse, Store,
};
use std::sync::Arc;

/// When a submission may take another job's answer (the exact and semantic caches, attaching
/// to an identical job in flight).
///
/// A sampled request (temperature above 0 or unset, and no seed) asks for a fresh sample each
/// time, as OpenAI's API means it; an earlier answer is not one. So by default only
/// deterministic requests are reused, unless their route or the caller's key sets
/// `reuse_samples`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReusePolicy {
    /// Deterministic requests only (temperature 0 or a seed), or any on a route or from a key
    /// that opted in.
    #[default]
    Auto,
    /// The caller asked for reuse (`"cache": true`): sampled requests too.
    Allow,
    /// The caller opted out (`"cache": false`), or the front door never reuses (batch lines).
    Never,
}

/// What a front door hands the intake.
#[derive(Debug, Clone)]
pub struct Submission {
    pub request: JobRequest,
    /// A lane the caller asked for; it can only lower the key's tier lane.
    pub lane: Option<Lane>,
    /// `Some(true)` asks for a completion email, `Some(false)` declines the free tier's
    /// default one, `None` leaves it to the tier.
    pub email: Option<bool>,
    pub reuse: ReusePolicy,
    /// `Idempotency-Key`: a resend with the same key and body answers the first job.
    pub idempotency_key: Option<String>,
}

impl Submission {
    /// A submission of `request` with every option at its default.
    pub fn new(request: JobRequest) -> Submission {
        Submission {
            request,
            lane: None,
            email: None,
            reuse: ReusePolicy::Auto,
            idempotency_key: None,
        }
    }
}

/// A job the intake queued (or found queued for an idempotent resend).
#[derive(Debug, Clone, PartialEq)]
pub struct Ticket {
    pub id: RequestId,
    pub state: JobState,
    pub lane: Lane,
    /// Place in the lane (1 = next), from the lane's depth as last read.
    pub position: u64,
    /// Seconds until the job starts, when the lane's drain rate is known.
    pub estimated_wait_secs: Option<f64>,
    /// The identical job in flight this one follows; its answer will be this one's.
    pub attached_to: Option<RequestId>,
    /// The pool admission chose, and why, when it is not the model's route.
    pub route: Option<String>,
    pub route_reason: Option<String>,
    /// An idempotent resend: the job is the one first submitted with this key.
    pub resent: bool,
}

impl Ticket {
    /// How the job was reused, if it was: a follower of an identical job in flight.
    pub fn reuse(&self) -> Option<Reuse> {
        self.attached_to.map(|_| Reuse::Dedup)
    }
}

/// What the intake did with a submission.
#[derive(Debug)]
pub enum Admitted {
    /// Stored and waiting in its lane, or following an identical job in flight.
    Queued(Ticket),
    /// Stored already answered from an earlier job's result.
    Answered { job: Box<JobRecord>, how: Reuse },
}

impl Admitted {
    pub fn id(&self) -> RequestId {
        match self {
            Admitted::Queued(ticket) => ticket.id,
            Admitted::Answered { job, .. } => job.id,
        }
    }
}

/// The intake: admission's policy plus the store and the lanes (the store announces what it
/// changes). One per API node.
pub struct Intake {
    pub store: Store,
    writer: JobWriter,
    /// Exact-cache look-ups of concurrent submissions, one statement for all of them.
    answers: Batcher<(String, Vec<u8>), Option<RequestId>>,
    pub publisher: Publisher,
    pub policy: Arc<Admission>,
    pub tiers: TierLanes,
}

impl Intake {
    pub fn new(
        store: Store,
        publisher: Publisher,
        policy: Arc<Admission>,
        tiers: TierLanes,
    ) -> Intake {
        // Two writers of up to 256 jobs each: concurrent submissions share statements. Fewer
        // writers make bigger batches, and the database's cost is mostly per statement; two
        // keep one statement gathering while the other commits (docs/PERFORMANCE.md, sixth round).
        let writer = JobWriter::spawn(store.clone(), 2, 256);
        let window = policy.cache.reuse_window();
        let reader = store.clone();
        let answers = Batcher::spawn(
            "exact_lookup",
            2,
            256,
            move |wanted: Vec<(String, Vec<u8>)>| {
                let store = reader.clone();
                async move { store.reusable_answers(&wanted, window).await }
            },
        );
        Intake {
            store,
            writer,
            answers,
            publisher,
            policy,
            tiers,
        }
    }

    /// The model aliases submissions may name.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.policy.routes.keys().map(String::as_str)
    }

    /// Check a request's rules and model without admitting it (batch lines are all checked
    /// before any is stored).
    pub fn check(&self, request: &JobRequest) -> Result<(), AdmitError> {
        request.validate()?;
        if !self.policy.routes.contains_key(&request.model) {
            return Err(AdmitError::UnknownModel {
                model: request.model.clone(),
                known: self.models().map(str::to_owned).collect(),
            });
        }
        Ok(())
    }

    /// The lane a submission of `principal` asking for `requested` enters.
    pub fn lane_for(&self, tier: Tier, requested: Option<Lane>) -> Lane {
        let lane = self.tiers.lane_for(tier);
        requested.map_or(lane, |r| lane.lowered_to(r))
    }

    /// Admit one submission: refused (nothing stored), answered from another job, or queued.
    pub async fn submit(
        &self,
        principal: Principal,
        submission: Submission,
    ) -> Result<Admitted, AdmitError> {
        let Submission {
            request,
            lane: requested_lane,
            email,
            reuse,
            idempotency_key,
        } = submission;
        self.check(&request)?;
        let notify_email = notify_email(&principal, email)?;
        let idempotency = idempotency_key.map(|key| {
            (
                key,
                idempotency_hash(&request, email, reuse, requested_lane),
            )
        });
        let policy = &self.policy;
        let tier = principal.tier;
        policy
            .take_quota(&principal)
            .await
            .inspect_err(|_| telemetry::job("refused", tier))?;
        let lane = self.lane_for(tier, requested_lane);
        let reusable = match reuse {
            ReusePolicy::Never => false,
            ReusePolicy::Allow => true,
            ReusePolicy::Auto => {
                request.is_deterministic()
                    || principal.reuse_samples
                    || policy.reuses_samples(&request.model)
            }
        };
        let request_hash = reusable.then(|| Admission::request_hash(&principal.tenant, &request));
        let id = RequestId::new();
        // The front door's `submit` span declares the field: every line it logs names the job.
        tracing::Span::current().record("request_id", tracing::field::display(id));
        let mut job = NewJob {
            id,
            principal,
            lane,
            request,
            idempotency,
            notify_email,
            request_hash,
            reuse_within: None,
            route: None,
        };
        // A job with an Idempotency-Key keeps its own identity: it is never answered from another.
        let may_reuse = job.idempotency.is_none() && reusable && job.request_hash.is_some();
        let semantic = policy.semantic_for(&job.request).filter(|_| may_reuse);
        // The exact cache is looked up by the insert itself (no round trip of its own), unless
        // the semantic cache comes first: an exact answer must win over a near one.
        let exact_in_insert = may_reuse && semantic.is_none();
        if may_reuse && !exact_in_insert {
            if let Some(admitted) = self.exact_answer(&job).await? {
                return Ok(admitted);
            }
        }
        // Shedding and budgets refuse new work; an answer the cache already holds is not.
        if let Err(refused) = policy.check_load(&job.principal, lane) {
            if exact_in_insert {
                if let Some(admitted) = self.exact_answer(&job).await? {
                    return Ok(admitted);
                }
            }
            telemetry::job("shed", tier);
            return Err(refused);
        }
        let routing = match policy
            .route(&self.store, &job.principal, &job.request)
            .await
        {
            Ok(routing) => routing,
            Err(refused) => {
                if matches!(refused, AdmitError::BudgetExhausted { .. }) {
                    if exact_in_insert {
                        if let Some(admitted) = self.exact_answer(&job).await? {
                            return Ok(admitted);
                        }
                    }
                    telemetry::job("refused", tier);
                }
                return Err(refused);
            }
        };
        job.route = routing.stored();
        let mut embedding = None;
        if let Some(cache) = semantic {
            let SemanticLookup { hit, remember } = policy
                .semantic_answer(cache, &self.store, &job.principal.tenant, &job.request)
                .await?;
            let mut answered = None;
            if let Some(source) = hit {
                answered = self.answer(&job, source, Reuse::Semantic).await?;
            }
            telemetry::cache_lookup("semantic", answered.is_some());
            if let Some(admitted) = answered {
                return Ok(admitted);
            }
            embedding = remember;
        }
        let tenant = job.principal.tenant.clone();
        let route = job.route.clone();
        let accepted = if job.idempotency.is_some() {
            match self.store.insert_job(&job).await? {
                Ingested::Created(message) => StoreAccepted::Queued(message),
                Ingested::Existing(existing) => {
                    let position = policy.position_now(existing.lane);
                    return Ok(Admitted::Queued(Ticket {
                        id: existing.id,
                        state: existing.state,
                        lane: existing.lane,
                        position,
                        estimated_wait_secs: policy.estimate(existing.lane, position),
                        attached_to: existing.leader,
                        route: pool_name(&existing.model),
                        route_reason: existing.route_reason,
                        resent: true,
                    }));
                }
                Ingested::Conflict => return Err(AdmitError::IdempotencyConflict),
            }
        } else if exact_in_insert {
            // Kept for storing the job as answered if the insert finds an answer (rare).
            let kept = job.clone();
            job.reuse_within = Some(self.policy.cache.reuse_window());
            let accepted = self
                .writer
                .insert(job)
                .await
                .map_err(|e| AdmitError::Store(unshare(e)))?;
            match accepted {
                StoreAccepted::Answerable { source } => {
                    // An answered job made no call, so it has no route (as when the exact cache
                    // answers before routing).
                    let unrouted = NewJob {
                        route: None,
                        ..kept.clone()
                    };
                    let answered = self.answer(&unrouted, source, Reuse::Exact).await?;
                    telemetry::cache_lookup("exact", answered.is_some());
                    if let Some(admitted) = answered {
                        return Ok(admitted);
                    }
                    // The answer went (purged) between the look-up and now: queue the job.
                    self.writer
                        .insert(kept)
                        .await
                        .map_err(|e| AdmitError::Store(unshare(e)))?
                }
                accepted => {
                    telemetry::cache_lookup("exact", false);
                    accepted
                }
            }
        } else {
            self.writer
                .insert(job)
                .await
                .map_err(|e| AdmitError::Store(unshare(e)))?
        };
        if let Some((scope, vector)) = embedding {
            // Best effort: a job whose embedding is lost is only never a semantic hit.
            if let Err(error) = self
                .store
                .put_semantic_entry(id, &tenant, &scope, &vector)
                .await
            {
                tracing::warn!(message = "could not store a prompt embedding", request_id = %id, %error);
            }
        }
        let attached_to = match accepted {
            StoreAccepted::Queued(message) => {
                self.publisher.publish_in_background(message);
                None
            }
            StoreAccepted::Enqueued => None,
            StoreAccepted::Attached { leader } => Some(leader),
            StoreAccepted::Answerable { .. } => {
                return Err(AdmitError::Store(sluice_store::StoreError::Corrupt(
                    format!("job {id} was neither stored nor answered"),
                )))
            }
        };
        // A job attached to an identical one in flight is reused, not queued: it counts as cached.
        telemetry::job(
            if attached_to.is_some() {
                "cached"
            } else {
                "accepted"
            },
            tier,
        );
        tracing::debug!(message = "job accepted", request_id = %id, %lane, attached = attached_to.is_some());
        let position = policy.position_now(lane);
        let (route, route_reason) = match route {
            Some((key, reason)) => (pool_name(&key), Some(reason)),
            None => (None, None),
        };
        Ok(Admitted::Queued(Ticket {
            id,
            state: JobState::Queued,
            lane,
            position,
            estimated_wait_secs: policy.estimate(lane, position),
            attached_to,
            route,
            route_reason,
            resent: false,
        }))
    }

    /// Admit a batch whose lines were each checked with [`Intake::check`]: the tenant's cap on
    /// unfinished batch lines and its budget, then every line a job in the `batch` lane
    /// (whatever the key's tier) with no reuse and no email of its own, routed like any job,
    /// all stored in one transaction with the batch and published after it.
    pub async fn submit_batch(
        &self,
        principal: &Principal,
        batch: &NewBatch,
        lines: Vec<(i32, String, JobRequest)>,
        max_pending_lines: i64,
    ) -> Result<(), AdmitError> {
        let adding = i64::try_from(lines.len()).unwrap_or(i64::MAX);
        let pending = self.store.pending_batch_lines(&principal.tenant).await?;
        if pending.saturating_add(adding) > max_pending_lines {
            telemetry::job("refused", principal.tier);
            return Err(AdmitError::BatchQueueFull {
                pending,
                adding,
                cap: max_pending_lines,
            });
        }
        let mut jobs = Vec::with_capacity(lines.len());
        for (line, custom_id, request) in lines {
            // Budget first, then the cheaper pool or the classifier, for each line as for any job.
            let routing = self
                .policy
                .route(&self.store, principal, &request)
                .await
                .inspect_err(|e| {
                    if matches!(e, AdmitError::BudgetExhausted { .. }) {
                        telemetry::job("refused", principal.tier);
                    }
                })?;
            let mut job = NewJob::new(principal.clone(), Lane::Batch, request);
            job.route = routing.stored();
            jobs.push(BatchLine {
                line,
                custom_id,
                job,
            });
        }
        let messages = self.store.create_batch(batch, &jobs).await?;
        for message in messages {
            self.publisher.publish_in_background(message);
        }
        metrics::counter!("sluice_jobs_total", "event" => "accepted", "tier" => principal.tier.as_str())
            .increment(jobs.len() as u64);
        tracing::info!(message = "batch accepted", batch = %batch.id, lines = jobs.len());
        Ok(())
    }

    /// The exact cache on its own (before the semantic cache, or for a submission the load or
    /// the budget refuses): `job` stored answered, or `None` when there is no answer.
    async fn exact_answer(&self, job: &NewJob) -> Result<Option<Admitted>, AdmitError> {
        let Some(hash) = &job.request_hash else {
            return Ok(None);
        };
        let source = self
            .answers
            .call((job.principal.tenant.clone(), hash.clone()))
            .await
            .map_err(|e| AdmitError::Store(unshare(e)))?;
        let mut answered = None;
        if let Some(source) = source {
            answered = self.answer(job, source, Reuse::Exact).await?;
        }
        telemetry::cache_lookup("exact", answered.is_some());
        Ok(answered)
    }

    /// Store `job` as answered by `source`'s result; `None` if `source` no longer qualifies.
    async fn answer(
        &self,
        job: &NewJob,
        source: RequestId,
        how: Reuse,
    ) -> Result<Option<Admitted>, AdmitError> {
        if !self.store.insert_answered(job, source, how).await? {
            return Ok(None);
        }
        telemetry::job("cached", job.principal.tier);
        tracing::debug!(message = "job answered from cache", request_id = %job.id, cache = how.as_str(), %source);
        let record = self
            .store
            .get_job(&job.principal.tenant, job.id)
            .await?
            .ok_or_else(|| {
                AdmitError::Store(sluice_store::StoreError::Corrupt(format!(
                    "answered job {} vanished",
                    job.id
                )))
            })?;
        Ok(Some(Admitted::Answered {
            job: Box::new(record),
            how,
        }))
    }
}

/// The pool a routing key names (`pool:NAME`), for showing; `None` for a model alias.
fn pool_name(routing_key: &str) -> Option<String> {
    RouteKey::pool_name(routing_key).map(str::to_owned)
}

/// The batched writer shares one error among the jobs of a failed statement.
fn unshare(error: Arc<sluice_store::StoreError>) -> sluice_store::StoreError {
    Arc::try_unwrap(error)
        .unwrap_or_else(|shared| sluice_store::StoreError::Corrupt(shared.to_string()))
}

/// What an idempotent resend must match: the request and every option that changes the job.
/// Options left at their default add nothing, so keys stored before the option existed match.
fn idempotency_hash(
    request: &JobRequest,
    email: Option<bool>,
    reuse: ReusePolicy,
    lane: Option<Lane>,
) -> Vec<u8> {
    // Plain data: encoding cannot fail, and an empty body would still hash consistently.
    let mut canonical = serde_json::to_vec(request).unwrap_or_default();
    if let Some(email) = email {
        canonical.extend_from_slice(format!("\nnotify.email={email}").as_bytes());
    }
    match reuse {
        ReusePolicy::Auto => {}
        ReusePolicy::Never => canonical.extend_from_slice(b"\ncache=false"),
        ReusePolicy::Allow => canonical.extend_from_slice(b"\ncache=true"),
    }
    if let Some(lane) = lane {
        canonical.extend_from_slice(format!("\nlane={lane}").as_bytes());
    }
    Sha256::digest(&canonical).to_vec()
}

/// Where the job's completion email goes: the key's address if the request asks for email,
/// or, when it does not say, if the key is free tier (free jobs wait longest, in `batch`).
pub fn notify_email(
    principal: &Principal,
    asked: Option<bool>,
) -> Result<Option<String>, AdmitError> {
    if !asked.unwrap_or(principal.tier == Tier::Free) {
        return Ok(None);
    }
    let address = principal
        .email
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    match (address, asked) {
        (Some(address), _) => Ok(Some(address.to_owned())),
        (None, Some(true)) => Err(AdmitError::NoEmail),
        // The free tier's default email needs an address; without one the caller polls.
        (None, _) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_core::Message;

    fn key(tier: Tier, email: Option<&str>) -> Principal {
        Principal {
            tenant: "acme".into(),
            user: "u1".into(),
            tier,
            email: email.map(str::to_owned),
            reuse_samples: false,
        }
    }

    #[test]
    fn the_free_tier_gets_email_by_default_and_may_turn_it_off() {
        let free = key(Tier::Free, Some("ada@example.com"));
        assert_eq!(
            notify_email(&free, None).unwrap().as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(
            notify_email(&free, Some(true)).unwrap().as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(notify_email(&free, Some(false)).unwrap(), None);
        // A free key without an address polls, unless the request insists on email.
        assert_eq!(notify_email(&key(Tier::Free, None), None).unwrap(), None);
        assert_eq!(
            notify_email(&key(Tier::Free, Some("  ")), None).unwrap(),
            None
        );
    }

    #[test]
    fn other_tiers_get_email_only_when_they_ask() {
        for tier in [Tier::Enterprise, Tier::Pro, Tier::Basic] {
            let k = key(tier, Some("bo@example.com"));
            assert_eq!(notify_email(&k, None).unwrap(), None, "{tier}");
            assert_eq!(notify_email(&k, Some(false)).unwrap(), None, "{tier}");
            assert_eq!(
                notify_email(&k, Some(true)).unwrap().as_deref(),
                Some("bo@example.com"),
                "{tier}"
            );
        }
    }

    #[test]
    fn asking_for_email_with_a_key_without_an_address_is_refused() {
        for tier in Tier::ALL {
            let err = notify_email(&key(tier, None), Some(true)).unwrap_err();
            assert!(matches!(err, AdmitError::NoEmail), "{err:?}");
            assert!(err.to_string().contains("no email address"), "{err}");
        }
    }

    #[test]
    fn idempotency_hashes_keep_their_old_value_and_see_every_option() {
        let request = JobRequest::new("m", vec![Message::user("hi")]);
        let plain = idempotency_hash(&request, None, ReusePolicy::Auto, None);
        // What the job API hashed before options existed: the request's JSON alone.
        assert_eq!(
            plain,
            Sha256::digest(serde_json::to_vec(&request).unwrap()).to_vec()
        );
        let variants = [
            idempotency_hash(&request, Some(true), ReusePolicy::Auto, None),
            idempotency_hash(&request, None, ReusePolicy::Never, None),
            idempotency_hash(&request, None, ReusePolicy::Allow, None),
            idempotency_hash(&request, None, ReusePolicy::Auto, Some(Lane::Batch)),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v, &plain, "variant {i}");
            assert!(variants[..i].iter().all(|w| w != v), "variant {i}");
        }
    }
}
