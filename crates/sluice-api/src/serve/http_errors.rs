//! HTTP-layer errors in the documented JSON shape: our own limits on a request's URI and header
//! bytes, checked before routing, and JSON bodies for the bodiless answers hyper writes itself.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode, Uri};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest URI (path and query, or the whole absolute form) a request may have, in bytes.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// Most bytes a request's header fields may take together (`name: value\r\n` each).
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Longest head hyper writes for a parse error (status line, `content-length`, `date`).
const MAX_HYPER_HEAD: usize = 256;

/// The answer to a request over [`MAX_URI_BYTES`] or [`MAX_HEADER_BYTES`], in its route's error
/// shape (`openai`: OpenAI's); `None` when it is within both.
pub(super) fn over_limits(uri: &Uri, headers: &HeaderMap, openai: bool) -> Option<Response<Body>> {
    let uri_bytes = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, str::len);
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let (status, code, message) = if uri_bytes > MAX_URI_BYTES {
        (
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request's URI is {uri_bytes} bytes; at most {MAX_URI_BYTES} are taken"),
        )
    } else if header_bytes > MAX_HEADER_BYTES {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request's headers are {header_bytes} bytes; at most {MAX_HEADER_BYTES} are taken"
            ),
        )
    } else {
        return None;
    };
    let mut response = if openai {
        axum::response::IntoResponse::into_response(
            crate::openai::OpenAiError::new(status, "invalid_request_error", message).code(code),
        )
    } else {
        axum::response::IntoResponse::into_response(crate::ApiError::new(status, code, message))
    };
    // The body, if any, was not read: the connection cannot carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(response)
}

/// What hyper's bodiless answer with `status` means, as the error's code and message.
fn explain(status: u16) -> Option<(&'static str, String)> {
    match status {
        400 => Some((
            "bad_request",
            "the request is not valid HTTP/1.1: a malformed request line or header, or a bad \
             or repeated Content-Length"
                .into(),
        )),
        414 => Some((
            "uri_too_long",
            format!("the request's URI is over {MAX_URI_BYTES} bytes"),
        )),
        431 => Some((
            "headers_too_large",
            format!("the request's headers are over {MAX_HEADER_BYTES} bytes or 100 fields"),
        )),
        _ => None,
    }
}

/// If `buf` is the whole of hyper's answer to a request it could not parse, the same answer
/// with a JSON body.
fn json_answer(buf: &[u8]) -> Option<Vec<u8>> {
    if buf.len() > MAX_HYPER_HEAD || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    let mut lines = head[..head.len() - 4].split("\r\n");
    let status_line = lines.next()?;
    let version = status_line.get(..8)?;
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return None;
    }
    let status: u16 = status_line.get(9..12)?.parse().ok()?;
    let (code, message) = explain(status)?;
    let mut date = None;
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(": ")?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" if value == "0" => empty = true,
            "date" => date = Some(value),
            "connection" => {}
            _ => return None,
        }
    }
    if !empty {
        return None;
    }
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut answer = format!(
        "{version} {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(date) = date {
        answer.push_str(&format!("date: {date}\r\n"));
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

/// A connection's socket, giving hyper's bodiless parse-error answers a JSON body.
///
/// hyper answers a request it cannot parse (a bad request line or header, a bad or repeated
/// `Content-Length`: 400; a URI over 64 KiB: 414; a head over its read buffer or over 100
/// fields: 431) before any service sees it, with an empty body, and offers no hook to change
/// that. [`JsonErrors`] sits under hyper on the socket and swaps exactly that answer for the
/// same status with a JSON body. It recognises hyper's answer by its form: one write that is
/// a whole head of one of those statuses with only `content-length: 0`, `date` and
/// `connection` headers. No handler's head has that form (every error of ours has a body), but
/// a response body could hold those very bytes (a file's content), and changing a body would
/// desynchronise the connection, which a proxy may share among clients. So only writes before
/// the connection's first request reached the service are looked at: until then, nothing but
/// hyper writes. A parse error on a later request of a kept-alive connection stays bodiless.
pub(super) struct JsonErrors<T> {
    io: T,
    /// The answer being written in place of hyper's, how much of it is out, and how many bytes
    /// of hyper's to report written once it all is.
    swapping: Option<(Vec<u8>, usize, usize)>,
    /// Set by the connection's service when it is first called: from then on a write may be
    /// a response body, which is never touched.
    served: Arc<AtomicBool>,
}

impl<T> JsonErrors<T> {
    pub(super) fn new(io: T, served: Arc<AtomicBool>) -> Self {
        JsonErrors {
            io,
            swapping: None,
            served,
        }
    }

    /// hyper's own answer to a request it could not parse, swapped; `None` for anything else.
    fn swap(&self, head: &[u8]) -> Option<Vec<u8>> {
        if self.served.load(Ordering::SeqCst) {
            return None;
        }
        json_answer(head)
    }
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    /// Write the swapped answer out; then report hyper's `claimed` bytes written, so hyper
    /// goes on to close the connection as it meant to.
    fn poll_swapping(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        loop {
            let Some((answer, written, claimed)) = &mut self.swapping else {
                return Poll::Ready(Ok(0));
            };
            if *written == answer.len() {
                let claimed = *claimed;
                self.swapping = None;
                return Poll::Ready(Ok(claimed));
            }
            match Pin::new(&mut self.io).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.swapping.is_none() {
            match this.swap(buf) {
                Some(answer) => this.swapping = Some((answer, 0, buf.len())),
                None => return Pin::new(&mut this.io).poll_write(cx, buf),
            }
        }
        this.poll_swapping(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.swapping.is_none() {
            // hyper's answer is its head alone: one non-empty slice.
            let mut filled = bufs.iter().filter(|b| !b.is_empty());
            let answer = match (filled.next(), filled.next()) {
                (Some(head), None) => this.swap(head).map(|a| (a, head.len())),
                _ => None,
            };
            match answer {
                Some((answer, claimed)) => this.swapping = Some((answer, 0, claimed)),
                None => return Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
            }
        }
        this.poll_swapping(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body(answer: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn hypers_bodiless_parse_errors_get_a_json_body() {
        let date = "date: Sat, 05 Dec 2026 21:00:00 GMT";
        for (status, reason, code) in [
            (400, "Bad Request", "bad_request"),
            (414, "URI Too Long", "uri_too_long"),
            (431, "Request Header Fields Too Large", "headers_too_large"),
        ] {
            let hyper =
                format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n{date}\r\n\r\n");
            let answer = json_answer(hyper.as_bytes()).unwrap();
            let (head, json) = body(&answer);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")),
                "{head}"
            );
            assert!(head.contains("content-type: application/json"), "{head}");
            assert!(
                head.contains("connection: close") && head.contains(date),
                "{head}"
            );
            let (_, raw_body) = std::str::from_utf8(&answer)
                .unwrap()
                .split_once("\r\n\r\n")
                .unwrap();
            assert!(
                head.contains(&format!("content-length: {}", raw_body.len())),
                "{head}"
            );
            assert_eq!(json["error"]["code"], code, "{json}");
            assert!(json["error"]["message"].as_str().unwrap().len() > 10);
        }
    }

    #[test]
    fn anything_else_is_written_as_it_is() {
        for other in [
            // Our own answers have bodies.
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-other: 1\r\n\r\n",
            "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            "HTTP/2 400\r\ncontent-length: 0\r\n\r\n",
            "",
        ] {
            assert!(json_answer(other.as_bytes()).is_none(), "{other:?}");
        }
        let long = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: {}\r\n\r\n",
            "x".repeat(MAX_HYPER_HEAD)
        );
        assert!(json_answer(long.as_bytes()).is_none());
    }

    #[tokio::test]
    async fn the_socket_sends_the_json_answer_and_reports_hypers_bytes_written() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(16);
        let mut server = JsonErrors::new(server, Arc::new(AtomicBool::new(false)));
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        // A small pipe: the answer goes out over many writes, each reported as none of hyper's
        // bytes until the last, which reports all of them.
        let n = std::future::poll_fn(|cx| Pin::new(&mut server).poll_write(cx, hyper))
            .await
            .unwrap();
        assert_eq!(n, hyper.len());
        server.write_all(b"").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let got = reader.await.unwrap();
        let (head, json) = body(&got);
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert_eq!(json["error"]["code"], "headers_too_large");
    }

    #[tokio::test]
    async fn after_the_first_request_the_same_bytes_are_a_body_and_pass_unchanged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let served = Arc::new(AtomicBool::new(false));
        let mut server = JsonErrors::new(server, served.clone());
        served.store(true, Ordering::SeqCst);
        let body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        server.write_all(body).await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, body);
    }

    #[test]
    fn limits_answer_in_the_routes_shape() {
        let uri: Uri = format!("/v1/jobs/{}", "a".repeat(MAX_URI_BYTES))
            .parse()
            .unwrap();
        let response = over_limits(&uri, &HeaderMap::new(), false).unwrap();
        assert_eq!(response.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-big",
            HeaderValue::from_str(&"a".repeat(MAX_HEADER_BYTES)).unwrap(),
        );
        let fine: Uri = "/healthz".parse().unwrap();
        let response = over_limits(&fine, &headers, true).unwrap();
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert!(over_limits(&fine, &HeaderMap::new(), false).is_none());
        let at_limit: Uri = format!("/{}", "a".repeat(MAX_URI_BYTES - 1))
            .parse()
            .unwrap();
        assert!(over_limits(&at_limit, &HeaderMap::new(), false).is_none());
    }
}
