//! End-to-end tests of the OpenAI adapter, pools and router against the provider simulator.
//! They check error classification on real HTTP answers and that pools stay under their limits.
#![allow(clippy::unwrap_used)]

use sluice_core::{JobRequest, Message};
use sluice_providers::{
    ChatRequest, ConfigError, EndpointConfig, OpenAiCompatible, PoolConfig, Provider,
    ProviderError, Router, Secret,
};
use sluice_sim::{Faults, Latency, SimConfig, SimHandle, SimKey};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn job() -> JobRequest {
    JobRequest {
        max_tokens: Some(8),
        temperature: Some(0.2),
        ..JobRequest::new("large", vec![Message::user("hello there")])
    }
}

fn key(name: &str, rpm: Option<u32>) -> SimKey {
    SimKey {
        name: name.into(),
        key: format!("sk-{name}-secret"),
        rpm,
    }
}

async fn sim(config: SimConfig) -> SimHandle {
    sluice_sim::spawn(config, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

async fn sim_with_keys(keys: Vec<SimKey>) -> SimHandle {
    sim(SimConfig {
        keys,
        ..SimConfig::default()
    })
    .await
}

fn endpoint(name: &str, base_url: &str, api_key: &str) -> EndpointConfig {
    let mut e = EndpointConfig::new(name, base_url, "gpt-sim", 600);
    e.api_key = Some(Secret::new(api_key));
    e
}

fn provider(config: &EndpointConfig) -> OpenAiCompatible {
    OpenAiCompatible::new(config, reqwest::Client::new()).unwrap()
}

async fn call(
    config: &EndpointConfig,
    request_id: &str,
) -> Result<sluice_providers::ChatResponse, ProviderError> {
    let job = job();
    provider(config)
        .chat(ChatRequest {
            request_id,
            job: &job,
        })
        .await
}

#[tokio::test]
async fn success_parses_content_and_usage_and_sends_the_request_id() {
    let sim = sim_with_keys(vec![key("a", None)]).await;
    let resp = call(&endpoint("a", &sim.base_url(), "sk-a-secret"), "job-ok")
        .await
        .unwrap();
    assert!(resp.content.starts_with("Simulated reply to: "), "{resp:?}");
    assert!(resp.usage.prompt_tokens > 0);
    assert!(resp.usage.completion_tokens > 0 && resp.usage.completion_tokens <= 8);
    assert_eq!(
        resp.usage.total_tokens,
        resp.usage.prompt_tokens + resp.usage.completion_tokens
    );
    assert_eq!(resp.model, "gpt-sim");
    assert!(resp.finish_reason.is_some());
    assert_eq!(sim.calls_for_job("job-ok"), 1);
    assert_eq!(sim.stats().by_key.get("a"), Some(&1));
}

#[tokio::test]
async fn server_error_is_retryable() {
    let sim = sim_with_keys(vec![key("a", None)]).await;
    sim.set_faults(Faults {
        always_fail: Some(500),
        ..Faults::default()
    });
    let err = call(&endpoint("a", &sim.base_url(), "sk-a-secret"), "job-500")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Server { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.status(), Some(500));
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let sim = sim_with_keys(vec![key("slow", Some(1))]).await;
    let e = endpoint("slow", &sim.base_url(), "sk-slow-secret");
    call(&e, "job-1").await.unwrap();
    let err = call(&e, "job-2").await.unwrap_err();
    let ProviderError::RateLimited { retry_after, .. } = &err else {
        panic!("expected RateLimited, got {err:?}");
    };
    assert!(retry_after.is_some_and(|d| d > Duration::ZERO), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.status(), Some(429));
    assert_eq!(err.retry_after(), *retry_after);
}

#[tokio::test]
async fn bad_request_is_rejected_and_permanent() {
    let sim = sim_with_keys(vec![key("a", None)]).await;
    sim.set_faults(Faults {
        always_fail: Some(400),
        ..Faults::default()
    });
    let err = call(&endpoint("a", &sim.base_url(), "sk-a-secret"), "job-400")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn wrong_key_is_rejected_401_without_leaking_it() {
    let sim = sim_with_keys(vec![key("a", None)]).await;
    let err = call(&endpoint("a", &sim.base_url(), "sk-wrong-key"), "job-401")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Rejected { status: 401, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(!err.to_string().contains("sk-wrong-key"));
    assert!(!format!("{err:?}").contains("sk-wrong-key"));
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/v1");
    let err = call(&endpoint("gone", &base, "sk-x"), "job-conn")
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Connection(_)), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn slow_provider_times_out() {
    let sim = sim(SimConfig {
        keys: vec![key("a", None)],
        latency: Latency::Fixed { ms: 2000 },
        ..SimConfig::default()
    })
    .await;
    let mut e = endpoint("a", &sim.base_url(), "sk-a-secret");
    e.timeout_secs = 1;
    let err = call(&e, "job-slow").await.unwrap_err();
    assert_eq!(err, ProviderError::Timeout);
    assert!(err.is_retryable());
}

/// A router with one pool `p` of one endpoint, behind the alias `m`.
fn single_endpoint(e: EndpointConfig) -> Router {
    router_for(
        vec![PoolConfig {
            name: "p".into(),
            endpoints: vec![e],
        }],
        "m",
        "p",
    )
    .unwrap()
}

fn router_for(pools: Vec<PoolConfig>, alias: &str, pool: &str) -> Result<Router, ConfigError> {
    let routes = BTreeMap::from([(alias.to_owned(), pool.into())]);
    Router::new(&pools, &routes, reqwest::Client::new())
}

#[tokio::test]
async fn pool_spreads_calls_across_endpoints() {
    let sim = sim_with_keys(vec![key("a", None), key("b", None)]).await;
    let pool = PoolConfig {
        name: "large".into(),
        endpoints: vec![
            endpoint("a", &sim.base_url(), "sk-a-secret"),
            endpoint("b", &sim.base_url(), "sk-b-secret"),
        ],
    };
    let router = router_for(vec![pool], "gpt-large", "large").unwrap();
    assert_eq!(router.aliases().collect::<Vec<_>>(), ["gpt-large"]);
    let pool = router.pool("gpt-large").unwrap();
    assert_eq!(pool.name(), "large");
    let job = job();
    let mut used = Vec::new();
    for i in 0..6 {
        let permit = pool.acquire().await;
        used.push(permit.endpoint().to_owned());
        let id = format!("job-rr-{i}");
        permit
            .call(ChatRequest {
                request_id: &id,
                job: &job,
            })
            .await
            .unwrap();
    }
    // Equal endpoints alternate whenever both can serve (which the ramp after idle may briefly
    // deny one of), so each serves half.
    assert_eq!(&used[..2], ["a", "b"]);
    let stats = sim.stats();
    assert_eq!(stats.by_key.get("a"), Some(&3));
    assert_eq!(stats.by_key.get("b"), Some(&3));
}

#[tokio::test]
async fn pool_keeps_to_the_endpoint_rpm() {
    // The simulator enforces 120 rpm (capacity 2); we run a little under it, since two clocks
    // meeting exactly at the boundary would make a 429 a matter of scheduling luck.
    let sim = sim(SimConfig {
        keys: vec![key("a", Some(120))],
        burst_seconds: 1.0,
        ..SimConfig::default()
    })
    .await;
    let mut e = endpoint("a", &sim.base_url(), "sk-a-secret");
    e.rpm = 110;
    e.burst = Some(1);
    let router = single_endpoint(e);
    let pool = router.pool("m").unwrap();
    let job = job();
    let start = Instant::now();
    for i in 0..6 {
        let id = format!("job-rpm-{i}");
        pool.acquire()
            .await
            .call(ChatRequest {
                request_id: &id,
                job: &job,
            })
            .await
            .unwrap();
    }
    // Two back to back, then four spaced by about 545 ms.
    assert!(
        start.elapsed() >= Duration::from_millis(1950),
        "{:?}",
        start.elapsed()
    );
    assert!(pool.try_acquire().await.is_none());
    assert_eq!(sim.stats().rate_limited, 0);
}

#[test]
fn router_rejects_unknown_pools_and_duplicates() {
    let pool = |name: &str, ep: &str| PoolConfig {
        name: name.into(),
        endpoints: vec![endpoint(ep, "http://127.0.0.1:1/v1", "k")],
    };
    assert_eq!(
        router_for(vec![pool("large", "a")], "gpt", "small").err(),
        Some(ConfigError::UnknownPool {
            alias: "gpt".into(),
            pool: "small".into()
        })
    );
    assert_eq!(
        router_for(vec![pool("large", "a"), pool("large", "b")], "gpt", "large").err(),
        Some(ConfigError::DuplicatePool("large".into()))
    );
    assert_eq!(
        router_for(vec![pool("large", "a"), pool("small", "a")], "gpt", "large").err(),
        Some(ConfigError::DuplicateEndpoint("a".into()))
    );
    let mut zero = pool("large", "a");
    zero.endpoints[0].rpm = 0;
    assert!(matches!(
        router_for(vec![zero], "gpt", "large"),
        Err(ConfigError::ZeroRpm { .. })
    ));
}

#[test]
fn config_debug_never_shows_keys() {
    let e = endpoint("a", "http://127.0.0.1:1/v1", "sk-top-secret");
    assert!(!format!("{e:?}").contains("sk-top-secret"));
    assert_eq!(format!("{:?}", Secret::new("sk-top-secret")), "[redacted]");
    let router = single_endpoint(e);
    assert!(!format!("{router:?}").contains("sk-top-secret"));
}

#[tokio::test]
async fn the_providers_remaining_and_reset_headers_hold_the_endpoint_back() {
    // Configured far too generously; the provider's headers say the truth: 1 a second.
    let sim = sim(SimConfig {
        keys: vec![key("a", Some(60))],
        burst_seconds: 1.0,
        ..SimConfig::default()
    })
    .await;
    let mut e = endpoint("a", &sim.base_url(), "sk-a-secret");
    e.rpm = 60_000;
    e.burst = Some(100);
    let router = single_endpoint(e);
    let pool = router.pool("m").unwrap();
    let job = job();
    let response = pool
        .try_acquire()
        .await
        .unwrap()
        .call(ChatRequest {
            request_id: "first",
            job: &job,
        })
        .await
        .unwrap();
    let rate = response
        .rate
        .expect("the simulator sends x-ratelimit headers");
    assert_eq!(rate.remaining, Some(0));
    assert!(
        pool.try_acquire().await.is_none(),
        "0 remaining: wait for the reset"
    );
    assert!(
        pool.wait_time() >= Duration::from_millis(500),
        "{:?}",
        pool.wait_time()
    );
    let next = pool.acquire().await;
    next.call(ChatRequest {
        request_id: "second",
        job: &job,
    })
    .await
    .unwrap();
    assert_eq!(sim.stats().rate_limited, 0);
}

#[tokio::test]
async fn a_token_limit_holds_calls_back_and_is_corrected_by_real_usage() {
    let sim = sim(SimConfig {
        default_rpm: 0,
        ..SimConfig::default()
    })
    .await;
    let mut e = endpoint("a", &sim.base_url(), "sk-any");
    e.rpm = 60_000;
    e.burst = Some(100);
    // 600 tokens a minute: 10 a second, with 9 more of burst.
    e.tpm = Some(600);
    let router = single_endpoint(e);
    let pool = router.pool("m").unwrap();
    // An estimate of 20 fits an idle budget, and a second right after does not.
    let permit = pool.try_acquire_for(20).await.unwrap();
    assert!(pool.try_acquire_for(20).await.is_none());
    assert!(
        pool.wait_time_for(20) >= Duration::from_millis(500),
        "{:?}",
        pool.wait_time_for(20)
    );
    // The call really used fewer tokens than estimated (the simulator's 16 + a few): the
    // difference goes back, so the budget frees sooner than the estimate alone would allow.
    let before = pool.wait_time_for(5);
    let job = job();
    let used = permit
        .call(ChatRequest {
            request_id: "t1",
            job: &job,
        })
        .await
        .unwrap()
        .usage
        .total_tokens;
    assert!(used < 20, "{used}");
    assert!(
        pool.wait_time_for(5) < before,
        "refund of {} tokens",
        20 - used
    );
    // A permit dropped unused gives its whole charge back.
    tokio::time::sleep(pool.wait_time_for(19)).await;
    let unused = pool.try_acquire_for(19).await.unwrap();
    let waiting = pool.wait_time_for(19);
    drop(unused);
    assert!(pool.wait_time_for(19) < waiting);
}
