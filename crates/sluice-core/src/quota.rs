//! Fixed-window submission quotas per user and per tenant: the configuration, the counters a
//! submission must take, and in-process counting for the embedded mode.

use crate::principal::{Principal, Tier};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// Whose submissions a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaScope {
    /// One user of one tenant.
    User,
    /// Every user of a tenant together.
    Tenant,
}

impl QuotaScope {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaScope::User => "user",
            QuotaScope::Tenant => "tenant",
        }
    }
}

impl fmt::Display for QuotaScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quota window's length in whole seconds. Configured as `"second"`, `"minute"`, `"hour"`,
/// `"day"` or a positive integer of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaWindow(u64);

impl QuotaWindow {
    pub const SECOND: QuotaWindow = QuotaWindow(1);
    pub const MINUTE: QuotaWindow = QuotaWindow(60);
    pub const HOUR: QuotaWindow = QuotaWindow(3_600);
    pub const DAY: QuotaWindow = QuotaWindow(86_400);

    const NAMED: [(&'static str, QuotaWindow); 4] = [
        ("second", QuotaWindow::SECOND),
        ("minute", QuotaWindow::MINUTE),
        ("hour", QuotaWindow::HOUR),
        ("day", QuotaWindow::DAY),
    ];

    pub const fn from_secs(secs: u64) -> QuotaWindow {
        QuotaWindow(secs)
    }

    pub fn secs(&self) -> u64 {
        self.0
    }

    fn name(self) -> Option<&'static str> {
        QuotaWindow::NAMED
            .iter()
            .find(|(_, w)| *w == self)
            .map(|(name, _)| *name)
    }
}

/// "minute" for the named windows, else "2 seconds", "2 minutes", ...: reads after "per".
impl fmt::Display for QuotaWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = self.name() {
            return f.write_str(name);
        }
        // The largest unit that divides the window evenly (`is_multiple_of` is past our MSRV).
        let (n, unit) = [(86_400, "days"), (3_600, "hours"), (60, "minutes")]
            .into_iter()
            .find(|&(secs, _)| self.0 > 0 && self.0 / secs * secs == self.0)
            .map_or((self.0, "seconds"), |(secs, unit)| (self.0 / secs, unit));
        write!(f, "{n} {unit}")
    }
}

impl Serialize for QuotaWindow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.name() {
            Some(name) => s.serialize_str(name),
            None => s.serialize_u64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for QuotaWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WindowVisitor;

        impl Visitor<'_> for WindowVisitor {
            type Value = QuotaWindow;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"second\", \"minute\", \"hour\", \"day\" or a number of seconds")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<QuotaWindow, E> {
                QuotaWindow::NAMED
                    .iter()
                    .find(|(name, _)| *name == v)
                    .map(|(_, w)| *w)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<QuotaWindow, E> {
                Ok(QuotaWindow(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<QuotaWindow, E> {
                u64::try_from(v)
                    .map(QuotaWindow)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }

        d.deserialize_any(WindowVisitor)
    }
}

/// At most `limit` submissions per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    pub per: QuotaWindow,
    pub limit: u64,
}

/// One tier's quotas: rules for each user, and rules for each tenant as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierQuotas {
    pub user: Vec<QuotaRule>,
    pub tenant: Vec<QuotaRule>,
}

impl TierQuotas {
    /// True when the tier has no rules at all (nothing to count).
    pub fn is_empty(&self) -> bool {
        self.user.is_empty() && self.tenant.is_empty()
    }
}

/// Quotas for every tier; by default nobody is limited.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    pub enterprise: TierQuotas,
    pub pro: TierQuotas,
    pub basic: TierQuotas,
    pub free: TierQuotas,
}

impl QuotaConfig {
    pub fn for_tier(&self, tier: Tier) -> &TierQuotas {
        match tier {
            Tier::Enterprise => &self.enterprise,
            Tier::Pro => &self.pro,
            Tier::Basic => &self.basic,
            Tier::Free => &self.free,
        }
    }

    /// Every limit at least 1 and every window at least 1 s; one rule per window and scope
    /// (two would share one counter).
    pub fn validate(&self) -> Result<(), String> {
        for tier in Tier::ALL {
            let quotas = self.for_tier(tier);
            for (scope, rules) in [
                (QuotaScope::User, &quotas.user),
                (QuotaScope::Tenant, &quotas.tenant),
            ] {
                for (i, rule) in rules.iter().enumerate() {
                    let at = format!("quotas.{tier}.{scope}[{i}]");
                    if rule.limit < 1 {
                        return Err(format!("{at}: limit must be at least 1"));
                    }
                    if rule.per.secs() < 1 {
                        return Err(format!("{at}: the window must be at least 1 second"));
                    }
                    if rules[..i].iter().any(|r| r.per == rule.per) {
                        return Err(format!(
                            "{at}: another {scope} rule of the {tier} tier already counts per {}",
                            rule.per
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One window's counter that a submission must take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Identifies the scope, the window length and the window; unique per counter.
    pub key: String,
    pub limit: u64,
    /// Time left until the window ends (and the counter can be forgotten).
    pub expires_in: Duration,
    pub scope: QuotaScope,
    pub window_secs: u64,
    /// The submitter, for the refusal message.
    pub tenant: String,
    pub user: String,
}

impl Counter {
    /// The refusal when this counter is at its limit.
    pub fn exceeded(&self) -> Exceeded {
        Exceeded {
            scope: self.scope,
            window_secs: self.window_secs,
            limit: self.limit,
            retry_after: self.expires_in,
            tenant: self.tenant.clone(),
            user: self.user.clone(),
        }
    }
}

/// The counters `principal` must take at `now_unix_ms` under `quotas`: user rules first, then
/// tenant rules. Windows are fixed and aligned to the Unix epoch, so every node computes the
/// same window (and key) from its own clock.
///
/// Keys look like `user:{tenant}:{user}:{window_secs}:{window_index}` and
/// `tenant:{tenant}:{window_secs}:{window_index}`, with `%` and `:` in names percent-escaped so
/// that a name containing `:` cannot collide with another. Two rules with the same window in one
/// scope (rejected by `validate`) become one counter with the smaller limit.
pub fn counters(principal: &Principal, quotas: &TierQuotas, now_unix_ms: u64) -> Vec<Counter> {
    let tenant = escape(&principal.tenant);
    let user = escape(&principal.user);
    let mut out: Vec<Counter> = Vec::with_capacity(quotas.user.len() + quotas.tenant.len());
    for (scope, rules) in [
        (QuotaScope::User, &quotas.user),
        (QuotaScope::Tenant, &quotas.tenant),
    ] {
        for rule in rules {
            // A zero window (unvalidated config) would divide by zero; treat it as one second.
            let window_secs = rule.per.secs().max(1);
            if let Some(same) = out
                .iter_mut()
                .find(|c| c.scope == scope && c.window_secs == window_secs)
            {
                same.limit = same.limit.min(rule.limit);
                continue;
            }
            let window_ms = window_secs.saturating_mul(1000);
            let index = now_unix_ms / window_ms;
            let ends_at = index.saturating_add(1).saturating_mul(window_ms);
            let key = match scope {
                QuotaScope::User => format!("user:{tenant}:{user}:{window_secs}:{index}"),
                QuotaScope::Tenant => format!("tenant:{tenant}:{window_secs}:{index}"),
            };
            out.push(Counter {
                key,
                limit: rule.limit,
                expires_in: Duration::from_millis(ends_at - now_unix_ms),
                scope,
                window_secs,
                tenant: principal.tenant.clone(),
                user: principal.user.clone(),
            });
        }
    }
    out
}

/// Percent-escape the key separator (and the escape character itself).
fn escape(name: &str) -> String {
    name.replace('%', "%25").replace(':', "%3A")
}

/// A submission refused by a quota; its `Display` is the API's 429 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub scope: QuotaScope,
    pub window_secs: u64,
    pub limit: u64,
    /// Until the window resets.
    pub retry_after: Duration,
    pub tenant: String,
    pub user: String,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            QuotaScope::User => write!(f, "user {} of tenant {}", self.user, self.tenant)?,
            QuotaScope::Tenant => write!(f, "tenant {}", self.tenant)?,
        }
        let jobs = if self.limit == 1 { "job" } else { "jobs" };
        write!(
            f,
            " may submit {} {jobs} per {}; the window resets in {}",
            self.limit,
            QuotaWindow(self.window_secs),
            wait_text(self.retry_after)
        )
    }
}

impl std::error::Error for Exceeded {}

/// A wait for people, rounded up: seconds under two minutes, then minutes, then hours.
fn wait_text(d: Duration) -> String {
    let secs = d.as_millis().div_ceil(1000);
    if secs < 120 {
        format!("{secs} s")
    } else if secs < 2 * 3600 {
        format!("{} min", secs.div_ceil(60))
    } else {
        format!("{} h", secs.div_ceil(3600))
    }
}

/// In-process quota counters for a single node (the embedded mode).
#[derive(Debug, Default)]
pub struct LocalQuotas {
    /// Key -> (count, window end in Unix ms).
    counts: HashMap<String, (u64, u64)>,
    /// Earliest window end among `counts`: nothing needs pruning before it.
    next_expiry: u64,
}

impl LocalQuotas {
    pub fn new() -> LocalQuotas {
        LocalQuotas::default()
    }

    /// Take one from every counter, or from none: if any is at its limit, nothing is counted
    /// and the first such counter's refusal is returned. `counters` must come from
    /// [`counters`] at the same `now_unix_ms`. Windows that have ended are dropped, so memory
    /// holds only the current windows of recent submitters.
    pub fn try_take(&mut self, counters: &[Counter], now_unix_ms: u64) -> Result<(), Exceeded> {
        self.prune(now_unix_ms);
        for c in counters {
            if self.count(&c.key, now_unix_ms) >= c.limit {
                return Err(c.exceeded());
            }
        }
        for c in counters {
            let ends_at = now_unix_ms.saturating_add(saturating_ms(c.expires_in));
            let entry = self.counts.entry(c.key.clone()).or_insert((0, ends_at));
            entry.0 += 1;
            self.next_expiry = self.next_expiry.min(entry.1);
        }
        Ok(())
    }

    /// Counters currently held (windows not yet pruned).
    pub fn tracked(&self) -> usize {
        self.counts.len()
    }

    fn count(&self, key: &str, now_unix_ms: u64) -> u64 {
        match self.counts.get(key) {
            Some(&(n, ends_at)) if ends_at > now_unix_ms => n,
            _ => 0,
        }
    }

    fn prune(&mut self, now_unix_ms: u64) {
        if self.counts.is_empty() {
            self.next_expiry = u64::MAX;
            return;
        }
        if now_unix_ms < self.next_expiry {
            return;
        }
        self.counts
            .retain(|_, &mut (_, ends_at)| ends_at > now_unix_ms);
        self.next_expiry = self
            .counts
            .values()
            .map(|&(_, ends_at)| ends_at)
            .min()
            .unwrap_or(u64::MAX);
    }
}

fn saturating_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
