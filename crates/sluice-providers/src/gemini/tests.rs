use super::*;
use serde_json::json;
use sluice_core::{ContentPart, ImageUrl, JsonSchemaFormat, Tool};

#[test]
fn roles_and_system_instruction() {
    let messages = vec![
        Message::new(Role::System, "be brief"),
        Message::user("hi"),
        Message::new(Role::Assistant, "hello"),
    ];
    let job = JobRequest {
        max_tokens: Some(9),
        top_p: Some(0.9),
        ..JobRequest::new("alias", messages)
    };
    let body = serde_json::to_value(wire_request(&job)).unwrap_or_default();
    let expected = serde_json::json!({
        "contents": [{"role": "user", "parts": [{"text": "hi"}]},
                     {"role": "model", "parts": [{"text": "hello"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"maxOutputTokens": 9, "topP": 0.8999999761581421},
    });
    assert_eq!(body, expected);
    let bare = JobRequest {
        messages: vec![job.messages[1].clone()],
        max_tokens: None,
        top_p: None,
        ..job
    };
    let body = serde_json::to_value(wire_request(&bare)).unwrap_or_default();
    assert!(body.get("generationConfig").is_none() && body.get("systemInstruction").is_none());
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

fn image(url: &str) -> ContentPart {
    ContentPart::ImageUrl {
        image_url: ImageUrl {
            url: url.into(),
            detail: None,
        },
    }
}

#[test]
fn images_tools_calls_and_results_translate() {
    let tool: Tool = serde_json::from_value(json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "required": ["city"], "additionalProperties": false,
                       "properties": {"city": {"type": "string"}}}}}))
    .unwrap_or_else(|e| panic!("{e}"));
    let look = sluice_core::Content::Parts(vec![
        ContentPart::Text {
            text: "compare".into(),
        },
        image("data:image/png;base64,iVBORw0KGgo="),
        image("https://x.test/photos/a.PNG?size=2"),
        image("https://x.test/b"),
    ]);
    let job = JobRequest {
        seed: Some(42),
        tools: vec![tool],
        tool_choice: Some(
            serde_json::from_value(
                json!({"type": "function", "function": {"name": "get_weather"}}),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        ),
        parallel_tool_calls: Some(false),
        response_format: Some(ResponseFormat::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: "report".into(),
                description: None,
                schema: Some(json!({"type": "object", "properties": {"ok": {"type": "boolean"}}})),
                strict: None,
            },
        }),
        ..JobRequest::new(
            "alias",
            vec![
                Message::new(Role::System, "be brief"),
                Message::new(Role::User, look),
                Message {
                    tool_calls: vec![
                        call("call_0", "get_weather", r#"{"city":"Paris"}"#),
                        call("call_1", "get_weather", "oops"),
                    ],
                    ..Message::new(Role::Assistant, "")
                },
                Message::tool_result("call_0", r#"{"temp": 21}"#),
                Message::tool_result("call_1", "rain"),
                Message::user("and tomorrow?"),
            ],
        )
    };
    let body = serde_json::to_value(wire_request(&job)).unwrap_or_default();
    let expected = json!({
        "contents": [
            {"role": "user", "parts": [
                {"text": "compare"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/photos/a.PNG?size=2"}},
                {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.test/b"}}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                 "thoughtSignature": "skip_thought_signature_validator"},
                {"functionCall": {"name": "get_weather", "args": {}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": {"temp": 21}}}},
                {"functionResponse": {"name": "get_weather", "response": {"content": "rain"}}},
                {"text": "and tomorrow?"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Weather for a city",
            "parametersJsonSchema": {"type": "object", "required": ["city"], "additionalProperties": false,
                                     "properties": {"city": {"type": "string"}}}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {"seed": 42, "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    });
    assert_eq!(body, expected);

    let object = JobRequest {
        response_format: Some(ResponseFormat::JsonObject),
        tools: Vec::new(),
        seed: Some(i64::MAX),
        ..job
    };
    let body = serde_json::to_value(wire_request(&object)).unwrap_or_default();
    assert_eq!(
        body["generationConfig"],
        json!({"seed": 2147483647, "responseMimeType": "application/json"})
    );
    // Without tools there is nothing to configure.
    assert!(body.get("tools").is_none() && body.get("toolConfig").is_none());
    assert_eq!(gemini_seed(-1), -1);
    assert_eq!(gemini_seed((1 << 32) + 5), 5);
}

#[test]
fn empty_messages_are_dropped_and_their_neighbours_merged() {
    let job = JobRequest::new(
        "alias",
        vec![
            Message::user("a"),
            Message::new(Role::Assistant, ""),
            Message::user("b"),
        ],
    );
    let body = serde_json::to_value(wire_request(&job)).unwrap_or_default();
    assert_eq!(
        body["contents"],
        json!([{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}])
    );
}

#[test]
fn modes_map_onto_function_calling_config() {
    for (choice, mode) in [("auto", "AUTO"), ("required", "ANY"), ("none", "NONE")] {
        let job = JobRequest {
            tools: vec![serde_json::from_value(
                json!({"type": "function", "function": {"name": "f"}}),
            )
            .unwrap_or_else(|e| panic!("{e}"))],
            tool_choice: Some(
                serde_json::from_value(json!(choice)).unwrap_or_else(|e| panic!("{e}")),
            ),
            ..JobRequest::new("alias", vec![Message::user("x")])
        };
        let body = serde_json::to_value(wire_request(&job)).unwrap_or_default();
        assert_eq!(
            body["toolConfig"],
            json!({"functionCallingConfig": {"mode": mode}}),
            "{choice}"
        );
        // No parameters: the declaration has none either.
        assert_eq!(
            body["tools"],
            json!([{"functionDeclarations": [{"name": "f"}]}])
        );
    }
}

#[test]
fn function_calls_become_tool_calls() {
    let wire: WireResponse = serde_json::from_value(json!({"candidates": [{
        "content": {"role": "model", "parts": [
            {"text": "thinking...", "thought": true},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
            {"functionCall": {"id": "fc-7", "name": "noop"}}]},
        "finishReason": "STOP"}]}))
    .unwrap_or_else(|e| panic!("{e}"));
    let candidate = &wire.candidates[0];
    assert_eq!(
        candidate.tool_calls(0),
        vec![
            call("call_0", "get_weather", r#"{"city":"Paris"}"#),
            call("fc-7", "noop", "{}")
        ]
    );
    assert_eq!(candidate.tool_calls(3)[0].id, "call_3");
    assert_eq!(candidate.text(), "");
    assert_eq!(
        answer_finish(candidate.finish_reason.as_deref(), true).as_deref(),
        Some("tool_calls")
    );
    assert_eq!(answer_finish(Some("STOP"), false).as_deref(), Some("stop"));
    assert_eq!(
        answer_finish(Some("MAX_TOKENS"), true).as_deref(),
        Some("length")
    );
}

#[test]
fn tool_results_find_their_function_by_call_id() {
    let messages = vec![
        Message {
            tool_calls: vec![call("call_0", "first", "{}")],
            ..Message::new(Role::Assistant, "")
        },
        Message::tool_result("call_0", "a"),
        Message {
            tool_calls: vec![call("call_0", "second", "{}")],
            ..Message::new(Role::Assistant, "")
        },
        Message::tool_result("call_0", "b"),
        Message {
            name: Some("named".into()),
            ..Message::tool_result("call_9", "c")
        },
        Message::tool_result("call_8", "d"),
    ];
    let names: Vec<&str> = (0..messages.len())
        .filter(|&at| messages[at].role == Role::Tool)
        .map(|at| answered_name(&messages, at))
        .collect();
    // Ids repeat across rounds (Gemini gives none; call_<n> restarts): the nearest wins.
    assert_eq!(names, ["first", "second", "named", "call_8"]);
}

#[test]
fn urls_and_finish_reasons() {
    let mut c = EndpointConfig::new("g", "http://x/v1beta/", "models/gemini-sim", 60);
    c.api_key = Some(crate::Secret::new("AIza-secret"));
    let Ok(g) = Gemini::new(&c, reqwest::Client::new()) else {
        panic!("config should build")
    };
    assert_eq!(
        g.url.as_str(),
        "http://x/v1beta/models/gemini-sim:generateContent"
    );
    assert_eq!(
        g.stream_url.as_str(),
        "http://x/v1beta/models/gemini-sim:streamGenerateContent?alt=sse"
    );
    assert!(!format!("{g:?}").contains("AIza-secret"));

    assert_eq!(finish_reason("MAX_TOKENS"), "length");
    assert_eq!(finish_reason("SAFETY"), "content_filter");
    assert_eq!(finish_reason("OTHER"), "other");
}
