//! Unit tests of the OpenAI wire format: parsing into the common form, refusals worded as
//! OpenAI words them, and the exact bytes of plain and streamed answers.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::chat::{reply_for, ChatRequest, Format, Message, Role, ToolChoice};

fn req(v: Value) -> ChatRequest {
    parse_request(v.to_string().as_bytes()).unwrap()
}

fn bad(v: Value) -> String {
    parse_request(v.to_string().as_bytes()).unwrap_err()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}})
}

/// The data of each event of an SSE body, `[DONE]` as a string.
fn events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| json!(d)))
        .collect()
}

#[test]
fn durations() {
    assert_eq!(openai_duration(Duration::ZERO), "0ms");
    assert_eq!(openai_duration(Duration::from_micros(300)), "1ms");
    assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
    assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
    assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
    assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
    assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
}

#[test]
fn parses_into_the_common_form() {
    let r = req(
        json!({"model": "m", "max_completion_tokens": 9, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "this?"}]}
    ], "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(
        r.messages,
        vec![
            Message::new(Role::System, "be brief"),
            Message {
                images: 1,
                ..Message::new(Role::User, "what is this?")
            }
        ]
    );
    assert_eq!(
        (r.max_tokens, r.stream, r.include_usage),
        (Some(9), true, true)
    );
    assert_eq!(
        reply_for(&r, 4).content,
        "Simulated reply to: [1 image] what is this?"
    );
}

#[test]
fn tools_choices_and_formats() {
    let r = req(
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": false}),
    );
    assert_eq!(r.tools[0].name, "get_weather");
    assert_eq!(r.tool_choice, ToolChoice::Named("get_weather".into()));
    let r = req(json!({"messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a",
            "schema": {"type": "object", "properties": {"x": {"type": "boolean"}}}}}}));
    assert_eq!(
        r.format,
        Format::JsonSchema(json!({"type": "object", "properties": {"x": {"type": "boolean"}}}))
    );
    let r = req(
        json!({"messages": [{"role": "user", "content": "answer in JSON"}],
        "response_format": {"type": "json_object"}}),
    );
    assert_eq!(r.format, Format::JsonObject);
}

#[test]
fn a_tool_call_answer_plain_and_streamed() {
    let r = req(
        json!({"model": "m", "messages": [{"role": "user", "content": "weather?"}],
                       "tools": [weather_tool()]}),
    );
    let reply = reply_for(&r, 16);
    let body = completion_body(
        "chatcmpl-sim-0123456789abcdef0123456789abcdef",
        1,
        "m",
        &reply,
    );
    assert_eq!(
        body["choices"][0],
        json!({"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null, "tool_calls": [{
                "id": "call_89abcdef0123456789abcdef", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"sim\"}"}}]}})
    );

    let stream = stream_body("chatcmpl-sim-x", 1, "m", &reply, false);
    let chunks = events(&stream);
    let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(
        (&first["id"], &first["function"]["name"], &first["index"]),
        (
            &json!("call_chatcmplsimx"),
            &json!("get_weather"),
            &json!(0)
        )
    );
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .filter(|a| !a.is_empty())
        .collect();
    assert!(pieces.len() >= 2, "{pieces:?}");
    assert_eq!(pieces.concat(), r#"{"city":"sim"}"#);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "tool_calls"
    );
    assert_eq!(chunks[chunks.len() - 1], json!("[DONE]"));
}

#[test]
fn the_follow_up_with_the_tool_result_gets_text() {
    let r = req(
        json!({"model": "m", "tools": [weather_tool()], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]}),
    );
    assert_eq!(
        r.messages[1].call_chars,
        "get_weather".len() + r#"{"city":"Paris"}"#.len()
    );
    let reply = reply_for(&r, 10);
    assert!(reply.tool_call.is_none());
    let body = completion_body("id", 1, "m", &reply);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Simulated reply to tool result: sunny, 21 C lorem"));
}

#[test]
fn stream_concatenates_to_content() {
    let r = req(json!({"model": "m", "messages": [{"role": "user", "content": "a  b\nc"}]}));
    let reply = reply_for(&r, 12);
    let body = stream_body("id", 1, "m", &reply, true);
    let mut text = String::new();
    for v in events(&body) {
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(s);
        }
    }
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert_eq!(text, reply.content);
    assert!(body.contains("\"finish_reason\":\"stop\""));
    assert!(body.contains("\"total_tokens\""));
}

#[test]
fn bad_requests() {
    assert!(parse_request(b"{").is_err());
    assert!(parse_request(br#"{"model":"m","messages":[]}"#).is_err());
    assert!(parse_request(br#"{"model":"m"}"#).is_err());
    let user = json!([{"role": "user", "content": "hi"}]);
    assert!(
        bad(json!({"messages": user, "tools": [{"type": "function"}]}))
            .contains("'tools[0].function'")
    );
    assert!(bad(
        json!({"messages": user, "tools": [{"type": "function", "function": {"name": "a b"}}]})
    )
    .contains("pattern"));
    assert!(bad(json!({"messages": user, "tools": []})).contains("empty array"));
    assert!(bad(json!({"messages": user, "tool_choice": "auto"})).contains("'tools' are specified"));
    assert!(bad(json!({"messages": user, "parallel_tool_calls": true}))
        .contains("'tools' are specified"));
    assert!(bad(json!({"messages": user, "tools": [weather_tool()],
        "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
    .contains("nope"));
    assert!(
        bad(json!({"messages": user, "response_format": {"type": "json_object"}}))
            .contains("must contain the word 'json'")
    );
    assert!(
        bad(json!({"messages": user, "response_format": {"type": "json_schema"}}))
            .contains("json_schema'")
    );
    // A tool result needs the call it answers, and every call needs its result.
    assert!(bad(json!({"messages": [{"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}))
    .contains("preceeding message with 'tool_calls'"));
    let call =
        json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}});
    assert!(bad(json!({"messages": [{"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "user", "content": "and?"}]}))
    .contains("did not have response messages: call_1"));
    assert!(bad(json!({"messages": [{"role": "user", "content": null}]})).contains("got null"));
    assert!(bad(json!({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}))
    .contains("only allowed for messages with role 'user'"));
    assert!(bad(json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}))
    .contains("image_url.url"));
    assert!(bad(json!({"messages": [{"role": "robot", "content": "x"}]})).contains("robot"));
}
