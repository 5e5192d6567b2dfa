//! Anthropic request translation: a job in OpenAI's vocabulary (roles, images, tools, tool results,
//! response formats) as a Messages API body, with JSON formats sent as a forced stand-in tool.

use serde::Serialize;
use serde_json::Value;
use sluice_core::{
    ContentPartRef, ImageUrl, JobRequest, Message, ResponseFormat, Role, ToolChoice, ToolMode,
};
use std::borrow::Cow;

/// Anthropic requires `max_tokens`; jobs that leave it out get this.
const DEFAULT_MAX_TOKENS: u32 = 1024;

#[derive(Serialize, Debug, PartialEq)]
pub(super) struct WireRequest<'a> {
    pub(super) model: &'a str,
    pub(super) max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) system: Option<System<'a>>,
    pub(super) messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stop_sequences: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) stream: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tool_choice: Option<WireToolChoice<'a>>,
}

/// One system message as a plain string; several as text blocks, which keeps them apart
/// without inventing a separator.
#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
pub(super) enum System<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize, Debug, PartialEq)]
pub(super) struct WireMessage<'a> {
    pub(super) role: &'static str,
    pub(super) content: MessageContent<'a>,
}

/// A turn that is one piece of text goes as a string, anything else as blocks.
#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
pub(super) enum MessageContent<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Block<'a> {
    Text {
        text: Cow<'a, str>,
    },
    Image {
        source: ImageSource<'a>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: &'a str,
        input: Value,
    },
    ToolResult {
        tool_use_id: Cow<'a, str>,
        #[serde(skip_serializing_if = "str::is_empty")]
        content: Cow<'a, str>,
    },
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum ImageSource<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize, Debug, PartialEq)]
pub(super) struct WireTool<'a> {
    pub(super) name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) description: Option<&'a str>,
    pub(super) input_schema: Cow<'a, Value>,
}

#[derive(Serialize, Debug, PartialEq)]
pub(super) struct WireToolChoice<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) name: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) disable_parallel_tool_use: bool,
}

/// The tool that stands in for `response_format`, which the Messages API does not have: the
/// model is made to "call" it, and the call's input is the JSON answer.
pub(super) struct FormatTool<'a> {
    pub(super) name: &'a str,
    pub(super) description: Option<&'a str>,
    pub(super) schema: Value,
}

/// Name of the stand-in tool for `json_object`, which has no name of its own.
pub(super) const JSON_OBJECT_TOOL: &str = "json_object";

pub(super) fn format_tool(job: &JobRequest) -> Option<FormatTool<'_>> {
    match job.response_format.as_ref()? {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(FormatTool {
            name: JSON_OBJECT_TOOL,
            description: None,
            schema: serde_json::json!({"type": "object"}),
        }),
        ResponseFormat::JsonSchema { json_schema } => Some(FormatTool {
            name: &json_schema.name,
            description: json_schema.description.as_deref(),
            schema: json_schema.schema_or_object(),
        }),
    }
}

/// Anthropic's pattern for tool_use ids is `^[a-zA-Z0-9_-]+$`. Ids from other providers (or
/// clients) that break it are mapped the same way in the call and in its result, so they
/// still pair up.
pub(super) fn tool_use_id(id: &str) -> Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(ok) {
        return Cow::Borrowed(id);
    }
    let mapped: String = id.chars().map(|c| if ok(c) { c } else { '_' }).collect();
    Cow::Owned(if mapped.is_empty() {
        "_".into()
    } else {
        mapped
    })
}

pub(super) fn image_block(image: &ImageUrl) -> Block<'_> {
    let source = match image.inline_data() {
        Some((media_type, data)) => ImageSource::Base64 { media_type, data },
        None => ImageSource::Url { url: &image.url },
    };
    Block::Image { source }
}

/// Blocks of a user or assistant message; empty text is left out, as Anthropic refuses it.
pub(super) fn content_blocks(m: &Message) -> Vec<Block<'_>> {
    let mut blocks: Vec<Block<'_>> = m
        .content
        .parts()
        .into_iter()
        .filter_map(|part| match part {
            ContentPartRef::Text("") => None,
            ContentPartRef::Text(text) => Some(Block::Text {
                text: Cow::Borrowed(text),
            }),
            ContentPartRef::Image(image) => Some(image_block(image)),
        })
        .collect();
    for call in &m.tool_calls {
        // The model wrote the arguments; if they are not a JSON object, the call still goes
        // back, with no arguments, rather than failing the whole conversation.
        let input = serde_json::from_str::<Value>(&call.function.arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        blocks.push(Block::ToolUse {
            id: tool_use_id(&call.id),
            name: &call.function.name,
            input,
        });
    }
    blocks
}

pub(super) fn wire_request<'a>(
    model: &'a str,
    job: &'a JobRequest,
    stream: bool,
) -> WireRequest<'a> {
    let mut system = Vec::new();
    // (role, blocks) per turn; consecutive messages of one role share a turn, since Anthropic
    // wants user and assistant to alternate and all results of one tool turn in one message.
    let mut turns: Vec<(&'static str, Vec<Block<'a>>)> = Vec::with_capacity(job.messages.len());
    for m in &job.messages {
        let (role, blocks) = match (m.role, m.tool_call_id.as_deref()) {
            (Role::System, _) => {
                system.push(m.content.text());
                continue;
            }
            (Role::Assistant, _) => ("assistant", content_blocks(m)),
            (Role::Tool, Some(id)) => (
                "user",
                vec![Block::ToolResult {
                    tool_use_id: tool_use_id(id),
                    content: m.content.text(),
                }],
            ),
            // A tool message without the id of its call cannot be a tool_result: plain text.
            (Role::User | Role::Tool, _) => ("user", content_blocks(m)),
        };
        if blocks.is_empty() {
            // An empty message says nothing, and Anthropic refuses empty content.
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            let content = match blocks.as_mut_slice() {
                [Block::Text { text }] => MessageContent::Text(std::mem::take(text)),
                _ => MessageContent::Blocks(blocks),
            };
            WireMessage { role, content }
        })
        .collect();
    let system = match system.len() {
        0 => None,
        1 => system.pop().map(System::Text),
        _ => Some(System::Blocks(
            system
                .into_iter()
                .map(|text| Block::Text { text })
                .collect(),
        )),
    };

    let mut tools: Vec<WireTool<'a>> = job
        .tools
        .iter()
        .map(|t| WireTool {
            name: &t.function.name,
            description: t.function.description.as_deref(),
            input_schema: match &t.function.parameters {
                Some(schema) => Cow::Borrowed(schema),
                None => Cow::Owned(t.function.parameters_or_empty()),
            },
        })
        .collect();
    let no_parallel = job.parallel_tool_calls == Some(false);
    let mut tool_choice = job.tool_choice.as_ref().map(|choice| {
        let (kind, name) = match choice {
            ToolChoice::Mode(ToolMode::Auto) => ("auto", None),
            ToolChoice::Mode(ToolMode::Required) => ("any", None),
            ToolChoice::Mode(ToolMode::None) => ("none", None),
            ToolChoice::Function(f) => ("tool", Some(f.function.name.as_str())),
        };
        WireToolChoice {
            kind,
            name,
            disable_parallel_tool_use: no_parallel && kind != "none",
        }
    });
    if tool_choice.is_none() && no_parallel && !tools.is_empty() {
        tool_choice = Some(WireToolChoice {
            kind: "auto",
            name: None,
            disable_parallel_tool_use: true,
        });
    }
    if let Some(format) = format_tool(job) {
        // Alone, the stand-in tool is forced; beside real tools the model chooses, as it
        // would choose between calling a tool and answering.
        if tools.is_empty() {
            tool_choice = Some(WireToolChoice {
                kind: "tool",
                name: Some(format.name),
                disable_parallel_tool_use: false,
            });
        }
        tools.push(WireTool {
            name: format.name,
            description: Some(format.description.unwrap_or(
                "Give the answer as this tool's input: a JSON value that matches the schema.",
            )),
            input_schema: Cow::Owned(format.schema),
        });
    }
    if tools.is_empty() {
        // A choice without tools means nothing to Anthropic, and `any` or `tool` would be refused.
        tool_choice = None;
    }

    WireRequest {
        model,
        max_tokens: job.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system,
        messages,
        temperature: job.temperature,
        top_p: job.top_p,
        stop_sequences: job.stop.as_deref(),
        stream,
        tools,
        tool_choice,
    }
}
