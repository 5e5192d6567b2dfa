//! What goes onto a lane: the outgoing message and its attributes, reasons made acceptable to
//! SQS, and delays split into `DelaySeconds` and a due time for those beyond SQS's limit.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::MessageAttributeValue;
use sluice_broker::{BrokerError, JobRef, Lane, PublishOptions};

use crate::{SqsConfig, NOT_BEFORE_ATTRIBUTE, REASON_ATTRIBUTE};

/// Longest delay accepted, as in the RabbitMQ backend: retries back off for minutes,
/// not weeks, and every re-delay hop costs a send and a delete.
const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// SQS limits a whole message (body and attributes) to 256 KiB, and a batch of ten
/// to the same; reasons quote provider errors of any length, so they are cut short.
const MAX_REASON_BYTES: usize = 8 * 1024;

/// One message on its way out.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) lane: Lane,
    pub(crate) body: String,
    pub(crate) delay_secs: i32,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
}

impl Outgoing {
    pub(crate) fn job(
        config: &SqsConfig,
        lane: Lane,
        job: &JobRef,
        opts: &PublishOptions,
    ) -> Result<Self, BrokerError> {
        let body = serde_json::to_string(job)
            .map_err(|e| BrokerError::Malformed(format!("cannot encode job: {e}")))?;
        let plan = plan_delay(opts.delay, config.max_native_delay_secs, now_ms())?;
        let mut attributes = HashMap::new();
        if let Some(reason) = opts.reason.as_deref() {
            if let Some(value) = reason_attribute(reason)? {
                attributes.insert(REASON_ATTRIBUTE.to_owned(), value);
            }
        }
        if let Some(not_before) = plan.not_before_ms {
            attributes.insert(
                NOT_BEFORE_ATTRIBUTE.to_owned(),
                number_attribute(not_before)?,
            );
        }
        Ok(Self {
            lane,
            body,
            delay_secs: plan.delay_secs,
            attributes,
        })
    }
}

pub(crate) fn string_attribute(value: &str) -> Result<MessageAttributeValue, BrokerError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| BrokerError::Malformed(format!("cannot build a message attribute: {e}")))
}

fn number_attribute(value: u64) -> Result<MessageAttributeValue, BrokerError> {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(value.to_string())
        .build()
        .map_err(|e| BrokerError::Malformed(format!("cannot build a message attribute: {e}")))
}

/// The reason as SQS accepts it, or `None` for an empty one (SQS refuses empty values).
pub(crate) fn reason_attribute(reason: &str) -> Result<Option<MessageAttributeValue>, BrokerError> {
    let clean = sanitize_reason(reason);
    if clean.is_empty() {
        return Ok(None);
    }
    string_attribute(&clean).map(Some)
}

/// SQS rejects a whole message whose attributes hold characters outside XML's
/// character set, and dead-lettering must not fail over a provider's error text:
/// such characters become U+FFFD, and over-long reasons are cut at a char boundary.
fn sanitize_reason(reason: &str) -> String {
    let mut clean: String = reason
        .chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect();
    if clean.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - '…'.len_utf8();
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
        clean.push('…');
    }
    clean
}

/// How a requested delay is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DelayPlan {
    /// `DelaySeconds` for SQS.
    pub(crate) delay_secs: i32,
    /// For delays beyond the native limit: when the message is due (Unix ms).
    pub(crate) not_before_ms: Option<u64>,
}

/// Rounds the delay up to whole seconds (never deliver early), and splits delays
/// beyond `max_native_secs` into a native part and a due time.
pub(crate) fn plan_delay(
    delay: Option<Duration>,
    max_native_secs: u32,
    now_ms: u64,
) -> Result<DelayPlan, BrokerError> {
    let Some(delay) = delay.filter(|d| !d.is_zero()) else {
        return Ok(DelayPlan {
            delay_secs: 0,
            not_before_ms: None,
        });
    };
    if delay > MAX_DELAY {
        return Err(BrokerError::DelayTooLong(delay));
    }
    // Bounded by MAX_DELAY above, so these fit.
    let secs = u32::try_from(delay.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u32::MAX);
    let ms = u64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if secs <= max_native_secs {
        return Ok(DelayPlan {
            delay_secs: native_secs(secs),
            not_before_ms: None,
        });
    }
    Ok(DelayPlan {
        delay_secs: native_secs(max_native_secs),
        not_before_ms: Some(now_ms.saturating_add(ms)),
    })
}

/// The `DelaySeconds` for a message that is due at `not_before_ms`, at most `max_native_secs`.
pub(crate) fn remaining_delay_secs(not_before_ms: u64, now_ms: u64, max_native_secs: u32) -> i32 {
    let remaining_ms = not_before_ms.saturating_sub(now_ms);
    let secs = u32::try_from(remaining_ms.div_ceil(1000)).unwrap_or(u32::MAX);
    native_secs(secs.min(max_native_secs))
}

fn native_secs(secs: u32) -> i32 {
    i32::try_from(secs).unwrap_or(i32::MAX)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn delays_round_up_to_whole_seconds() {
        let plan = |d: Option<Duration>| plan_delay(d, 900, 1_000).unwrap();
        assert_eq!(plan(None).delay_secs, 0);
        assert_eq!(plan(Some(Duration::ZERO)).delay_secs, 0);
        assert_eq!(plan(Some(Duration::from_nanos(1))).delay_secs, 1);
        assert_eq!(plan(Some(Duration::from_millis(1200))).delay_secs, 2);
        assert_eq!(plan(Some(Duration::from_secs(3))).delay_secs, 3);
        let at_limit = plan(Some(Duration::from_secs(900)));
        assert_eq!(at_limit.delay_secs, 900);
        assert_eq!(at_limit.not_before_ms, None);
    }

    #[test]
    fn long_delays_get_a_due_time() {
        let plan = plan_delay(Some(Duration::from_millis(4_001)), 2, 10_000).unwrap();
        assert_eq!(plan.delay_secs, 2);
        assert_eq!(plan.not_before_ms, Some(14_001));
        // The re-delay on receipt covers what is left, up to the native limit again.
        assert_eq!(remaining_delay_secs(14_001, 12_000, 2), 2);
        assert_eq!(remaining_delay_secs(14_001, 13_500, 2), 1);
        assert_eq!(remaining_delay_secs(14_001, 10_000, 900), 5);
        assert!(plan_delay(Some(Duration::from_secs(8 * 24 * 3600)), 900, 0).is_err());
    }

    #[test]
    fn reasons_are_made_acceptable_to_sqs() {
        assert_eq!(sanitize_reason("a\tb\nc ✗"), "a\tb\nc ✗");
        assert_eq!(sanitize_reason("nul\0bell\u{7}"), "nul\u{FFFD}bell\u{FFFD}");
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = sanitize_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(reason_attribute("").unwrap().is_none());
    }
}
