//! Unit tests of the Gemini wire format: requests map onto the same common form as OpenAI's,
//! refusals are worded as Gemini words them, and answers carry Gemini's parts and usage.

#![allow(clippy::unwrap_used)]

use super::request::SKIP_SIGNATURE;
use super::*;
use crate::chat::{reply_for, ChatRequest, Format};
use crate::wire;

fn parse(v: Value) -> Result<ChatRequest, String> {
    parse_request(v.to_string().as_bytes(), "gemini-sim", false)
}

fn weather() -> Value {
    json!({"functionDeclarations": [{"name": "get_weather", "description": "Weather",
        "parametersJsonSchema": {"type": "object", "required": ["city"],
            "properties": {"city": {"type": "string"}}, "additionalProperties": false}}]})
}

#[test]
fn maps_onto_the_openai_reply() {
    let gemini = parse(
        json!({"systemInstruction": {"parts": [{"text": "be "}, {"text": "brief"}]},
               "contents": [{"role": "user", "parts": [{"text": "hello"}]},
                            {"role": "model", "parts": [{"text": "hi"}]},
                            {"role": "user", "parts": [{"text": "hello there"}]}],
               "generationConfig": {"maxOutputTokens": 9}}),
    )
    .unwrap();
    let openai = wire::parse_request(
        json!({"model": "m", "max_tokens": 9, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "hello there"}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(reply_for(&gemini, 16), reply_for(&openai, 16));
    assert_eq!(reply_for(&gemini, 16).completion_tokens, 9);
}

#[test]
fn images_calls_and_responses_map_like_openai() {
    let gemini = parse(json!({"tools": [weather()],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "contents": [
            {"role": "user", "parts": [{"text": "look"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"file_data": {"file_uri": "https://x.test/a.jpg"}}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                                         "thoughtSignature": SKIP_SIGNATURE}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                "response": {"content": "sunny"}}}]}]}))
    .unwrap();
    let openai = wire::parse_request(json!({"model": "m",
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "required": ["city"],
                "properties": {"city": {"type": "string"}}, "additionalProperties": false}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
        .to_string().as_bytes())
    .unwrap();
    assert_eq!(gemini.messages, openai.messages);
    assert_eq!(
        (&gemini.tools, &gemini.tool_choice),
        (&openai.tools, &openai.tool_choice)
    );
    assert_eq!(reply_for(&gemini, 8), reply_for(&openai, 8));
}

#[test]
fn a_function_call_answer_plain_and_streamed() {
    let req = parse(json!({"tools": [weather()],
        "contents": [{"role": "user", "parts": [{"text": "weather?"}]}]}))
    .unwrap();
    let reply = reply_for(&req, 8);
    let body = response_body("g", &reply);
    let candidate = &body["candidates"][0];
    assert_eq!(candidate["finishReason"], "STOP");
    let part = &candidate["content"]["parts"][0];
    assert_eq!(
        part["functionCall"],
        json!({"name": "get_weather", "args": {"city": "sim"}})
    );
    assert!(part["thoughtSignature"]
        .as_str()
        .is_some_and(chat::is_base64));

    let chunks = stream_chunks("g", &reply);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0]["candidates"][0]["content"]["parts"][0], *part);
    assert_eq!(chunks[0]["candidates"][0]["finishReason"], "STOP");

    // NONE turns calling off; the answer is text.
    let none = parse(json!({"tools": [weather()],
        "toolConfig": {"functionCallingConfig": {"mode": "NONE"}},
        "contents": [{"role": "user", "parts": [{"text": "weather?"}]}]}))
    .unwrap();
    assert!(reply_for(&none, 8).tool_call.is_none());
}

#[test]
fn json_output_follows_the_schema() {
    let req = parse(json!({"contents": [{"parts": [{"text": "x"}]}],
        "generationConfig": {"responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object", "required": ["n"],
                "properties": {"n": {"type": "integer"}}}}}))
    .unwrap();
    let text = response_body("g", &reply_for(&req, 8))["candidates"][0]["content"]["parts"][0]
        ["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(text, r#"{"n":1}"#);
    let openapi = parse(json!({"contents": [{"parts": [{"text": "x"}]}],
        "generationConfig": {"responseMimeType": "application/json",
            "responseSchema": {"type": "OBJECT", "properties": {"ok": {"type": "BOOLEAN"}}}}}))
    .unwrap();
    assert_eq!(reply_for(&openapi, 8).content, r#"{"ok":true}"#);
    let any = parse(json!({"contents": [{"parts": [{"text": "x"}]}],
        "generationConfig": {"responseMimeType": "application/json"}}))
    .unwrap();
    assert_eq!(any.format, Format::JsonObject);
}

#[test]
fn rejects_what_gemini_rejects() {
    let bad = |v: Value| parse(v).unwrap_err();
    assert!(bad(json!({"contents": []})).contains("contents"));
    assert!(
        bad(json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}))
            .contains("role")
    );
    assert!(bad(json!({"contents": [{"role": "user", "parts": []}]})).contains("parts"));
    assert!(bad(json!({"contents": [{"parts": [{}]}]})).contains("oneof"));
    assert!(
        bad(json!({"contents": [{"parts": [{"text": "a", "inlineData": {}}]}]}))
            .contains("already set")
    );
    assert!(bad(json!({"contents": [{"parts": [
        {"inlineData": {"mimeType": "image/png", "data": "%%%"}}]}]}))
    .contains("Base64"));

    let user = json!({"role": "user", "parts": [{"text": "x"}]});
    let call = |signature: Option<&str>| {
        let mut part = json!({"functionCall": {"name": "get_weather", "args": {}}});
        if let Some(s) = signature {
            part["thoughtSignature"] = json!(s);
        }
        json!({"role": "model", "parts": [part]})
    };
    let response = json!({"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"content": "ok"}}}]});
    let two = json!({"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"content": "ok"}}},
        {"functionResponse": {"name": "get_weather", "response": {"content": "ok"}}}]});
    assert!(bad(json!({"contents": [user, call(None), response]})).contains("thought_signature"));
    assert!(parse(json!({"contents": [user, call(Some(SKIP_SIGNATURE)), response]})).is_ok());
    assert!(
        bad(json!({"contents": [user, call(Some(SKIP_SIGNATURE)), two]}))
            .contains("number of function response parts")
    );
    assert!(bad(json!({"contents": [user, response]})).contains("immediately after"));

    let with_tools = |tools: Value| json!({"contents": [user], "tools": tools});
    assert!(
        bad(with_tools(json!([{"functionDeclarations": [{"name": "f",
        "parameters": {"type": "object", "additionalProperties": false}}]}])))
        .contains("Unknown name \"additionalProperties\"")
    );
    assert!(
        bad(with_tools(json!([{"functionDeclarations": [{"name": "f",
        "parameters": {"type": "object"}, "parametersJsonSchema": {"type": "object"}}]}])))
        .contains("mutually exclusive")
    );
    assert!(bad(with_tools(
        json!([{"functionDeclarations": [{"name": "1f"}]}])
    ))
    .contains("Invalid function name"));
    let mut config = with_tools(json!([weather()]));
    config["toolConfig"] =
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["nope"]}});
    assert!(bad(config.clone()).contains("nope"));
    config["toolConfig"] = json!({"functionCallingConfig": {"mode": "SOMETIMES"}});
    assert!(bad(config).contains("SOMETIMES"));
    let mut format = json!({"contents": [user]});
    format["generationConfig"] = json!({"responseJsonSchema": {"type": "object"}});
    assert!(bad(format).contains("response_mime_type"));
}

#[test]
fn last_chunk_carries_finish_and_usage() {
    let reply = Reply {
        content: "a b c".into(),
        tool_call: None,
        prompt_tokens: 2,
        completion_tokens: 3,
    };
    let chunks = stream_chunks("g", &reply);
    assert_eq!(chunks.len(), 3);
    let text: String = chunks
        .iter()
        .map(|c| {
            c["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(text, "a b c");
    assert!(chunks[0].get("usageMetadata").is_none());
    assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(chunks[2]["usageMetadata"]["totalTokenCount"], 5);
}
