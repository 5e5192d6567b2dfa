//! Where logs and traces go: stderr as text or JSON (`SLUICE_LOG_FORMAT`), filtered by
//! `SLUICE_LOG`, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/HTTP.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The trace exporter, kept to flush its last batch at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("could not flush traces: {error}");
            }
        }
    }
}

/// Install the process's subscriber. Text or one JSON object a line (with the current span's
/// fields, so a job's `request_id` is on every line logged while it is handled); spans go to
/// an OpenTelemetry collector too when `OTEL_EXPORTER_OTLP_ENDPOINT` names one (the standard
/// OTEL_* variables tune the exporter).
pub fn init() -> Telemetry {
    let format = std::env::var("SLUICE_LOG_FORMAT").unwrap_or_default();
    let text = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let output = match format.as_str() {
        "json" => text
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
        _ => text.boxed(),
    };
    let (otlp, provider, otlp_error) = match otlp_provider() {
        Ok(Some(provider)) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("sluice"))
                .with_filter(filter().and(secret_safe()));
            (Some(layer), Some(provider), None)
        }
        Ok(None) => (None, None, None),
        Err(error) => (None, None, Some(error)),
    };
    tracing_subscriber::registry()
        .with(output.with_filter(filter().and(secret_safe())))
        .with(otlp)
        .init();
    if !matches!(format.as_str(), "" | "human" | "json") {
        tracing::warn!(
            message = "SLUICE_LOG_FORMAT must be human or json; logging as human",
            value = format
        );
    }
    if let Some(error) = otlp_error {
        tracing::warn!(message = "OTLP trace export is off: the exporter could not be built", %error);
    }
    Telemetry { provider }
}

/// What is logged (and exported): `SLUICE_LOG`, else `RUST_LOG`, else info without sqlx's and
/// lapin's chatter.
fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn"))
}

/// The most detail third-party crates may log whatever `SLUICE_LOG` asks for: below these
/// levels they write what went over the wire, secrets included. Sluice's own logs redact.
fn secret_safe() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        // trace: every WebSocket message received, a client's `auth` message and key included.
        .with_target("tungstenite", LevelFilter::DEBUG)
        .with_target("tokio_tungstenite", LevelFilter::DEBUG)
        // trace: frames and headers, `Authorization` and provider keys included.
        .with_target("h2", LevelFilter::DEBUG)
        .with_target("hyper", LevelFilter::DEBUG)
        .with_target("hyper_util", LevelFilter::DEBUG)
        .with_target("reqwest", LevelFilter::DEBUG)
        // debug: every SMTP line, the AUTH credentials and the emails' text included.
        .with_target("lettre", LevelFilter::INFO)
        // trace: AMQP frames, the connection's credentials included.
        .with_target("lapin", LevelFilter::DEBUG)
        .with_target("amq_protocol", LevelFilter::DEBUG)
}

/// A tracer provider exporting to `OTEL_EXPORTER_OTLP_ENDPOINT`, if set.
fn otlp_provider() -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").map_or(true, |e| e.trim().is_empty()) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("sluice")
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}
