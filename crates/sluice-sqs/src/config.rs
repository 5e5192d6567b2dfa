//! Where the SQS lanes live and how they behave, as read from the `[broker.sqs]` settings.
//! [`SqsConfig::validate`] checks everything SQS would otherwise reject later, at a bad moment.

use serde::Deserialize;
use sluice_core::Lane;

/// SQS refuses queue names longer than this.
pub const MAX_QUEUE_NAME_LEN: usize = 80;
/// SQS's limit for `DelaySeconds`.
pub const SQS_MAX_DELAY_SECS: u32 = 900;
/// SQS's limit for a message's total visibility timeout (12 h).
pub const SQS_MAX_VISIBILITY_SECS: u32 = 43_200;
/// SQS's limit for a long poll.
pub const SQS_MAX_WAIT_SECS: u32 = 20;
/// SQS's limit for a redrive policy's `maxReceiveCount`.
pub const SQS_MAX_RECEIVE_COUNT: u32 = 1_000;

/// The SQS lanes: one standard queue per lane, named `{prefix}-{lane}`.
///
/// Credentials come from the normal AWS chain (environment, profile, web identity,
/// ECS/EC2 roles). When `endpoint_url` is set (moto, localstack), only the
/// environment and the profile files are asked, and if neither has credentials
/// static dummy ones are used, since local emulators accept any.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqsConfig {
    /// Queue name prefix; lane queues are `{prefix}-{lane}`, e.g. `sluice-priority`.
    /// 1 to 71 characters of ASCII letters, digits, `-` and `_`, so that every
    /// lane's queue name stays within SQS's 80-character limit.
    pub prefix: String,
    /// Talk to this endpoint instead of AWS, e.g. `http://127.0.0.1:5000` for moto.
    pub endpoint_url: Option<String>,
    /// AWS region of the queues.
    pub region: String,
    /// How long a received message stays hidden from other consumers. While a
    /// delivery is held unsettled a heartbeat keeps extending it, so this only
    /// bounds how soon a message comes back after its consumer died. 1 to 43200.
    pub visibility_timeout_secs: u32,
    /// Long-poll wait of each receive; longer means fewer empty receives. 0 to 20.
    pub wait_time_secs: u32,
    /// A message received this many times without being deleted is moved to the
    /// dead lane by SQS's redrive policy. 1 to 1000.
    pub max_receive_count: u32,
    /// Longest delay handed to SQS as `DelaySeconds` (SQS allows at most 900).
    /// Longer delays are sent with this delay and re-delayed on receipt until due.
    /// 1 to 900; lower only to exercise the re-delay path.
    pub max_native_delay_secs: u32,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            prefix: "sluice".into(),
            endpoint_url: None,
            region: "us-east-1".into(),
            visibility_timeout_secs: 60,
            wait_time_secs: 20,
            max_receive_count: 5,
            max_native_delay_secs: SQS_MAX_DELAY_SECS,
        }
    }
}

/// A setting SQS would refuse, or one the broker cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid SQS queue prefix {prefix:?}: {why}")]
    InvalidPrefix { prefix: String, why: String },
    #[error("{field} = {value} is out of range {min}..={max}")]
    OutOfRange {
        field: &'static str,
        value: u32,
        min: u32,
        max: u32,
    },
}

impl SqsConfig {
    /// Checks every field against SQS's limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_prefix(&self.prefix)?;
        range(
            "visibility_timeout_secs",
            self.visibility_timeout_secs,
            1,
            SQS_MAX_VISIBILITY_SECS,
        )?;
        range("wait_time_secs", self.wait_time_secs, 0, SQS_MAX_WAIT_SECS)?;
        range(
            "max_receive_count",
            self.max_receive_count,
            1,
            SQS_MAX_RECEIVE_COUNT,
        )?;
        // 0 would make every over-long delay re-send itself in a tight loop.
        range(
            "max_native_delay_secs",
            self.max_native_delay_secs,
            1,
            SQS_MAX_DELAY_SECS,
        )
    }

    /// The queue backing a lane, e.g. `sluice-priority`.
    pub fn queue_name(&self, lane: Lane) -> String {
        format!("{}-{}", self.prefix, lane.as_str())
    }
}

fn range(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// The longest prefix for which every lane's queue name fits SQS's limit.
pub fn max_prefix_len() -> usize {
    let longest_lane = Lane::ALL
        .iter()
        .map(|lane| lane.as_str().len())
        .max()
        .unwrap_or(0);
    MAX_QUEUE_NAME_LEN - 1 - longest_lane
}

/// SQS queue names are 1-80 characters of ASCII alphanumerics, `-` and `_`.
fn validate_prefix(prefix: &str) -> Result<(), ConfigError> {
    let invalid = |why: String| ConfigError::InvalidPrefix {
        prefix: prefix.to_owned(),
        why,
    };
    if prefix.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    let max = max_prefix_len();
    if prefix.len() > max {
        return Err(invalid(format!(
            "it is {} characters long; at most {max} fit SQS's {MAX_QUEUE_NAME_LEN}-character queue names",
            prefix.len()
        )));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(format!(
            "{bad:?} is not allowed; SQS queue names take only ASCII letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let config = SqsConfig::default();
        config.validate().unwrap();
        assert_eq!(config.region, "us-east-1");
        assert_eq!(config.visibility_timeout_secs, 60);
        assert_eq!(config.wait_time_secs, 20);
        assert_eq!(config.max_receive_count, 5);
        assert_eq!(config.max_native_delay_secs, 900);
        assert_eq!(config.queue_name(Lane::Dead), "sluice-dead");
    }

    #[test]
    fn deserializes_with_defaults_and_rejects_unknown_fields() {
        let config: SqsConfig =
            serde_json::from_str(r#"{"prefix": "prod_lanes", "wait_time_secs": 5}"#).unwrap();
        assert_eq!(config.prefix, "prod_lanes");
        assert_eq!(config.wait_time_secs, 5);
        assert_eq!(config.visibility_timeout_secs, 60);
        let unknown = serde_json::from_str::<SqsConfig>(r#"{"prefx": "x"}"#);
        assert!(unknown.is_err(), "{unknown:?}");
    }

    #[test]
    fn prefixes_follow_sqs_name_rules() {
        let check = |prefix: &str| {
            SqsConfig {
                prefix: prefix.into(),
                ..SqsConfig::default()
            }
            .validate()
        };
        assert!(check("a").is_ok());
        assert!(check("Sluice_prod-2").is_ok());
        let longest = "p".repeat(max_prefix_len());
        assert!(check(&longest).is_ok());
        for lane in Lane::ALL {
            let config = SqsConfig {
                prefix: longest.clone(),
                ..SqsConfig::default()
            };
            assert!(config.queue_name(lane).len() <= MAX_QUEUE_NAME_LEN);
        }
        for bad in ["", "has space", "dot.ted", "slash/", "ünïcode", "x.fifo"] {
            let err = check(bad).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidPrefix { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = check(&format!("{longest}p")).unwrap_err();
        assert!(err.to_string().contains("characters long"), "{err}");
    }

    #[test]
    fn limits_are_enforced() {
        let bad = [
            SqsConfig {
                wait_time_secs: 21,
                ..SqsConfig::default()
            },
            SqsConfig {
                visibility_timeout_secs: 0,
                ..SqsConfig::default()
            },
            SqsConfig {
                max_receive_count: 0,
                ..SqsConfig::default()
            },
            SqsConfig {
                max_native_delay_secs: 901,
                ..SqsConfig::default()
            },
            SqsConfig {
                max_native_delay_secs: 0,
                ..SqsConfig::default()
            },
        ];
        for config in bad {
            let err = config.validate().unwrap_err();
            assert!(matches!(err, ConfigError::OutOfRange { .. }), "{err}");
        }
    }
}
