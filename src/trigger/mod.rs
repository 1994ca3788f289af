//! Triggers: the rules that decide when a person should get a message, and the state that
//! makes each decision once.
//!
//! The core here is pure: [`evaluate_event`] and [`evaluate_timers`] take a person's
//! [`TriggerState`], what is known about them now (features, scores, segments, the event)
//! and `now`, update the state and return the [`Firing`]s — delivered, held out or
//! suppressed with a reason. The engine's shards call them for each event and each due
//! timer and commit the state, the timers and the outbox entries in the same batch as the
//! profile, so a trigger is decided exactly once per cause, across restarts.
//!
//! - [`rules`]: the rules file, checked and compiled.
//! - [`outbox`]: the durable, ordered log of delivered triggers that subscribers and
//!   webhooks read with cursors.
//! - [`webhook`]: Standard Webhooks delivery with retries, limits and dead letters.

pub mod outbox;
pub mod rules;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use cel_interpreter::{Context, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::{Event, PersonKey};
use crate::features::{FeatureRow, FEATURES};
use crate::metrics::Metrics;
use crate::store::{OutcomeTotals, Store, StoreError};
use crate::time::Time;
use outbox::Outbox;
use rules::{Condition, Expr, Rule, RuleSet, RulesError, Schedule};

/// What the shards and the API share: the running rules (swapped whole on reload), the
/// outbox, and the store behind both.
pub struct Triggers {
    pub rules: ArcSwap<RuleSet>,
    pub outbox: Arc<Outbox>,
    store: Arc<Store>,
    /// The rules file; empty for none.
    path: PathBuf,
    metrics: Arc<Metrics>,
    /// One reload at a time.
    reloading: Mutex<()>,
}

/// One rule variant's outcome, summed over the shards.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantOutcome {
    pub rule: String,
    pub experiment: String,
    pub variant: String,
    pub totals: OutcomeTotals,
}

impl Triggers {
    /// Loads the rules file (refusing a bad one) and opens the outbox.
    pub fn open(
        path: PathBuf,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Triggers> {
        let rules = if path.as_os_str().is_empty() {
            RuleSet::empty()
        } else {
            RuleSet::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        };
        metrics.rules_loaded.set(rules.rules.len() as i64);
        Ok(Triggers {
            rules: ArcSwap::from_pointee(rules),
            outbox: Arc::new(Outbox::open(store.clone())?),
            store,
            path,
            metrics,
            reloading: Mutex::new(()),
        })
    }

    /// Reads the rules file again; a file with problems is refused and the running rules
    /// stay. `cause` is for the log.
    pub fn reload_rules(&self, cause: &str) -> Result<Arc<RuleSet>, RulesError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        if self.path.as_os_str().is_empty() {
            return Ok(self.rules.load_full());
        }
        match RuleSet::load(&self.path) {
            Ok(rules) => {
                let current = self.rules.load_full();
                if rules.version == current.version {
                    return Ok(current);
                }
                let rules = Arc::new(rules);
                self.rules.store(rules.clone());
                self.metrics.rules_reloads.with_label_values(&["ok"]).inc();
                self.metrics.rules_loaded.set(rules.rules.len() as i64);
                tracing::info!(cause, version = %rules.version, rules = rules.rules.len(), "rules now running");
                Ok(rules)
            }
            Err(e) => {
                self.metrics
                    .rules_reloads
                    .with_label_values(&["refused"])
                    .inc();
                tracing::error!(cause, file = %self.path.display(), error = %e, "rules refused; the running rules stay");
                Err(e)
            }
        }
    }

    /// The rules file, for watching.
    pub fn rules_path(&self) -> &std::path::Path {
        &self.path
    }

    /// Exposures and conversions per rule and variant, summed over the shards.
    pub fn outcomes(&self) -> Result<Vec<VariantOutcome>, StoreError> {
        let mut sums: BTreeMap<(String, String), OutcomeTotals> = BTreeMap::new();
        for (rule, variant, _, t) in self.store.outcomes()? {
            let sum = sums.entry((rule, variant)).or_default();
            sum.exposures += t.exposures;
            sum.conversions += t.conversions;
        }
        let rules = self.rules.load();
        Ok(sums
            .into_iter()
            .map(|((rule, variant), totals)| VariantOutcome {
                experiment: rules
                    .get(&rule)
                    .and_then(|r| r.experiment.as_ref())
                    .map(|e| e.name.clone())
                    .unwrap_or_default(),
                rule,
                variant,
                totals,
            })
            .collect())
    }

    /// Erases the triggers of `people` (a person and their linked ids) from the outbox and
    /// the dead letters; returns how many went. A scan: erasure is rare, the outbox bounded
    /// by its retention.
    pub fn forget(&self, people: &[PersonKey]) -> Result<usize, StoreError> {
        let concerns = |t: &Trigger| {
            people.iter().any(|p| match p {
                PersonKey::User(id) => t.user_id.as_ref() == Some(id),
                PersonKey::Anonymous(id) => t.anonymous_id.as_ref() == Some(id),
            })
        };
        let mut outbox = Vec::new();
        let mut cursor = 0;
        loop {
            let batch = self.store.outbox_range(cursor, u64::MAX, 4096)?;
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            cursor = last;
            for (seq, bytes) in batch {
                if serde_json::from_slice::<Trigger>(&bytes).is_ok_and(|t| concerns(&t)) {
                    outbox.push(seq);
                }
            }
        }
        let dead: Vec<(String, u64)> = self
            .store
            .all_dead_letters()?
            .into_iter()
            .filter(|(_, _, bytes)| {
                serde_json::from_slice::<webhook::DeadLetter>(bytes)
                    .is_ok_and(|d| concerns(&d.trigger))
            })
            .map(|(consumer, seq, _)| (consumer, seq))
            .collect();
        self.store.remove_delivered(&outbox, &dead)?;
        Ok(outbox.len() + dead.len())
    }

    /// A webhook endpoint's dead letters, oldest first.
    pub fn dead_letters(
        &self,
        endpoint: &str,
        limit: usize,
    ) -> Result<Vec<webhook::DeadLetter>, StoreError> {
        webhook::dead_letters(&self.store, endpoint, limit)
    }

    /// Deletes outbox entries older than `retention_ms` that every webhook endpoint has
    /// taken care of.
    pub fn trim_outbox(
        &self,
        now: Time,
        retention_ms: i64,
        endpoints: &[String],
    ) -> Result<usize, StoreError> {
        let mut up_to = self.outbox.watermark();
        for name in endpoints {
            up_to = up_to.min(self.store.cursor(&webhook::consumer(name))?);
        }
        // Entries are in time order: find the last one that is old enough.
        let mut cut = 0;
        let mut cursor = self.outbox.first()?.map_or(0, |f| f.saturating_sub(1));
        'scan: loop {
            let batch = self.outbox.read(cursor, 1024)?;
            if batch.is_empty() {
                break;
            }
            for (seq, t) in batch {
                if seq > up_to || now.since(Time(t.time_ms)) < retention_ms {
                    break 'scan;
                }
                cut = seq;
                cursor = seq;
            }
        }
        if cut == 0 {
            return Ok(0);
        }
        self.store.trim_outbox(cut)
    }
}

/// The variant name of an experiment's control group.
pub const HOLDOUT: &str = "holdout";
/// Decisions answered per person for "why (not)?" questions.
pub const AUDIT_LEN: usize = 50;
/// Experiment exposures remembered per person while their conversion window is open.
const MAX_EXPOSURES: usize = 32;
/// Contributions reported per model in a trigger.
pub const TOP_CONTRIBUTIONS: usize = 5;

/// What the trigger engine keeps per person, stored beside the profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TriggerState {
    /// Per rule name, only rules with something to remember (most people have none).
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

/// The cause of a threshold's recheck timer.
const RECHECK: &str = "recheck";
/// Rechecks stop this long after a person's latest event (the profile's history).
const RECHECK_HORIZON_MS: i64 = crate::profile::HISTORY_DAYS as i64 * crate::time::DAY_MS;

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
    pub action: rules::Action,
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

/// The variant of `experiment` for `person`: a deterministic hash, so it never changes.
pub fn assign_variant<'a>(experiment: &'a rules::Experiment, person: &PersonKey) -> &'a str {
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

/// The CEL context for one evaluation, built once and shared by every rule.
struct Env {
    context: Context<'static>,
    stage: &'static str,
}

impl Env {
    fn new(rules: &RuleSet, facts: &Facts<'_>, event: Option<&Event>) -> Env {
        // Only what some expression reads: building the context is most of the cost.
        let read = |name: &str| rules.variables.contains(name);
        let mut context = Context::default();
        for (def, value) in FEATURES.iter().zip(facts.row.0) {
            if read(def.name) {
                context.add_variable_from_value(def.name, value);
            }
        }
        if read("scores") {
            let scores: HashMap<String, f64> = facts.scores.iter().cloned().collect();
            context.add_variable_from_value("scores", scores);
        }
        if read("segment") {
            context.add_variable_from_value("segment", facts.segment.unwrap_or("").to_owned());
        }
        if read("segments") {
            context.add_variable_from_value(
                "segments",
                facts
                    .segments
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect::<Vec<_>>(),
            );
        }
        if read("event") {
            context.add_variable_from_value("event", event_value(event));
        }
        let mut env = Env {
            context,
            stage: "awareness",
        };
        env.stage = if env.holds(&rules.journey.decision) {
            "decision"
        } else if env.holds(&rules.journey.consideration) {
            "consideration"
        } else {
            "awareness"
        };
        env.context.add_variable_from_value("stage", env.stage);
        env
    }

    /// Whether an expression is true. An error (a missing score, comparing a string with
    /// a number) counts as false: a rule never fires on something it could not check.
    fn holds(&self, expr: &Expr) -> bool {
        matches!(expr.program.execute(&self.context), Ok(Value::Bool(true)))
    }
}

fn event_value(event: Option<&Event>) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    let s = |v: &str| Value::String(Arc::new(v.to_owned()));
    let Some(e) = event else {
        map.insert("kind".into(), s("timer"));
        return map;
    };
    map.insert("kind".into(), s(e.kind.as_str()));
    let p = &e.properties;
    for (name, value) in [
        ("product_id", &p.product_id),
        ("category", &p.category),
        ("page", &p.page),
        ("search_query", &p.search_query),
        ("campaign_id", &p.campaign_id),
    ] {
        map.insert(name.into(), s(value.as_deref().unwrap_or("")));
    }
    for (name, value) in [("price", p.price), ("order_value", p.order_value)] {
        map.insert(name.into(), Value::Float(value.unwrap_or(f64::NAN)));
    }
    let attributes: HashMap<String, Value> = e
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), s(v)))
        .collect();
    map.insert("attributes".into(), attributes.into());
    map
}

/// A rule that wants to fire, before suppression.
struct Candidate<'r> {
    rule: &'r Rule,
    cause: String,
    variant: Option<String>,
}

/// Evaluates every rule for an event that was just applied to the person's profile.
pub fn evaluate_event(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
    event: &Event,
) -> Vec<Firing> {
    if rules.rules.is_empty() {
        return Vec::new();
    }
    let env = Env::new(rules, facts, Some(event));
    let cause = format!("event:{}", event.id);
    let mut candidates = Vec::new();
    for rule in &rules.rules {
        let when = rule.when.as_ref().is_none_or(|w| env.holds(w));
        match &rule.condition {
            Condition::Threshold { recheck_ms, .. } => {
                if recheck_ms.is_some() {
                    // Only people the rule can fire for (its `when` holds now) are
                    // rechecked: a recheck timer per person is memory and work.
                    state
                        .timers
                        .retain(|t| !(t.rule == rule.name && t.cause == RECHECK));
                }
                if let (Some(every), true) = (recheck_ms, when) {
                    state.timers.push(Timer {
                        rule: rule.name.clone(),
                        due: facts.now.plus_ms(*every),
                        step: 0,
                        cause: RECHECK.to_owned(),
                        variant: None,
                    });
                }
                if crossed(state, rule, facts, when) {
                    candidates.push(Candidate {
                        rule,
                        cause: cause.clone(),
                        variant: None,
                    });
                }
            }
            Condition::Predicate => {
                let mut rs = state.rule(&rule.name);
                let was = std::mem::replace(&mut rs.latched, when);
                if when && !was {
                    candidates.push(Candidate {
                        rule,
                        cause: cause.clone(),
                        variant: None,
                    });
                }
                state.set_rule(&rule.name, rs);
            }
            Condition::Absence {
                after,
                missing,
                within_ms,
                schedule,
                ..
            } => {
                if missing.contains(&event.kind) && *schedule == Schedule::Action {
                    state.timers.retain(|t| t.rule != rule.name);
                }
                if after.contains(&event.kind) && when {
                    let pending = state.timers.iter().any(|t| t.rule == rule.name);
                    if *schedule == Schedule::Time && pending {
                        continue;
                    }
                    state.timers.retain(|t| t.rule != rule.name);
                    let variant = rule
                        .experiment
                        .as_ref()
                        .map(|e| assign_variant(e, facts.person));
                    let within = rule
                        .experiment
                        .as_ref()
                        .and_then(|e| e.variants.iter().find(|v| Some(v.name.as_str()) == variant))
                        .and_then(|v| v.within_ms)
                        .unwrap_or(*within_ms);
                    state.timers.push(Timer {
                        rule: rule.name.clone(),
                        due: event.time.plus_ms(within),
                        step: 0,
                        cause: event.id.clone(),
                        variant: variant.map(str::to_owned),
                    });
                }
            }
        }
    }
    decide(rules, state, facts, &env, candidates)
}

/// Fires every timer of the person that is due at `facts.now`, and schedules follow-ups.
pub fn evaluate_timers(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
) -> Vec<Firing> {
    let now = facts.now;
    let (due, pending): (Vec<Timer>, Vec<Timer>) = std::mem::take(&mut state.timers)
        .into_iter()
        .partition(|t| t.due <= now);
    state.timers = pending;
    if due.is_empty() {
        return Vec::new();
    }
    let env = Env::new(rules, facts, None);
    let mut candidates = Vec::new();
    for timer in due {
        // A timer of a rule that was removed or changed kind is dropped.
        let Some(rule) = rules.get(&timer.rule) else {
            continue;
        };
        if let Condition::Threshold {
            recheck_ms: Some(every),
            ..
        } = &rule.condition
        {
            if timer.cause != RECHECK {
                continue;
            }
            let quiet_for = facts.history.last_seen.map_or(i64::MAX, |t| now.since(t));
            if quiet_for < RECHECK_HORIZON_MS {
                state.timers.push(Timer {
                    due: timer.due.plus_ms(*every).max(now.plus_ms(1)),
                    ..timer.clone()
                });
            }
            let when = rule.when.as_ref().is_none_or(|w| env.holds(w));
            if crossed(state, rule, facts, when) {
                candidates.push(Candidate {
                    rule,
                    cause: format!("{RECHECK}:{}", timer.due.millis()),
                    variant: None,
                });
            }
            continue;
        }
        let Condition::Absence {
            follow_ups_ms,
            schedule,
            ..
        } = &rule.condition
        else {
            continue;
        };
        if let Some(delay) = follow_ups_ms.get(timer.step as usize) {
            let from = match schedule {
                Schedule::Action => now,
                Schedule::Time => timer.due,
            };
            state.timers.push(Timer {
                due: from.plus_ms(*delay),
                step: timer.step + 1,
                ..timer.clone()
            });
        }
        candidates.push(Candidate {
            rule,
            cause: format!("timer:{}:{}", timer.cause, timer.step),
            variant: timer.variant,
        });
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.rule.priority));
    decide(rules, state, facts, &env, candidates)
}

/// Whether a threshold rule's score crossed up (with `when` true) and so fires; moves its
/// latch: set on crossing, cleared below the re-arm level.
fn crossed(state: &mut TriggerState, rule: &Rule, facts: &Facts<'_>, when: bool) -> bool {
    let Condition::Threshold {
        score,
        above,
        rearm_below,
        ..
    } = &rule.condition
    else {
        return false;
    };
    let Some(&(_, p)) = facts.scores.iter().find(|(m, _)| m == score) else {
        return false;
    };
    let mut rs = state.rule(&rule.name);
    let fire = if rs.latched {
        if p < *rearm_below {
            rs.latched = false;
        }
        false
    } else if p >= *above && when {
        rs.latched = true;
        true
    } else {
        false
    };
    state.set_rule(&rule.name, rs);
    fire
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

/// Applies suppression to the candidates, highest priority first, and records each
/// decision in the state.
fn decide(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
    env: &Env,
    candidates: Vec<Candidate<'_>>,
) -> Vec<Firing> {
    let now = facts.now;
    if let Some(cap) = &rules.cap {
        state.delivered.retain(|t| now.since(*t) < cap.per_ms);
    }
    let mut firings = Vec::with_capacity(candidates.len());
    for c in candidates {
        let rule = c.rule;
        let variant = c.variant.or_else(|| {
            rule.experiment
                .as_ref()
                .map(|e| assign_variant(e, facts.person).to_owned())
        });
        let last = state.rule(&rule.name).last_fired;
        let within = |ms: Option<i64>, t: Option<Time>| match (ms, t) {
            (Some(ms), Some(t)) => now.since(t) < ms,
            _ => false,
        };
        let s = &rule.suppression;
        let suppressed = if within(s.purchased_within_ms, facts.history.last_purchase) {
            Some(Suppressed::PurchasedRecently)
        } else if within(s.received_within_ms, last) {
            Some(Suppressed::AlreadyReceived)
        } else if s.unless.as_ref().is_some_and(|u| env.holds(u)) {
            Some(Suppressed::Excluded)
        } else if within(s.cooldown_ms, last) {
            Some(Suppressed::Cooldown)
        } else if !s.ignore_quiet_hours
            && rules.quiet_hours.is_some_and(|q| q.contains(now.millis()))
        {
            Some(Suppressed::QuietHours)
        } else if rules
            .cap
            .is_some_and(|cap| state.delivered.len() >= cap.max as usize)
        {
            Some(Suppressed::FrequencyCap)
        } else {
            None
        };
        let outcome = match suppressed {
            Some(reason) => Outcome::Suppressed(reason),
            None if variant.as_deref() == Some(HOLDOUT) => Outcome::Holdout,
            None => Outcome::Delivered,
        };
        // Explaining a score costs more than everything else here (TreeSHAP): only
        // delivered triggers carry it.
        let explained = outcome == Outcome::Delivered;
        let trigger = build_trigger(rule, &c.cause, variant, facts, env, explained);
        if !matches!(outcome, Outcome::Suppressed(_)) {
            let mut rs = state.rule(&rule.name);
            rs.last_fired = Some(now);
            state.set_rule(&rule.name, rs);
            if let (Some(e), Some(v)) = (&rule.experiment, &trigger.variant) {
                if state.exposures.len() >= MAX_EXPOSURES {
                    state.exposures.remove(0);
                }
                state.exposures.push(Exposure {
                    rule: rule.name.clone(),
                    variant: v.clone(),
                    at: now,
                    window_ms: e.conversion_window_ms,
                });
            }
        }
        if outcome == Outcome::Delivered {
            state.delivered.push(now);
        }
        firings.push(Firing { trigger, outcome });
    }
    firings
}

fn build_trigger(
    rule: &Rule,
    cause: &str,
    variant: Option<String>,
    facts: &Facts<'_>,
    env: &Env,
    explained: bool,
) -> Trigger {
    let mut action = rule.action.clone();
    if let Some(v) = rule.experiment.as_ref().and_then(|e| {
        e.variants
            .iter()
            .find(|v| Some(&v.name) == variant.as_ref())
    }) {
        action.params.extend(v.params.clone());
        if let Some(t) = &v.template {
            action.template = t.clone();
        }
    }
    let (user_id, anonymous_id) = match facts.person {
        PersonKey::User(id) => (Some(id.clone()), None),
        PersonKey::Anonymous(id) => (None, Some(id.clone())),
    };
    Trigger {
        trigger_id: trigger_id(&rule.name, facts.person, cause),
        rule: rule.name.clone(),
        user_id,
        anonymous_id,
        time_ms: facts.now.millis(),
        cause: cause.to_owned(),
        scores: facts.scores.iter().cloned().collect(),
        journey_stage: env.stage.to_owned(),
        contributions: facts
            .scores
            .iter()
            .filter(|_| explained)
            .map(|(model, _)| (model.clone(), (facts.explain)(model)))
            .filter(|(_, c)| !c.is_empty())
            .collect(),
        action,
        experiment: rule.experiment.as_ref().map(|e| e.name.clone()),
        variant,
    }
}

impl TriggerState {
    /// A rule's state (the default when nothing is recorded for it).
    pub fn rule(&self, name: &str) -> RuleState {
        self.rules
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, rs)| *rs)
            .unwrap_or_default()
    }

    /// Records a rule's state; a default one takes no room.
    fn set_rule(&mut self, name: &str, rs: RuleState) {
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

#[cfg(test)]
mod tests;
