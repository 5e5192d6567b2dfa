#![allow(clippy::unwrap_used)]
use super::*;
use sluice_core::Message;

fn request(text: &str) -> JobRequest {
    JobRequest::new("default", vec![Message::user(text)])
}

#[test]
fn the_request_hash_is_per_tenant_and_ignores_only_streaming() {
    let plain = request("hello");
    let hash = Admission::request_hash("acme", &plain);
    assert_eq!(hash, Admission::request_hash("acme", &plain.clone()));
    assert_ne!(
        hash,
        Admission::request_hash("other", &plain),
        "tenant-scoped"
    );
    let streamed = JobRequest {
        stream: true,
        ..plain.clone()
    };
    assert_eq!(hash, Admission::request_hash("acme", &streamed));
    for changed in [
        JobRequest {
            temperature: Some(0.5),
            ..plain.clone()
        },
        JobRequest {
            max_tokens: Some(10),
            ..plain.clone()
        },
        JobRequest {
            model: "auto".into(),
            ..plain.clone()
        },
        request("hello!"),
    ] {
        assert_ne!(
            hash,
            Admission::request_hash("acme", &changed),
            "{changed:?}"
        );
    }
}

#[test]
fn the_request_hash_keeps_its_old_value_and_sees_tools_formats_and_seeds() {
    let plain = request("hello");
    // The formula of the first version, for a request without the later parameters.
    let old = serde_json::json!({
        "tenant": "acme", "model": "default", "messages": plain.messages,
        "max_tokens": null, "temperature": null, "top_p": null, "stop": null,
    });
    assert_eq!(
        Admission::request_hash("acme", &plain),
        Sha256::digest(old.to_string().as_bytes()).to_vec()
    );
    let tool: sluice_core::Tool = serde_json::from_value(serde_json::json!({
        "type": "function", "function": {"name": "f"}
    }))
    .unwrap();
    let variants = [
        JobRequest {
            seed: Some(1),
            ..plain.clone()
        },
        JobRequest {
            tools: vec![tool],
            ..plain.clone()
        },
        JobRequest {
            response_format: Some(sluice_core::ResponseFormat::JsonObject),
            ..plain.clone()
        },
        JobRequest {
            parallel_tool_calls: Some(false),
            ..plain.clone()
        },
    ];
    let hashes: Vec<_> = variants
        .iter()
        .map(|r| Admission::request_hash("acme", r))
        .collect();
    for (i, h) in hashes.iter().enumerate() {
        assert_ne!(h, &Admission::request_hash("acme", &plain), "variant {i}");
        assert!(hashes[..i].iter().all(|o| o != h), "variant {i}");
    }
}

#[test]
fn answers_are_reused_within_the_ttl_or_only_the_dedup_window_without_the_cache() {
    let on = CacheConfig::default();
    assert_eq!(on.reuse_window(), Duration::from_secs(3600));
    let off = CacheConfig {
        enabled: false,
        ..CacheConfig::default()
    };
    assert_eq!(off.reuse_window(), Duration::from_secs(5));
    let bad = CacheConfig {
        dedup_window_secs: f64::NAN,
        ..CacheConfig::default()
    };
    assert!(bad.validate().is_err());
}

#[test]
fn budgets_fall_back_to_the_default_and_are_checked() {
    let budgets = BudgetConfig {
        default_daily_usd: Some(5.0),
        tenants: BTreeMap::from([("acme".to_owned(), 50.0)]),
        ..BudgetConfig::default()
    };
    assert_eq!(budgets.daily("acme"), Some(50.0));
    assert_eq!(budgets.daily("other"), Some(5.0));
    assert_eq!(BudgetConfig::default().daily("acme"), None, "unlimited");
    assert!(BudgetConfig {
        cheaper_at: 1.5,
        ..BudgetConfig::default()
    }
    .validate()
    .is_err());
    assert!(BudgetConfig {
        tenants: BTreeMap::from([("x".to_owned(), -1.0)]),
        ..BudgetConfig::default()
    }
    .validate()
    .is_err());
}

#[test]
fn semantic_scopes_separate_models_and_earlier_messages() {
    let system = [Message::new(sluice_core::Role::System, "Be brief.")];
    let other = [Message::new(sluice_core::Role::System, "Be verbose.")];
    assert_eq!(semantic_scope("m", &system), semantic_scope("m", &system));
    assert_ne!(semantic_scope("m", &system), semantic_scope("m", &other));
    assert_ne!(semantic_scope("m", &system), semantic_scope("n", &system));
    assert!(semantic_scope("m", &[]).starts_with("m#"));
}

#[test]
fn midnight_is_within_a_day() {
    let wait = until_utc_midnight();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(86_400),
        "{wait:?}"
    );
}
