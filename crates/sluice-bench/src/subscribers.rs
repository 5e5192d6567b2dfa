//! `sluice bench subscribers`: `sluice dev`'s submission throughput and resident memory while
//! stalled WebSocket and SSE subscribers follow streamed jobs, against the same run without them.

use crate::memory::{common_toml, dev_store, mb, read_memory, start_dev, TempDir};
use anyhow::{bail, Context};
use clap::Args;
use futures::{SinkExt, StreamExt};
use sluice::config::Config;
use sluice_store::Store;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Acceptance: throughput with the stalled subscribers at least this share of without.
const MIN_RATIO: f64 = 0.8;
/// Acceptance: resident memory after they are gone within this of the start.
const MAX_GROWTH_MB: f64 = 50.0;
/// Quiet time before the start reading and before the after reading.
const SETTLE: Duration = Duration::from_secs(3);
/// A stalled client's receive buffer: it never reads, so a small one fills at once.
const STALLED_RECV_BUFFER: u32 = 4_096;

#[derive(Args)]
pub struct SubscribersArgs {
    /// WebSocket subscribers that never read, each following all of the bench user's jobs.
    #[arg(long, default_value_t = 300)]
    websockets: usize,
    /// SSE streams that never read, each on one streamed job.
    #[arg(long, default_value_t = 200)]
    sse: usize,
    /// Streamed jobs (`stream: true`) running meanwhile.
    #[arg(long, default_value_t = 400)]
    streamed: usize,
    /// Words in each answer (a streamed job sends one delta a word).
    #[arg(long, default_value_t = 400)]
    words: u32,
    /// Plain jobs submitted, and timed, while the streamed jobs run.
    #[arg(long, default_value_t = 5_000)]
    jobs: usize,
    /// Concurrent HTTP clients submitting the plain jobs.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Give up waiting for the jobs after this many seconds (per run).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// What one run measured.
#[derive(Debug, Default)]
struct Report {
    /// Plain jobs accepted per second while the streamed jobs ran.
    per_sec: f64,
    rss_start: u64,
    rss_peak: u64,
    rss_after: u64,
    /// `sluice_subscribers_cut_off_total` by kind, as the server counted them.
    cut_websocket: f64,
    cut_sse: f64,
    /// What the stalled WebSocket clients found when they read at last.
    saw_4408: usize,
    saw_other_close: usize,
    saw_end_only: usize,
    /// ... and open, never cut off.
    still_open: usize,
    /// SSE clients that found `event: error` (overloaded) when they read at last.
    sse_told: usize,
    /// `sluice_subscribers` (all kinds) once they were gone: 0 unless one leaked.
    left_open: f64,
}

pub async fn run(config: &Config, args: SubscribersArgs) -> anyhow::Result<()> {
    if args.streamed == 0 || args.jobs == 0 || args.clients == 0 || args.sse > args.streamed {
        bail!("--streamed, --jobs and --clients must be at least 1, and --sse at most --streamed");
    }
    let exe = crate::common::sluice_exe()?;
    eprintln!("bench subscribers: the run without subscribers");
    let alone = one_run(config, &args, &exe, false).await?;
    eprintln!(
        "bench subscribers: the run with {} stalled WebSockets and {} stalled SSE streams",
        args.websockets, args.sse
    );
    let stalled = one_run(config, &args, &exe, true).await?;
    let ratio = stalled.per_sec / alone.per_sec;
    println!(
        "\nsluice bench subscribers: {} streamed jobs of {} words, {} plain jobs from {} clients (sluice dev)",
        args.streamed, args.words, args.jobs, args.clients
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "run", "jobs/s", "RSS start", "RSS peak", "RSS after"
    );
    for (name, r) in [
        ("without subscribers", &alone),
        ("with subscribers", &stalled),
    ] {
        println!(
            "{name:<24} {:>10.0} {:>7.1} MB {:>7.1} MB {:>7.1} MB",
            r.per_sec,
            mb(r.rss_start),
            mb(r.rss_peak),
            mb(r.rss_after)
        );
    }
    println!("throughput ratio (with / without): {ratio:.2} (acceptance: at least {MIN_RATIO})");
    println!(
        "WebSockets: {} cut off by the server; when read at last, {} closed with 4408, {} with another code, {} ended without a close frame, {} still open",
        stalled.cut_websocket,
        stalled.saw_4408,
        stalled.saw_other_close,
        stalled.saw_end_only,
        stalled.still_open
    );
    println!(
        "SSE: {} cut off by the server; {} said `event: error` overloaded when read at last",
        stalled.cut_sse, stalled.sse_told
    );
    let growth = mb(stalled.rss_after) - mb(stalled.rss_start);
    println!("RSS after they went: {growth:+.1} MB from the start (acceptance: within {MAX_GROWTH_MB} MB)");
    // The jobs alone leave memory behind too (caches, the allocator's free lists): the run
    // without subscribers tells what of the growth is theirs.
    println!(
        "of which the subscribers': {:+.1} MB (RSS after, with minus without)",
        mb(stalled.rss_after) - mb(alone.rss_after)
    );
    println!(
        "subscribers still open on the server once they went: {}",
        stalled.left_open
    );
    let mut missed = Vec::new();
    if ratio < MIN_RATIO {
        missed.push(format!("throughput ratio {ratio:.2}"));
    }
    if growth > MAX_GROWTH_MB {
        missed.push(format!("memory {growth:+.1} MB"));
    }
    if stalled.cut_websocket < args.websockets as f64 {
        missed.push(format!(
            "{} of {} WebSockets cut off",
            stalled.cut_websocket, args.websockets
        ));
    }
    if !missed.is_empty() {
        bail!("acceptance missed: {}", missed.join(", "));
    }
    Ok(())
}

/// One `sluice dev` on a fresh SQLite file: the streamed and plain jobs, with or without the
/// stalled subscribers.
async fn one_run(
    config: &Config,
    args: &SubscribersArgs,
    exe: &Path,
    with_subscribers: bool,
) -> anyhow::Result<Report> {
    let dir = TempDir::new()?;
    let sim = sluice_sim::spawn(
        sluice_sim::SimConfig {
            default_rpm: 0,
            completion_tokens: args.words,
            ..Default::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .context("cannot start the simulator")?;
    let data = dir.0.join("data").join("sluice.db");
    std::fs::create_dir_all(dir.0.join("data")).context("cannot create the data directory")?;
    std::fs::write(
        dir.0.join("sluice.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\n\n{}",
            common_toml(&sim.base_url(), 64)
        ),
    )
    .context("cannot write the run's config")?;
    let result = async {
        let store = dev_store(config, &data).await?;
        let result = async {
            let keys = crate::common::tier_keys(&store).await?;
            let (dev, url) = start_dev(exe, &dir.0, &data).await?;
            let pid = dev.id().context("sluice dev has already exited")?;
            let report = measure(&store, &url, &keys, pid, args, with_subscribers).await;
            drop(dev);
            report
        }
        .await;
        store.close().await;
        result
    }
    .await;
    sim.shutdown();
    result
}

/// The run against a started `sluice dev` at `url` (process `pid`).
async fn measure(
    store: &Store,
    url: &str,
    keys: &[String],
    pid: u32,
    args: &SubscribersArgs,
    with_subscribers: bool,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::new();
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("not an address: {url}"))?;
    // The pro key's jobs are the streamed ones the subscribers follow.
    let key = keys.get(1).context("a key per tier")?.clone();
    tokio::time::sleep(SETTLE).await;
    let mut report = Report {
        rss_start: read_memory(pid)?.rss,
        ..Report::default()
    };
    let peak = Arc::new(AtomicU64::new(report.rss_start));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                if let Ok(memory) = read_memory(pid) {
                    peak.fetch_max(memory.rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let mut sockets = Vec::new();
    if with_subscribers {
        for _ in 0..args.websockets {
            sockets.push(stalled_websocket(addr, &key).await?);
        }
    }
    // The streamed jobs, then an SSE stream on each of the first `sse` of them.
    let mut streamed = Vec::with_capacity(args.streamed);
    for n in 0..args.streamed {
        let body = serde_json::json!({
            "model": "default",
            "messages": [{"role": "user", "content": format!("streamed {n}")}],
            "stream": true,
            "max_tokens": args.words,
        });
        let response = http
            .post(format!("{url}/v1/jobs"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .context("cannot submit a streamed job")?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            bail!("a streamed job was answered {}", response.status());
        }
        let accepted: serde_json::Value = response.json().await?;
        let id = accepted["request_id"]
            .as_str()
            .context("a request_id")?
            .to_owned();
        streamed.push(id);
    }
    let mut streams = Vec::new();
    if with_subscribers {
        for id in streamed.iter().take(args.sse) {
            streams.push(stalled_sse(addr, &key, id).await?);
        }
    }
    // The timed part: plain jobs while the streamed ones run.
    let accepted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let offer = crate::common::Offer {
        jobs: args.jobs,
        clients: args.clients,
        label: "plain",
        rate: None,
        temperature: None,
    };
    let mut submitters = crate::common::spawn_submitters(&http, url, keys, offer, &accepted);
    while let Some(done) = submitters.join_next().await {
        done.context("a submitter panicked")??;
    }
    report.per_sec = args.jobs as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "bench subscribers: {} plain jobs accepted at {:.0}/s; waiting for every job to end",
        args.jobs, report.per_sec
    );
    wait_done(store, args.streamed + args.jobs, args.timeout_secs).await?;

    if with_subscribers {
        let metrics = scrape(&http, url).await?;
        report.cut_websocket = counter(&metrics, "websocket");
        eprintln!("bench subscribers: the stalled clients read what they were sent");
        // What each stalled client finds when it reads at last; then it goes.
        let ends = futures::future::join_all(sockets.into_iter().map(read_to_end)).await;
        for end in ends {
            match end {
                Ending::Closed(4408) => report.saw_4408 += 1,
                Ending::Closed(_) => report.saw_other_close += 1,
                Ending::Dropped => report.saw_end_only += 1,
                Ending::Open => report.still_open += 1,
            }
        }
        let told = futures::future::join_all(streams.into_iter().map(sse_told)).await;
        report.sse_told = told.into_iter().filter(|t| *t).count();
        let metrics = scrape(&http, url).await?;
        report.cut_sse = counter(&metrics, "sse");
    }
    tokio::time::sleep(SETTLE).await;
    report.rss_after = read_memory(pid)?.rss;
    let metrics = scrape(&http, url).await?;
    report.left_open = metrics
        .lines()
        .filter(|line| line.starts_with("sluice_subscribers{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value);
    sampler.abort();
    report.rss_peak = peak.load(Ordering::Relaxed).max(report.rss_after);
    Ok(report)
}

/// `sluice_subscribers_cut_off_total{kind}` from a `/metrics` page.
fn counter(metrics: &str, kind: &str) -> f64 {
    let series = format!("sluice_subscribers_cut_off_total{{kind=\"{kind}\"}}");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&series))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}

/// Wait until `jobs` jobs are terminal.
async fn wait_done(store: &Store, jobs: usize, timeout_secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let done: i64 = store
            .count_by_state()
            .await
            .context("cannot count the jobs")?
            .into_iter()
            .filter(|(state, _)| state.is_terminal())
            .map(|(_, n)| n)
            .sum();
        if done >= jobs as i64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{done} of {jobs} jobs finished within {timeout_secs} s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A connection with a small receive buffer that it never reads.
async fn stalled_tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpSocket::new_v4()?;
    tcp.set_recv_buffer_size(STALLED_RECV_BUFFER)?;
    Ok(tcp.connect(addr).await?)
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket following all of `key`'s user's jobs that reads nothing after `subscribed`.
async fn stalled_websocket(addr: SocketAddr, key: &str) -> anyhow::Result<Socket> {
    let stream = stalled_tcp(addr).await?;
    let mut request = format!("ws://{addr}/v1/stream").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    let (mut socket, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .context("cannot open a WebSocket")?;
    socket
        .send(Message::Text(r#"{"type":"subscribe","all":true}"#.into()))
        .await?;
    let mut answers = 0;
    while answers < 2 {
        match socket.next().await {
            Some(Ok(Message::Text(_))) => answers += 1,
            Some(Ok(_)) => {}
            _ => bail!("the WebSocket closed before it was subscribed"),
        }
    }
    Ok(socket)
}

/// How a stalled WebSocket ended, as its client finds out when it reads at last.
enum Ending {
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped,
    /// Nothing but pings came for a while: the server never cut it off.
    Open,
}

/// Read what the connection holds to its end (pings do not count as news).
async fn read_to_end(mut socket: Socket) -> Ending {
    let mut quiet_until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(quiet_until, socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => return Ending::Closed(frame.code.into()),
            Ok(Some(Ok(Message::Close(None)))) | Ok(Some(Err(_))) | Ok(None) => {
                return Ending::Dropped
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(_))) => {
                quiet_until = tokio::time::Instant::now() + Duration::from_secs(10);
            }
            Err(_) => return Ending::Open,
        }
    }
}

/// `GET /v1/jobs/{id}/events` on a connection that reads nothing after the request.
async fn stalled_sse(addr: SocketAddr, key: &str, id: &str) -> anyhow::Result<TcpStream> {
    let mut stream = stalled_tcp(addr).await?;
    let request = format!(
        "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Accept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    Ok(stream)
}

/// Whether the stream, read at last, says it was cut off (`event: error`).
async fn sse_told(mut stream: TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => {
                // The note may straddle two reads: keep a little of what came before.
                seen.extend_from_slice(&buffer[..n]);
                if seen.windows(12).any(|w| w == b"event: error") {
                    return true;
                }
                let keep = seen.len().saturating_sub(16);
                seen.drain(..keep);
            }
            _ => return false,
        }
    }
}

/// The API's `/metrics` text.
async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    Ok(http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}
