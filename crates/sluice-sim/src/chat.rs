//! The simulator's format-independent view of a chat request and its deterministic answer.
//! Every wire format parses into [`ChatRequest`] and renders [`Reply`], so all three answer alike.

use serde_json::{json, Value};

use crate::schema;

/// Characters one image counts as in the prompt estimate: about what a low-detail image costs
/// OpenAI (85 tokens), as Sluice's own estimate assumes.
pub const IMAGE_CHARS: usize = 340;

/// Who wrote a message, in OpenAI's terms (`tool` is a tool's result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One message as the simulator needs it: its text, how many images came with it, and the size
/// of any tool calls it carries (which count toward the prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub text: String,
    pub images: usize,
    /// Characters of the tool calls of an assistant turn (names plus compact JSON arguments).
    pub call_chars: usize,
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Message {
        Message {
            role,
            text: text.into(),
            images: 0,
            call_chars: 0,
        }
    }

    fn prompt_chars(&self) -> usize {
        self.text.chars().count() + self.images * IMAGE_CHARS + self.call_chars
    }
}

/// A function the request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    /// The arguments' JSON Schema (an empty object schema when the format sent none).
    pub schema: Value,
}

/// Whether the model should call a tool. `Auto` and `Required` behave alike: the simulated
/// model always calls one when it may.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    #[default]
    Auto,
    Required,
    None,
    Named(String),
}

/// The form the answer's text must take.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Format {
    #[default]
    Text,
    /// Any JSON object: the simulator answers `{"reply": <the usual text>}`.
    JsonObject,
    /// JSON generated from this schema.
    JsonSchema(Value),
}

/// The parts of a chat request the simulator looks at, whatever format it arrived in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage`.
    pub include_usage: bool,
    pub tools: Vec<ToolDef>,
    pub tool_choice: ToolChoice,
    pub format: Format,
}

/// A simulated tool call: the function and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    /// The arguments as compact JSON text, as OpenAI sends them.
    pub fn arguments_text(&self) -> String {
        self.arguments.to_string()
    }
}

/// The deterministic answer and its usage numbers: text, or one tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The answer's text; empty when the answer is a tool call.
    pub content: String,
    pub tool_call: Option<ToolCall>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

const FILLER: [&str; 8] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
];

/// Characters of the last message (or of the trailing tool results) echoed back.
const ECHO_CHARS: usize = 64;

/// Builds the reply for `req`:
///
/// - a request that offers tools (tool choice not `None`) and does not end in a tool result
///   gets one call to the named function, or else the first, with arguments generated from its
///   schema;
/// - otherwise the text is `Simulated reply to: <last user message>`, or `Simulated reply to tool
///   result: <result>` after tool results, padded with filler words up to `completion_tokens`
///   words (capped by the request's max tokens); a message's images show as `[1 image]`;
/// - a JSON format wraps that text as `{"reply": ...}` (JSON object) or replaces it with JSON
///   generated from the schema.
pub fn reply_for(req: &ChatRequest, completion_tokens: u32) -> Reply {
    let chars: usize = req
        .messages
        .iter()
        .map(Message::prompt_chars)
        .sum::<usize>()
        + req
            .tools
            .iter()
            .map(|t| t.name.len() + t.description.len() + t.schema.to_string().len())
            .sum::<usize>();
    let prompt_tokens = u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX).max(1);
    let cap = req.max_tokens.unwrap_or(u32::MAX);
    let after_tool = req.messages.last().is_some_and(|m| m.role == Role::Tool);

    if !after_tool {
        if let Some(tool) = chosen_tool(req) {
            let call = ToolCall {
                name: tool.name.clone(),
                arguments: schema::sample(&tool.schema),
            };
            return Reply {
                content: String::new(),
                completion_tokens: tokens_of(&call.arguments_text()).min(cap),
                tool_call: Some(call),
                prompt_tokens,
            };
        }
    }

    let words = completion_tokens.min(cap);
    let mut content = if after_tool {
        let results: Vec<&str> = req
            .messages
            .iter()
            .rev()
            .take_while(|m| m.role == Role::Tool)
            .map(|m| m.text.as_str())
            .collect();
        // Oldest first, as they were sent.
        let joined: Vec<&str> = results.into_iter().rev().collect();
        format!(
            "Simulated reply to tool result: {}",
            first_chars(&joined.join(" "))
        )
    } else {
        let last = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .or(req.messages.last());
        let images = last.map_or(0, |m| m.images);
        let text = last.map_or("", |m| m.text.as_str());
        match images {
            0 => format!("Simulated reply to: {}", first_chars(text)),
            1 => format!("Simulated reply to: [1 image] {}", first_chars(text)),
            n => format!("Simulated reply to: [{n} images] {}", first_chars(text)),
        }
    };
    let missing = (words as usize).saturating_sub(content.split_whitespace().count());
    for word in FILLER.iter().cycle().take(missing) {
        content.push(' ');
        content.push_str(word);
    }

    let (content, completion_tokens) = match &req.format {
        Format::Text => (content, words),
        Format::JsonObject => (json!({"reply": content}).to_string(), words),
        Format::JsonSchema(schema) => {
            let text = schema::sample(schema).to_string();
            let tokens = tokens_of(&text).min(cap);
            (text, tokens)
        }
    };
    Reply {
        content,
        tool_call: None,
        prompt_tokens,
        completion_tokens,
    }
}

/// The tool a call goes to, if the request lets the model call one.
fn chosen_tool(req: &ChatRequest) -> Option<&ToolDef> {
    match &req.tool_choice {
        ToolChoice::None => None,
        ToolChoice::Named(name) => req.tools.iter().find(|t| &t.name == name),
        ToolChoice::Auto | ToolChoice::Required => req.tools.first(),
    }
}

fn first_chars(text: &str) -> String {
    text.chars().take(ECHO_CHARS).collect()
}

/// About four characters a token, at least one.
fn tokens_of(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(4))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Whether `data` decodes as base64 (standard or URL-safe alphabet, padded or not), as the
/// providers check inline image data.
pub fn is_base64(data: &str) -> bool {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .any(|engine| engine.decode(data).is_ok())
}

/// How a text is streamed: word by word (each piece keeps its trailing space), or, for text
/// without spaces such as compact JSON, in pieces of a few characters; at least two pieces
/// whenever the text has two characters, so clients must assemble.
pub fn pieces(text: &str) -> Vec<&str> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    if words.len() > 1 {
        return words;
    }
    let chars = text.chars().count();
    let size = chars.div_ceil(2).clamp(1, 8);
    let mut out = Vec::with_capacity(chars / size + 1);
    let mut start = 0;
    for (n, (at, _)) in text.char_indices().enumerate() {
        if n > 0 && n % size == 0 {
            out.push(&text[start..at]);
            start = at;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn conversation(messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: Some("m".into()),
            messages,
            ..ChatRequest::default()
        }
    }

    fn weather() -> ToolDef {
        ToolDef {
            name: "get_weather".into(),
            description: "Weather for a city".into(),
            schema: json!({"type": "object", "required": ["city"],
                           "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}),
        }
    }

    #[test]
    fn reply_is_deterministic_and_sized() {
        let r = conversation(vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "hello there"),
        ]);
        let a = reply_for(&r, 16);
        assert_eq!(a, reply_for(&r, 16));
        assert!(a
            .content
            .starts_with("Simulated reply to: hello there lorem"));
        assert_eq!(a.content.split_whitespace().count(), 16);
        assert_eq!((a.completion_tokens, a.prompt_tokens), (16, 5)); // ceil((8 + 11) / 4)
        assert_eq!(a.tool_call, None);

        let capped = ChatRequest {
            max_tokens: Some(7),
            ..conversation(vec![Message::new(Role::User, "x")])
        };
        let c = reply_for(&capped, 16);
        assert_eq!(
            (c.completion_tokens, c.content.split_whitespace().count()),
            (7, 7)
        );
        let long = conversation(vec![Message::new(Role::User, "y".repeat(100))]);
        assert_eq!(
            reply_for(&long, 1).content,
            format!("Simulated reply to: {}", "y".repeat(64))
        );
    }

    #[test]
    fn images_are_counted_in_the_echo_and_the_prompt() {
        let mut m = Message::new(Role::User, "what is this?");
        m.images = 1;
        let one = reply_for(&conversation(vec![m.clone()]), 1);
        assert_eq!(one.content, "Simulated reply to: [1 image] what is this?");
        assert_eq!(one.prompt_tokens, (13 + 340_u32).div_ceil(4));
        m.images = 2;
        let two = reply_for(&conversation(vec![m]), 1);
        assert!(two
            .content
            .starts_with("Simulated reply to: [2 images] what"));
    }

    #[test]
    fn tools_get_one_call_to_the_chosen_function() {
        let mut req = conversation(vec![Message::new(Role::User, "weather in Paris?")]);
        let other = ToolDef {
            name: "noop".into(),
            description: String::new(),
            schema: json!({"type": "object", "properties": {}}),
        };
        req.tools = vec![weather(), other];
        let r = reply_for(&req, 16);
        assert_eq!(
            r.tool_call,
            Some(ToolCall {
                name: "get_weather".into(),
                arguments: json!({"city": "sim"})
            })
        );
        assert_eq!(r.content, "");
        assert_eq!(r.completion_tokens, 4); // {"city":"sim"} is 14 characters
        assert!(r.prompt_tokens > 10, "tool definitions count: {r:?}");

        req.tool_choice = ToolChoice::Named("noop".into());
        let named = reply_for(&req, 16).tool_call.unwrap();
        assert_eq!((named.name.as_str(), named.arguments), ("noop", json!({})));

        req.tool_choice = ToolChoice::None;
        assert!(reply_for(&req, 16)
            .content
            .starts_with("Simulated reply to: weather"));
    }

    #[test]
    fn after_tool_results_the_model_answers_in_text() {
        let mut req = conversation(vec![
            Message::new(Role::User, "weather in Paris?"),
            Message {
                call_chars: 30,
                ..Message::new(Role::Assistant, "")
            },
            Message::new(Role::Tool, "sunny, 21 C"),
            Message::new(Role::Tool, "windy"),
        ]);
        req.tools = vec![weather()];
        let r = reply_for(&req, 12);
        assert_eq!(r.tool_call, None);
        assert!(
            r.content
                .starts_with("Simulated reply to tool result: sunny, 21 C windy lorem"),
            "{}",
            r.content
        );
        assert_eq!(r.content.split_whitespace().count(), 12);
    }

    #[test]
    fn json_formats() {
        let mut req = conversation(vec![Message::new(Role::User, "hi")]);
        req.format = Format::JsonObject;
        let object: Value = serde_json::from_str(&reply_for(&req, 5).content).unwrap();
        assert_eq!(object, json!({"reply": "Simulated reply to: hi lorem"}));
        req.format = Format::JsonSchema(json!({"type": "object", "required": ["n"],
            "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}));
        let r = reply_for(&req, 4);
        assert_eq!(r.content, r#"{"n":1}"#);
        assert_eq!(r.completion_tokens, 2);
    }

    #[test]
    fn pieces_concatenate_and_split_text_without_spaces() {
        assert_eq!(pieces("a b  c"), ["a ", "b ", " ", "c"]);
        assert_eq!(pieces("{}"), ["{", "}"]);
        let json = r#"{"city":"sim","days":1}"#;
        let p = pieces(json);
        assert!(p.len() > 2 && p.iter().all(|s| s.len() <= 8), "{p:?}");
        assert_eq!(p.concat(), json);
        assert_eq!(pieces("é"), ["é"]);
        assert!(pieces("").is_empty());
    }
}
