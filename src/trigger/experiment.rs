//! Experiments: which variant a person is in (a deterministic hash, so it never changes),
//! and which exposures a purchase converts.

use sha2::{Digest, Sha256};

use super::rules::Experiment;
use super::state::{OutcomeTotals, TriggerState};
use crate::event::PersonKey;
use crate::time::Time;

/// The variant name of an experiment's control group.
pub const HOLDOUT: &str = "holdout";

/// One rule variant's outcome, summed over the shards.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantOutcome {
    pub rule: String,
    pub experiment: String,
    pub variant: String,
    pub totals: OutcomeTotals,
}

/// The variant of `experiment` for `person`: a deterministic hash, so it never changes.
pub fn assign_variant<'a>(experiment: &'a Experiment, person: &PersonKey) -> &'a str {
    let digest = Sha256::new()
        .chain_update(&experiment.name)
        .chain_update([0])
        .chain_update(person.stable_hash().to_be_bytes())
        .chain_update(match person {
            PersonKey::User(id) | PersonKey::Anonymous(id) => id.as_bytes(),
        })
        .finalize();
    let bits = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    // 53 bits make an exactly representable fraction in [0, 1).
    let u = (bits >> 11) as f64 / (1u64 << 53) as f64;
    if u < experiment.holdout {
        return HOLDOUT;
    }
    let total: f64 = experiment.variants.iter().map(|v| v.weight).sum();
    let mut point = (u - experiment.holdout) / (1.0 - experiment.holdout) * total;
    for v in &experiment.variants {
        if point < v.weight {
            return &v.name;
        }
        point -= v.weight;
    }
    &experiment.variants[experiment.variants.len() - 1].name
}

/// Records a purchase against open experiment exposures; returns the (rule, variant) pairs
/// that converted. Each exposure converts at most once.
pub fn record_purchase(state: &mut TriggerState, at: Time) -> Vec<(String, String)> {
    let mut converted = Vec::new();
    state.exposures.retain(|e| {
        let open = at >= e.at && at.since(e.at) <= e.window_ms;
        if open {
            converted.push((e.rule.clone(), e.variant.clone()));
        }
        // Exposures whose window has passed can no longer convert.
        !open && at.since(e.at) <= e.window_ms
    });
    converted
}
