//! Quotas against a real Redis (`SLUICE_TEST_REDIS_URL`, default 127.0.0.1:6379), two `Quotas`
//! standing for two API nodes, and the same scenarios in local mode with one node.
//!
//! Windows are aligned to the epoch, so each scenario first makes sure its windows do not end
//! mid-test (or waits for a fresh one): counts are then exact, with no timing slack.
#![allow(clippy::unwrap_used)]

use sluice_admission::{QuotaError, Quotas};
use sluice_core::quota::{QuotaConfig, QuotaRule, QuotaScope, QuotaWindow, TierQuotas};
use sluice_core::{Exceeded, Principal, Tier};
use sluice_redis::redis::{self, AsyncCommands};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test (or run) uses.
fn unique_prefix(tag: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "sluice-test:{tag}:{}-{}-{}",
        std::process::id(),
        unix_ms(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("these tests need Redis at {url}: {e}"))
}

async fn keys(url: &str, prefix: &str) -> Vec<String> {
    conn(url).await.keys(format!("{prefix}:*")).await.unwrap()
}

/// Delete every key of the test's prefix.
async fn cleanup(url: &str, prefix: &str) {
    let keys = keys(url, prefix).await;
    if !keys.is_empty() {
        let _: () = conn(url).await.del(keys).await.unwrap();
    }
}

/// Two API nodes sharing `prefix`, each with its own pool and script.
async fn two_nodes(tag: &str, config: &QuotaConfig) -> (Vec<Quotas>, String) {
    let url = redis_url();
    // Fail here, clearly, rather than have the quotas fail open and the counts look wrong.
    let _ = conn(&url).await;
    let prefix = unique_prefix(tag);
    let nodes = (0..2)
        .map(|_| Quotas::redis(&url, &prefix, config.clone()).unwrap())
        .collect();
    (nodes, prefix)
}

fn rules(rules: &[(u64, u64)]) -> Vec<QuotaRule> {
    rules
        .iter()
        .map(|&(secs, limit)| QuotaRule {
            per: QuotaWindow::from_secs(secs),
            limit,
        })
        .collect()
}

/// Quotas for the free tier only: `(window secs, limit)` per user and per tenant.
fn free(user: &[(u64, u64)], tenant: &[(u64, u64)]) -> QuotaConfig {
    QuotaConfig {
        free: TierQuotas {
            user: rules(user),
            tenant: rules(tenant),
        },
        ..QuotaConfig::default()
    }
}

fn principal(tenant: &str, user: &str) -> Principal {
    Principal {
        tenant: tenant.to_owned(),
        user: user.to_owned(),
        tier: Tier::Free,
        email: None,
        reuse_samples: false,
    }
}

/// If the current window of `window_secs` ends within `need`, wait for the next one.
async fn window_with_room(window_secs: u64, need: Duration) {
    let window_ms = window_secs * 1000;
    let left = window_ms - unix_ms() % window_ms;
    if Duration::from_millis(left) < need {
        tokio::time::sleep(Duration::from_millis(left + 20)).await;
    }
}

/// Wait until just after the next window of `window_secs` starts.
async fn next_window(window_secs: u64) {
    let window_ms = window_secs * 1000;
    let left = window_ms - unix_ms() % window_ms;
    tokio::time::sleep(Duration::from_millis(left + 20)).await;
}

/// Take on node `i % nodes.len()`, so consecutive takes alternate between the nodes.
async fn take(nodes: &[Quotas], i: usize, p: &Principal) -> Result<(), Exceeded> {
    nodes[i % nodes.len()].take(p).await
}

fn expect_refused(r: Result<(), Exceeded>, scope: QuotaScope, what: &str) -> Exceeded {
    let e = r.expect_err(what);
    assert_eq!(e.scope, scope, "{what}: {e}");
    e
}

// The scenarios, run on two Redis nodes and on one local node.

/// The limit-th take passes and the next fails, whichever node each lands on.
async fn one_limit_across_nodes(nodes: &[Quotas]) {
    window_with_room(3600, Duration::from_secs(30)).await;
    let p = principal("acme", "u1");
    for i in 0..7 {
        assert!(take(nodes, i, &p).await.is_ok(), "take {} of 7", i + 1);
    }
    for i in 7..9 {
        let e = expect_refused(take(nodes, i, &p).await, QuotaScope::User, "over the limit");
        assert_eq!((e.limit, e.window_secs), (7, 3600));
        assert!(e.retry_after <= Duration::from_secs(3600));
        assert!(e.to_string().starts_with(
            "user u1 of tenant acme may submit 7 jobs per hour; the window resets in"
        ));
    }
    // Only that user is limited.
    assert!(take(nodes, 0, &principal("acme", "u2")).await.is_ok());
}

/// A user's own limit and its tenant's shared limit apply independently.
async fn user_and_tenant_limits(nodes: &[Quotas]) {
    window_with_room(3600, Duration::from_secs(30)).await;
    let (u1, u2) = (principal("acme", "u1"), principal("acme", "u2"));
    assert!(take(nodes, 0, &u1).await.is_ok());
    assert!(take(nodes, 1, &u1).await.is_ok());
    expect_refused(take(nodes, 2, &u1).await, QuotaScope::User, "u1's limit");
    assert!(take(nodes, 3, &u2).await.is_ok());
    let e = expect_refused(
        take(nodes, 4, &u2).await,
        QuotaScope::Tenant,
        "acme's limit",
    );
    assert_eq!(e.limit, 3);
    assert!(e
        .to_string()
        .starts_with("tenant acme may submit 3 jobs per hour"));
    // Another tenant's user of the same name has counters of its own.
    assert!(take(nodes, 5, &principal("globex", "u1")).await.is_ok());
}

/// A 2-second window refuses at its limit and admits again once the next one starts.
async fn short_window_resets(nodes: &[Quotas]) {
    let p = principal("acme", "u1");
    next_window(2).await;
    assert!(take(nodes, 0, &p).await.is_ok());
    assert!(take(nodes, 1, &p).await.is_ok());
    let e = expect_refused(take(nodes, 2, &p).await, QuotaScope::User, "2 per 2 s");
    assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(2));
    assert!(e.to_string().contains("2 jobs per 2 seconds"), "{e}");
    tokio::time::sleep(e.retry_after + Duration::from_millis(20)).await;
    assert!(take(nodes, 3, &p).await.is_ok(), "a new window");
    assert!(take(nodes, 4, &p).await.is_ok());
    expect_refused(take(nodes, 5, &p).await, QuotaScope::User, "full again");
}

/// Refusals count against no counter: neither the one that refused nor the others.
async fn refusals_are_not_counted(nodes: &[Quotas]) {
    window_with_room(3600, Duration::from_secs(30)).await;
    // Free: the user's 1-per-2-s refuses; the tenant's 3 per hour must not see the refusals.
    let p = principal("acme", "u1");
    next_window(2).await;
    assert!(take(nodes, 0, &p).await.is_ok());
    for i in 0..20 {
        expect_refused(take(nodes, i, &p).await, QuotaScope::User, "1 per 2 s");
    }
    next_window(2).await;
    assert!(take(nodes, 1, &p).await.is_ok());
    next_window(2).await;
    assert!(take(nodes, 0, &p).await.is_ok());
    next_window(2).await;
    expect_refused(take(nodes, 1, &p).await, QuotaScope::Tenant, "3 per hour");

    // Basic: the tenant's 1-per-2-s refuses; the user's 2 per hour, checked first and under its
    // limit, must not count the refusals either.
    let p = Principal {
        tier: Tier::Basic,
        ..principal("initech", "u1")
    };
    next_window(2).await;
    assert!(take(nodes, 0, &p).await.is_ok());
    for i in 0..20 {
        expect_refused(take(nodes, i, &p).await, QuotaScope::Tenant, "1 per 2 s");
    }
    next_window(2).await;
    assert!(take(nodes, 1, &p).await.is_ok(), "the user has 1 of 2");
    next_window(2).await;
    expect_refused(take(nodes, 0, &p).await, QuotaScope::User, "2 per hour");
}

fn refusal_config() -> QuotaConfig {
    QuotaConfig {
        basic: TierQuotas {
            user: rules(&[(3600, 2)]),
            tenant: rules(&[(2, 1)]),
        },
        ..free(&[(2, 1)], &[(3600, 3)])
    }
}

#[tokio::test]
async fn redis_two_nodes_enforce_one_limit() {
    let (nodes, prefix) = two_nodes("one-limit", &free(&[(3600, 7)], &[])).await;
    one_limit_across_nodes(&nodes).await;
    cleanup(&redis_url(), &prefix).await;
}

#[tokio::test]
async fn redis_user_and_tenant_limits() {
    let (nodes, prefix) = two_nodes("user-tenant", &free(&[(3600, 2)], &[(3600, 3)])).await;
    user_and_tenant_limits(&nodes).await;
    cleanup(&redis_url(), &prefix).await;
}

#[tokio::test]
async fn redis_short_window_resets() {
    let (nodes, prefix) = two_nodes("reset", &free(&[(2, 2)], &[])).await;
    short_window_resets(&nodes).await;
    cleanup(&redis_url(), &prefix).await;
}

#[tokio::test]
async fn redis_refusals_are_not_counted() {
    let (nodes, prefix) = two_nodes("refusals", &refusal_config()).await;
    refusals_are_not_counted(&nodes).await;
    cleanup(&redis_url(), &prefix).await;
}

#[tokio::test]
async fn redis_concurrent_takes_admit_exactly_the_limit() {
    let (nodes, prefix) = two_nodes("concurrent", &free(&[(3600, 20)], &[])).await;
    window_with_room(3600, Duration::from_secs(30)).await;
    let p = principal("acme", "u1");
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let node = nodes[i % 2].clone();
            let p = p.clone();
            tokio::spawn(async move { node.take(&p).await.is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 20);
    cleanup(&redis_url(), &prefix).await;
}

#[tokio::test]
async fn redis_keys_live_under_the_prefix_and_expire() {
    let url = redis_url();
    let (nodes, prefix) = two_nodes("keys", &free(&[(60, 5)], &[(3600, 50)])).await;
    assert!(nodes[0].take(&principal("a:b", "c")).await.is_ok());
    let mut found = keys(&url, &prefix).await;
    found.sort();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with(&format!("{prefix}:quota:tenant:a%3Ab:3600:")));
    assert!(found[1].starts_with(&format!("{prefix}:quota:user:a%3Ab:c:60:")));
    let mut c = conn(&url).await;
    let ttl: i64 = c.pttl(&found[1]).await.unwrap();
    assert!(
        ttl > 0 && ttl <= 65_000,
        "a minute window plus slack: {ttl} ms"
    );
    let ttl: i64 = c.pttl(&found[0]).await.unwrap();
    assert!(
        ttl > 0 && ttl <= 3_605_000,
        "an hour window plus slack: {ttl} ms"
    );
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn unreachable_redis_admits() {
    let q = Quotas::redis(
        "redis://127.0.0.1:1",
        &unique_prefix("down"),
        free(&[(3600, 1)], &[(3600, 1)]),
    )
    .unwrap();
    let p = principal("acme", "u1");
    let started = Instant::now();
    for _ in 0..5 {
        assert!(q.take(&p).await.is_ok(), "fails open");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn bad_setup_is_an_error() {
    let config = QuotaConfig::default();
    assert!(matches!(
        Quotas::redis("redis://127.0.0.1:6379", "", config.clone()),
        Err(QuotaError::EmptyPrefix)
    ));
    let err = Quotas::redis("http://user:s3cret@host", "p", config).unwrap_err();
    assert!(matches!(err, QuotaError::InvalidUrl(_)));
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[test]
fn is_limited_follows_the_config() {
    let q = Quotas::local(free(&[(60, 1)], &[]));
    assert!(q.is_limited(Tier::Free));
    assert!(!q.is_limited(Tier::Pro));
}

#[tokio::test]
async fn unlimited_tiers_are_never_refused() {
    let q = Quotas::local(free(&[(60, 1)], &[]));
    let p = Principal {
        tier: Tier::Enterprise,
        ..principal("acme", "u1")
    };
    for _ in 0..100 {
        assert!(q.take(&p).await.is_ok());
    }
}

#[tokio::test]
async fn local_one_limit() {
    one_limit_across_nodes(&[Quotas::local(free(&[(3600, 7)], &[]))]).await;
}

#[tokio::test]
async fn local_user_and_tenant_limits() {
    user_and_tenant_limits(&[Quotas::local(free(&[(3600, 2)], &[(3600, 3)]))]).await;
}

#[tokio::test]
async fn local_short_window_resets() {
    short_window_resets(&[Quotas::local(free(&[(2, 2)], &[]))]).await;
}

#[tokio::test]
async fn local_refusals_are_not_counted() {
    refusals_are_not_counted(&[Quotas::local(refusal_config())]).await;
}

#[tokio::test]
async fn local_clones_share_counters() {
    let q = Quotas::local(free(&[(3600, 3)], &[]));
    window_with_room(3600, Duration::from_secs(30)).await;
    let nodes = [q.clone(), q];
    let p = principal("acme", "u1");
    for i in 0..3 {
        assert!(take(&nodes, i, &p).await.is_ok());
    }
    expect_refused(take(&nodes, 3, &p).await, QuotaScope::User, "clones share");
}

/// A private redis-server that speaks only TLS, with a self-signed certificate made for it;
/// stopped when dropped.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_redis() -> TlsRedis {
    let dir = std::env::temp_dir().join(unique_prefix("tls").replace(':', "-"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg("/CN=127.0.0.1")
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    TlsRedis {
        child,
        port,
        _dir: TempDir(dir),
    }
}

/// ElastiCache with encryption in transit speaks only TLS: `rediss://` URLs must work. The
/// limit is enforced, which only a reached Redis does (an unreachable one fails open).
#[tokio::test]
async fn quotas_are_counted_in_a_redis_that_speaks_only_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = tls_redis();
    let url = format!("rediss://127.0.0.1:{}/#insecure", redis.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the TLS redis-server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config = free(&[(60, 2)], &[]);
    let quotas = Quotas::redis(&url, &unique_prefix("tls"), config).unwrap();
    window_with_room(60, Duration::from_secs(5)).await;
    let ada = principal("acme", "ada");
    quotas.take(&ada).await.unwrap();
    quotas.take(&ada).await.unwrap();
    expect_refused(
        quotas.take(&ada).await,
        QuotaScope::User,
        "the third over TLS",
    );
}
