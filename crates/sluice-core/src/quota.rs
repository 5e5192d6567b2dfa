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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn principal(tenant: &str, user: &str) -> Principal {
        Principal {
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            tier: Tier::Free,
            email: None,
            reuse_samples: false,
        }
    }

    fn rule(per: QuotaWindow, limit: u64) -> QuotaRule {
        QuotaRule { per, limit }
    }

    fn quotas(user: &[QuotaRule], tenant: &[QuotaRule]) -> TierQuotas {
        TierQuotas {
            user: user.to_vec(),
            tenant: tenant.to_vec(),
        }
    }

    /// Take for `p` at `now`, as the API would.
    fn take(l: &mut LocalQuotas, q: &TierQuotas, p: &Principal, now: u64) -> Result<(), Exceeded> {
        l.try_take(&counters(p, q, now), now)
    }

    const T0: u64 = 1_700_000_040_000; // a whole minute since the epoch

    #[test]
    fn windows_align_to_the_epoch() {
        let q = quotas(
            &[rule(QuotaWindow::MINUTE, 10)],
            &[rule(QuotaWindow::HOUR, 100)],
        );
        let cs = counters(&principal("acme", "u1"), &q, T0 + 37_000);
        let index = T0 / 60_000;
        assert_eq!(cs[0].key, format!("user:acme:u1:60:{index}"));
        assert_eq!(cs[0].expires_in, Duration::from_secs(23));
        assert_eq!(cs[0].scope, QuotaScope::User);
        assert_eq!(cs[1].key, format!("tenant:acme:3600:{}", T0 / 3_600_000));
        assert_eq!(cs[1].window_secs, 3600);
        assert_eq!(
            cs[1].expires_in,
            Duration::from_millis(3_600_000 - (T0 + 37_000) % 3_600_000)
        );
        // The last millisecond of a window still has 1 ms to go; the next starts a new key.
        let last = counters(&principal("acme", "u1"), &q, T0 + 59_999);
        assert_eq!(last[0].expires_in, Duration::from_millis(1));
        let next = counters(&principal("acme", "u1"), &q, T0 + 60_000);
        assert_ne!(last[0].key, next[0].key);
        assert_eq!(next[0].expires_in, Duration::from_secs(60));
    }

    #[test]
    fn names_with_separators_cannot_collide() {
        let q = quotas(
            &[rule(QuotaWindow::MINUTE, 1)],
            &[rule(QuotaWindow::MINUTE, 1)],
        );
        let a = counters(&principal("a:b", "c"), &q, T0);
        let b = counters(&principal("a", "b:c"), &q, T0);
        assert_ne!(a[0].key, b[0].key);
        assert_eq!(a[0].key, format!("user:a%3Ab:c:60:{}", T0 / 60_000));
        let c = counters(&principal("a%3Ab", "c"), &q, T0);
        assert_ne!(a[0].key, c[0].key);
        assert_ne!(a[1].key, b[1].key);
        // Different tenants and users get different counters.
        let mut l = LocalQuotas::new();
        assert!(take(&mut l, &q, &principal("a:b", "c"), T0).is_ok());
        assert!(take(&mut l, &q, &principal("a", "b:c"), T0).is_ok());
    }

    #[test]
    fn the_limit_th_passes_and_the_next_fails() {
        let q = quotas(&[rule(QuotaWindow::MINUTE, 10)], &[]);
        let p = principal("acme", "u1");
        let mut l = LocalQuotas::new();
        for i in 0..10 {
            assert!(
                take(&mut l, &q, &p, T0 + i).is_ok(),
                "request {} of 10",
                i + 1
            );
        }
        let err = take(&mut l, &q, &p, T0 + 37_000).expect_err("the 11th is refused");
        assert_eq!(err.scope, QuotaScope::User);
        assert_eq!(err.limit, 10);
        assert_eq!(err.retry_after, Duration::from_secs(23));
        assert_eq!(
            err.to_string(),
            "user u1 of tenant acme may submit 10 jobs per minute; the window resets in 23 s"
        );
        // Still refused at the window's last millisecond, admitted at the next window.
        assert!(take(&mut l, &q, &p, T0 + 59_999).is_err());
        for i in 0..10 {
            assert!(take(&mut l, &q, &p, T0 + 60_000 + i).is_ok());
        }
        assert!(take(&mut l, &q, &p, T0 + 60_010).is_err());
    }

    #[test]
    fn user_and_tenant_limits_are_independent() {
        let q = quotas(
            &[rule(QuotaWindow::MINUTE, 2)],
            &[rule(QuotaWindow::MINUTE, 3)],
        );
        let mut l = LocalQuotas::new();
        let u1 = principal("acme", "u1");
        let u2 = principal("acme", "u2");
        let other = principal("globex", "u1");
        assert!(take(&mut l, &q, &u1, T0).is_ok());
        assert!(take(&mut l, &q, &u1, T0).is_ok());
        let err = take(&mut l, &q, &u1, T0).expect_err("u1's own limit");
        assert_eq!(err.scope, QuotaScope::User);
        // u2 has its own user counter but shares the tenant's: one more fits the tenant.
        assert!(take(&mut l, &q, &u2, T0).is_ok());
        let err = take(&mut l, &q, &u2, T0).expect_err("acme's tenant limit");
        assert_eq!(err.scope, QuotaScope::Tenant);
        assert_eq!(
            err.to_string(),
            "tenant acme may submit 3 jobs per minute; the window resets in 60 s"
        );
        // Another tenant's user of the same name is untouched.
        assert!(take(&mut l, &q, &other, T0).is_ok());
    }

    #[test]
    fn a_refused_request_is_not_counted() {
        // The user's second-window is full; refusals must not use up the tenant's minute.
        let q = quotas(
            &[rule(QuotaWindow::SECOND, 1)],
            &[rule(QuotaWindow::MINUTE, 3)],
        );
        let p = principal("acme", "u1");
        let mut l = LocalQuotas::new();
        assert!(take(&mut l, &q, &p, T0).is_ok());
        for _ in 0..50 {
            let err = take(&mut l, &q, &p, T0 + 500).expect_err("one per second");
            assert_eq!(err.scope, QuotaScope::User);
            assert_eq!(err.window_secs, 1);
        }
        // Two more fit the tenant's minute, one per second.
        assert!(take(&mut l, &q, &p, T0 + 1_000).is_ok());
        assert!(take(&mut l, &q, &p, T0 + 2_000).is_ok());
        let err = take(&mut l, &q, &p, T0 + 3_000).expect_err("tenant minute full");
        assert_eq!(err.scope, QuotaScope::Tenant);

        // The other way round: the tenant's counter (checked last) refuses, and the user's
        // counter, checked first and under its limit, must not count the refusals either.
        let q = quotas(
            &[rule(QuotaWindow::MINUTE, 2)],
            &[rule(QuotaWindow::SECOND, 1)],
        );
        let mut l = LocalQuotas::new();
        assert!(take(&mut l, &q, &p, T0).is_ok());
        for _ in 0..20 {
            let err = take(&mut l, &q, &p, T0 + 500).expect_err("tenant: one per second");
            assert_eq!(err.scope, QuotaScope::Tenant);
        }
        assert!(take(&mut l, &q, &p, T0 + 1_000).is_ok(), "user has 1 of 2");
        let err = take(&mut l, &q, &p, T0 + 2_000).expect_err("user minute full");
        assert_eq!(err.scope, QuotaScope::User);
    }

    #[test]
    fn the_first_exceeded_counter_is_reported() {
        let q = quotas(
            &[rule(QuotaWindow::MINUTE, 1)],
            &[rule(QuotaWindow::MINUTE, 1)],
        );
        let p = principal("acme", "u1");
        let mut l = LocalQuotas::new();
        assert!(take(&mut l, &q, &p, T0).is_ok());
        assert_eq!(
            take(&mut l, &q, &p, T0).map_err(|e| e.scope),
            Err(QuotaScope::User)
        );
    }

    #[test]
    fn ended_windows_are_pruned() {
        let q = quotas(&[rule(QuotaWindow::SECOND, 5)], &[]);
        let mut l = LocalQuotas::new();
        for i in 0..100 {
            assert!(take(&mut l, &q, &principal("acme", &format!("u{i}")), T0).is_ok());
        }
        assert_eq!(l.tracked(), 100);
        assert!(take(&mut l, &q, &principal("acme", "late"), T0 + 1_000).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn no_rules_no_counters() {
        let p = principal("acme", "u1");
        assert!(counters(&p, &TierQuotas::default(), T0).is_empty());
        let mut l = LocalQuotas::new();
        assert!(l.try_take(&[], T0).is_ok());
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn duplicate_windows_share_one_counter_at_the_smaller_limit() {
        let q = quotas(
            &[
                rule(QuotaWindow::MINUTE, 5),
                rule(QuotaWindow::from_secs(60), 2),
            ],
            &[],
        );
        let cs = counters(&principal("acme", "u1"), &q, T0);
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].limit, 2);
        let config = QuotaConfig {
            pro: q,
            ..QuotaConfig::default()
        };
        let err = config.validate().expect_err("duplicate window");
        assert!(err.contains("quotas.pro.user[1]"), "{err}");
    }

    #[test]
    fn windows_parse_from_names_and_seconds() {
        let c: QuotaConfig = serde_json::from_str(
            r#"{"free": {"user": [{"per": "minute", "limit": 10}, {"per": 2, "limit": 1}],
                         "tenant": [{"per": "day", "limit": 1000}]}}"#,
        )
        .expect("parses");
        assert_eq!(c.free.user[0].per.secs(), 60);
        assert_eq!(c.free.user[1].per.secs(), 2);
        assert_eq!(c.for_tier(Tier::Free).tenant[0].per, QuotaWindow::DAY);
        assert!(c.for_tier(Tier::Pro).is_empty());
        assert!(c.validate().is_ok());
        for bad in [
            r#"{"free": {"user": [{"per": "fortnight", "limit": 1}]}}"#,
            r#"{"free": {"user": [{"per": -5, "limit": 1}]}}"#,
            r#"{"free": {"user": [{"per": "minute", "limit": 1, "burst": 2}]}}"#,
            r#"{"free": {"users": []}}"#,
            r#"{"gold": {}}"#,
        ] {
            assert!(serde_json::from_str::<QuotaConfig>(bad).is_err(), "{bad}");
        }
        let zero: QuotaConfig =
            serde_json::from_str(r#"{"basic": {"tenant": [{"per": 0, "limit": 1}]}}"#)
                .expect("parses");
        assert!(zero
            .validate()
            .expect_err("zero window")
            .contains("1 second"));
        let zero: QuotaConfig =
            serde_json::from_str(r#"{"basic": {"tenant": [{"per": 5, "limit": 0}]}}"#)
                .expect("parses");
        assert!(zero
            .validate()
            .expect_err("zero limit")
            .contains("at least 1"));
        // Serialized back the same way.
        let v = serde_json::to_value(&c).expect("serializes");
        assert_eq!(v["free"]["user"][0]["per"], "minute");
        assert_eq!(v["free"]["user"][1]["per"], 2);
    }

    #[test]
    fn refusal_messages_read_well() {
        let e = |scope, window_secs, limit, retry_ms| Exceeded {
            scope,
            window_secs,
            limit,
            retry_after: Duration::from_millis(retry_ms),
            tenant: "acme".to_owned(),
            user: "u1".to_owned(),
        };
        assert_eq!(
            e(QuotaScope::User, 2, 1, 1_200).to_string(),
            "user u1 of tenant acme may submit 1 job per 2 seconds; the window resets in 2 s"
        );
        assert_eq!(
            e(QuotaScope::Tenant, 120, 5, 61_000).to_string(),
            "tenant acme may submit 5 jobs per 2 minutes; the window resets in 61 s"
        );
        assert_eq!(
            e(QuotaScope::Tenant, 3_600, 100, 1_800_000).to_string(),
            "tenant acme may submit 100 jobs per hour; the window resets in 30 min"
        );
        assert_eq!(
            e(QuotaScope::Tenant, 86_400, 1000, 36_000_000).to_string(),
            "tenant acme may submit 1000 jobs per day; the window resets in 10 h"
        );
    }

    proptest! {
        /// Whatever the arrival pattern, no window of any counter admits more than its limit,
        /// and a refusal happens only when some counter is really full.
        #[test]
        fn never_over_a_limit_and_never_refused_below_it(
            user_limit in 1u64..6,
            tenant_limit in 1u64..10,
            steps in prop::collection::vec((0u64..1_500, 0usize..3), 1..200),
        ) {
            let q = quotas(
                &[rule(QuotaWindow::from_secs(2), user_limit)],
                &[rule(QuotaWindow::from_secs(3), tenant_limit)],
            );
            let users = [principal("acme", "a"), principal("acme", "b"), principal("acme", "c")];
            let mut l = LocalQuotas::new();
            let mut admitted: HashMap<String, u64> = HashMap::new();
            let mut now = T0;
            for (dt, who) in steps {
                now += dt;
                let cs = counters(&users[who], &q, now);
                let full = cs.iter().any(|c| admitted.get(&c.key).copied().unwrap_or(0) >= c.limit);
                match l.try_take(&cs, now) {
                    Ok(()) => {
                        prop_assert!(!full, "admitted over a limit");
                        for c in &cs {
                            *admitted.entry(c.key.clone()).or_default() += 1;
                        }
                    }
                    Err(e) => {
                        prop_assert!(full, "refused below every limit: {}", e);
                    }
                }
            }
        }
    }
}
