//! Caller input in error messages, cut short: an error names what was wrong without echoing a
//! megabyte back. One rule for every front door (the job API, the OpenAI routes, the WebSocket).

use std::borrow::Cow;
use std::fmt;

/// Characters of one input kept in a message.
pub const EXCERPT_CHARS: usize = 100;
/// Characters of a whole message kept once its inputs are cut short.
pub const MAX_MESSAGE_CHARS: usize = 1_000;

/// `input` as an error message may quote it: whole when short; else its first
/// [`EXCERPT_CHARS`] characters, `…` and its length. `{}` writes it plain, `{:?}` quoted and
/// escaped like a `str`'s `Debug` (so control characters stay visible).
pub fn excerpt(input: &str) -> Excerpt<'_> {
    Excerpt(input)
}

/// See [`excerpt`].
#[derive(Clone, Copy)]
pub struct Excerpt<'a>(&'a str);

impl Excerpt<'_> {
    /// The kept start, if the input is cut.
    fn head(&self) -> Option<&str> {
        let (cut, _) = self.0.char_indices().nth(EXCERPT_CHARS)?;
        Some(&self.0[..cut])
    }
}

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.head() {
            None => f.write_str(self.0),
            Some(head) => write!(f, "{head}… ({} bytes)", self.0.len()),
        }
    }
}

impl fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.head() {
            None => write!(f, "{:?}", self.0),
            Some(head) => write!(f, "{:?} ({} bytes)", format!("{head}…"), self.0.len()),
        }
    }
}

/// A message that may quote input it did not cut (a serde error names the unknown field or the
/// mistyped value whole), made short: each quoted run (between `` ` `` or `"`) longer than
/// [`EXCERPT_CHARS`] becomes an [`excerpt`], and what is still over [`MAX_MESSAGE_CHARS`]
/// is cut there. Short messages come back as they are.
pub fn shorten_message(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_CHARS {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(MAX_MESSAGE_CHARS + 64);
    for piece in message.split_inclusive(['`', '"']) {
        let (run, delimiter) = match piece.strip_suffix(['`', '"']) {
            Some(run) => (run, &piece[run.len()..]),
            None => (piece, ""),
        };
        if run.chars().nth(EXCERPT_CHARS).is_some() {
            out.push_str(&excerpt(run).to_string());
        } else {
            out.push_str(run);
        }
        out.push_str(delimiter);
        if out.len() > 4 * MAX_MESSAGE_CHARS {
            break;
        }
    }
    if let Some((cut, _)) = out.char_indices().nth(MAX_MESSAGE_CHARS) {
        out.truncate(cut);
        out.push('…');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_kept_whole() {
        assert_eq!(excerpt("gpt-4o").to_string(), "gpt-4o");
        assert_eq!(format!("{:?}", excerpt("a\r\nb")), r#""a\r\nb""#);
    }

    #[test]
    fn long_input_keeps_its_start_and_says_its_length() {
        let long = "é".repeat(1_000_000);
        let plain = excerpt(&long).to_string();
        assert_eq!(
            plain,
            format!("{}… (2000000 bytes)", "é".repeat(EXCERPT_CHARS))
        );
        let quoted = format!("{:?}", excerpt(&long));
        assert_eq!(
            quoted,
            format!("\"{}…\" (2000000 bytes)", "é".repeat(EXCERPT_CHARS))
        );
    }

    #[test]
    fn a_serde_message_keeps_its_words_and_loses_the_bulk() {
        let field = "f".repeat(1_000_000);
        let message =
            format!("unknown field `{field}`, expected one of `model`, `messages` at line 1");
        let short = shorten_message(&message);
        assert!(short.len() < 400, "{short}");
        assert!(short.starts_with("unknown field `fff"), "{short}");
        assert!(
            short.ends_with("(1000000 bytes)`, expected one of `model`, `messages` at line 1"),
            "{short}"
        );
        let value = "v".repeat(5_000);
        let message = format!("invalid type: string \"{value}\", expected u32");
        let short = shorten_message(&message);
        assert!(short.ends_with("(5000 bytes)\", expected u32"), "{short}");
    }

    #[test]
    fn many_short_quoted_runs_are_still_cut_at_the_cap() {
        let message = "`a`".repeat(100_000);
        let short = shorten_message(&message);
        assert_eq!(short.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn short_messages_are_untouched() {
        assert!(matches!(
            shorten_message("missing field `model`"),
            Cow::Borrowed("missing field `model`")
        ));
    }
}
