//! Hiding credentials in connection URLs before they reach logs, `Debug` output or errors.
//! One rule for every backend (PostgreSQL, SQLite, RabbitMQ, Redis), so none prints a password.

/// The URL with its password (or a lone user-info token) replaced by `***`.
///
/// `scheme://user:secret@host/path` becomes `scheme://user:***@host/path`. A user-info part
/// with no colon is replaced whole (`redis://***@host`): Redis URLs may carry the password
/// alone there, and hiding a plain user name costs little. Only the authority is looked at, so
/// an `@` in the path, query or fragment is left alone; text that is not a URL comes back as is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_owned(),
    };
    format!("{}{redacted}{}", &url[..rest_start], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://token@host/1"), "redis://***@host/1");
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("amqp://app:s3cret@rabbit:5672/%2f"),
            "amqp://app:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redact_url("rediss://u:p@host:6380/#insecure"),
            "rediss://u:***@host:6380/#insecure"
        );
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        for url in [
            "redis://127.0.0.1:6379",
            "postgres://h/db",
            "amqp://rabbit/%2f",
            "redis://host/0?x=a@b",
            "redis://host#a:b@c",
            "sqlite://data/sluice.db",
            "not a url",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }
}
