//! Tests of the Anthropic adapter's translation both ways: request bodies from jobs, answers,
//! stop reasons and stream error statuses from Anthropic's wire format.

use super::request::*;
use super::response::*;
use super::*;
use serde_json::json;
use sluice_core::{
    Content, ContentPart, FunctionCall, FunctionKind, ImageUrl, JobRequest, JsonSchemaFormat,
    Message, ResponseFormat, Role, Tool, ToolCall, ToolChoice, ToolMode,
};

fn msg(role: Role, content: &str) -> Message {
    Message::new(role, content)
}

#[test]
fn system_messages_move_to_the_top_and_max_tokens_defaults() {
    let messages = vec![
        msg(Role::System, "be brief"),
        msg(Role::User, "hi"),
        msg(Role::Assistant, "hello"),
        msg(Role::Tool, "42"),
    ];
    let job = JobRequest {
        temperature: Some(0.5),
        stop: Some(vec!["END".into()]),
        ..JobRequest::new("alias", messages)
    };
    let body = serde_json::to_value(wire_request("claude", &job, false)).ok();
    let expected = serde_json::json!({
        "model": "claude", "max_tokens": 1024, "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "42"}],
        "temperature": 0.5, "stop_sequences": ["END"],
    });
    assert_eq!(body, Some(expected));

    let two = JobRequest {
        messages: vec![
            msg(Role::System, "a"),
            msg(Role::System, "b"),
            msg(Role::User, "x"),
        ],
        max_tokens: Some(7),
        ..job
    };
    let body = serde_json::to_value(wire_request("claude", &two, true)).ok();
    let body = body.unwrap_or_default();
    assert_eq!(
        body["system"],
        serde_json::json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    );
    assert_eq!(
        (body["max_tokens"].as_u64(), body["stream"].as_bool()),
        (Some(7), Some(true))
    );
}

fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        kind: FunctionKind::Function,
        function: FunctionCall {
            name: name.into(),
            arguments: arguments.into(),
        },
    }
}

fn weather_tool() -> Tool {
    serde_json::from_value(json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}}))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn image(url: &str) -> ContentPart {
    ContentPart::ImageUrl {
        image_url: ImageUrl {
            url: url.into(),
            detail: None,
        },
    }
}

#[test]
fn images_tool_calls_and_results_become_blocks_in_alternating_turns() {
    let look = Content::Parts(vec![
        ContentPart::Text {
            text: "compare".into(),
        },
        image("data:image/png;base64,iVBORw0KGgo="),
        image("https://x.test/a.jpg"),
    ]);
    let job = JobRequest {
        seed: Some(3),
        tools: vec![weather_tool()],
        tool_choice: Some(
            serde_json::from_value(
                json!({"type": "function", "function": {"name": "get_weather"}}),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        ),
        parallel_tool_calls: Some(false),
        ..JobRequest::new(
            "alias",
            vec![
                msg(Role::System, "be brief"),
                Message::new(Role::User, look),
                Message {
                    tool_calls: vec![
                        call("call_1", "get_weather", r#"{"city":"Paris"}"#),
                        call("call:2", "get_weather", "not json"),
                    ],
                    ..msg(Role::Assistant, "Checking.")
                },
                Message::tool_result("call_1", "sunny"),
                Message::tool_result("call:2", "rain"),
                msg(Role::User, "and tomorrow?"),
            ],
        )
    };
    let body = serde_json::to_value(wire_request("claude", &job, false)).ok();
    let expected = json!({
        "model": "claude", "max_tokens": 1024, "system": "be brief",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                {"type": "text", "text": "and tomorrow?"}]}],
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": {"type": "object", "required": ["city"],
                                    "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
    });
    assert_eq!(body, Some(expected));
}

#[test]
fn response_formats_become_a_forced_tool() {
    let schema =
        json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}});
    let job = JobRequest {
        response_format: Some(ResponseFormat::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: "count".into(),
                description: None,
                schema: Some(schema.clone()),
                strict: Some(true),
            },
        }),
        // A choice about tools the job does not have is dropped, not sent.
        tool_choice: Some(ToolChoice::Mode(ToolMode::Auto)),
        ..JobRequest::new("alias", vec![msg(Role::User, "how many?")])
    };
    let body = serde_json::to_value(wire_request("claude", &job, false)).unwrap_or_default();
    assert_eq!(
        (&body["tools"], &body["tool_choice"]),
        (
            &json!([{"name": "count", "input_schema": schema,
                     "description": "Give the answer as this tool's input: a JSON value that matches the schema."}]),
            &json!({"type": "tool", "name": "count"})
        )
    );
    let object = JobRequest {
        response_format: Some(ResponseFormat::JsonObject),
        tools: vec![weather_tool()],
        tool_choice: None,
        ..job
    };
    let body = serde_json::to_value(wire_request("claude", &object, false)).unwrap_or_default();
    // Beside a real tool the stand-in is offered, not forced.
    assert_eq!(body["tools"][1]["name"], JSON_OBJECT_TOOL);
    assert_eq!(body["tools"][1]["input_schema"], json!({"type": "object"}));
    assert!(body.get("tool_choice").is_none(), "{body}");
    let bare = JobRequest {
        tool_choice: Some(ToolChoice::Mode(ToolMode::None)),
        response_format: None,
        tools: Vec::new(),
        ..object
    };
    let body = serde_json::to_value(wire_request("claude", &bare, false)).unwrap_or_default();
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
}

#[test]
fn answers_turn_tool_use_into_calls_and_the_format_tool_into_content() {
    let wire: WireResponse = serde_json::from_value(json!({"model": "claude-x",
        "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7}}))
    .unwrap_or_else(|e| panic!("{e}"));
    let a = Answer::from_blocks(wire.content, wire.stop_reason.as_deref(), None);
    assert_eq!(a.content, "Let me check.");
    assert_eq!(
        a.tool_calls,
        vec![call("toolu_1", "get_weather", r#"{"city":"Paris"}"#)]
    );
    assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));

    let wire: WireResponse = serde_json::from_value(json!({
        "content": [{"type": "tool_use", "id": "toolu_2", "name": "count", "input": {"n": 1}}],
        "stop_reason": "tool_use"}))
    .unwrap_or_else(|e| panic!("{e}"));
    let a = Answer::from_blocks(wire.content, wire.stop_reason.as_deref(), Some("count"));
    assert_eq!(
        (
            a.content.as_str(),
            a.tool_calls.len(),
            a.finish_reason.as_deref()
        ),
        (r#"{"n":1}"#, 0, Some("stop"))
    );
}

#[test]
fn empty_messages_are_dropped_and_their_neighbours_merged() {
    let job = JobRequest::new(
        "alias",
        vec![
            msg(Role::User, "a"),
            msg(Role::Assistant, ""),
            msg(Role::User, "b"),
        ],
    );
    let body = serde_json::to_value(wire_request("claude", &job, false)).unwrap_or_default();
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    );
}

#[test]
fn tool_use_ids_are_made_valid_for_anthropic() {
    assert_eq!(tool_use_id("toolu_01-ab"), "toolu_01-ab");
    assert_eq!(tool_use_id("call:1/2"), "call_1_2");
    assert_eq!(tool_use_id(""), "_");
}

#[test]
fn stop_reasons_and_stream_error_types() {
    assert_eq!(finish_reason("end_turn"), "stop");
    assert_eq!(finish_reason("max_tokens"), "length");
    assert_eq!(finish_reason("pause_turn"), "pause_turn");
    assert_eq!(status_for("overloaded_error"), 529);
    assert_eq!(status_for("rate_limit_error"), 429);
    assert_eq!(status_for("something_new"), 400);
}

#[test]
fn debug_hides_the_key() {
    let mut c = EndpointConfig::new("a", "http://x/v1", "claude", 60);
    c.api_key = Some(crate::Secret::new("sk-ant-secret"));
    let Ok(p) = Anthropic::new(&c, reqwest::Client::new()) else {
        panic!("config should build")
    };
    assert!(!format!("{p:?}").contains("sk-ant-secret"));
    assert_eq!(p.url.as_str(), "http://x/v1/messages");
}
