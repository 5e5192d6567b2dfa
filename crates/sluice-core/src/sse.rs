//! An incremental parser for Server-Sent Events, shared by the provider adapters (streamed
//! answers) and the CLI's `sluice watch` (the API's job event streams).

use std::collections::VecDeque;

/// One server-sent event: its `event:` name and `id:`, if any, and its `data:` lines joined by
/// `\n`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

/// Incremental SSE parser: an event is the lines up to a blank line. Bytes are buffered until a
/// line is complete, so chunk boundaries may fall anywhere, even inside a UTF-8 character.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Feed the next bytes of the body; complete events are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut VecDeque<SseEvent>) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let line = self.buf[start..end]
                .strip_suffix(b"\r")
                .unwrap_or(&self.buf[start..end]);
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line, out);
            start = end + 1;
        }
        self.buf.drain(..start);
    }

    /// The body ended: a last event without its blank line still counts.
    pub fn finish(&mut self, out: &mut VecDeque<SseEvent>) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line =
                String::from_utf8_lossy(rest.strip_suffix(b"\r").unwrap_or(&rest)).into_owned();
            self.line(&line, out);
        }
        self.line("", out);
    }

    fn line(&mut self, line: &str, out: &mut VecDeque<SseEvent>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push_back(SseEvent {
                    event: self.event.take(),
                    id: self.id.take(),
                    data,
                });
            }
            self.event = None;
            self.id = None;
            return;
        }
        // Lines starting with ':' are comments (keep-alives); `retry` does not matter here.
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_chunks(body: &[u8], chunk: usize) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = VecDeque::new();
        for piece in body.chunks(chunk) {
            p.push(piece, &mut out);
        }
        p.finish(&mut out);
        out.into_iter().collect()
    }

    #[test]
    fn events_survive_any_chunking() {
        let body = "event: message_start\ndata: {\"a\":\"é\"}\n\n: keep-alive\n\nid: 7\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]";
        let expected = vec![
            SseEvent {
                event: Some("message_start".into()),
                id: None,
                data: "{\"a\":\"é\"}".into(),
            },
            SseEvent {
                event: None,
                id: Some("7".into()),
                data: "one\ntwo".into(),
            },
            SseEvent {
                event: None,
                id: None,
                data: "[DONE]".into(),
            },
        ];
        for chunk in 1..=body.len() {
            assert_eq!(
                parse_in_chunks(body.as_bytes(), chunk),
                expected,
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn names_and_ids_do_not_leak_into_the_next_event() {
        let events = parse_in_chunks(b"event: ping\nid: 3\n\ndata:x\n\n", 64);
        assert_eq!(
            events,
            [SseEvent {
                event: None,
                id: None,
                data: "x".into()
            }]
        );
    }
}
