//! Anthropic response parsing: a message's content blocks as text and OpenAI-shaped tool calls
//! (the stand-in format tool turned back into the answer), stop reasons and error statuses.

use serde::Deserialize;
use serde_json::Value;
use sluice_core::{FunctionCall, FunctionKind, ToolCall};

#[derive(Deserialize)]
pub(super) struct WireResponse {
    #[serde(default)]
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) content: Vec<WireBlock>,
    #[serde(default)]
    pub(super) stop_reason: Option<String>,
    #[serde(default)]
    pub(super) usage: Option<WireUsage>,
}

#[derive(Deserialize)]
pub(super) struct WireBlock {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) text: Option<String>,
    /// tool_use blocks: the call's id, function and arguments.
    #[serde(default)]
    pub(super) id: Option<String>,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) input: Option<Value>,
}

/// A finished answer's text and calls, with the `response_format` stand-in tool turned back
/// into the answer: its input is the JSON text, and the turn ends as a normal stop.
pub(super) struct Answer {
    pub(super) content: String,
    pub(super) tool_calls: Vec<ToolCall>,
    pub(super) finish_reason: Option<String>,
}

impl Answer {
    /// A whole message's answer: its text and tool_use blocks (thinking blocks are not part of it).
    pub(super) fn from_blocks(
        blocks: Vec<WireBlock>,
        stop_reason: Option<&str>,
        format_tool: Option<&str>,
    ) -> Answer {
        let mut text = String::new();
        let mut calls = Vec::new();
        for block in blocks {
            match block.kind.as_str() {
                "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
                "tool_use" => calls.push((
                    block.id.unwrap_or_default(),
                    block.name.unwrap_or_default(),
                    block
                        .input
                        .map_or_else(|| "{}".to_owned(), |v| v.to_string()),
                )),
                _ => {}
            }
        }
        Answer::new(text, calls, stop_reason, format_tool)
    }

    /// `calls` are (id, name, arguments as JSON text) in the order the model made them.
    pub(super) fn new(
        text: String,
        calls: Vec<(String, String, String)>,
        stop_reason: Option<&str>,
        format_tool: Option<&str>,
    ) -> Answer {
        let mut content = text;
        let mut tool_calls = Vec::with_capacity(calls.len());
        let mut formatted = false;
        for (id, name, arguments) in calls {
            if Some(name.as_str()) == format_tool && !formatted {
                // The JSON is the whole answer; any words before it are not.
                content = arguments;
                formatted = true;
                continue;
            }
            tool_calls.push(ToolCall {
                id,
                kind: FunctionKind::Function,
                function: FunctionCall { name, arguments },
            });
        }
        let finish_reason = match stop_reason {
            Some("tool_use") if formatted && tool_calls.is_empty() => Some("stop".to_owned()),
            other => other.map(finish_reason),
        };
        Answer {
            content,
            tool_calls,
            finish_reason,
        }
    }
}

#[derive(Deserialize, Default)]
pub(super) struct WireUsage {
    #[serde(default)]
    pub(super) input_tokens: Option<u32>,
    #[serde(default)]
    pub(super) output_tokens: Option<u32>,
}

/// Anthropic's stop reasons in the OpenAI vocabulary the rest of Sluice uses.
pub(super) fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

/// The HTTP status Anthropic uses for an error type, for errors that arrive inside a stream.
pub(super) fn status_for(error_type: &str) -> u16 {
    match error_type {
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        "api_error" => 500,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        _ => 400,
    }
}
