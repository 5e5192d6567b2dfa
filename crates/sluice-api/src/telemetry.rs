//! The metrics the API records beside admission's, names and labels in one place (alert rules
//! depend on them).
//! Recorded through the `metrics` facade; the binary installs the recorder that renders them.

pub(crate) use sluice_admission::telemetry::job;

/// One open stream in `sluice_subscribers{kind=websocket|sse}`, for as long as it lives: a
/// guard, so a stream that ends by error or by the client going away is counted out too.
pub(crate) struct Subscriber(&'static str);

impl Subscriber {
    pub(crate) fn open(kind: &'static str) -> Subscriber {
        metrics::gauge!("sluice_subscribers", "kind" => kind).increment(1.0);
        Subscriber(kind)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        metrics::gauge!("sluice_subscribers", "kind" => self.0).decrement(1.0);
    }
}

/// `sluice_connections_refused_total{answered=true|false}`: connections past `[http]
/// max_connections`, answered `503` or (past the refusals under way) closed unanswered.
pub(crate) fn connection_refused(answered: bool) {
    let answered = if answered { "true" } else { "false" };
    metrics::counter!("sluice_connections_refused_total", "answered" => answered).increment(1);
}

/// `sluice_subscribers_cut_off_total{kind=websocket|sse}`: subscribers whose buffer passed
/// `[streams] buffer_bytes` (too slow to keep up) and were cut off.
pub(crate) fn cut_off(kind: &'static str) {
    metrics::counter!("sluice_subscribers_cut_off_total", "kind" => kind).increment(1);
}
