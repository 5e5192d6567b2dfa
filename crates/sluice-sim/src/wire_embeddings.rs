//! OpenAI embeddings wire format: request parsing, the deterministic vector, the response body.
//! The vector is a feature hash of words and word pairs, so similar texts really are similar.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

/// Dimensions when the request does not ask for a number.
pub const DEFAULT_DIMENSIONS: usize = 256;
/// The most `dimensions` the simulator serves (text-embedding-3-large has 3072).
pub const MAX_DIMENSIONS: usize = 4096;
/// OpenAI's limit on the number of inputs in one request.
pub const MAX_INPUTS: usize = 2048;

/// The parts of an embeddings request the simulator looks at; unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct WireRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<Value>,
}

/// A valid embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    /// At least one, none empty.
    pub inputs: Vec<String>,
    pub dimensions: usize,
    /// `encoding_format: "base64"`: each vector as base64 of its little-endian f32 bytes,
    /// which the official Python client asks for by default.
    pub base64: bool,
}

const INVALID_INPUT: &str =
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.";

/// Parses and validates a request body; the error is the message for a 400.
pub fn parse_request(body: &[u8]) -> Result<EmbeddingsRequest, String> {
    let req: WireRequest = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request. ({e})"))?;
    let model = req
        .model
        .ok_or_else(|| "you must provide a model parameter".to_owned())?;
    let inputs = match req.input {
        None | Some(Value::Null) => return Err("'input' is a required property".into()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => {
            if items.len() > MAX_INPUTS {
                return Err(format!(
                    "'$.input' is too long: at most {MAX_INPUTS} inputs per request"
                ));
            }
            // Token arrays (lists of integers) are valid for OpenAI but not simulated.
            items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(INVALID_INPUT.to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(INVALID_INPUT.into()),
    };
    if inputs.is_empty() || inputs.iter().any(String::is_empty) {
        return Err(INVALID_INPUT.into());
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(format!(
                "Invalid value for 'encoding_format': {other:?}. Supported values are: 'float' and 'base64'."
            ))
        }
    };
    let dimensions = match req.dimensions {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=MAX_DIMENSIONS).contains(n))
            .ok_or_else(|| {
                format!("Invalid value for 'dimensions': {v}. It must be an integer within 1..={MAX_DIMENSIONS}.")
            })?,
    };
    Ok(EmbeddingsRequest {
        model,
        inputs,
        dimensions,
        base64,
    })
}

/// Lowercased words with everything but letters and digits removed, so case and punctuation
/// never change a vector: "France?" and "france" are the same word.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// FNV-1a followed by a 64-bit finaliser: stable across platforms and Rust versions (unlike
/// `DefaultHasher`), so a vector stored by one build matches one computed by the next.
fn hash(feature: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in feature.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser spreads FNV's weak low bits over the whole word.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Adds `feature` to `v` at its hashed index with its hashed sign; signs make colliding
/// features cancel as often as they add up, so unrelated texts score near 0.
fn add(v: &mut [f64], feature: &str) {
    let h = hash(feature);
    let len = v.len() as u64;
    // `len` is at least 1 and the index is below it, so the conversions cannot fail.
    let i = usize::try_from(h % len).unwrap_or(0);
    let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
    if let Some(slot) = v.get_mut(i) {
        *slot += sign;
    }
}

/// The embedding of `text` in `dimensions` dims: every word and every pair of neighbouring
/// words (joined by a space, which no word contains) adds ±1 at its hashed index; the sum is
/// scaled to length 1. A text without words hashes as one feature, so it is never the zero vector.
///
/// Barring hash collisions, changing one word in the middle of an n-word text keeps
/// 2n - 4 of its 2n - 1 features: cosine (2n - 4) / (2n - 1), which reaches 0.95 at 31 words.
pub fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    let mut v = vec![0.0f64; dimensions.max(1)];
    let words = words(text);
    if words.is_empty() {
        add(&mut v, text);
    }
    for w in &words {
        add(&mut v, w);
    }
    for pair in words.windows(2) {
        add(&mut v, &format!("{} {}", pair[0], pair[1]));
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        // Every feature cancelled out in a collision: still answer with a unit vector.
        v[0] = 1.0;
        return v.iter().map(|x| *x as f32).collect();
    }
    v.iter().map(|x| (x / norm) as f32).collect()
}

/// Usage tokens of one input, estimated like the chat route's prompt tokens (4 chars a token).
pub fn tokens(text: &str) -> u32 {
    u32::try_from(text.chars().count().div_ceil(4))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The `list` body answering `req`, one `embedding` object per input in order.
pub fn response_body(req: &EmbeddingsRequest) -> Value {
    let data: Vec<Value> = req
        .inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let v = embed(text, req.dimensions);
            let embedding = if req.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let prompt_tokens = req
        .inputs
        .iter()
        .fold(0u32, |sum, t| sum.saturating_add(tokens(t)));
    json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        // Unit vectors: the dot product is the cosine.
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    fn sim(a: &str, b: &str) -> f64 {
        cosine(&embed(a, DEFAULT_DIMENSIONS), &embed(b, DEFAULT_DIMENSIONS))
    }

    #[test]
    fn vectors_are_unit_length_and_deterministic() {
        for text in ["hello", "What is the capital of France?", "?!", " "] {
            let v = embed(text, DEFAULT_DIMENSIONS);
            assert_eq!(v.len(), 256);
            let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum();
            assert!((norm - 1.0).abs() < 1e-6, "{text:?}: {norm}");
            assert_eq!(v, embed(text, DEFAULT_DIMENSIONS));
        }
        assert_eq!(embed("hello world", 8).len(), 8);
        assert_eq!(embed("hello world", 1).len(), 1);
        // Pinned bits: a change to the hash or the features would invalidate stored vectors.
        // 0x...0f % 4 = 3, top bit clear: +1 at index 3.
        assert_eq!(hash("hello"), 0x16fe_05a1_c75b_cd0f, "{:#x}", hash("hello"));
        assert_eq!(embed("hello", 4), [0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn case_and_punctuation_do_not_matter() {
        assert_eq!(
            words("What is the capital of France?"),
            ["what", "is", "the", "capital", "of", "france"]
        );
        assert_eq!(
            embed("What is the capital of France?", 256),
            embed("what   is the capital of france", 256)
        );
        assert_eq!(embed("Hello, World!", 64), embed("hello world", 64));
        assert!((sim("Hello, World!", "hello world") - 1.0).abs() < 1e-6);
    }

    const LONG: &str =
        "please write a short and friendly email to the whole team explaining that the \
        quarterly planning meeting has moved from tuesday morning to thursday afternoon because \
        the main conference room is being renovated this week";

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-3
    }

    #[test]
    fn one_word_changed_stays_close_only_in_a_long_text() {
        assert_eq!(words(LONG).len(), 35);
        // In the middle: (2 * 35 - 4) / (2 * 35 - 1) = 0.9565 without collisions.
        let middle = sim(LONG, &LONG.replace("friendly", "polite"));
        assert!(close(middle, 0.9577), "{middle}");
        // At the end one word and one pair change: (2 * 35 - 3) / (2 * 35 - 1) = 0.971.
        let end = sim(LONG, &LONG.replace("this week", "this month"));
        assert!(close(end, 0.9730), "{end}");

        // Twenty words are not enough: (2 * 20 - 4) / (2 * 20 - 1) = 0.923.
        let twenty = "one two three four five six seven eight nine ten eleven twelve thirteen \
            fourteen fifteen sixteen seventeen eighteen nineteen twenty";
        let changed = sim(twenty, &twenty.replace("ten", "zehn"));
        assert!(close(changed, 0.9343), "{changed}");

        // A six-word question with its last word changed: 9 of 11 features shared.
        let short = sim(
            "what is the capital of france",
            "what is the capital of spain",
        );
        assert!(close(short, 9.0 / 11.0), "{short}");
    }

    #[test]
    fn word_order_and_unrelated_texts_score_low() {
        // No word in common and, as it happens, no colliding index either.
        let unrelated = sim(
            "What is the capital of France?",
            "Summarise this contract for a ten year old.",
        );
        assert_eq!(unrelated, 0.0);
        let other = sim(LONG, "translate the following sentence into german please");
        assert!(close(other, 0.1839), "{other}");
        // Same words, other order: the words all match (squared norm 4 + 1 + 1 + 1, "the" twice)
        // and 3 of the 4 pairs: (7 + 3) / (7 + 4) = 0.909. Related, but not a match.
        let swapped = sim("the dog bites the man", "the man bites the dog");
        assert!(close(swapped, 10.0 / 11.0), "{swapped}");
    }

    #[test]
    fn parses_string_and_array_inputs() {
        let r = parse_request(br#"{"model":"m","input":"hi"}"#).unwrap();
        assert_eq!(
            r,
            EmbeddingsRequest {
                model: "m".into(),
                inputs: vec!["hi".into()],
                dimensions: 256,
                base64: false,
            }
        );
        let r = parse_request(
            br#"{"model":"m","input":["a","b"],"encoding_format":"base64","dimensions":3,"user":"u"}"#,
        )
        .unwrap();
        assert_eq!((r.inputs.len(), r.dimensions, r.base64), (2, 3, true));
        let r = parse_request(
            br#"{"model":"m","input":"a","encoding_format":"float","dimensions":null}"#,
        )
        .unwrap();
        assert_eq!((r.dimensions, r.base64), (256, false));
    }

    #[test]
    fn rejects_bad_requests() {
        for body in [
            &br#"{"#[..],
            br#"{"input":"hi"}"#,
            br#"{"model":"m"}"#,
            br#"{"model":"m","input":null}"#,
            br#"{"model":"m","input":""}"#,
            br#"{"model":"m","input":[]}"#,
            br#"{"model":"m","input":["a",""]}"#,
            br#"{"model":"m","input":[1,2,3]}"#,
            br#"{"model":"m","input":{"text":"a"}}"#,
            br#"{"model":"m","input":"a","encoding_format":"int8"}"#,
            br#"{"model":"m","input":"a","dimensions":0}"#,
            br#"{"model":"m","input":"a","dimensions":-1}"#,
            br#"{"model":"m","input":"a","dimensions":1.5}"#,
            br#"{"model":"m","input":"a","dimensions":100000}"#,
        ] {
            assert!(
                parse_request(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let many = json!({"model": "m", "input": vec!["a"; MAX_INPUTS + 1]});
        assert!(parse_request(many.to_string().as_bytes()).is_err());
        assert_eq!(
            parse_request(br#"{"model":"m","input":""}"#).unwrap_err(),
            INVALID_INPUT
        );
    }

    #[test]
    fn body_in_openai_shape() {
        let req = parse_request(br#"{"model":"emb","input":["hello world","x"],"dimensions":4}"#)
            .unwrap();
        let body = response_body(&req);
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "emb");
        assert_eq!(body["data"][1]["object"], "embedding");
        assert_eq!(body["data"][1]["index"], 1);
        let first: Vec<f32> = serde_json::from_value(body["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(first, embed("hello world", 4));
        // 11 chars -> 3 tokens, 1 char -> 1 token.
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 4, "total_tokens": 4})
        );

        let b64 = parse_request(
            br#"{"model":"emb","input":"hello world","dimensions":4,"encoding_format":"base64"}"#,
        )
        .unwrap();
        let text = response_body(&b64)["data"][0]["embedding"]
            .as_str()
            .unwrap()
            .to_owned();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, first);
    }
}
