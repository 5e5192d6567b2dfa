//! Against a real Redis (`SLUICE_TEST_REDIS_URL`, default 127.0.0.1:6379): the pool and the
//! client reach the server, and keys land under the prefix.
#![allow(clippy::unwrap_used)]

use sluice_redis::redis::{self, AsyncCommands};
use sluice_redis::Redis;
use std::time::{SystemTime, UNIX_EPOCH};

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sluice-test:redis:{}-{nanos}", std::process::id())
}

#[tokio::test]
async fn the_pool_and_the_client_reach_the_same_keys() {
    let url = redis_url();
    let redis = Redis::open(&url, &unique_prefix()).unwrap();
    let pool = redis.pool(Some(2)).unwrap();
    let key = redis.key("probe");
    let mut conn = pool
        .get()
        .await
        .unwrap_or_else(|e| panic!("this test needs Redis at {url}: {e}"));
    let _: () = conn.set_ex(&key, "yes", 60).await.unwrap();

    let mut other = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let got: Option<String> = other.get(&key).await.unwrap();
    assert_eq!(got.as_deref(), Some("yes"));
    let pong: String = redis::cmd("PING").query_async(&mut other).await.unwrap();
    assert_eq!(pong, "PONG");
    let _: () = other.del(&key).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_is_not_a_setup_error() {
    // Port 1 refuses at once: setting up succeeds, only taking a connection fails.
    let redis = Redis::open("redis://127.0.0.1:1", "p").unwrap();
    let pool = redis.pool(None).unwrap();
    assert!(pool.get().await.is_err());
}
