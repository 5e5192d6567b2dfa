//! Checking names that end up inside SQL text (schemas, table prefixes), where DDL takes no bind
//! parameters: only plain lowercase identifiers pass, so nothing needs quoting or escaping.

/// Whether `name` is a lowercase SQL identifier: 1 to 63 characters (PostgreSQL's limit) of
/// `a-z`, `0-9` and `_`, not starting with a digit.
pub fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_lowercase_identifiers_pass() {
        assert!(valid_identifier("sluice_test_1"));
        assert!(valid_identifier("_x"));
        assert!(valid_identifier(&"a".repeat(63)));
        assert!(!valid_identifier(&"a".repeat(64)));
        assert!(!valid_identifier("x; DROP TABLE jobs"));
        assert!(!valid_identifier("1abc"));
        assert!(!valid_identifier("Upper"));
        assert!(!valid_identifier("with-dash"));
        assert!(!valid_identifier("ünïcode"));
        assert!(!valid_identifier(""));
    }
}
