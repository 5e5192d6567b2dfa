//! Vector helpers for the semantic cache: cosine similarity, the byte form stored in the
//! database, the text of a conversation to embed, and an exact nearest-match scan.

use crate::chat::{Message, Role};

/// Cosine similarity of `a` and `b`, within `-1.0..=1.0`.
///
/// `None` when the lengths differ, a vector is empty or zero, or a component is not finite:
/// the similarity is undefined, and a cache must treat that as "no match" rather than as 0.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f32> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    // Summed in f64 so long vectors do not lose the last digits that a 0.95 threshold looks at.
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let denom = (na * nb).sqrt();
    if !(denom.is_finite() && denom > 0.0 && dot.is_finite()) {
        return None;
    }
    Some((dot / denom).clamp(-1.0, 1.0) as f32)
}

/// The vector as little-endian `f32`s, 4 bytes each, for a BYTEA/BLOB column.
pub fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The inverse of [`encode_vector`]; `None` when the length is not a multiple of 4.
pub fn decode_vector(bytes: &[u8]) -> Option<Vec<f32>> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return None;
    }
    Some(
        chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// The text to embed for a conversation: one `role: content` line per message, in order.
///
/// The same conversation always gives the same text. It is meant for similarity, not identity:
/// two conversations can give the same text (a content with a newline and `user: `), so anything
/// that needs exact equality should compare the messages themselves.
pub fn prompt_text(messages: &[Message]) -> String {
    let mut out = String::with_capacity(
        messages
            .iter()
            .map(|m| m.content.estimated_chars() + 12)
            .sum(),
    );
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(role_name(m.role));
        out.push_str(": ");
        out.push_str(&m.content.text());
    }
    out
}

/// The candidate most similar to `query` with a cosine at or above `threshold`, and that cosine.
///
/// An exact scan. Candidates whose similarity is undefined (another length, a zero vector) are
/// skipped; among equal best scores the first wins. A NaN threshold matches nothing.
pub fn best_match<'a, K>(
    query: &[f32],
    candidates: impl IntoIterator<Item = (K, &'a [f32])>,
    threshold: f32,
) -> Option<(K, f32)> {
    let mut best: Option<(K, f32)> = None;
    for (key, vector) in candidates {
        let Some(score) = cosine(query, vector) else {
            continue;
        };
        let better = best.as_ref().is_none_or(|(_, s)| score > *s);
        if score >= threshold && better {
            best = Some((key, score));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cosine_of_known_vectors() {
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), Some(0.0));
        assert_eq!(cosine(&[1.0, 2.0], &[2.0, 4.0]), Some(1.0));
        assert_eq!(cosine(&[1.0, 2.0], &[-1.0, -2.0]), Some(-1.0));
        let c = cosine(&[1.0, 1.0], &[1.0, 0.0]).unwrap();
        assert!((c - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{c}");
    }

    #[test]
    fn cosine_is_undefined_for_mismatch_zero_empty_and_nan() {
        assert_eq!(cosine(&[1.0, 2.0], &[1.0]), None);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 0.0]), None);
        assert_eq!(cosine(&[], &[]), None);
        assert_eq!(cosine(&[f32::NAN, 1.0], &[1.0, 1.0]), None);
        assert_eq!(cosine(&[f32::INFINITY, 1.0], &[1.0, 1.0]), None);
    }

    #[test]
    fn vectors_encode_little_endian() {
        assert_eq!(encode_vector(&[1.0]), vec![0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(encode_vector(&[]), Vec::<u8>::new());
        assert_eq!(decode_vector(&[0x00, 0x00, 0x80, 0x3f]), Some(vec![1.0]));
        assert_eq!(decode_vector(&[]), Some(vec![]));
        assert_eq!(decode_vector(&[0, 0, 0]), None);
        assert_eq!(decode_vector(&[0, 0, 0x80, 0x3f, 0]), None);
    }

    #[test]
    fn prompt_text_joins_roles_and_contents() {
        let conversation = [
            Message::new(Role::System, "be brief"),
            Message::user("What is the capital of France?"),
            Message::new(Role::Assistant, "Paris."),
            Message::new(Role::Tool, "{}"),
        ];
        let text = prompt_text(&conversation);
        assert_eq!(
            text,
            "system: be brief\nuser: What is the capital of France?\nassistant: Paris.\ntool: {}"
        );
        assert_eq!(text, prompt_text(&conversation.clone()));
        assert_eq!(prompt_text(&[]), "");
        // The role is part of the text: the same words from another author are another prompt.
        assert_ne!(
            prompt_text(&[Message::user("hi")]),
            prompt_text(&[Message::new(Role::System, "hi")])
        );
    }

    #[test]
    fn best_match_takes_the_highest_at_or_above_threshold() {
        let q = [1.0, 0.0];
        let far = [0.0, 1.0];
        let near = [1.0, 0.1];
        let exact = [2.0, 0.0];
        let other_len = [1.0, 0.0, 0.0];
        let zero = [0.0, 0.0];
        let candidates: Vec<(&str, &[f32])> = vec![
            ("far", &far),
            ("near", &near),
            ("other_len", &other_len),
            ("zero", &zero),
            ("exact", &exact),
        ];
        assert_eq!(
            best_match(&q, candidates.clone(), 0.95),
            Some(("exact", 1.0))
        );
        // near: 1 / sqrt(1.01) = 0.995; at the threshold itself still matches.
        let near_score = cosine(&q, &near).unwrap();
        let without_exact = candidates[..4].to_vec();
        assert_eq!(
            best_match(&q, without_exact.clone(), near_score),
            Some(("near", near_score))
        );
        assert_eq!(best_match(&q, without_exact.clone(), 0.999), None);
        assert_eq!(best_match(&q, without_exact, f32::NAN), None);
        assert_eq!(best_match::<u8>(&q, [], 0.0), None);
        // Ties: the first candidate wins.
        let ties: Vec<(u8, &[f32])> = vec![(1, &exact), (2, &exact)];
        assert_eq!(best_match(&q, ties, 0.5), Some((1, 1.0)));
    }

    fn nonzero_vector() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(-1000.0f32..1000.0, 1..300)
            .prop_filter("not all zero", |v| v.iter().any(|x| x.abs() > 1e-3))
    }

    proptest! {
        #[test]
        fn cosine_with_itself_is_one(v in nonzero_vector()) {
            let c = cosine(&v, &v).unwrap();
            prop_assert!((c - 1.0).abs() < 1e-5, "{}", c);
        }

        #[test]
        fn cosine_is_symmetric_and_bounded(
            (a, b) in (1usize..100).prop_flat_map(|n| (
                prop::collection::vec(-1000.0f32..1000.0, n),
                prop::collection::vec(-1000.0f32..1000.0, n),
            ))
        ) {
            let ab = cosine(&a, &b);
            prop_assert_eq!(ab, cosine(&b, &a));
            if let Some(c) = ab {
                prop_assert!((-1.0..=1.0).contains(&c));
            }
        }

        #[test]
        fn encode_decode_round_trips(v in prop::collection::vec(any::<f32>(), 0..300)) {
            let bytes = encode_vector(&v);
            prop_assert_eq!(bytes.len(), v.len() * 4);
            let back = decode_vector(&bytes).unwrap();
            // Bitwise, so NaNs and negative zeros round-trip too.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&back), bits(&v));
        }
    }
}
