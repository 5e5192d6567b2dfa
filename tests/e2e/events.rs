//! Delivery without polling: WebSocket subscribers on one API node see jobs submitted through
//! another, SSE resumes from `Last-Event-ID`, streamed jobs' text arrives as deltas, and the
//! tenant wall and authentication hold on both.

use crate::helpers::{job_body, sim_always_failing, spawn_app, AppOptions};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sluice_core::{JobState, RequestId, Tier};
use sluice_sim::{Faults, SimConfig};
use std::collections::HashMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open `/v1/stream` on `api`, authenticated by header when `key` is given.
async fn connect(api: &str, key: Option<&str>) -> Socket {
    let url = format!("{}/v1/stream", api.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
}

/// The next JSON text message (pings skipped); `None` when the socket closed.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("no message within 30 s")?;
        match message.ok()? {
            Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_websocket_on_one_node_sees_every_change_of_jobs_submitted_through_another() {
    let mut app = spawn_app(AppOptions {
        workers: 2,
        redis: true,
        ..Default::default()
    })
    .await;
    let (_node_b, node_b) = app.start_api_node().await;
    let key = app.key("acme", Tier::Pro).await;
    let mut socket = connect(&app.api, Some(&key)).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");
    send(&mut socket, json!({ "type": "subscribe", "all": true })).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "subscribed");

    let mut ids = Vec::new();
    for n in 0..100 {
        let response = app
            .http
            .post(format!("{node_b}/v1/jobs"))
            .bearer_auth(&key)
            .json(&job_body(&format!("through b {n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        ids.push(
            body["request_id"]
                .as_str()
                .unwrap()
                .parse::<RequestId>()
                .unwrap(),
        );
    }
    let mut seen: HashMap<RequestId, Vec<(i64, String)>> = HashMap::new();
    let mut finished = 0;
    while finished < ids.len() {
        let message = next_json(&mut socket).await.expect("socket closed early");
        assert_eq!(message["type"], "event", "{message}");
        let id: RequestId = message["request_id"].as_str().unwrap().parse().unwrap();
        let state = message["state"].as_str().unwrap().to_owned();
        if state == "succeeded" {
            finished += 1;
        }
        seen.entry(id)
            .or_default()
            .push((message["seq"].as_i64().unwrap(), state));
    }
    // Each job's stored log, exactly once and in order.
    for id in &ids {
        let stored: Vec<(i64, String)> = app
            .store
            .events(*id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (i64::from(e.seq), e.state.to_string()))
            .collect();
        assert_eq!(seen.get(id), Some(&stored), "job {id}");
        assert_eq!(stored.first().map(|e| e.1.as_str()), Some("queued"));
    }
    app.cleanup().await;
}

/// Read SSE frames from a response until `stop` says so; each frame as (id, event, data).
async fn read_sse(
    mut response: reqwest::Response,
    mut stop: impl FnMut(&(Option<String>, String, Value)) -> bool,
) -> Vec<(Option<String>, String, Value)> {
    let mut buffer = String::new();
    let mut frames = Vec::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(30), response.chunk())
            .await
            .expect("no SSE data within 30 s")
            .unwrap();
        let Some(chunk) = chunk else {
            return frames;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let parsed = (id, event, serde_json::from_str(&data).unwrap());
            let done = stop(&parsed);
            frames.push(parsed);
            if done {
                return frames;
            }
        }
    }
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_without_gaps_or_duplicates() {
    // Two 500s per job: queued, running, retrying, running, retrying, running, succeeded.
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            faults: Faults {
                fail_first_per_job: 2,
                fail_status: 500,
                ..Faults::default()
            },
            ..SimConfig::default()
        },
        retry_base_secs: 0.5,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "follow me").await;
    let url = format!("{}/v1/jobs/{id}/events", app.api);
    let first = app.http.get(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(first.status(), reqwest::StatusCode::OK);
    // Hang up right after the first `running`.
    let before = read_sse(first, |(_, _, data)| data["state"] == "running").await;
    let last_id = before.last().unwrap().0.clone().unwrap();
    let again = app
        .http
        .get(&url)
        .bearer_auth(&key)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    // The stream ends by itself after the terminal event.
    let after = read_sse(again, |_| false).await;
    let seqs: Vec<i64> = before
        .iter()
        .chain(&after)
        .map(|(_, event, data)| {
            assert_eq!(event, "state");
            data["seq"].as_i64().unwrap()
        })
        .collect();
    let stored = app.store.events(id).await.unwrap();
    assert_eq!(seqs, (1..=stored.len() as i64).collect::<Vec<_>>());
    assert_eq!(after.last().unwrap().2["state"], "succeeded");
    assert_eq!(stored.len(), 7, "{stored:?}");
    // Resuming after the end answers at once with nothing.
    let done = app
        .http
        .get(&url)
        .bearer_auth(&key)
        .header("last-event-id", "7")
        .send()
        .await
        .unwrap();
    assert!(read_sse(done, |_| false).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_streamed_jobs_deltas_reach_websocket_and_sse_and_add_up_to_the_result() {
    let app = spawn_app(AppOptions {
        redis: true,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    // Block the pool until both subscribers are in place, so no delta goes out before them.
    app.sim.set_faults(Faults {
        always_fail: Some(503),
        ..Faults::default()
    });
    let mut body = job_body("stream this please");
    body["stream"] = json!(true);
    let (status, accepted) = app.post_job(&key, &body).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{accepted}");
    let id: RequestId = accepted["request_id"].as_str().unwrap().parse().unwrap();
    let mut socket = connect(&app.api, Some(&key)).await;
    next_json(&mut socket).await.unwrap();
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": [id.to_string()] }),
    )
    .await;
    // Unblock only once the server has the subscription, or the job may finish before it.
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "subscribed");
    let sse = app
        .http
        .get(format!("{}/v1/jobs/{id}/events", app.api))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    app.sim.set_faults(Faults::default());

    let mut ws_text = String::new();
    let mut ws_index = 0;
    let mut seen = Vec::new();
    loop {
        let message = next_json(&mut socket).await.unwrap();
        seen.push(message.clone());
        if message["type"] == "delta" {
            assert_eq!(message["index"], ws_index);
            ws_index += 1;
            ws_text.push_str(message["text"].as_str().unwrap());
        }
        if message["state"] == "succeeded" {
            break;
        }
    }
    let frames = read_sse(sse, |_| false).await;
    let sse_text: String = frames
        .iter()
        .filter(|(_, event, _)| event == "delta")
        .map(|(_, _, data)| data["text"].as_str().unwrap().to_owned())
        .collect();
    let job = app.store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    let content = job.result.unwrap()["content"].as_str().unwrap().to_owned();
    assert!(ws_index > 1, "the answer came in several deltas: {seen:?}");
    assert_eq!(ws_text, content);
    assert_eq!(sse_text, content);
    app.cleanup().await;
}

#[tokio::test]
async fn the_tenant_wall_and_authentication_hold_on_streams() {
    let app = spawn_app(AppOptions::default()).await;
    let acme = app.key("acme", Tier::Pro).await;
    let globex = app.key("globex", Tier::Pro).await;
    let theirs = app.submit(&globex, "not yours").await;
    let unknown = RequestId::new();

    // SSE: another tenant's job answers exactly like an unknown one.
    let ask = |id: RequestId| {
        app.http
            .get(format!("{}/v1/jobs/{id}/events", app.api))
            .bearer_auth(&acme)
            .send()
    };
    let (a, b) = (ask(theirs).await.unwrap(), ask(unknown).await.unwrap());
    assert_eq!(a.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(b.status(), a.status());
    assert_eq!(a.text().await.unwrap(), b.text().await.unwrap());

    // WebSocket: the same, message for message.
    let mut socket = connect(&app.api, None).await;
    send(&mut socket, json!({ "type": "auth", "api_key": acme })).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");
    let mut answers = Vec::new();
    for id in [theirs, unknown] {
        send(
            &mut socket,
            json!({ "type": "subscribe", "request_ids": [id.to_string()] }),
        )
        .await;
        let answer = next_json(&mut socket).await.unwrap();
        assert_eq!(answer["code"], "not_found");
        answers.push((answer["message"].clone(), answer["subscribed"].clone()));
    }
    assert_eq!(answers[0], answers[1]);

    // Unauthenticated: a bad key, or no auth message, closes with 4401.
    for first in [
        Some(json!({ "type": "auth", "api_key": "sk_sluice_wrong" })),
        Some(json!({ "type": "subscribe", "all": true })),
    ] {
        let mut socket = connect(&app.api, None).await;
        if let Some(first) = first {
            send(&mut socket, first).await;
        }
        let close = loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let frame = close.expect("a close code");
        assert_eq!(u16::from(frame.code), 4401);
    }
    app.cleanup().await;
}

/// Open `/v1/stream` with a tiny receive buffer, subscribed to all of the key's jobs, and
/// read nothing more: the server's writes to it block as soon as the kernel buffers fill.
async fn stalled_subscriber(api: &str, key: &str) -> Socket {
    let addr: std::net::SocketAddr = api.trim_start_matches("http://").parse().unwrap();
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4_096).unwrap();
    let stream = tcp.connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}/v1/stream")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");
    send(&mut socket, json!({ "type": "subscribe", "all": true })).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "subscribed");
    socket
}

/// Submit `n` streamed jobs of `words` words each: several megabytes of deltas, more than
/// the kernel buffers of a connection hold.
async fn flood(app: &crate::helpers::TestApp, key: &str, n: usize, words: u32) -> Vec<RequestId> {
    let mut ids = Vec::new();
    for chunk in 0..n.div_ceil(25) {
        let batch = (0..25.min(n - chunk * 25)).map(|i| {
            let mut body = job_body(&format!("flood {chunk}-{i}"));
            body["stream"] = json!(true);
            body["max_tokens"] = json!(words);
            async move { app.post_job(key, &body).await }
        });
        for (status, accepted) in futures::future::join_all(batch).await {
            assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{accepted}");
            ids.push(accepted["request_id"].as_str().unwrap().parse().unwrap());
        }
    }
    ids
}

/// Read `socket` to its end: the text messages before it, and the close frame if one came.
async fn drain(mut socket: Socket) -> (usize, Option<u16>) {
    let mut texts = 0;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("the stalled connection neither sent nor ended within 30 s");
        match next {
            Some(Ok(Message::Text(_))) => texts += 1,
            Some(Ok(Message::Close(frame))) => {
                return (texts, frame.map(|f| u16::from(f.code)));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (texts, None),
        }
    }
}

/// Words per answer in the flood tests.
const WORDS: u32 = 400;

/// An app with Redis whose simulator answers `WORDS` words, with these `[streams]` settings.
async fn streaming_app(concurrency: usize, streams: &str) -> crate::helpers::TestApp {
    spawn_app(AppOptions {
        redis: true,
        concurrency,
        sim: SimConfig {
            default_rpm: 0,
            completion_tokens: WORDS,
            ..SimConfig::default()
        },
        extra_toml: streams.into(),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_subscriber_that_never_reads_is_cut_off_with_a_reason_and_holds_up_nobody() {
    const JOBS: usize = 150;
    // The simulator sends a whole answer at once: fewer jobs at a time keep the bursts a
    // reading subscriber sees within its buffer. This test's own reader shares two cores with
    // everything else: a buffer of 16,384 messages absorbs those bursts for it and still
    // overflows for a reader that stopped. The stalled client resumes reading long before its
    // writes would time out.
    let app = streaming_app(8, "[streams]\nbuffer = 16384\nwrite_timeout_secs = 300\n").await;
    let key = app.key("acme", Tier::Pro).await;
    let stalled = stalled_subscriber(&app.api, &key).await;
    let mut reader = connect(&app.api, Some(&key)).await;
    next_json(&mut reader).await.unwrap();
    send(&mut reader, json!({ "type": "subscribe", "all": true })).await;
    assert_eq!(next_json(&mut reader).await.unwrap()["type"], "subscribed");
    let collect = tokio::spawn(async move {
        let mut states: HashMap<String, Vec<(i64, String)>> = HashMap::new();
        let (mut deltas, mut ended) = (0usize, 0usize);
        while ended < JOBS {
            let Some(message) = next_json(&mut reader).await else {
                panic!("the reading subscriber was cut off after {deltas} deltas and {ended} jobs");
            };
            match message["type"].as_str() {
                Some("delta") => deltas += 1,
                Some("event") => {
                    let id = message["request_id"].as_str().unwrap().to_owned();
                    let state = message["state"].as_str().unwrap().to_owned();
                    ended += usize::from(state == "succeeded");
                    let seq = message["seq"].as_i64().unwrap();
                    states.entry(id).or_default().push((seq, state));
                }
                other => panic!("unexpected message {other:?}: {message}"),
            }
        }
        (states, deltas)
    });

    let ids = flood(&app, &key, JOBS, WORDS).await;
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    let (states, deltas) = tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .expect("the reading subscriber fell behind")
        .unwrap();
    // The reader got every state change of every job, in order, each once.
    for id in &ids {
        let stored: Vec<(i64, String)> = app
            .store
            .events(*id)
            .await
            .unwrap()
            .iter()
            .map(|e| (i64::from(e.seq), e.state.to_string()))
            .collect();
        assert_eq!(states[&id.to_string()], stored, "job {id}");
        assert_eq!(app.state(*id).await, JobState::Succeeded);
    }
    assert!(deltas > JOBS * WORDS as usize / 2, "only {deltas} deltas");

    // The stalled one gets what was already on its way, then the overload close code.
    let (texts, code) = drain(stalled).await;
    assert_eq!(code, Some(4408), "after {texts} messages");
    assert!(
        texts < deltas,
        "the stalled subscriber got {texts} of {deltas} messages: it was never cut off"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_connection_that_stays_stalled_past_the_write_timeout_is_dropped() {
    const JOBS: usize = 120;
    // A buffer too big to fill: only the write timeout can end the connection.
    let app = streaming_app(32, "[streams]\nbuffer = 1000000\nwrite_timeout_secs = 1\n").await;
    let key = app.key("acme", Tier::Pro).await;
    let stalled = stalled_subscriber(&app.api, &key).await;
    let ids = flood(&app, &key, JOBS, WORDS).await;
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The server gave up on its blocked write: what the kernel held arrives, then the
    // connection ends without a closing handshake (there was no room left to send one).
    let (texts, code) = drain(stalled).await;
    assert_eq!(code, None, "after {texts} messages");
    assert!(texts > 0);
    app.cleanup().await;
}

#[tokio::test]
async fn malformed_websocket_messages_get_a_json_error_and_the_socket_stays_open() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let mut socket = connect(&app.api, Some(&key)).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");
    for bad in [
        "not json at all",
        r#"{"type":"dance"}"#,
        r#"{"type":"subscribe","request_ids":"not-a-list"}"#,
        r#"{"type":"subscribe","all":true,"extra":1}"#,
        "[]",
    ] {
        socket.send(Message::Text(bad.into())).await.unwrap();
        let answer = next_json(&mut socket).await.expect("socket closed");
        assert_eq!(answer["type"], "error", "{bad}: {answer}");
        assert_eq!(answer["code"], "invalid_message", "{bad}: {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }
    socket
        .send(Message::Binary(vec![0, 159, 146, 150].into()))
        .await
        .unwrap();
    let answer = next_json(&mut socket).await.expect("socket closed");
    assert_eq!(answer["code"], "invalid_message", "{answer}");
    // A second auth is refused in words too; the socket still works afterwards.
    send(&mut socket, json!({ "type": "auth", "api_key": key })).await;
    let answer = next_json(&mut socket).await.unwrap();
    assert_eq!(answer["code"], "already_authenticated");
    let id = app.submit(&key, "still listening").await;
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": [id.to_string()] }),
    )
    .await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "subscribed");
    loop {
        let message = next_json(&mut socket).await.unwrap();
        if message["state"] == "succeeded" {
            break;
        }
    }
    app.cleanup().await;
}

/// `sluice dlq replay` is a process of its own, yet its store announces the replay on the bus
/// like any other change: a subscriber hears of it at once, not from the hub's poll (which, with
/// Redis, leaves events two seconds to settle first).
#[tokio::test]
async fn a_subscriber_sees_a_job_replayed_by_the_cli_within_a_second() {
    let app = spawn_app(AppOptions {
        redis: true,
        sim: sim_always_failing(400),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "dies, then comes back").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    assert_eq!(app.state(id).await, JobState::Dead);
    let died_at = app.store.events(id).await.unwrap().last().unwrap().seq;

    let mut socket = connect(&app.api, Some(&key)).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": [id.to_string()] }),
    )
    .await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "subscribed");
    app.sim.set_faults(Faults::default());
    let out = app.cli(&["dlq", "replay", &id.to_string()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let replayed = loop {
        let message = next_json(&mut socket).await.expect("the socket stays open");
        if message["type"] == "event" && message["seq"].as_i64().unwrap() > i64::from(died_at) {
            break message;
        }
    };
    let heard = chrono::Utc::now();
    assert_eq!(replayed["state"], "queued", "{replayed}");
    let at: chrono::DateTime<chrono::Utc> = replayed["at"].as_str().unwrap().parse().unwrap();
    let late = heard - at;
    assert!(
        late < chrono::Duration::seconds(1),
        "the replay reached the subscriber {late} after it was stored"
    );
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    assert_eq!(app.state(id).await, JobState::Succeeded);
    app.cleanup().await;
}
