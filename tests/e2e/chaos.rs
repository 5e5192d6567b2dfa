//! Chaos under steady submissions: API nodes and workers killed with `kill -9`, PostgreSQL,
//! RabbitMQ and Redis crashed and restarted (servers of the test's own), at random from a seed.
//! No accepted job may be lost or end twice. Alone, replaying a schedule:
//! `CHAOS_SEED=7 CHAOS_FAULTS=50 cargo nextest run -p sluice --test e2e -E 'test(chaos)'`.

use crate::helpers::{spawn_app, AppOptions, Node};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_core::{RequestId, Tier};
use sluice_providers::testing::PrivateRedis;
use sluice_sim::{Latency, SimConfig};
use sluice_testkit::private::{PrivatePostgres, PrivateRabbit};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    KillApiNode,
    RestartPostgres,
    RestartRabbitmq,
    RestartRedis,
}

const FAULTS: [Fault; 5] = [
    Fault::KillWorker,
    Fault::KillApiNode,
    Fault::RestartPostgres,
    Fault::RestartRabbitmq,
    Fault::RestartRedis,
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_no_accepted_job_and_ends_none_twice() {
    let seed: u64 = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let faults: usize = env_or("CHAOS_FAULTS", 50);
    // On stderr first, so a failing run can be replayed with the same schedule.
    eprintln!("chaos: seed {seed}, {faults} faults");
    let mut rng = SmallRng::seed_from_u64(seed);

    let postgres = PrivatePostgres::start().await;
    let rabbitmq = PrivateRabbit::start().await;
    let mut redis = PrivateRedis::start().await;
    let mut app = spawn_app(AppOptions {
        processes: true,
        workers: 2,
        redis: true,
        redis_url: Some(redis.url()),
        database_url: Some(postgres.url()),
        rabbitmq_url: Some(rabbitmq.url()),
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Uniform {
                min_ms: 5,
                max_ms: 60,
            },
            ..SimConfig::default()
        },
        lease_secs: 3.0,
        retry_base_secs: 0.2,
        // Every fault may cost a job a try (its worker killed, its outcome not recorded): the
        // budget is for the faults, so that a job that ends `dead` is a finding.
        max_attempts: 30,
        reconcile_after_secs: 10.0,
        ..Default::default()
    })
    .await;
    app.supervised = true;
    let key = app.key("chaos", Tier::Pro).await;
    let mut nodes: Vec<(Node, String)> = Vec::new();
    for _ in 0..2 {
        nodes.push(app.start_api_node().await);
    }
    let urls = Arc::new(Mutex::new(
        nodes.iter().map(|(_, url)| url.clone()).collect::<Vec<_>>(),
    ));

    // Steady submissions, round robin over the live API nodes; a 202 is a promise.
    let accepted: Arc<Mutex<Vec<RequestId>>> = Arc::default();
    let unanswered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let submitter = {
        let (urls, accepted, unanswered, stop) = (
            urls.clone(),
            accepted.clone(),
            unanswered.clone(),
            stop.clone(),
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        tokio::spawn(async move {
            let mut n = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                tick.tick().await;
                n += 1;
                let url = {
                    let urls = urls.lock().unwrap();
                    format!("{}/v1/jobs", urls[n % urls.len()])
                };
                let (http, key, accepted, unanswered) = (
                    http.clone(),
                    key.clone(),
                    accepted.clone(),
                    unanswered.clone(),
                );
                tokio::spawn(async move {
                    let body = crate::helpers::job_body(&format!("chaos job {n} {seed}"));
                    let response = http.post(url).bearer_auth(key).json(&body).send().await;
                    match response {
                        Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                            let body: serde_json::Value = r.json().await.unwrap();
                            let id: RequestId =
                                body["request_id"].as_str().unwrap().parse().unwrap();
                            accepted.lock().unwrap().push(id);
                        }
                        // Refused or cut off mid-fault: not a promise, so not checked.
                        _ => {
                            unanswered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        })
    };

    let started = Instant::now();
    let mut injected: BTreeMap<Fault, usize> = BTreeMap::new();
    for _ in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1_200))).await;
        let fault = FAULTS[rng.gen_range(0..FAULTS.len())];
        match fault {
            Fault::KillWorker => {
                let index = rng.gen_range(0..2);
                app.kill_worker(index).await;
                app.start_worker().await;
            }
            Fault::KillApiNode => {
                let index = rng.gen_range(0..nodes.len());
                // Dropping the node's process handle kills it with SIGKILL.
                drop(nodes.remove(index));
                let node = app.start_api_node().await;
                urls.lock().unwrap()[index] = node.1.clone();
                nodes.insert(index, node);
            }
            Fault::RestartPostgres => postgres.crash_and_restart().await,
            Fault::RestartRabbitmq => rabbitmq.crash_and_restart().await,
            Fault::RestartRedis => {
                redis.stop().await;
                redis.restart().await;
            }
        }
        *injected.entry(fault).or_default() += 1;
    }
    let faulted_for = started.elapsed();
    // A few more seconds of calm submissions, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    submitter.await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let ids = accepted.lock().unwrap().clone();
    assert!(
        ids.len() > faults * 5,
        "too few jobs were accepted ({}) for the run to mean anything",
        ids.len()
    );
    app.wait_terminal(&ids, Duration::from_secs(180)).await;

    let pool = app.store.pg_pool().unwrap().clone();
    let mut not_succeeded = Vec::new();
    for id in &ids {
        let job = app.store.job(*id).await.unwrap().unwrap();
        if job.state != sluice_core::JobState::Succeeded {
            not_succeeded.push((*id, job.state, job.error));
        }
    }
    let twice: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT job_id, count(*) FROM job_events
         WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead')
         GROUP BY job_id HAVING count(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let calls: u64 = ids
        .iter()
        .map(|id| app.sim.calls_for_job(&id.to_string()))
        .sum();
    let jobs = u64::try_from(ids.len()).unwrap();
    eprintln!(
        "chaos: seed {seed}: {faults} faults in {:.0} s ({injected:?}); {} jobs accepted, {} \
         submissions unanswered or refused; {} provider calls, {} beyond one per job",
        faulted_for.as_secs_f64(),
        ids.len(),
        unanswered.load(std::sync::atomic::Ordering::Relaxed),
        calls,
        calls.saturating_sub(jobs),
    );
    assert!(
        not_succeeded.is_empty(),
        "seed {seed}: accepted jobs that did not succeed: {not_succeeded:?}"
    );
    assert!(
        twice.is_empty(),
        "seed {seed}: jobs that ended twice: {twice:?}"
    );
    assert!(calls >= jobs, "every job asked its provider at least once");

    drop(nodes);
    app.cleanup().await;
    drop((postgres, rabbitmq, redis));
}
