//! A cheap rule-based guess at how demanding a prompt is, so an alias like `auto` can go to a
//! small or a large pool. Plain string scanning; the rule that fired is kept for the job record.

use crate::chat::Message;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Prompts longer than this many characters count as complex.
pub const LONG_PROMPT_CHARS: usize = 1500;

/// Word stems that suggest reasoning or design work, matched at the start of a word, so that
/// "analysis", "comparing" and "debugging" count but "improve" does not count as "prove".
const REASONING_STEMS: &[&str] = &[
    "design",
    "architect",
    "analyz",
    "analys",
    "compar",
    "prove",
    "proof",
    "deriv",
    "optimiz",
    "optimis",
    "debug",
    "trade-off",
    "tradeoff",
    "trade off",
];

/// How demanding a prompt looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Complexity {
    Simple,
    Complex,
}

impl Complexity {
    pub fn as_str(self) -> &'static str {
        match self {
            Complexity::Simple => "simple",
            Complexity::Complex => "complex",
        }
    }
}

impl fmt::Display for Complexity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verdict and the rule that gave it, in words for the job record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classification {
    pub complexity: Complexity,
    pub rule: String,
}

/// Classify a conversation by all of its messages' contents. Rules in order, first match wins:
/// a code block, multi-step wording, a reasoning or design keyword, or a long prompt make it
/// complex; anything else is simple.
pub fn classify(messages: &[Message]) -> Classification {
    let text = messages
        .iter()
        .map(|m| m.content.text())
        .collect::<Vec<_>>()
        .join("\n")
        .to_lowercase();
    let complex = |rule: String| Classification {
        complexity: Complexity::Complex,
        rule,
    };

    if text.contains("```") {
        return complex("code block (```) in the prompt".to_owned());
    }
    if let Some(words) = multi_step(&text) {
        return complex(format!("multi-step wording ({words})"));
    }
    if let Some(word) = REASONING_STEMS
        .iter()
        .filter_map(|stem| find_word_start(&text, stem, 0).map(|at| (at, stem.len())))
        .min()
        .map(|(at, len)| word_at(&text, at, len))
    {
        return complex(format!("reasoning or design keyword \"{word}\""));
    }
    // Counted on the original contents: lowercasing can change the length of some characters.
    let chars: usize = messages
        .iter()
        .map(|m| m.content.text().chars().count())
        .sum();
    if chars > LONG_PROMPT_CHARS {
        return complex(format!("long prompt ({chars} characters)"));
    }
    Classification {
        complexity: Complexity::Simple,
        rule: format!("short plain prompt ({chars} characters)"),
    }
}

/// Which multi-step wording the (lowercased) text uses, if any.
fn multi_step(text: &str) -> Option<&'static str> {
    if let Some(first) = find_word(text, "first", 0) {
        if let Some(then) = find_word(text, "then", first + "first".len()) {
            if find_word(text, "finally", then + "then".len()).is_some() {
                return Some("first … then … finally");
            }
        }
    }
    if text.contains("step by step") || text.contains("step-by-step") {
        return Some("\"step by step\"");
    }
    let numbered = |n: &str| {
        text.lines().any(|line| {
            let line = line.trim_start();
            // "1." or "1)" followed by a space or the line's end: "1.5" is a number, not a step.
            line.strip_prefix(n)
                .and_then(|rest| rest.strip_prefix(['.', ')']))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
        })
    };
    if numbered("1") && numbered("2") {
        return Some("numbered steps 1. and 2.");
    }
    None
}

/// Byte offset of the first whole-word `word` at or after `from`.
fn find_word(text: &str, word: &str, from: usize) -> Option<usize> {
    let mut start = from;
    while let Some(at) = find_word_start(text, word, start) {
        if !continues_word(text, at + word.len()) {
            return Some(at);
        }
        start = at + word.len();
    }
    None
}

/// Byte offset of the first `stem` at or after `from` that starts a word.
fn find_word_start(text: &str, stem: &str, from: usize) -> Option<usize> {
    let mut start = from;
    while let Some(found) = text.get(start..).and_then(|rest| rest.find(stem)) {
        let at = start + found;
        let starts_word = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        if starts_word {
            return Some(at);
        }
        // Step past the match's first character, staying on a char boundary.
        start = at + text[at..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// Whether the character at byte `at` continues a word (is alphanumeric).
fn continues_word(text: &str, at: usize) -> bool {
    text.get(at..)
        .and_then(|rest| rest.chars().next())
        .is_some_and(char::is_alphanumeric)
}

/// The word a stem of `len` bytes at byte `at` begins, extended over letters, digits and
/// hyphens ("analys" in "analysis, ..." gives "analysis"), for the rule text.
fn word_at(text: &str, at: usize, len: usize) -> &str {
    let rest = &text[at + len..];
    let end = rest
        .char_indices()
        .find(|&(_, c)| !(c.is_alphanumeric() || c == '-'))
        .map_or(rest.len(), |(i, _)| i);
    &text[at..at + len + end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    fn one(text: &str) -> Classification {
        classify(&[Message::user(text)])
    }

    fn is_complex(text: &str) -> bool {
        one(text).complexity == Complexity::Complex
    }

    #[test]
    fn short_plain_prompts_are_simple() {
        assert_eq!(
            one("What is the capital of France?"),
            Classification {
                complexity: Complexity::Simple,
                rule: "short plain prompt (30 characters)".to_owned(),
            }
        );
        assert_eq!(classify(&[]).rule, "short plain prompt (0 characters)");
    }

    #[test]
    fn code_blocks_are_complex() {
        let c = one("Why does this fail?\n```rust\nlet x = 1;\n```");
        assert_eq!(c.complexity, Complexity::Complex);
        assert_eq!(c.rule, "code block (```) in the prompt");
        // A single backtick is inline code, not a block.
        assert!(!is_complex("What does `ls` print?"));
    }

    #[test]
    fn multi_step_wording_is_complex() {
        assert_eq!(
            one("First boil water, then add pasta, and finally drain it.").rule,
            "multi-step wording (first … then … finally)"
        );
        // Out of order, or inside other words, does not count.
        assert!(!is_complex("Finally, then, first."));
        assert!(!is_complex("Firstly the authentication, then finally done"));
        assert!(is_complex(
            "Firstly no; first this, then that, finally done"
        ));
        assert_eq!(
            one("Explain it Step By Step please").rule,
            "multi-step wording (\"step by step\")"
        );
        assert_eq!(
            one("Do this:\n1. wash\n  2) dry").rule,
            "multi-step wording (numbered steps 1. and 2.)"
        );
        assert!(!is_complex("1. only one step"));
        assert!(
            !is_complex("It costs 1.5 and 2.5"),
            "numbers mid-line are not steps"
        );
        assert!(!is_complex("1.5 kg\n2.5 kg"), "decimals are not steps");
    }

    #[test]
    fn reasoning_keywords_are_complex_and_named() {
        for (text, word) in [
            ("Design a login page", "design"),
            ("What is the ARCHITECTURE here?", "architecture"),
            ("analyse this", "analyse"),
            ("An analysis please", "analysis"),
            ("Analyze sales", "analyze"),
            ("compare cats and dogs", "compare"),
            ("prove that 2 is prime", "prove"),
            ("derive the formula", "derive"),
            ("Optimise my query", "optimise"),
            ("optimize it", "optimize"),
            ("help me debug", "debug"),
            ("the trade-offs of X", "trade-offs"),
            ("what trade off would you make", "trade off"),
        ] {
            assert_eq!(
                one(text).rule,
                format!("reasoning or design keyword \"{word}\""),
                "{text}"
            );
        }
        // Stems only count at the start of a word.
        assert!(!is_complex("How do I improve my sleep?"));
        assert!(!is_complex("Is it redesignable?"));
    }

    #[test]
    fn the_first_rule_in_order_wins() {
        let c = one("Design this step by step:\n```\ncode\n```");
        assert_eq!(c.rule, "code block (```) in the prompt");
        let c = one("Design this step by step");
        assert_eq!(c.rule, "multi-step wording (\"step by step\")");
    }

    #[test]
    fn long_prompts_are_complex_with_the_count() {
        let exactly = "a ".repeat(750);
        assert_eq!(exactly.chars().count(), 1500);
        assert_eq!(one(&exactly).complexity, Complexity::Simple);
        let longer = format!("{exactly}b");
        assert_eq!(one(&longer).rule, "long prompt (1501 characters)");
        // Characters, not bytes.
        let accented = "é".repeat(1000);
        assert_eq!(one(&accented).complexity, Complexity::Simple);
    }

    #[test]
    fn every_message_is_read() {
        let messages = [
            Message::new(Role::System, "You are terse."),
            Message::user("Hi"),
            Message::new(Role::Assistant, "Hello"),
            Message::user("Now compare the two"),
        ];
        assert_eq!(
            classify(&messages).rule,
            "reasoning or design keyword \"compare\""
        );
        let long = [
            Message::user("x".repeat(800)),
            Message::user("y".repeat(800)),
        ];
        assert_eq!(classify(&long).rule, "long prompt (1600 characters)");
    }

    #[test]
    fn non_ascii_text_does_not_panic() {
        for text in [
            "ééé design",
            "日本語 first 然后 then ünd finally",
            "Ⅰ. Ⅱ. 1.\n2.",
        ] {
            let _ = one(text);
        }
        assert!(is_complex("日本語 first 然后 then ünd finally"));
    }
}
