//! Triggers: the rules that decide when a person should get a message, and the state that
//! makes each decision once.
//!
//! This module is a pure core. [`evaluate`] takes a person's [`TriggerState`], what is
//! known about them now ([`Facts`]: features, scores, segments, history, `now`) and the
//! [`Cause`] — an event just applied, or timers come due — updates the state and returns
//! the [`Decisions`]: delivered, held out or suppressed with a reason, and experiment
//! conversions. It reads no clock, does no IO but reading the rules file, and knows nothing
//! of the store, the engine or delivery: the engine's shards call it and commit the state,
//! the timers and the outbox entries in the same batch as the profile, so a trigger is
//! decided exactly once per cause, across restarts.
//!
//! - [`rules`]: the rules file, checked and compiled; [`Live`] holds the running set.
//! - [`context`]: the person's product and category memory as rules read it, and the
//!   context block a trigger carries.
//! - [`expr`]: CEL expressions and the context they run in (the only user of the CEL crate).
//! - [`evaluate`](mod@evaluate): conditions, timers, suppression.
//! - [`experiment`]: variant assignment and conversions.
//! - [`state`]: the persisted per-person state.

pub mod context;
mod evaluate;
pub mod experiment;
pub mod expr;
pub mod rules;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::PersonKey;
use crate::features::FeatureRow;
use crate::time::Time;
pub use context::{Memory, MemoryNeeds, TriggerContext};
pub use evaluate::{evaluate, Cause, Decisions};
pub use experiment::{VariantOutcome, HOLDOUT};
use rules::{RuleSet, RulesError};
pub use state::{AuditEntry, Outcome, OutcomeTotals, Suppressed, Timer, TriggerState};

/// Decisions answered per person for "why (not)?" questions.
pub const AUDIT_LEN: usize = 50;
/// Contributions reported per model in a trigger.
pub const TOP_CONTRIBUTIONS: usize = 5;

/// The running rules, swapped whole on reload; evaluations keep the `Arc` they started
/// with.
pub struct Live {
    rules: ArcSwap<RuleSet>,
    /// The rules file; empty for none.
    path: PathBuf,
    /// One reload at a time.
    reloading: Mutex<()>,
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub rules: Arc<RuleSet>,
    /// False when the file was unchanged (or there is no file).
    pub changed: bool,
}

impl Live {
    /// Loads the rules file (an empty path: no rules), refusing a file with problems.
    pub fn open(path: PathBuf) -> Result<Live, RulesError> {
        let rules = if path.as_os_str().is_empty() {
            RuleSet::empty()
        } else {
            RuleSet::load(&path)?
        };
        Ok(Live {
            rules: ArcSwap::from_pointee(rules),
            path,
            reloading: Mutex::new(()),
        })
    }

    /// The rules running now.
    pub fn current(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Reads the rules file again; a file with problems is refused and the running rules
    /// stay.
    pub fn reload(&self) -> Result<Reloaded, RulesError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.rules.load_full();
        if self.path.as_os_str().is_empty() {
            return Ok(Reloaded {
                rules: current,
                changed: false,
            });
        }
        let rules = RuleSet::load(&self.path)?;
        if rules.version == current.version {
            return Ok(Reloaded {
                rules: current,
                changed: false,
            });
        }
        let rules = Arc::new(rules);
        self.rules.store(rules.clone());
        Ok(Reloaded {
            rules,
            changed: true,
        })
    }

    /// The rules file, for watching (empty for none).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why a person got (or did not get) triggers: the latest decisions, oldest first, and the
/// timers still pending.
#[derive(Debug, Default)]
pub struct Explanation {
    pub decisions: Vec<AuditEntry>,
    pub timers: Vec<Timer>,
}

/// A trigger: what subscribers and webhooks receive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// Derived from the rule, the person and the cause: consumers deduplicate on it.
    pub trigger_id: String,
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// Milliseconds since the epoch.
    pub time_ms: i64,
    /// `event:<id>` or `timer:<starting event id>:<step>`.
    pub cause: String,
    pub scores: BTreeMap<String, f64>,
    pub journey_stage: String,
    /// Per model, the features that pushed the score most (LightGBM models).
    pub contributions: BTreeMap<String, Vec<Contribution>>,
    /// The action, with the variant's and the computed parameters applied.
    pub action: rules::Action,
    /// What the rule's `context` list asked for; absent when it asks for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<TriggerContext>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub feature: String,
    /// The feature's additive contribution to the raw (log-odds) score.
    pub value: f64,
}

/// A decision about one rule for one person.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    pub trigger: Trigger,
    pub outcome: Outcome,
    /// The action parameters computed from expressions, as they are in the trigger.
    pub computed: BTreeMap<String, String>,
}

impl Firing {
    /// The decision as the audit record keeps it.
    pub fn audit_entry(&self) -> AuditEntry {
        AuditEntry {
            at: Time(self.trigger.time_ms),
            rule: self.trigger.rule.clone(),
            trigger_id: self.trigger.trigger_id.clone(),
            outcome: self.outcome.clone(),
            variant: self.trigger.variant.clone(),
            detail: state::AuditDetail {
                computed: self.computed.clone(),
                context: self.trigger.context.clone(),
            },
        }
    }
}

/// Everything known about a person at `now`.
pub struct Facts<'a> {
    pub person: &'a PersonKey,
    pub row: &'a FeatureRow,
    /// Model name and probability of each model that scored.
    pub scores: &'a [(String, f64)],
    pub segment: Option<&'a str>,
    pub segments: &'a [&'static str],
    pub history: History,
    /// The product and category memory, taken when the event was applied; empty unless
    /// the rules read it ([`rules::RuleSet::memory_needs`]).
    pub memory: &'a Memory,
    /// Explains a model's score for this person: top contributions (empty when the
    /// backend cannot). Called only for delivered triggers; it may be costly (TreeSHAP),
    /// so callers should cache per model.
    pub explain: &'a dyn Fn(&str) -> Vec<Contribution>,
    pub now: Time,
}

/// When the person last did what suppression and rechecks ask about.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct History {
    pub last_purchase: Option<Time>,
    /// The latest event of any kind.
    pub last_seen: Option<Time>,
}

impl History {
    pub fn of(profile: &crate::profile::Profile) -> History {
        History {
            last_purchase: profile.last_purchase(),
            last_seen: profile.last_seen(),
        }
    }
}

/// A stable id for the trigger a rule makes for a person from a cause.
pub fn trigger_id(rule: &str, person: &PersonKey, cause: &str) -> String {
    let (tag, id) = match person {
        PersonKey::User(id) => ("u", id),
        PersonKey::Anonymous(id) => ("a", id),
    };
    let digest = Sha256::new()
        .chain_update(rule)
        .chain_update([0])
        .chain_update(tag)
        .chain_update(id)
        .chain_update([0])
        .chain_update(cause)
        .finalize();
    format!("trg_{}", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests;
