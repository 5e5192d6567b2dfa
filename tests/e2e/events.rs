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
    let sse = app.open_events(&key, id).await;
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
    let (a, b) = (
        app.open_events(&acme, theirs).await,
        app.open_events(&acme, unknown).await,
    );
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
    // Pings alone would keep a connection the server never gave up on open for ever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled connection was still open after 90 s ({texts} messages read)"
        );
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

/// Settings under which a stalled subscriber passes a 64 KiB bound early in a flood while no
/// write times out for two minutes: only the cut-off and `close_timeout_secs` end it.
fn stalling_streams(close_timeout_secs: u32) -> String {
    format!(
        "[http]\nwrite_timeout_secs = 120\n\
         [streams]\nbuffer_bytes = 65536\nwrite_timeout_secs = 120\n\
         close_timeout_secs = {close_timeout_secs}\n"
    )
}

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
    // writes (and the close frame behind them) would time out.
    let app = streaming_app(
        8,
        "[streams]\nbuffer_bytes = 4194304\nwrite_timeout_secs = 300\nclose_timeout_secs = 300\n",
    )
    .await;
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
    const ROUNDS: usize = 4;
    // A buffer too big to fill: only the write timeout can end the connection.
    let app = streaming_app(
        32,
        "[streams]\nbuffer_bytes = 1073741824\nwrite_timeout_secs = 1\n",
    )
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let stalled = stalled_subscriber(&app.api, &key).await;
    assert_eq!(websocket_subscribers(&app).await, 1.0);
    // A write blocks only once the kernel buffers are full, and the server's send buffer grows
    // to megabytes (`tcp_wmem`): flood until the server has given the connection up, as its
    // subscriber gauge says, rather than guess how much it takes.
    let mut rounds = 0;
    while rounds < ROUNDS {
        let ids = flood(&app, &key, JOBS, WORDS).await;
        app.wait_terminal(&ids, Duration::from_secs(120)).await;
        rounds += 1;
        if websocket_subscribers_reach(&app, 0.0).await {
            break;
        }
    }
    assert_eq!(
        websocket_subscribers(&app).await,
        0.0,
        "the server still held the stalled connection after {rounds} floods of {JOBS} jobs"
    );
    // The server gave up on its blocked write: what the kernel held arrives, then the
    // connection ends without a closing handshake (there was no room left to send one).
    let (texts, code) = drain(stalled).await;
    assert_eq!(code, None, "after {texts} messages");
    assert!(texts > 0);
    app.cleanup().await;
}

/// `sluice_subscribers{kind="websocket"}`: the WebSocket subscribers the app's API holds open.
async fn websocket_subscribers(app: &crate::helpers::TestApp) -> f64 {
    crate::metrics::Scrape::of(app, &format!("{}/metrics", app.api))
        .await
        .sum("sluice_subscribers", &[("kind", "websocket")])
}

/// Whether [`websocket_subscribers`] comes to `n` within about 10 s (a blocked write gives up
/// after its timeout, and the flood's last frames may still be on their way to it).
async fn websocket_subscribers_reach(app: &crate::helpers::TestApp, n: f64) -> bool {
    for _ in 0..100 {
        if websocket_subscribers(app).await == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `sluice_subscribers_cut_off_total{kind}` on the app's API.
async fn cut_off(app: &crate::helpers::TestApp, kind: &str) -> f64 {
    crate::metrics::Scrape::of(app, &format!("{}/metrics", app.api))
        .await
        .sum("sluice_subscribers_cut_off_total", &[("kind", kind)])
}

/// [`cut_off`] once it reaches `n`, or after about 10 s, whatever it is then.
async fn cut_off_at_least(app: &crate::helpers::TestApp, kind: &str, n: usize) -> f64 {
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = cut_off(app, kind).await;
        if counted >= n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    counted
}

#[tokio::test]
async fn many_stalled_subscribers_are_each_cut_off_with_4408_and_a_reader_misses_nothing() {
    const STALLED: usize = 100;
    const JOBS: usize = 150;
    const PLAIN: usize = 20;
    // A small bound in bytes, so each stalled socket passes it early in the flood. The stalled
    // clients read only after the flood: the close frame waits behind what their connection
    // already holds, so the close timeout (and the socket's own write timeout, which would
    // drop them sooner) is long enough for them to get to it.
    let app = streaming_app(16, &stalling_streams(120)).await;
    let key = app.key("acme", Tier::Pro).await;
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(stalled_subscriber(&app.api, &key).await);
    }
    // A normal subscriber, following plain jobs submitted during the flood, one by one.
    let mut reader = connect(&app.api, Some(&key)).await;
    assert_eq!(next_json(&mut reader).await.unwrap()["type"], "ready");
    let plain = async {
        let mut seen: HashMap<RequestId, Vec<(i64, String)>> = HashMap::new();
        let mut ids = Vec::new();
        for n in 0..PLAIN {
            let id = app.submit(&key, &format!("plain {n}")).await;
            ids.push(id);
            send(
                &mut reader,
                json!({ "type": "subscribe", "request_ids": [id.to_string()] }),
            )
            .await;
        }
        let (mut subscribed, mut ended) = (0, 0);
        while subscribed < PLAIN || ended < PLAIN {
            let message = next_json(&mut reader)
                .await
                .expect("the reading subscriber was cut off");
            match message["type"].as_str() {
                Some("subscribed") => subscribed += 1,
                Some("event") => {
                    let id: RequestId = message["request_id"].as_str().unwrap().parse().unwrap();
                    let state = message["state"].as_str().unwrap().to_owned();
                    ended += usize::from(state == "succeeded");
                    let seq = message["seq"].as_i64().unwrap();
                    seen.entry(id).or_default().push((seq, state));
                }
                other => panic!("unexpected message {other:?}: {message}"),
            }
        }
        (ids, seen)
    };
    let (flooded, (ids, seen)) = tokio::join!(flood(&app, &key, JOBS, WORDS), plain);
    app.wait_terminal(&flooded, Duration::from_secs(120)).await;
    for id in &ids {
        let stored: Vec<(i64, String)> = app
            .store
            .events(*id)
            .await
            .unwrap()
            .iter()
            .map(|e| (i64::from(e.seq), e.state.to_string()))
            .collect();
        assert_eq!(seen.get(id), Some(&stored), "job {id}");
    }
    // Cut off while still not reading: their buffers are gone before they read a byte.
    let counted = cut_off_at_least(&app, "websocket", STALLED).await;
    assert_eq!(counted, STALLED as f64, "stalled subscribers cut off");
    // Then each, reading at last, gets what its connection held and the overload close code.
    let codes = futures::future::join_all(stalled.into_iter().map(drain)).await;
    for (n, (texts, code)) in codes.into_iter().enumerate() {
        assert_eq!(
            code,
            Some(4408),
            "stalled subscriber {n}, after {texts} messages"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_cut_off_subscriber_that_speaks_before_reading_still_gets_4408() {
    const JOBS: usize = 150;
    // A browser answers pings and may send a message at any time. Whatever the peer sends
    // after being cut off must not turn the server's close into a reset, which would throw
    // away everything the peer had not read yet, the close frame with it.
    let app = streaming_app(16, &stalling_streams(120)).await;
    let key = app.key("acme", Tier::Pro).await;
    let mut stalled = stalled_subscriber(&app.api, &key).await;
    let ids = flood(&app, &key, JOBS, WORDS).await;
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    let counted = cut_off_at_least(&app, "websocket", 1).await;
    assert_eq!(counted, 1.0, "the stalled subscriber was not cut off");
    // Cut off, not yet reading: it speaks first (a ping and a message), then reads.
    stalled
        .send(Message::Ping(Default::default()))
        .await
        .unwrap();
    send(
        &mut stalled,
        json!({ "type": "unsubscribe", "request_ids": [] }),
    )
    .await;
    let (texts, code) = drain(stalled).await;
    assert_eq!(code, Some(4408), "after {texts} messages");
    assert!(texts > 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_cut_off_websocket_that_never_reads_is_dropped_after_the_close_timeout() {
    const JOBS: usize = 120;
    // Writes may block for two minutes: only the close timeout can end this connection soon.
    let app = streaming_app(16, &stalling_streams(1)).await;
    let key = app.key("acme", Tier::Pro).await;
    let stalled = stalled_subscriber(&app.api, &key).await;
    assert_eq!(
        websocket_subscribers(&app).await,
        1.0,
        "the stalled subscriber is counted"
    );
    let ids = flood(&app, &key, JOBS, WORDS).await;
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    assert!(
        websocket_subscribers_reach(&app, 0.0).await,
        "the server still holds the stalled connection"
    );
    assert_eq!(cut_off(&app, "websocket").await, 1.0);
    // Its close frame never got past what the connection held: the client finds the end only.
    let (texts, code) = drain(stalled).await;
    assert_eq!(code, None, "after {texts} messages");
    app.cleanup().await;
}

#[tokio::test]
async fn an_sse_stream_that_stops_reading_is_cut_off_and_says_so_when_it_reads_again() {
    // One answer of megabytes of deltas against a 64 KiB bound: about 18 MB, so it overflows
    // even when the kernel buffers absorb their 4 MiB and the bus loses deltas (best effort).
    const LONG: u32 = 120_000;
    let app = spawn_app(AppOptions {
        redis: true,
        sim: SimConfig {
            default_rpm: 0,
            completion_tokens: LONG,
            ..SimConfig::default()
        },
        extra_toml: "[streams]\nbuffer_bytes = 65536\n".into(),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    // Block the pool until the stream is in place, so no delta goes out before it.
    app.sim.set_faults(Faults {
        always_fail: Some(503),
        ..Faults::default()
    });
    let mut body = job_body("a very long answer");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(LONG);
    let (status, accepted) = app.post_job(&key, &body).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{accepted}");
    let id: RequestId = accepted["request_id"].as_str().unwrap().parse().unwrap();

    let addr: std::net::SocketAddr = app.api.trim_start_matches("http://").parse().unwrap();
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4_096).unwrap();
    let mut stream = tcp.connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    // The first state event (`queued`, replayed from the log) shows the stream follows the job.
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while !String::from_utf8_lossy(&received).contains("event: state") {
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read(&mut stream, &mut chunk),
        )
        .await
        .expect("the stream sent nothing within 30 s")
        .unwrap();
        assert!(read > 0, "the stream ended before its first event");
        received.extend_from_slice(&chunk[..read]);
    }
    app.sim.set_faults(Faults::default());
    app.wait_terminal(&[id], Duration::from_secs(120)).await;
    assert_eq!(app.state(id).await, JobState::Succeeded);

    // Reading at last: what the connection held, then the note, then the end of the stream.
    loop {
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read(&mut stream, &mut chunk),
        )
        .await
        .expect("the stream neither sent nor ended within 30 s")
        .unwrap();
        received.extend_from_slice(&chunk[..read]);
        if read == 0 || received.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&received);
    let deltas = text.matches("event: delta").count();
    assert!(deltas > 0, "{}", &text[..text.len().min(2_000)]);
    assert!(
        (deltas as u32) < LONG,
        "all {deltas} deltas came: the stream was never cut off"
    );
    let note = text
        .rfind("event: error")
        .expect("no `event: error` at the end");
    assert!(
        text[note..].contains("\"code\":\"overloaded\""),
        "{}",
        &text[note..]
    );
    assert!(
        !text.contains("\"state\":\"succeeded\""),
        "a cut-off stream sends nothing after the note"
    );
    assert_eq!(cut_off(&app, "sse").await, 1.0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_websocket_subscribe_resumes_after_the_given_seq() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let first = app.submit(&key, "resumed").await;
    let second = app.submit(&key, "followed whole").await;
    app.wait_terminal(&[first, second], Duration::from_secs(30))
        .await;
    let stored = |id: RequestId| {
        let store = app.store.clone();
        async move {
            store
                .events(id)
                .await
                .unwrap()
                .iter()
                .map(|e| (i64::from(e.seq), e.state.to_string()))
                .collect::<Vec<_>>()
        }
    };
    let (first_log, second_log) = (stored(first).await, stored(second).await);
    assert!(first_log.len() >= 3, "{first_log:?}");
    let mut socket = connect(&app.api, Some(&key)).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");

    // Refused whole, nothing followed: the error is the next message, and no event follows.
    let (a, b) = (first.to_string(), second.to_string());
    for (bad, why) in [
        (
            json!({ "after": { &b: 1 } }),
            "not one of this message's request_ids",
        ),
        (
            json!({ "after": { "nope": 1 } }),
            "not one of this message's request_ids",
        ),
        (json!({ "after": { &a: -1 } }), "0 or more"),
        (json!({ "after": { &a: 1u64 << 40 } }), "0 or more"),
        (
            json!({ "after": { &a: "2" } }),
            "not a message this socket understands",
        ),
        (
            json!({ "after": [1] }),
            "not a message this socket understands",
        ),
    ] {
        let mut message = json!({ "type": "subscribe", "request_ids": [&a] });
        message["after"] = bad["after"].clone();
        send(&mut socket, message).await;
        let answer = next_json(&mut socket).await.unwrap();
        assert_eq!(answer["type"], "error", "{bad}: {answer}");
        assert_eq!(answer["code"], "invalid_message", "{bad}: {answer}");
        let text = answer["message"].as_str().unwrap();
        assert!(text.contains(why), "{bad}: {text}");
    }

    // After seq 1 of the first job, the whole of the second.
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": [&a, &b], "after": { &a: 1 } }),
    )
    .await;
    let mut got: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    let (mut subscribed, mut ended) = (false, 0);
    while !subscribed || ended < 2 {
        let message = next_json(&mut socket).await.unwrap();
        if message["type"] == "subscribed" {
            subscribed = true;
            continue;
        }
        assert_eq!(message["type"], "event", "{message}");
        ended += usize::from(message["state"] == "succeeded");
        got.entry(message["request_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                message["seq"].as_i64().unwrap(),
                message["state"].as_str().unwrap().to_owned(),
            ));
    }
    assert_eq!(got.get(&a), Some(&first_log[1..].to_vec()));
    assert_eq!(got.get(&b), Some(&second_log));
    // Past the last event there is nothing to resume: only the reply comes.
    let third = app.submit(&key, "nothing after the end").await;
    app.wait_terminal(&[third], Duration::from_secs(30)).await;
    let last = stored(third).await.len();
    let c = third.to_string();
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": [&c], "after": { &c: last } }),
    )
    .await;
    let answer = next_json(&mut socket).await.unwrap();
    assert_eq!(answer["type"], "subscribed", "{answer}");
    send(
        &mut socket,
        json!({ "type": "unsubscribe", "request_ids": [&c] }),
    )
    .await;
    let answer = next_json(&mut socket).await.unwrap();
    assert_eq!(answer["type"], "unsubscribed", "no event came: {answer}");
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

#[tokio::test]
async fn a_subscribe_names_at_most_a_thousand_distinct_ids_and_a_repeat_counts_once() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let mut socket = connect(&app.api, Some(&key)).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "ready");
    let id = app.submit(&key, "followed once").await.to_string();
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": [&id, &id, &id] }),
    )
    .await;
    let answer = next_json(&mut socket).await.unwrap();
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(answer["request_ids"], json!([id]), "the repeats are one id");
    // 400,000 ids in one message cost 37 s of work and a 15.6 MB reply before the cap.
    let many: Vec<String> = (0..400_000)
        .map(|_| sluice_core::RequestId::new().to_string())
        .collect();
    let started = std::time::Instant::now();
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": many }),
    )
    .await;
    let mut refusal = None;
    while refusal.is_none() {
        let message = next_json(&mut socket).await.expect("socket closed");
        if message["type"] == "error" {
            refusal = Some(message);
        }
    }
    let refusal = refusal.unwrap();
    assert_eq!(refusal["code"], "too_many_ids", "{refusal}");
    assert_eq!(refusal["max"], 1000);
    assert!(
        refusal.to_string().len() < 2048,
        "a short refusal: {refusal}"
    );
    // Well under the 37 s the look-up took, with room for a debug build on a loaded CI
    // machine (parsing the 15 MB message alone took 5 s there once).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused without looking the ids up: {:?}",
        started.elapsed()
    );
    // A thousand distinct ids is within the cap: each unknown one is named.
    let thousand: Vec<String> = (0..1000)
        .map(|_| sluice_core::RequestId::new().to_string())
        .collect();
    send(
        &mut socket,
        json!({ "type": "subscribe", "request_ids": thousand }),
    )
    .await;
    loop {
        let message = next_json(&mut socket).await.expect("socket closed");
        if message["type"] == "error" {
            assert_eq!(message["code"], "not_found", "{message}");
            assert_eq!(message["request_ids"].as_array().unwrap().len(), 1000);
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
