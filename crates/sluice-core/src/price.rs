//! What a call costs from its token counts, and where a day's spend stands against its budget
//! (within, time to prefer cheaper pools, or exhausted).

use serde::{Deserialize, Serialize};

/// Tokens per price unit: prices are quoted per million tokens.
const TOKENS_PER_UNIT: f64 = 1_000_000.0;

/// A model's price in USD per million tokens, prompt and completion priced apart.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    /// Both prices must be finite and not negative (0 is fine: self-hosted models).
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("input_per_mtok", self.input_per_mtok),
            ("output_per_mtok", self.output_per_mtok),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!(
                    "price {name} must be a finite number of USD at or above 0, got {value}"
                ));
            }
        }
        Ok(())
    }

    /// The cost in USD of a call that used these tokens.
    pub fn cost(&self, prompt_tokens: u32, completion_tokens: u32) -> f64 {
        (f64::from(prompt_tokens) * self.input_per_mtok
            + f64::from(completion_tokens) * self.output_per_mtok)
            / TOKENS_PER_UNIT
    }
}

/// Where today's spend stands against the daily budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetState {
    /// Spend is below the cheaper-at threshold.
    Within,
    /// Spend has reached the threshold: route to cheaper pools where a route allows.
    Cheaper,
    /// Spend has reached the budget.
    Exhausted,
}

/// Exhausted once `spent` reaches `daily_budget`; cheaper once it reaches `cheaper_at` (a
/// fraction, e.g. 0.8) of it; else within. A budget of 0 is exhausted from the start; a NaN
/// or infinite budget, or a NaN threshold, never triggers (no budget set).
pub fn budget_state(spent: f64, daily_budget: f64, cheaper_at: f64) -> BudgetState {
    if spent >= daily_budget {
        BudgetState::Exhausted
    } else if spent >= cheaper_at * daily_budget {
        BudgetState::Cheaper
    } else {
        BudgetState::Within
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_prices_prompt_and_completion_apart() {
        let p = Price {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
        };
        assert_eq!(p.cost(1_000_000, 0), 3.0);
        assert_eq!(p.cost(0, 1_000_000), 15.0);
        assert!((p.cost(2_000, 500) - 0.0135).abs() < 1e-12);
        assert_eq!(p.cost(0, 0), 0.0);
        // No overflow at the extremes.
        assert!(p.cost(u32::MAX, u32::MAX).is_finite());
    }

    #[test]
    fn prices_validate_and_parse() {
        assert!(Price::default().validate().is_ok());
        for bad in [-0.01, f64::NAN, f64::INFINITY] {
            let p = Price {
                input_per_mtok: 1.0,
                output_per_mtok: bad,
            };
            let err = p.validate().expect_err("invalid price");
            assert!(err.contains("output_per_mtok"), "{err}");
        }
        let p: Price = serde_json::from_str(r#"{"input_per_mtok": 0.15, "output_per_mtok": 0.6}"#)
            .expect("parses");
        assert_eq!(p.output_per_mtok, 0.6);
        assert!(serde_json::from_str::<Price>(
            r#"{"input_per_mtok": 1, "output_per_mtok": 1, "currency": "EUR"}"#
        )
        .is_err());
    }

    #[test]
    fn budget_thresholds_are_inclusive() {
        assert_eq!(budget_state(0.0, 100.0, 0.8), BudgetState::Within);
        assert_eq!(budget_state(79.99, 100.0, 0.8), BudgetState::Within);
        assert_eq!(budget_state(80.0, 100.0, 0.8), BudgetState::Cheaper);
        assert_eq!(budget_state(99.99, 100.0, 0.8), BudgetState::Cheaper);
        assert_eq!(budget_state(100.0, 100.0, 0.8), BudgetState::Exhausted);
        assert_eq!(budget_state(250.0, 100.0, 0.8), BudgetState::Exhausted);
        assert_eq!(budget_state(0.0, 0.0, 0.8), BudgetState::Exhausted);
        assert_eq!(budget_state(1e9, f64::INFINITY, 0.8), BudgetState::Within);
        assert_eq!(budget_state(1e9, f64::NAN, 0.8), BudgetState::Within);
        assert_eq!(budget_state(99.0, 100.0, f64::NAN), BudgetState::Within);
        // A threshold of 1 or more means never cheaper before exhausted.
        assert_eq!(budget_state(99.0, 100.0, 1.0), BudgetState::Within);
    }
}
