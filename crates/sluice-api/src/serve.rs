//! The API's serve loop: HTTP/1 and h2c (prior knowledge) on one port, with the limits that keep
//! a client from holding sockets for nothing (`[http]`): a header read timeout that also bounds a
//! connection with no request in flight, a body read timeout, h2 keep-alive pings and a stream
//! cap, and a cap on open connections past which a connection is answered `503` and closed.

mod http_errors;

use crate::ApiError;
use axum::body::{Body, HttpBody};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use serde::Deserialize;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// `[http]`: how long the API waits for a client, and how many connections it holds at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Longest a client may take to send a request's headers; also the longest a connection
    /// may stay open with no request in flight (before its first request, and between requests
    /// on a kept-alive HTTP/1 or h2c connection). A held chat completion, an SSE stream or a
    /// WebSocket is a request in flight, never idle.
    pub header_read_timeout_secs: f64,
    /// Longest a request body may go without sending more; past it the request is answered
    /// `408 body_timeout` and its connection closed.
    pub body_read_timeout_secs: f64,
    /// Longest a write to a client may wait on a peer that reads nothing (its socket buffers
    /// full); past it the connection is dropped. Bounds what a stalled SSE stream, a download
    /// or an upgraded WebSocket holds ([streams] `write_timeout_secs` ends a WebSocket sooner).
    pub write_timeout_secs: f64,
    /// Connections open at once (HTTP/1, h2c and upgraded WebSockets alike). Past it a new
    /// connection gets `503 too_many_connections` with `Connection: close`. Lowered at start to
    /// the process's open-file limit (`ulimit -n`) less 128, and at least half of it.
    pub max_connections: usize,
    /// h2c: send a PING this often on a connection (0 turns pings off)...
    pub h2_keepalive_interval_secs: f64,
    /// ...and close the connection if its answer takes longer than this.
    pub h2_keepalive_timeout_secs: f64,
    /// h2c: streams (requests) one connection may have open at once.
    pub h2_max_concurrent_streams: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_secs: 10.0,
            body_read_timeout_secs: 30.0,
            write_timeout_secs: 30.0,
            max_connections: 10_000,
            h2_keepalive_interval_secs: 20.0,
            h2_keepalive_timeout_secs: 20.0,
            h2_max_concurrent_streams: 256,
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        for (key, value) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("body_read_timeout_secs", self.body_read_timeout_secs),
            ("write_timeout_secs", self.write_timeout_secs),
            ("h2_keepalive_timeout_secs", self.h2_keepalive_timeout_secs),
        ] {
            if !positive(value) {
                return Err(format!("http.{key} must be a positive number of seconds"));
            }
        }
        if !(self.h2_keepalive_interval_secs.is_finite() && self.h2_keepalive_interval_secs >= 0.0)
        {
            return Err("http.h2_keepalive_interval_secs must be a number of seconds >= 0".into());
        }
        if self.max_connections == 0 || self.max_connections > Semaphore::MAX_PERMITS {
            return Err("http.max_connections must be at least 1".into());
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err("http.h2_max_concurrent_streams must be at least 1".into());
        }
        Ok(())
    }

    fn header_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_read_timeout_secs)
    }

    fn body_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_read_timeout_secs)
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.write_timeout_secs)
    }
}

/// Connections past the cap being answered `503` at once (at most a sixteenth of the cap);
/// past this many they are closed without an answer.
const MAX_REFUSING: usize = 256;

/// Open files kept for everything but client connections (the database, broker and Redis
/// pools, log and data files, refusals under way) when the open-file limit lowers the cap.
const FD_RESERVE: u64 = 128;

/// The process's open-file (soft) limit, where the system tells it (Linux).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "unlimited" does not parse: no limit to heed.
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `max_connections`, lowered so that the cap refuses before the system does: the open-file
/// limit less [`FD_RESERVE`], and at least half of it.
fn connection_cap(configured: usize, open_files: Option<u64>) -> usize {
    let Some(limit) = open_files else {
        return configured;
    };
    let room = limit.saturating_sub(FD_RESERVE).max(limit / 2).max(1);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// Longest a refused connection is held to send its `503`.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Serve `router` on `listener` until `shutdown` fires; then stop accepting, let every
/// connection finish the requests it has in flight, and return.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout());
    let keepalive = (config.h2_keepalive_interval_secs > 0.0)
        .then(|| Duration::from_secs_f64(config.h2_keepalive_interval_secs));
    builder
        .http2()
        .timer(TokioTimer::new())
        // The CONNECT protocol: WebSockets over HTTP/2.
        .enable_connect_protocol()
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .keep_alive_interval(keepalive)
        .keep_alive_timeout(Duration::from_secs_f64(config.h2_keepalive_timeout_secs));
    let builder = Arc::new(builder);
    let mut refusal = Builder::new(TokioExecutor::new());
    refusal
        .http1()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIMEOUT);
    let refusal = Arc::new(refusal);

    let open_files = open_file_limit();
    let cap = connection_cap(config.max_connections, open_files);
    if cap < config.max_connections {
        tracing::warn!(
            message = "max_connections lowered below the open-file limit (raise `ulimit -n`)",
            configured = config.max_connections,
            cap,
            open_files,
        );
    }
    let slots = Arc::new(Semaphore::new(cap));
    // Refusals hold descriptors too: a share of the cap's.
    let refusing = Arc::new(Semaphore::new((cap / 16).clamp(1, MAX_REFUSING)));
    // Every connection task holds a receiver; all are gone when the last connection closed.
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    let idle_after = config.header_read_timeout();
    let body_timeout = config.body_read_timeout();
    let write_timeout = config.write_timeout();
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if !is_connection_error(&error) {
                        // E.g. out of file descriptors: give connections a moment to close.
                        tracing::warn!(message = "accept failed", %error);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let answering = refusing.clone().try_acquire_owned();
            crate::telemetry::connection_refused(answering.is_ok());
            if let Ok(refusing) = answering {
                let refusal = refusal.clone();
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(too_many_connections())
                    });
                    let _ = tokio::time::timeout(
                        REFUSAL_TIMEOUT,
                        refusal.serve_connection(io, service),
                    )
                    .await;
                    drop(refusing);
                });
            }
            continue;
        };
        let served = Arc::new(AtomicBool::new(false));
        // Under hyper, so the errors it answers by itself get the JSON body every error has.
        let io = TokioIo::new(http_errors::JsonErrors::new(
            Counted::new(stream, permit, write_timeout),
            served.clone(),
        ));
        let idle = Arc::new(Idle::new());
        let service = ConnService {
            router: router.clone(),
            body_timeout,
            idle: idle.clone(),
            served,
        };
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let mut conn = pin!(builder.serve_connection_with_upgrades(io, service));
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(error) = result {
                            tracing::trace!(message = "connection ended", %error);
                        }
                        break;
                    }
                    () = shutdown.cancelled(), if !stopping => {
                        stopping = true;
                        idle.touch();
                        conn.as_mut().graceful_shutdown();
                    }
                    () = idle.expired(idle_after) => {
                        if stopping {
                            // Still nothing in flight, as long again after the shutdown began
                            // (an h2c peer that never acknowledges the GOAWAY's PING): drop it.
                            break;
                        }
                        stopping = true;
                        idle.touch();
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(listener);
    drop(close_rx);
    close_tx.closed().await;
    Ok(())
}

fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// The answer to a connection past `max_connections`.
fn too_many_connections() -> Response<Body> {
    let mut response = axum::response::IntoResponse::into_response(
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server holds as many connections as it takes; retry shortly",
        )
        .with_retry_after(Duration::from_secs(1)),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The answer to a request whose body stopped arriving, in the error shape of its route: the
/// OpenAI routes' (`/v1/` but the job API's `/v1/jobs` and `/v1/stream`), or the job API's.
fn body_timeout(openai: bool, after: Duration) -> Response<Body> {
    let message = format!(
        "the request body stopped arriving for {} s",
        after.as_secs_f64()
    );
    let mut response = if openai {
        axum::response::IntoResponse::into_response(
            crate::openai::OpenAiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                message,
            )
            .code("body_timeout"),
        )
    } else {
        axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            message,
        ))
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A connection's socket with its slot under `max_connections`: the slot goes when the socket
/// does, also after a WebSocket upgrade took it over. A write that waits longer than the write
/// timeout on a peer that reads nothing fails, which ends the connection.
struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    write_timeout: Duration,
    /// Armed while a write or flush waits for room in the socket.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Counted {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit, write_timeout: Duration) -> Counted {
        Counted {
            io,
            _permit: permit,
            write_timeout,
            stalled: None,
        }
    }

    /// `poll`, a write or flush of the socket, under the write timeout.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if !poll.is_pending() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = None;
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client read nothing for http.write_timeout_secs",
        )))
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.timed(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.timed(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.timed(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Whether a connection has a request in flight, and since when it has had none.
struct Idle {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
    changed: tokio::sync::Notify,
}

impl Idle {
    fn new() -> Idle {
        Idle {
            in_flight: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        InFlight(self.clone())
    }

    /// Count the idle time from now.
    fn touch(&self) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.changed.notify_waiters();
    }

    /// Resolves once the connection has had no request in flight for `after`.
    async fn expired(&self, after: Duration) {
        loop {
            let changed = self.changed.notified();
            let mut changed = pin!(changed);
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
            tokio::select! {
                () = tokio::time::sleep_until(since + after) => {
                    if self.in_flight.load(Ordering::SeqCst) == 0
                        && *self.since.lock().unwrap_or_else(|e| e.into_inner()) == since
                    {
                        return;
                    }
                }
                () = changed => {}
            }
        }
    }
}

/// One request in flight on a connection, until its response body is done or dropped.
struct InFlight(Arc<Idle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// One connection's service: the router, with the body timeout and the in-flight count.
#[derive(Clone)]
struct ConnService {
    router: Router,
    body_timeout: Duration,
    idle: Arc<Idle>,
    /// Set at the first request: from then on the socket may carry response bodies.
    served: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.served.store(true, Ordering::SeqCst);
        let in_flight = self.idle.begin();
        let timed_out = Arc::new(AtomicBool::new(false));
        let after = self.body_timeout;
        let request = request.map(|body| {
            Body::new(TimedBody {
                body,
                after,
                sleep: None,
                timed_out: timed_out.clone(),
            })
        });
        let router = self.router.clone();
        let path = request.uri().path();
        let openai = path.starts_with("/v1/")
            && !path.starts_with("/v1/jobs")
            && !path.starts_with("/v1/stream");
        let refused = http_errors::over_limits(request.uri(), request.headers(), openai);
        Box::pin(async move {
            let response = match refused {
                Some(refused) => refused,
                None => match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
            };
            // Whatever the handler made of the failed read, the client hears why.
            let response = if timed_out.load(Ordering::SeqCst) {
                body_timeout(openai, after)
            } else {
                response
            };
            Ok(response.map(|body| {
                Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// A request body that fails once no frame has arrived for `after`.
struct TimedBody {
    body: Incoming,
    after: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// The error a request body gives when it stopped arriving.
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving")]
pub struct BodyTimeout;

impl HttpBody for TimedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let after = this.after;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.timed_out.store(true, Ordering::SeqCst);
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that holds its request's place in flight until it is done or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair: the server's end counted under a write timeout, and the client's.
    async fn pair(write_timeout: Duration) -> (Counted, TcpStream) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        (Counted::new(server, permit, write_timeout), client)
    }

    #[tokio::test]
    async fn a_write_to_a_client_that_reads_nothing_fails_after_the_write_timeout() {
        let (mut server, _client) = pair(Duration::from_millis(300)).await;
        let chunk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        let mut written = 0usize;
        let error = loop {
            match tokio::time::timeout(Duration::from_secs(30), server.write(&chunk)).await {
                Ok(Ok(n)) => written += n,
                Ok(Err(error)) => break error,
                Err(_) => panic!("a write waited 30 s on a full socket without failing"),
            }
        };
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(written > 0, "the socket's buffers took something first");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_client_that_keeps_reading_is_never_timed_out() {
        let (mut server, mut client) = pair(Duration::from_millis(200)).await;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let chunk = vec![b'x'; 256 * 1024];
        for _ in 0..40 {
            server.write_all(&chunk).await.unwrap();
        }
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), 40 * 256 * 1024);
    }

    #[test]
    fn the_cap_stays_under_the_open_file_limit() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(1_048_576)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1_024)), 896);
        assert_eq!(connection_cap(10_000, Some(300)), 172);
        assert_eq!(connection_cap(10_000, Some(100)), 50);
        assert_eq!(connection_cap(10_000, Some(0)), 1);
        assert_eq!(connection_cap(3, Some(300)), 3);
    }

    #[test]
    fn this_process_has_an_open_file_limit_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(open_file_limit().is_some_and(|limit| limit > 0));
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |edit: fn(&mut HttpConfig)| {
            let mut config = HttpConfig::default();
            edit(&mut config);
            config.validate().is_err()
        };
        assert!(HttpConfig::default().validate().is_ok());
        assert!(bad(|c| c.header_read_timeout_secs = 0.0));
        assert!(bad(|c| c.body_read_timeout_secs = f64::NAN));
        assert!(bad(|c| c.max_connections = 0));
        assert!(bad(|c| c.h2_max_concurrent_streams = 0));
        assert!(bad(|c| c.h2_keepalive_interval_secs = -1.0));
    }
}
