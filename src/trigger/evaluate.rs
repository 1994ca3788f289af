//! The evaluator: one entry point, [`evaluate`], for both causes of a decision — an event
//! just applied to the person's profile, or the person's timers coming due. It updates the
//! person's [`TriggerState`] and returns the decisions; the caller commits both.

use std::collections::BTreeMap;

use super::context::{ContextPart, EventFacts, SegmentFacts, TriggerContext};
use super::experiment::{assign_variant, record_purchase, HOLDOUT};
use super::expr::Env;
use super::rules::{Condition, Rule, RuleSet, Schedule};
use super::state::{
    rule_of, Exposure, Outcome, RuleState, Suppressed, Timer, TriggerState, MAX_EXPOSURES,
    PRODUCT_KEY_SEPARATOR,
};
use super::{trigger_id, Facts, Firing, Trigger};
use crate::event::{fnv1a, Event, EventKind, PersonKey};
use crate::profile::interest::MAX_PRODUCTS;
use crate::time::Time;

/// The cause of a threshold's recheck timer.
const RECHECK: &str = "recheck";
/// Rechecks stop this long after a person's latest event (the profile's history).
const RECHECK_HORIZON_MS: i64 = crate::profile::HISTORY_DAYS as i64 * crate::time::DAY_MS;

/// Why rules are evaluated for a person now.
#[derive(Clone, Copy, Debug)]
pub enum Cause<'a> {
    /// The event was just applied to the person's profile.
    Event(&'a Event),
    /// Some of the person's timers are due at `facts.now`.
    Due,
}

/// What one evaluation decided.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Delivered, held out or suppressed, highest priority first.
    pub firings: Vec<Firing>,
    /// The (rule, variant) exposures a purchase converted.
    pub conversions: Vec<(String, String)>,
    /// Expressions that panicked while they ran (each counted as false).
    pub expression_panics: u64,
}

/// Evaluates every rule for `person`'s state and facts, for one cause.
pub fn evaluate(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
    cause: Cause<'_>,
) -> Decisions {
    // Latches of rules no longer in the file are remembered for nothing.
    state
        .rules
        .retain(|(key, _)| rules.get(rule_of(key)).is_some());
    match cause {
        Cause::Event(event) => {
            let (firings, expression_panics) = evaluate_event(rules, state, facts, event);
            Decisions {
                firings,
                conversions: if event.kind == EventKind::Purchase {
                    record_purchase(state, event.time)
                } else {
                    Vec::new()
                },
                expression_panics,
            }
        }
        Cause::Due => {
            let (firings, expression_panics) = evaluate_timers(rules, state, facts);
            Decisions {
                firings,
                conversions: Vec::new(),
                expression_panics,
            }
        }
    }
}

/// A rule that wants to fire, before suppression.
struct Candidate<'r> {
    rule: &'r Rule,
    cause: String,
    variant: Option<String>,
    /// A product-level rule's state key for the event's product.
    product_key: Option<String>,
}

/// The state key of a product-level rule for one product.
fn product_key(rule: &str, product_id: &str) -> String {
    format!(
        "{rule}{PRODUCT_KEY_SEPARATOR}{:016x}",
        fnv1a(product_id.bytes())
    )
}

/// Evaluates every rule for an event that was just applied to the person's profile.
/// Returns the firings and how many expressions panicked.
fn evaluate_event(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
    event: &Event,
) -> (Vec<Firing>, u64) {
    if rules.rules.is_empty() {
        return (Vec::new(), 0);
    }
    let env = Env::new(rules, facts, Some(event));
    let cause = format!("event:{}", event.id);
    let mut candidates = Vec::new();
    for rule in &rules.rules {
        // A product-level rule latches per product: an event without a product (which its
        // `when` cannot hold for) leaves every product's latch as it is.
        let key = match (rule.per_product, &facts.memory.product) {
            (false, _) => None,
            (true, Some(p)) => Some(product_key(&rule.name, &p.product_id)),
            (true, None) => continue,
        };
        let latch = key.as_deref().unwrap_or(&rule.name);
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
                if crossed(state, rule, latch, facts, when) {
                    candidates.push(Candidate {
                        rule,
                        cause: cause.clone(),
                        variant: None,
                        product_key: key.clone(),
                    });
                }
            }
            Condition::Predicate => {
                let mut rs = state.rule(latch);
                let was = std::mem::replace(&mut rs.latched, when);
                if when && !was {
                    candidates.push(Candidate {
                        rule,
                        cause: cause.clone(),
                        variant: None,
                        product_key: key.clone(),
                    });
                }
                state.set_rule(latch, rs);
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
    let firings = decide(rules, state, facts, &env, Some(event), candidates);
    for rule in rules.rules.iter().filter(|r| r.per_product) {
        state.bound_product_states(&rule.name, MAX_PRODUCTS);
    }
    (firings, env.panics())
}

/// Fires every timer of the person that is due at `facts.now`, and schedules follow-ups.
/// Returns the firings and how many expressions panicked.
fn evaluate_timers(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
) -> (Vec<Firing>, u64) {
    let now = facts.now;
    let (due, pending): (Vec<Timer>, Vec<Timer>) = std::mem::take(&mut state.timers)
        .into_iter()
        .partition(|t| t.due <= now);
    state.timers = pending;
    if due.is_empty() {
        return (Vec::new(), 0);
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
            // A product-level threshold is checked on events about its products only.
            if rule.per_product {
                continue;
            }
            let when = rule.when.as_ref().is_none_or(|w| env.holds(w));
            if crossed(state, rule, &rule.name, facts, when) {
                candidates.push(Candidate {
                    rule,
                    cause: format!("{RECHECK}:{}", timer.due.millis()),
                    variant: None,
                    product_key: None,
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
            product_key: None,
        });
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.rule.priority));
    let firings = decide(rules, state, facts, &env, None, candidates);
    (firings, env.panics())
}

/// Whether a threshold rule's score crossed up (with `when` true) and so fires; moves its
/// latch (the rule's, or a product-level rule's for the product): set on crossing, cleared
/// below the re-arm level.
fn crossed(
    state: &mut TriggerState,
    rule: &Rule,
    latch: &str,
    facts: &Facts<'_>,
    when: bool,
) -> bool {
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
    let mut rs = state.rule(latch);
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
    state.set_rule(latch, rs);
    fire
}

/// Applies suppression to the candidates, highest priority first, and records each
/// decision in the state.
fn decide(
    rules: &RuleSet,
    state: &mut TriggerState,
    facts: &Facts<'_>,
    env: &Env,
    event: Option<&Event>,
    candidates: Vec<Candidate<'_>>,
) -> Vec<Firing> {
    let now = facts.now;
    // Only the frequency cap reads delivery times, and only within its window: keep no
    // more than it needs (none without a cap), so the state stays bounded.
    match &rules.cap {
        Some(cap) => state.delivered.retain(|t| now.since(*t) < cap.per_ms),
        None => state.delivered.clear(),
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
        let s = &rule.suppression;
        let last_for_cooldown = match (&c.product_key, s.cooldown_per_product) {
            (Some(key), true) => state.rule(key).last_fired,
            _ => last,
        };
        let within = |ms: Option<i64>, t: Option<Time>| match (ms, t) {
            (Some(ms), Some(t)) => now.since(t) < ms,
            _ => false,
        };
        let suppressed = if within(s.purchased_within_ms, facts.history.last_purchase) {
            Some(Suppressed::PurchasedRecently)
        } else if within(s.received_within_ms, last) {
            Some(Suppressed::AlreadyReceived)
        } else if s.unless.as_ref().is_some_and(|u| env.holds(u)) {
            Some(Suppressed::Excluded)
        } else if within(s.cooldown_ms, last_for_cooldown) {
            Some(Suppressed::Cooldown)
        } else if !s.ignore_quiet_hours
            && rules
                .quiet_hours
                .as_ref()
                .is_some_and(|q| q.contains(now.millis()))
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
        let (trigger, computed) =
            build_trigger(rule, &c.cause, variant, facts, env, event, explained);
        if !matches!(outcome, Outcome::Suppressed(_)) {
            for key in std::iter::once(rule.name.as_str()).chain(c.product_key.as_deref()) {
                let rs = RuleState {
                    last_fired: Some(now),
                    ..state.rule(key)
                };
                state.set_rule(key, rs);
            }
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
        if outcome == Outcome::Delivered && rules.cap.is_some() {
            state.delivered.push(now);
        }
        firings.push(Firing {
            trigger,
            outcome,
            computed,
        });
    }
    firings
}

/// The trigger a rule makes, and the parameters it computed.
fn build_trigger(
    rule: &Rule,
    cause: &str,
    variant: Option<String>,
    facts: &Facts<'_>,
    env: &Env,
    event: Option<&Event>,
    explained: bool,
) -> (Trigger, BTreeMap<String, String>) {
    let chosen = rule.action_for(env.stage);
    let mut action = chosen.action.clone();
    let mut expressions: Vec<&(String, super::expr::Expr)> = chosen.computed.iter().collect();
    if let Some(v) = rule.experiment.as_ref().and_then(|e| {
        e.variants
            .iter()
            .find(|v| Some(&v.name) == variant.as_ref())
    }) {
        action.params.extend(v.params.clone());
        expressions.extend(&v.computed);
        if let Some(t) = &v.template {
            action.template = t.clone();
        }
    }
    // A parameter whose expression fails (a missing score) is left out, not guessed.
    let mut computed = BTreeMap::new();
    for (name, expr) in expressions {
        match env.value(expr) {
            Some(value) => {
                computed.insert(name.clone(), value);
            }
            None => {
                computed.remove(name);
                action.params.remove(name);
            }
        }
    }
    action.params.extend(computed.clone());
    let (user_id, anonymous_id) = match facts.person {
        PersonKey::User(id) => (Some(id.clone()), None),
        PersonKey::Anonymous(id) => (None, Some(id.clone())),
    };
    let trigger = Trigger {
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
        context: context(rule, facts, env, event),
        experiment: rule.experiment.as_ref().map(|e| e.name.clone()),
        variant,
    };
    (trigger, computed)
}

/// The context block a rule's `context` list asks for (none for an empty list). A
/// product-level rule's context always names its product.
fn context(
    rule: &Rule,
    facts: &Facts<'_>,
    env: &Env,
    event: Option<&Event>,
) -> Option<TriggerContext> {
    if rule.context.is_empty() && !rule.per_product {
        return None;
    }
    let memory = facts.memory;
    let mut context = TriggerContext {
        product: memory.product.clone().filter(|_| rule.per_product),
        ..TriggerContext::default()
    };
    for part in &rule.context {
        match part {
            ContextPart::Cart => context.cart = Some(memory.cart.clone()),
            ContextPart::TopProducts => context.top_products = Some(memory.top_products.clone()),
            ContextPart::TopCategories => {
                context.top_categories = Some(
                    memory
                        .categories
                        .iter()
                        .take(super::context::MAX_TOP_CATEGORIES)
                        .cloned()
                        .collect(),
                )
            }
            ContextPart::Segment => {
                context.segment = Some(SegmentFacts {
                    segment: facts.segment.unwrap_or("").to_owned(),
                    segments: facts.segments.iter().map(|s| (*s).to_owned()).collect(),
                    stage: env.stage.to_owned(),
                })
            }
            ContextPart::Event => context.event = event.map(EventFacts::of),
        }
    }
    Some(context)
}
