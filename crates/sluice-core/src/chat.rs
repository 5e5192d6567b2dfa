//! The conversation a job carries, in OpenAI's chat vocabulary: messages with text and image
//! parts, tool definitions and calls, and the response format. Adapters translate it per wire.

use serde::{Deserialize, Deserializer, Serialize};
use std::borrow::Cow;

/// Author of a chat message. OpenAI's `developer` role arrives as [`Role::System`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// A message's content: plain text, or a list of text and image parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Default for Content {
    fn default() -> Self {
        Content::Text(String::new())
    }
}

impl From<&str> for Content {
    fn from(text: &str) -> Self {
        Content::Text(text.to_owned())
    }
}

impl From<String> for Content {
    fn from(text: String) -> Self {
        Content::Text(text)
    }
}

impl Content {
    /// The text of the content: the string, or the text parts joined without a separator.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Content::Text(text) => Cow::Borrowed(text),
            Content::Parts(parts) => {
                let mut texts = parts.iter().filter_map(ContentPart::as_text);
                match (texts.next(), texts.next()) {
                    (None, _) => Cow::Borrowed(""),
                    (Some(one), None) => Cow::Borrowed(one),
                    (Some(first), Some(second)) => {
                        let mut all = String::from(first);
                        all.push_str(second);
                        texts.for_each(|t| all.push_str(t));
                        Cow::Owned(all)
                    }
                }
            }
        }
    }

    /// True when there is neither text nor any other part.
    pub fn is_empty(&self) -> bool {
        match self {
            Content::Text(text) => text.is_empty(),
            Content::Parts(parts) => parts.is_empty(),
        }
    }

    /// The parts, a plain string counting as one text part.
    pub fn parts(&self) -> Vec<ContentPartRef<'_>> {
        match self {
            Content::Text(text) if text.is_empty() => Vec::new(),
            Content::Text(text) => vec![ContentPartRef::Text(text)],
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => ContentPartRef::Text(text),
                    ContentPart::ImageUrl { image_url } => ContentPartRef::Image(image_url),
                })
                .collect(),
        }
    }

    /// Characters of text, for token estimates; an image counts as a fixed amount.
    pub fn estimated_chars(&self) -> usize {
        match self {
            Content::Text(text) => text.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => text.len(),
                    // About what a low-detail image costs OpenAI (85 tokens), in characters.
                    ContentPart::ImageUrl { .. } => 340,
                })
                .sum(),
        }
    }
}

/// One part of a multi-part message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

impl ContentPart {
    fn as_text(&self) -> Option<&str> {
        match self {
            ContentPart::Text { text } => Some(text),
            ContentPart::ImageUrl { .. } => None,
        }
    }
}

/// A borrowed view of one part, for adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ContentPartRef<'a> {
    Text(&'a str),
    Image(&'a ImageUrl),
}

/// An image given by URL: `https://...` or a `data:<mime>;base64,...` URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    pub url: String,
    /// OpenAI's `low`, `high` or `auto`; other providers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ImageUrl {
    /// The media type and base64 data of a `data:` URL; `None` for other URLs.
    pub fn inline_data(&self) -> Option<(&str, &str)> {
        let rest = self.url.strip_prefix("data:")?;
        let (mime, data) = rest.split_once(";base64,")?;
        Some((mime, data))
    }
}

/// One chat message of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    /// `null` (an assistant turn made only of tool calls) reads as empty text.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: Content,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tools an assistant turn called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Content, D::Error> {
    Ok(Option::<Content>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    pub fn new(role: Role, content: impl Into<Content>) -> Message {
        Message {
            role,
            content: content.into(),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content.into())
    }

    /// A tool's result, answering the call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            tool_call_id: Some(call_id.into()),
            ..Message::new(Role::Tool, content.into())
        }
    }
}

/// A tool the model may call. Only functions exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    pub function: FunctionDef,
}

/// The one kind of tool and tool call there is: `"function"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    #[default]
    Function,
}

/// A function's name, description and JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl FunctionDef {
    /// The arguments' schema; a function without one takes an empty object.
    pub fn parameters_or_empty(&self) -> serde_json::Value {
        self.parameters
            .clone()
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}))
    }
}

/// A call the model made: the function and its arguments as a JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: FunctionKind,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as the model wrote it (it may not parse).
    pub arguments: String,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolMode),
    Function(NamedFunction),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    None,
    Auto,
    Required,
}

/// `{"type": "function", "function": {"name": ...}}`: call this function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    pub name: String,
}

impl ToolChoice {
    /// The function the model must call, if one is named.
    pub fn named(&self) -> Option<&str> {
        match self {
            ToolChoice::Function(f) => Some(&f.function.name),
            ToolChoice::Mode(_) => None,
        }
    }
}

/// The form the answer's text must take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        json_schema: JsonSchemaFormat,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl JsonSchemaFormat {
    /// The schema; a format without one accepts any JSON object.
    pub fn schema_or_object(&self) -> serde_json::Value {
        self.schema
            .clone()
            .unwrap_or_else(|| serde_json::json!({"type": "object"}))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_text_messages_keep_their_old_encoding() {
        let m = Message::user("hi");
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"role": "user", "content": "hi"})
        );
        let back: Message =
            serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn parts_tool_calls_and_null_content_parse() {
        let m: Message = serde_json::from_value(json!({"role": "user", "content": [
            {"type": "text", "text": "what is "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            {"type": "text", "text": "this?"}
        ]}))
        .unwrap();
        assert_eq!(m.content.text(), "what is this?");
        let parts = m.content.parts();
        assert_eq!(parts.len(), 3);
        let ContentPartRef::Image(image) = parts[1] else {
            panic!("{parts:?}")
        };
        assert_eq!(image.inline_data(), Some(("image/png", "AAAA")));

        let a: Message = serde_json::from_value(json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "f", "arguments": "{\"x\":1}"}}]}))
        .unwrap();
        assert!(a.content.is_empty());
        assert_eq!(a.tool_calls[0].function.name, "f");
        let t: Message = serde_json::from_value(
            json!({"role": "tool", "tool_call_id": "call_1", "content": "42"}),
        )
        .unwrap();
        assert_eq!(t, Message::tool_result("call_1", "42"));
    }

    #[test]
    fn unknown_parts_and_fields_are_refused() {
        for bad in [
            json!({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
            json!({"role": "user", "content": "x", "extra": 1}),
        ] {
            assert!(
                serde_json::from_value::<Message>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tool_choice_and_response_format_parse_both_spellings() {
        let auto: ToolChoice = serde_json::from_value(json!("auto")).unwrap();
        assert_eq!(auto, ToolChoice::Mode(ToolMode::Auto));
        let named: ToolChoice =
            serde_json::from_value(json!({"type": "function", "function": {"name": "f"}})).unwrap();
        assert_eq!(named.named(), Some("f"));
        let schema: ResponseFormat = serde_json::from_value(json!({"type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}}))
        .unwrap();
        assert!(matches!(schema, ResponseFormat::JsonSchema { .. }));
        let object: ResponseFormat =
            serde_json::from_value(json!({"type": "json_object"})).unwrap();
        assert_eq!(object, ResponseFormat::JsonObject);
        assert!(serde_json::from_value::<ResponseFormat>(json!({"type": "xml"})).is_err());
    }
}
