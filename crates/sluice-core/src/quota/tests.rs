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
        serde_json::from_str(r#"{"basic": {"tenant": [{"per": 0, "limit": 1}]}}"#).expect("parses");
    assert!(zero
        .validate()
        .expect_err("zero window")
        .contains("1 second"));
    let zero: QuotaConfig =
        serde_json::from_str(r#"{"basic": {"tenant": [{"per": 5, "limit": 0}]}}"#).expect("parses");
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
