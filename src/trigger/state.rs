//! The trigger state Nudge keeps per person, as the store persists it: per-rule latches,
//! delivery times for the frequency cap, pending timers, open experiment exposures, and the
//! audit entries of decisions. Plain data: this file imports only time.

use serde::{Deserialize, Serialize};

use crate::heap::{self, HeapSize};
use crate::time::Time;

/// Experiment exposures remembered per person while their conversion window is open.
pub const MAX_EXPOSURES: usize = 32;

/// Separates a rule's name from a product in the key of a product-level rule's state
/// (`rule#<product hash>`); rule names never hold it.
pub const PRODUCT_KEY_SEPARATOR: char = '#';

/// The rule a state key belongs to: the key itself, or a product-level key's rule.
pub fn rule_of(key: &str) -> &str {
    key.split_once(PRODUCT_KEY_SEPARATOR)
        .map_or(key, |(rule, _)| rule)
}

/// What the trigger engine keeps per person, stored beside the profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TriggerState {
    /// Per rule name (or, for product-level rules, `rule#<product hash>`), only rules with
    /// something to remember (most people have none).
    pub rules: Vec<(String, RuleState)>,
    /// Times of delivered triggers within the frequency cap's window.
    pub delivered: Vec<Time>,
    pub timers: Vec<Timer>,
    pub exposures: Vec<Exposure>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    /// Thresholds: fired and not yet re-armed. Predicates: true at the last evaluation.
    pub latched: bool,
    /// The latest firing that was delivered (or held out).
    pub last_fired: Option<Time>,
}

/// A pending absence deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub rule: String,
    pub due: Time,
    /// 0 for the first reminder, then one per follow-up.
    pub step: u32,
    /// The event that started the wait; `recheck` for a threshold's recheck.
    pub cause: String,
    pub variant: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exposure {
    pub rule: String,
    pub variant: String,
    pub at: Time,
    pub window_ms: i64,
}

/// One decision, as the audit record keeps it (see `Store::audit`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Time,
    pub rule: String,
    pub trigger_id: String,
    pub outcome: Outcome,
    pub variant: Option<String>,
    /// Stored after the entry's first five fields, not inside them: entries written before
    /// it existed end there (`Store` encodes and decodes the two parts).
    #[serde(skip)]
    pub detail: AuditDetail,
}

/// What a decision computed: its action's parameters from expressions, and its context.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditDetail {
    pub computed: std::collections::BTreeMap<String, String>,
    pub context: Option<super::TriggerContext>,
}

/// What became of one would-be trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Written to the outbox for subscribers and webhooks.
    Delivered,
    /// The person is in the experiment's holdout: recorded, not delivered.
    Holdout,
    Suppressed(Suppressed),
}

/// Why a trigger was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Suppressed {
    PurchasedRecently,
    AlreadyReceived,
    Excluded,
    Cooldown,
    QuietHours,
    FrequencyCap,
}

impl Suppressed {
    pub const fn as_str(self) -> &'static str {
        match self {
            Suppressed::PurchasedRecently => "purchased_recently",
            Suppressed::AlreadyReceived => "already_received",
            Suppressed::Excluded => "excluded",
            Suppressed::Cooldown => "cooldown",
            Suppressed::QuietHours => "quiet_hours",
            Suppressed::FrequencyCap => "frequency_cap",
        }
    }
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Holdout => "holdout",
            Outcome::Suppressed(reason) => reason.as_str(),
        }
    }
}

/// Exposures and conversions of one rule variant (one shard's share, or a sum).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeTotals {
    pub exposures: u64,
    pub conversions: u64,
}

impl HeapSize for TriggerState {
    fn heap_bytes(&self) -> usize {
        let rules = heap::buffer::<(String, RuleState)>(self.rules.capacity())
            + self
                .rules
                .iter()
                .map(|(n, _)| n.heap_bytes())
                .sum::<usize>();
        let timers = heap::buffer::<Timer>(self.timers.capacity())
            + self
                .timers
                .iter()
                .map(|t| t.rule.heap_bytes() + t.cause.heap_bytes() + t.variant.heap_bytes())
                .sum::<usize>();
        let exposures = heap::buffer::<Exposure>(self.exposures.capacity())
            + self
                .exposures
                .iter()
                .map(|e| e.rule.heap_bytes() + e.variant.heap_bytes())
                .sum::<usize>();
        rules + heap::buffer::<Time>(self.delivered.capacity()) + timers + exposures
    }
}

impl TriggerState {
    /// Gives back the spare capacity growth left, as [`crate::profile::Profile::shrink_to_fit`].
    pub fn shrink_to_fit(&mut self) {
        self.rules.shrink_to_fit();
        self.delivered.shrink_to_fit();
        self.timers.shrink_to_fit();
        self.exposures.shrink_to_fit();
    }

    /// A rule's state (the default when nothing is recorded for it).
    pub fn rule(&self, name: &str) -> RuleState {
        self.rules
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, rs)| *rs)
            .unwrap_or_default()
    }

    /// Records a rule's state; a default one takes no room.
    pub(super) fn set_rule(&mut self, name: &str, rs: RuleState) {
        let at = self.rules.iter().position(|(n, _)| n == name);
        match (at, rs == RuleState::default()) {
            (Some(i), true) => {
                self.rules.swap_remove(i);
            }
            (Some(i), false) => self.rules[i].1 = rs,
            (None, false) => self.rules.push((name.to_owned(), rs)),
            (None, true) => {}
        }
    }

    /// Keeps at most `max` product-level states of `rule` (keys `rule#…`): latched ones
    /// first, then the most recently fired.
    pub(super) fn bound_product_states(&mut self, rule: &str, max: usize) {
        let is_product_of = |key: &str| {
            key.strip_prefix(rule)
                .is_some_and(|rest| rest.starts_with(PRODUCT_KEY_SEPARATOR))
        };
        let count = self.rules.iter().filter(|(k, _)| is_product_of(k)).count();
        for _ in max..count {
            let weakest = self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, (k, _))| is_product_of(k))
                .min_by_key(|(_, (_, rs))| (rs.latched, rs.last_fired))
                .map(|(i, _)| i);
            if let Some(i) = weakest {
                self.rules.swap_remove(i);
            }
        }
    }

    /// Whether there is nothing worth storing.
    pub fn is_empty(&self) -> bool {
        self == &TriggerState::default()
    }

    /// The due times of the pending timers.
    pub fn dues(&self) -> Vec<Time> {
        let mut dues: Vec<Time> = self.timers.iter().map(|t| t.due).collect();
        dues.sort_unstable();
        dues.dedup();
        dues
    }

    /// Folds another person's state into this one (identity stitching): timers and
    /// exposures move over; per rule, the latest firing wins.
    pub fn merge(&mut self, other: TriggerState) {
        for (name, theirs) in other.rules {
            let mut mine = self.rule(&name);
            mine.latched |= theirs.latched;
            mine.last_fired = mine.last_fired.max(theirs.last_fired);
            self.set_rule(&name, mine);
        }
        self.delivered.extend(other.delivered);
        self.delivered.sort_unstable();
        for timer in other.timers {
            // One pending wait per rule: the earlier one stands.
            match self.timers.iter_mut().find(|t| t.rule == timer.rule) {
                Some(t) if t.due <= timer.due => {}
                Some(t) => *t = timer,
                None => self.timers.push(timer),
            }
        }
        self.exposures.extend(other.exposures);
        self.exposures.sort_by_key(|e| e.at);
        let excess = self.exposures.len().saturating_sub(MAX_EXPOSURES);
        self.exposures.drain(..excess);
    }
}
