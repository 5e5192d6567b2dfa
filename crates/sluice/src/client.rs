//! The HTTP client side of the CLI: `submit` and `status` against a running API.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sluice_core::RequestId;
use std::time::Duration;

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
