//! `GET /metrics` on the API and on a worker after a run: each metric holds the value the run
//! implies (jobs by event, cache hits, provider calls, tokens, cost, histograms, gauges).

use crate::helpers::{greedy_body, spawn_app, AppOptions, TestApp};
use reqwest::StatusCode;
use sluice_core::{RequestId, Tier};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parser for the text format as the exporter writes it (no escaped quotes or commas in
/// label values, which Sluice's labels never hold).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("a number: {line}")),
            }
        })
        .collect()
}

pub(crate) struct Scrape(Vec<Sample>);

impl Scrape {
    pub(crate) async fn of(app: &TestApp, url: &str) -> Scrape {
        let response = app.http.get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let kind = response.headers()["content-type"].to_str().unwrap();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        Scrape(parse(&response.text().await.unwrap()))
    }

    /// The sum over the series of `name` whose labels include `labels` (0 when none).
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The single series of `name` with exactly these labels' values; panics if absent.
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert_eq!(found.len(), 1, "one {name}{labels:?} in {:?}", self.0);
        found[0].value
    }
}

/// Scrape `url` until `check` holds (gauges are refreshed on a clock); the last scrape.
async fn scrape_until(app: &TestApp, url: &str, what: &str, check: impl Fn(&Scrape) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = Scrape::of(app, url).await;
        if check(&scrape) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {:?}", scrape.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const LANES: [&str; 4] = ["priority", "standard", "batch", "retry"];

#[tokio::test]
async fn metrics_after_a_run_hold_what_the_run_implies() {
    let app = spawn_app(AppOptions {
        processes: true,
        ..AppOptions::default()
    })
    .await;
    // A price on the endpoint, so cost is counted: the processes read it at start.
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    let config = config.replacen(
        "timeout_secs = 10\n",
        "timeout_secs = 10\nprice = { input_per_mtok = 3, output_per_mtok = 15 }\n",
        1,
    );
    std::fs::write(&app.config_path, config).unwrap();
    let mut app = app;
    app.restart_api_and_workers().await;
    let api_metrics = format!("{}/metrics", app.api);
    let worker_metrics = app.worker_metrics[0].clone();

    // Ten jobs of each tier, each tier a tenant of its own.
    let tiers = [
        (Tier::Enterprise, "priority"),
        (Tier::Pro, "priority"),
        (Tier::Basic, "standard"),
        (Tier::Free, "batch"),
    ];
    let mut pro = String::new();
    let mut ids: Vec<RequestId> = Vec::new();
    for (tier, _) in tiers {
        let key = app.key(&format!("m-{tier}"), tier).await;
        for n in 0..10 {
            // Deterministic, so the resubmissions below can be answered from the cache.
            let body = greedy_body(&format!("metrics job {tier} {n}"));
            let (status, accepted) = app.post_job(&key, &body).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
            ids.push(accepted["request_id"].as_str().unwrap().parse().unwrap());
        }
        if tier == Tier::Pro {
            pro = key;
        }
    }
    app.wait_terminal(&ids, Duration::from_secs(60)).await;

    // Five identical resubmissions answer from the exact cache.
    let pro = &pro;
    for n in 0..5 {
        let (status, body) = app
            .post_job(pro, &greedy_body(&format!("metrics job pro {n}")))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["cache"], "exact", "{body}");
    }

    // What the run implies, from the jobs themselves.
    let (mut prompt, mut completion, mut cost) = (0.0, 0.0, 0.0);
    for id in &ids {
        let job = app.store.job(*id).await.unwrap().unwrap();
        assert_eq!(job.state, sluice_core::JobState::Succeeded, "{id}");
        let usage = &job.result.as_ref().unwrap()["usage"];
        prompt += usage["prompt_tokens"].as_f64().unwrap();
        completion += usage["completion_tokens"].as_f64().unwrap();
        cost += job.cost_usd.unwrap();
    }
    assert!(prompt > 0.0 && completion > 0.0 && cost > 0.0);
    let jobs = ids.len() as f64;

    // The API: admission's decisions, cache look-ups, lane gauges.
    let api = Scrape::of(&app, &api_metrics).await;
    for (tier, _) in tiers {
        let accepted = api.one(
            "sluice_jobs_total",
            &[("event", "accepted"), ("tier", tier.as_str())],
        );
        assert_eq!(accepted, 10.0, "accepted {tier}");
    }
    let submitted = jobs + 5.0;
    let cached = api.sum("sluice_jobs_total", &[("event", "cached")]);
    assert_eq!(cached, 5.0);
    assert_eq!(
        api.sum("sluice_jobs_total", &[("event", "accepted")]),
        submitted - cached
    );
    assert_eq!(api.sum("sluice_jobs_total", &[("event", "shed")]), 0.0);
    assert_eq!(api.sum("sluice_jobs_total", &[("event", "refused")]), 0.0);
    let lookups = |result| {
        api.sum(
            "sluice_cache_lookups_total",
            &[("kind", "exact"), ("result", result)],
        )
    };
    assert_eq!(lookups("hit"), 5.0, "one hit per identical resubmission");
    assert_eq!(lookups("miss"), jobs);
    scrape_until(&app, &api_metrics, "lanes empty after the run", |s| {
        LANES.iter().all(|lane| {
            s.sum("sluice_lane_depth", &[("lane", lane)]) == 0.0
                && s.matching("sluice_lane_depth", &[("lane", lane)]).count() == 1
                && s.sum("sluice_lane_oldest_age_seconds", &[("lane", lane)]) == 0.0
        }) && s.sum("sluice_load_level", &[]) == 0.0
    })
    .await;

    // The worker: outcomes by lane, provider calls, usage, histograms, endpoint gauges.
    let worker = Scrape::of(&app, &worker_metrics).await;

    // The store's batched statements: every submission went through the ingest writer (the
    // exact cache is looked up by the insert), every job through one claim and one completion;
    // each batch records its time, its oldest item's wait and its size once.
    for (scrape, statement, items) in [
        (&api, "insert", submitted),
        (&worker, "claim", jobs),
        (&worker, "complete", jobs),
    ] {
        let label = [("statement", statement)];
        let batches = scrape.one("sluice_store_batch_items_count", &label);
        assert_eq!(
            scrape.one("sluice_store_batch_items_sum", &label),
            items,
            "{statement}"
        );
        assert!(
            batches >= 1.0 && batches <= items,
            "{statement}: {batches} batches"
        );
        // The items' own buckets, up to a writer's 256 items.
        let all = [("statement", statement), ("le", "256")];
        assert_eq!(scrape.one("sluice_store_batch_items_bucket", &all), batches);
        for timed in [
            "sluice_store_batch_seconds",
            "sluice_store_batch_wait_seconds",
        ] {
            let count = scrape.one(&format!("{timed}_count"), &label);
            assert_eq!(count, batches, "{timed} {statement}");
            // The statement buckets, not the provider-scale ones: one bound under a millisecond.
            let fine = scrape.one(
                &format!("{timed}_bucket"),
                &[("statement", statement), ("le", "0.0005")],
            );
            assert!(fine <= count, "{timed} {statement}");
        }
    }
    let completed = worker.sum("sluice_jobs_total", &[("event", "completed")]);
    assert_eq!(completed, jobs, "every job ran once");
    for (lane, n) in [("priority", 20.0), ("standard", 10.0), ("batch", 10.0)] {
        let by_lane = [("event", "completed"), ("lane", lane)];
        assert_eq!(worker.one("sluice_jobs_total", &by_lane), n, "{lane}");
        let lane = [("lane", lane)];
        assert_eq!(worker.one("sluice_queue_wait_seconds_count", &lane), n);
        assert_eq!(worker.one("sluice_job_duration_seconds_count", &lane), n);
    }
    for event in ["failed", "dead"] {
        assert_eq!(worker.sum("sluice_jobs_total", &[("event", event)]), 0.0);
    }
    let sim = [("endpoint", "sim-1")];
    let calls = |outcome| {
        worker.sum(
            "sluice_provider_calls_total",
            &[("endpoint", "sim-1"), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("ok"), completed);
    assert_eq!(calls("rate_limited") + calls("error"), 0.0);
    assert_eq!(
        worker.one("sluice_provider_latency_seconds_count", &sim),
        completed
    );
    let tokens = |kind| {
        worker.one(
            "sluice_tokens_total",
            &[("endpoint", "sim-1"), ("kind", kind)],
        )
    };
    assert_eq!(tokens("prompt"), prompt);
    assert_eq!(tokens("completion"), completion);
    let counted = worker.one("sluice_cost_usd_total", &sim);
    assert!((counted - cost).abs() < 1e-9, "cost {counted} vs {cost}");
    scrape_until(&app, &worker_metrics, "endpoint gauges", |s| {
        let used = s.sum("sluice_endpoint_limit_utilization", &sim);
        // 40 calls within the minute against 60,000 rpm.
        (used - jobs / 60_000.0).abs() < 1e-9 && s.one("sluice_breaker_state", &sim) == 0.0
    })
    .await;
    let used = Scrape::of(&app, &worker_metrics)
        .await
        .one("sluice_endpoint_limit_utilization", &sim);
    assert!(used > 0.0 && used <= 1.0, "{used}");

    // A subscriber counted while its SSE stream is open and not after it ends; a job left
    // queued (no worker runs any more) is cancelled while it watches.
    app.terminate_worker(0).await;
    let waiting = app.submit(pro, "metrics job left waiting").await;
    let stream = app
        .http
        .get(format!("{}/v1/jobs/{waiting}/events", app.api))
        .bearer_auth(pro)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let sse = [("kind", "sse")];
    assert_eq!(
        Scrape::of(&app, &api_metrics)
            .await
            .one("sluice_subscribers", &sse),
        1.0
    );
    let (status, body) = app.cancel_job(pro, waiting).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = tokio::time::timeout(Duration::from_secs(10), stream.text())
        .await
        .expect("the stream ends after the terminal event")
        .unwrap();
    assert!(events.contains("cancelled"), "{events}");
    scrape_until(&app, &api_metrics, "the subscriber counted out", |s| {
        s.one("sluice_subscribers", &sse) == 0.0
    })
    .await;
    let api = Scrape::of(&app, &api_metrics).await;
    let cancelled = [("event", "cancelled"), ("tier", "pro")];
    assert_eq!(api.one("sluice_jobs_total", &cancelled), 1.0);
    assert_eq!(
        api.sum("sluice_jobs_total", &[("event", "accepted")]),
        submitted - cached + 1.0
    );
    app.cleanup().await;
}
