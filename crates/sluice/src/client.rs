//! The HTTP client side of the CLI: `submit`, `status` and `watch` against a running API.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sluice_core::sse::{SseEvent, SseParser};
use sluice_core::RequestId;
use std::collections::VecDeque;
use std::io::Write;
use std::time::Duration;

/// Reconnects in a row without a new event after which `watch` gives up.
const WATCH_ATTEMPTS: u32 = 10;

#[derive(clap::Args)]
pub struct ApiArgs {
    /// Base URL of the API.
    #[arg(long, env = "SLUICE_API_URL", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// API key (sk_sluice_...).
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    pub key: String,
}

async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("the API answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        let code = body["error"]["code"].as_str().unwrap_or("unknown");
        bail!("the API refused the request ({status}, {code}): {message}");
    }
    Ok(body)
}

pub async fn submit(
    api: &ApiArgs,
    model: &str,
    max_tokens: Option<u32>,
    message: &str,
    wait: bool,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut body = json!({ "model": model, "messages": [{ "role": "user", "content": message }] });
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    let response = http
        .post(format!("{}/v1/jobs", api.api.trim_end_matches('/')))
        .bearer_auth(&api.key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {}", api.api))?;
    let accepted = answer(response).await?;
    let id: RequestId = accepted["request_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("the API did not return a request_id")?;
    println!("{id}");
    if !wait {
        return Ok(());
    }
    loop {
        let job = fetch(&http, api, id).await?;
        let state = job["state"].as_str().unwrap_or_default();
        if matches!(state, "succeeded" | "failed" | "cancelled" | "dead") {
            println!("{}", serde_json::to_string_pretty(&job)?);
            if state != "succeeded" {
                bail!("job {id} ended {state}");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fetch(http: &reqwest::Client, api: &ApiArgs, id: RequestId) -> anyhow::Result<Value> {
    let response = http
        .get(format!("{}/v1/jobs/{id}", api.api.trim_end_matches('/')))
        .bearer_auth(&api.key)
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {}", api.api))?;
    answer(response).await
}

pub async fn status(api: &ApiArgs, id: RequestId) -> anyhow::Result<()> {
    let job = fetch(&reqwest::Client::new(), api, id).await?;
    println!("{}", serde_json::to_string_pretty(&job)?);
    Ok(())
}

/// How one connection of `watch` ended.
enum Followed {
    /// The job reached this terminal state.
    Ended { state: String, detail: Value },
    /// The stream stopped early (dropped, or cut off as too slow); `progress` if it brought
    /// new events.
    Dropped { progress: bool, why: String },
}

/// Follow a job's events (`GET /v1/jobs/{id}/events`) until its terminal one, reconnecting
/// with `Last-Event-ID` when the connection drops so no state change is missed or repeated.
/// Prints a line per state change and streamed text as it comes; with `json`, each message's
/// JSON on a line of its own. Fails unless the job succeeded.
pub async fn watch(api: &ApiArgs, id: RequestId, json: bool) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/jobs/{id}/events", api.api.trim_end_matches('/'));
    let mut last_seq: Option<String> = None;
    let mut streamed = false;
    let mut failures = 0;
    let (state, detail) = loop {
        let mut request = http
            .get(&url)
            .bearer_auth(&api.key)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(seq) = &last_seq {
            request = request.header("last-event-id", seq);
        }
        let followed = match request.send().await {
            Ok(response) if response.status().is_success() => {
                follow(response, &mut last_seq, &mut streamed, json).await
            }
            // Overload and outages pass; anything else (unknown job, bad key) is the answer.
            Ok(response) if response.status().is_server_error() || response.status() == 429 => {
                Followed::Dropped {
                    progress: false,
                    why: format!("the API answered {}", response.status()),
                }
            }
            Ok(response) => {
                answer(response).await?;
                bail!("the API answered the event stream with an unexpected success");
            }
            Err(error) => Followed::Dropped {
                progress: false,
                why: format!("cannot reach the API at {}: {error}", api.api),
            },
        };
        match followed {
            Followed::Ended { state, detail } => break (state, detail),
            Followed::Dropped { progress, why } => {
                failures = if progress { 1 } else { failures + 1 };
                if failures >= WATCH_ATTEMPTS {
                    bail!("gave up following job {id} after {failures} tries: {why}");
                }
                let wait = Duration::from_millis(250 * 2u64.pow(failures.min(5)));
                tracing::warn!(message = "event stream interrupted; resuming", why, ?wait);
                tokio::time::sleep(wait).await;
            }
        }
    };
    if state != "succeeded" {
        let error = detail
            .get("error")
            .map(|e| {
                format!(
                    ": {}",
                    e.as_str().map_or_else(|| e.to_string(), str::to_owned)
                )
            })
            .unwrap_or_default();
        bail!("job {id} ended {state}{error}");
    }
    if !json && !streamed {
        // The answer itself is not an event; show it as `submit --wait` does.
        let job = fetch(&http, api, id).await?;
        if let Some(content) = job["result"]["content"].as_str() {
            println!("{content}");
        }
    }
    Ok(())
}

/// Read one connection's events, printing them, until the terminal one or the end.
async fn follow(
    mut response: reqwest::Response,
    last_seq: &mut Option<String>,
    streamed: &mut bool,
    json: bool,
) -> Followed {
    let mut parser = SseParser::default();
    let mut ready = VecDeque::new();
    let mut progress = false;
    let mut stdout = std::io::stdout().lock();
    loop {
        while let Some(event) = ready.pop_front() {
            if let Some(ended) = show(&mut stdout, &event, last_seq, streamed, json) {
                return ended;
            }
            progress |= event.id.is_some();
        }
        let _ = stdout.flush();
        match response.chunk().await {
            Ok(Some(bytes)) => parser.push(&bytes, &mut ready),
            Ok(None) => {
                parser.finish(&mut ready);
                if ready.is_empty() {
                    let why = "the stream ended before the job did".to_owned();
                    return Followed::Dropped { progress, why };
                }
            }
            Err(error) => {
                let why = format!("the connection broke: {error}");
                return Followed::Dropped { progress, why };
            }
        }
    }
}

/// Print one event; the end of the job, or of this connection, if it says so.
fn show(
    out: &mut impl Write,
    event: &SseEvent,
    last_seq: &mut Option<String>,
    streamed: &mut bool,
    json: bool,
) -> Option<Followed> {
    let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
        tracing::warn!(
            message = "ignoring an event that is not JSON",
            data = event.data
        );
        return None;
    };
    match event.event.as_deref() {
        Some("error") => {
            let why = data["message"]
                .as_str()
                .unwrap_or("the API ended the stream");
            return Some(Followed::Dropped {
                progress: false,
                why: why.to_owned(),
            });
        }
        Some("delta") => {
            *streamed = true;
            let text = data["text"].as_str().unwrap_or_default();
            let _ = if json {
                writeln!(out, "{data}")
            } else {
                write!(out, "{text}")
            };
            return None;
        }
        _ => {}
    }
    if event.id.is_some() {
        last_seq.clone_from(&event.id);
    }
    let state = data["state"].as_str().unwrap_or_default().to_owned();
    let _ = if json {
        writeln!(out, "{data}")
    } else {
        let at = data["at"].as_str().unwrap_or_default();
        let detail = data
            .get("detail")
            .map(|d| format!("  {d}"))
            .unwrap_or_default();
        // Streamed text has no newline of its own; end it before the next state line.
        let gap = if *streamed && state != "running" {
            "\n"
        } else {
            ""
        };
        writeln!(out, "{gap}{at}  {state}{detail}")
    };
    let terminal = matches!(
        state.as_str(),
        "succeeded" | "failed" | "cancelled" | "dead"
    );
    terminal.then(|| Followed::Ended {
        state,
        detail: data.get("detail").cloned().unwrap_or(Value::Null),
    })
}
