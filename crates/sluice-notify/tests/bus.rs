//! The event bus over a real Redis: once `listening` says so, what another process publishes is
//! heard, and against an unreachable Redis it says no within its timeout.
#![allow(clippy::unwrap_used)]

use sluice_core::RequestId;
use sluice_notify::{BusMessage, EventBus};
use sluice_testkit::{redis_url, unique};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_listening_a_bus_hears_the_first_message_another_publishes() {
    let prefix = unique("bus");
    // Ten fresh pairs: without waiting for the subscription, the first message is often lost.
    for round in 0..10 {
        let listener = EventBus::redis(&redis_url(), &prefix).unwrap();
        let mut heard = listener.subscribe();
        assert!(
            listener.listening(Duration::from_secs(10)).await,
            "round {round}: the bus did not subscribe"
        );
        let publisher = EventBus::redis(&redis_url(), &prefix).unwrap();
        let sent = BusMessage::Delta {
            request_id: RequestId::new(),
            tenant: "acme".into(),
            attempt: 1,
            index: 0,
            text: format!("round {round}"),
        };
        publisher.publish(sent.clone());
        publisher.flush(Duration::from_secs(5)).await;
        let got = tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the message was never heard"))
            .unwrap();
        assert_eq!(got, sent);
    }
}

#[tokio::test]
async fn a_bus_that_cannot_reach_redis_is_not_listening_and_one_that_does_not_listen_is() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = EventBus::redis(&format!("redis://127.0.0.1:{port}"), "bus").unwrap();
    // Nothing subscribed yet: nothing to wait for.
    assert!(unreachable.listening(Duration::from_millis(100)).await);
    let _heard = unreachable.subscribe();
    assert!(!unreachable.listening(Duration::from_millis(300)).await);
    assert!(EventBus::local().listening(Duration::ZERO).await);
}
