//! Unit tests of the Anthropic wire format: requests map onto the same common form as OpenAI's,
//! refusals are worded as Anthropic words them, and answers have Anthropic's event sequence.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::chat::{reply_for, ChatRequest};

fn parse(v: Value) -> Result<ChatRequest, String> {
    parse_request(v.to_string().as_bytes())
}

fn weather() -> Value {
    json!({"name": "get_weather", "description": "Weather",
           "input_schema": {"type": "object", "required": ["city"],
                            "properties": {"city": {"type": "string"}}}})
}

/// (event name, data) of each event of an SSE body.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            (name.strip_prefix("event: ").unwrap().to_owned(), v)
        })
        .collect()
}

#[test]
fn maps_onto_the_openai_reply() {
    let anthropic = parse(
        json!({"model": "claude-sim", "max_tokens": 1024, "system": "be brief",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}),
    )
    .unwrap();
    let openai = wire::parse_request(
        json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(reply_for(&anthropic, 16), reply_for(&openai, 16));
}

#[test]
fn images_tools_and_results_map_like_openai() {
    let png = "iVBORw0KGgo=";
    let anthropic = parse(json!({"model": "c", "max_tokens": 50, "tools": [weather()],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "sunny"}]}]}]}))
    .unwrap();
    let openai = wire::parse_request(json!({"model": "m", "max_tokens": 50,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
        .to_string().as_bytes())
    .unwrap();
    assert_eq!(anthropic.messages, openai.messages);
    assert_eq!(
        (&anthropic.tools, &anthropic.tool_choice),
        (&openai.tools, &openai.tool_choice)
    );
    let reply = reply_for(&anthropic, 8);
    assert_eq!(reply, reply_for(&openai, 8));
    assert!(reply
        .content
        .starts_with("Simulated reply to tool result: sunny"));
}

#[test]
fn a_tool_call_answer_plain_and_streamed() {
    let req = parse(json!({"model": "c", "max_tokens": 50, "tools": [weather()],
        "messages": [{"role": "user", "content": "weather?"}]}))
    .unwrap();
    let reply = reply_for(&req, 8);
    let body = message_body("msg_sim_0123456789abcdef0123456789abcdef", "c", &reply);
    assert_eq!(
        body["content"],
        json!([{"type": "tool_use", "id": "toolu_sim_89abcdef0123456789abcdef",
                "name": "get_weather", "input": {"city": "sim"}}])
    );
    assert_eq!(body["stop_reason"], "tool_use");

    let events = events(&stream_body("msg_sim_1", "c", &reply));
    let start = &events[1].1;
    assert_eq!(
        start["content_block"],
        json!({"type": "tool_use", "id": "toolu_sim_msgsim1", "name": "get_weather", "input": {}})
    );
    let json: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert_eq!(json, r#"{"city":"sim"}"#);
    assert!(
        events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .count()
            >= 3
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );
}

#[test]
fn rejects_what_anthropic_rejects() {
    let bad = |v: Value| parse(v).unwrap_err();
    let msg = json!([{"role": "user", "content": "x"}]);
    assert!(bad(json!({"model": "m", "messages": msg})).contains("max_tokens"));
    assert!(bad(json!({"max_tokens": 5, "messages": msg})).contains("model"));
    assert!(bad(json!({"model": "m", "max_tokens": 5, "messages": []})).contains("messages"));
    let system_role = json!([{"role": "system", "content": "x"}]);
    assert!(bad(json!({"model": "m", "max_tokens": 5, "messages": system_role})).contains("role"));
    assert!(parse_request(b"{").is_err());

    let with = |messages: Value| json!({"model": "m", "max_tokens": 5, "messages": messages});
    let call = json!({"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]});
    // A result for a call the previous turn did not make.
    assert!(bad(with(json!([{"role": "user", "content": "x"}, call,
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2"}]}])))
    .contains("unexpected `tool_use_id`"));
    // A call nobody answered.
    assert!(bad(with(json!([{"role": "user", "content": "x"}, call,
        {"role": "user", "content": "and?"}])))
    .contains("without `tool_result` blocks immediately after: toolu_1"));
    // Results after text.
    assert!(bad(with(json!([{"role": "user", "content": "x"}, call,
        {"role": "user", "content": [{"type": "text", "text": "here"},
            {"type": "tool_result", "tool_use_id": "toolu_1"}]}])))
    .contains("must come first"));
    assert!(bad(with(
        json!([{"role": "user", "content": [{"type": "text", "text": ""}]}])
    ))
    .contains("non-empty"));
    assert!(
        bad(with(json!([{"role": "user", "content": [{"type": "image",
        "source": {"type": "base64", "media_type": "image/bmp", "data": "AAAA"}}]}])))
        .contains("media_type")
    );
    assert!(
        bad(with(json!([{"role": "user", "content": [{"type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}]}])))
        .contains("base64")
    );
    assert!(bad(with(
        json!([{"role": "user", "content": [{"type": "image_url",
        "image_url": {"url": "https://x"}}]}])
    ))
    .contains("image_url"));

    let mut tools = with(json!([{"role": "user", "content": "x"}]));
    tools["tools"] = json!([{"name": "f", "parameters": {"type": "object"}}]);
    assert!(bad(tools.clone()).contains("input_schema: Field required"));
    tools["tools"] = json!([weather()]);
    tools["tool_choice"] = json!({"type": "tool", "name": "nope"});
    assert!(bad(tools.clone()).contains("nope"));
    tools["tool_choice"] = json!({"type": "function"});
    assert!(bad(tools).contains("'auto', 'any', 'tool', 'none'"));
}

#[test]
fn stream_deltas_concatenate_to_content() {
    let reply = Reply {
        content: "Simulated reply to: hi lorem".into(),
        tool_call: None,
        prompt_tokens: 3,
        completion_tokens: 5,
    };
    let events = events(&stream_body("msg_sim_1", "claude-sim", &reply));
    let mut text = String::new();
    for (name, v) in &events {
        assert_eq!(&v["type"], name.as_str());
        if let Some(t) = v["delta"]["text"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, reply.content);
    assert_eq!(events.first().map(|e| e.0.as_str()), Some("message_start"));
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("message_stop"));
}
