//! The email address a key may carry for completion emails, parsed once where a key gets it
//! (the admin API, the CLI), so no CR/LF ever reaches a mail header and `not-an-email` is
//! refused when it is given rather than when the first email bounces.

use std::fmt;

/// Longest address SMTP carries (RFC 5321: a 256-octet path less its angle brackets).
pub const MAX_EMAIL: usize = 254;
/// Longest local part (RFC 5321).
const MAX_LOCAL: usize = 64;
/// Longest domain label (RFC 1035).
const MAX_LABEL: usize = 63;

/// An address of the form `local@domain`: a dot-atom local part (letters, digits and
/// ``!#$%&'*+-/=?^_`{|}~``, dots between them) and a domain of one or more labels (letters,
/// digits and inner hyphens; `localhost` is one label). Letters may be non-ASCII
/// (RFC 6531). Quoted local parts and address literals are not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

/// Why a string is not an [`EmailAddress`]; the message does not repeat the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an email address like name@example.com: {0}")]
pub struct InvalidEmail(&'static str);

impl EmailAddress {
    pub fn parse(input: &str) -> Result<EmailAddress, InvalidEmail> {
        let invalid = |why| Err(InvalidEmail(why));
        if input.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return invalid("it holds a control character or whitespace (CR, LF, tab, space)");
        }
        if input.len() > MAX_EMAIL {
            return invalid("it is longer than 254 bytes");
        }
        let Some((local, domain)) = input.split_once('@') else {
            return invalid("it has no @");
        };
        if domain.contains('@') {
            return invalid("it has more than one @");
        }
        if local.is_empty() || local.len() > MAX_LOCAL {
            return invalid("the part before @ must be 1 to 64 bytes");
        }
        let atext = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
        if !local
            .split('.')
            .all(|a| !a.is_empty() && a.chars().all(atext))
        {
            return invalid(
                "the part before @ may hold letters, digits, !#$%&'*+-/=?^_`{|}~ and single \
                 dots between them",
            );
        }
        let label = |l: &str| {
            (1..=MAX_LABEL).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        };
        if domain.is_empty() || !domain.split('.').all(label) {
            return invalid(
                "the domain must be labels of letters, digits and inner hyphens, joined by dots",
            );
        }
        Ok(EmailAddress(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for EmailAddress {
    type Err = InvalidEmail;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EmailAddress::parse(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_are_taken() {
        for ok in [
            "me@example.org",
            "first.last+tag@mail.example.co.uk",
            "ops@localhost",
            "o'brien@x-y.example",
            "josé@exemple.fr",
            "a@b",
        ] {
            assert_eq!(
                EmailAddress::parse(ok).map(EmailAddress::into_string),
                Ok(ok.to_owned()),
                "{ok}"
            );
        }
    }

    #[test]
    fn what_is_not_an_address_is_refused() {
        for bad in [
            "not-an-email",
            "x\r\nBcc: evil@example.org",
            "x@example.org\r\n",
            "x\n@example.org",
            "x@exa\tmple.org",
            " x@example.org",
            "a b@example.org",
            "@example.org",
            "x@",
            "x@@example.org",
            "x@y@example.org",
            ".x@example.org",
            "x.@example.org",
            "x..y@example.org",
            "x@.example.org",
            "x@example.org.",
            "x@example..org",
            "x@-example.org",
            "x@example-.org",
            "x@exa_mple.org",
            "x@[127.0.0.1]",
            "\"quoted\"@example.org",
            "Name <x@example.org>",
            "x\u{0}@example.org",
            "",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?} was taken");
        }
        let long = format!("{}@example.org", "a".repeat(65));
        assert!(EmailAddress::parse(&long).is_err());
        let long = format!("a@{}.org", "b".repeat(64));
        assert!(EmailAddress::parse(&long).is_err());
        let long = format!("a@{}org", "b.".repeat(130));
        assert!(EmailAddress::parse(&long).is_err());
    }

    #[test]
    fn the_error_says_why_without_repeating_the_input() {
        let error = EmailAddress::parse("x\r\nBcc: evil@example.org").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("control character"), "{message}");
        assert!(!message.contains("evil"), "{message}");
    }
}
