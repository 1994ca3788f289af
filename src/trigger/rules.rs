//! The rules file: what marketers' engineers write, parsed and checked into a [`RuleSet`]
//! that evaluates fast.
//!
//! A rules file is TOML. Loading it checks everything — durations, thresholds, event
//! kinds, experiment weights, and every CEL expression (it must parse and name only known
//! variables) — and reports every problem at once; a file with any problem is refused as a
//! whole. Expressions are compiled once, here.
//!
//! ```toml
//! [limits]                      # a global per-person frequency cap across rules
//! max_per_person = 3
//! per = "24h"
//!
//! [[rules]]
//! name = "purchase_intent"
//! threshold = { score = "purchase", above = 0.75, rearm_below = 0.70 }
//! action = { type = "discount", channel = "email", template = "discount-10" }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

pub use super::context::{ContextPart, MemoryNeeds};
pub use super::expr::{Expr, CONTEXT_VARIABLES};
use sha2::{Digest, Sha256};

use crate::event::EventKind;
use crate::features::FEATURES;
use crate::time::{DAY_MS, HOUR_MS, MINUTE_MS};

/// The most rules one file may hold (rule names are metric labels).
pub const MAX_RULES: usize = 200;

/// Every problem found in a rules file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rules:\n  - {}", .problems.join("\n  - "))]
pub struct RulesError {
    pub problems: Vec<String>,
}

/// A checked, compiled rules file.
#[derive(Debug)]
pub struct RuleSet {
    /// A hash of the file's text: which rules are running.
    pub version: String,
    /// Highest priority first (then file order).
    pub rules: Vec<Rule>,
    pub cap: Option<FrequencyCap>,
    pub quiet_hours: Option<QuietHours>,
    pub journey: Journey,
    /// Every name some expression reads: only these go into an evaluation's context.
    pub variables: BTreeSet<String>,
    /// The parts of the person's product and category memory some expression or context
    /// reads (what the engine then takes per event: [`super::Memory`]).
    pub memory_needs: MemoryNeeds,
    /// The FeatureSpec columns among `variables`, by index: an evaluation's features.
    pub features_read: Vec<usize>,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub priority: i32,
    pub condition: Condition,
    /// A further condition: for thresholds and absences, the event that crosses or starts
    /// must also satisfy it; for predicates it is the condition.
    pub when: Option<Expr>,
    pub suppression: Suppression,
    /// The action for stages without one of their own.
    pub action: RuleAction,
    /// The actions for the journey stages, in [`STAGES`] order; `None` takes `action`.
    pub stage_actions: [Option<RuleAction>; 3],
    pub experiment: Option<Experiment>,
    /// The parts of the context its triggers carry.
    pub context: Vec<ContextPart>,
    /// A product-level rule (a predicate or threshold whose `when` reads `product`): it
    /// latches per (person, product), so each product crosses on its own.
    pub per_product: bool,
}

/// The journey stages, in the order [`Rule::stage_actions`] keeps them.
pub const STAGES: [&str; 3] = ["awareness", "consideration", "decision"];

/// An action and the parameters it computes when it fires.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleAction {
    /// With the literal parameters.
    pub action: Action,
    /// Parameters computed from expressions at firing, by name.
    pub computed: Vec<(String, Expr)>,
}

impl Rule {
    /// The action for a journey stage.
    pub fn action_for(&self, stage: &str) -> &RuleAction {
        STAGES
            .iter()
            .position(|s| *s == stage)
            .and_then(|i| self.stage_actions[i].as_ref())
            .unwrap_or(&self.action)
    }

    /// Every expression the rule may run.
    fn expressions(&self) -> impl Iterator<Item = &Expr> {
        let actions = std::iter::once(&self.action).chain(self.stage_actions.iter().flatten());
        [self.when.as_ref(), self.suppression.unless.as_ref()]
            .into_iter()
            .flatten()
            .chain(actions.flat_map(|a| a.computed.iter().map(|(_, e)| e)))
            .chain(
                self.experiment
                    .iter()
                    .flat_map(|e| &e.variants)
                    .flat_map(|v| v.computed.iter().map(|(_, e)| e)),
            )
    }
}

/// What makes a rule fire.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Fires when `score` goes from below `above` to at or above it; re-arms once it falls
    /// below `rearm_below`. Checked on every event, and with `recheck_ms` also that long
    /// after the person's latest event and every `recheck_ms` after (scores such as churn
    /// rise while a person stays away, when there are no events to check on).
    Threshold {
        score: String,
        above: f64,
        rearm_below: f64,
        recheck_ms: Option<i64>,
    },
    /// Fires when `when` goes from false to true (re-arms when it is false again).
    Predicate,
    /// One of `after` not followed by any of `missing` within `within`: fires from a timer
    /// at the deadline, and again after each of `follow_ups` while still nothing happened.
    Absence {
        after: Vec<EventKind>,
        missing: Vec<EventKind>,
        within_ms: i64,
        follow_ups_ms: Vec<i64>,
        schedule: Schedule,
    },
}

/// How an absence rule's reminders are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Action-based: each reminder is due its delay after the previous one, and any of the
    /// `missing` events cancels the rest. A new `after` event restarts the sequence.
    Action,
    /// Time-based: every reminder is due at a fixed delay after the `after` event,
    /// whatever the person does meanwhile (exclusions still apply when each is due).
    Time,
}

/// Reasons not to fire that belong to one rule.
#[derive(Debug, Default)]
pub struct Suppression {
    /// Not again within this long of this rule's previous firing.
    pub cooldown_ms: Option<i64>,
    /// The cooldown counts per product: a firing for one product does not hold back
    /// another's (product-level rules).
    pub cooldown_per_product: bool,
    /// Not if the person purchased within this long.
    pub purchased_within_ms: Option<i64>,
    /// Not if the person received this rule's trigger within this long.
    pub received_within_ms: Option<i64>,
    /// Not if this expression is true.
    pub unless: Option<Expr>,
    /// Fire even during quiet hours.
    pub ignore_quiet_hours: bool,
}

/// What the trigger asks its consumer to do.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, serde::Serialize)]
pub struct Action {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub template: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// Variants of a rule, and a holdout group that is recorded but never delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub name: String,
    pub holdout: f64,
    pub variants: Vec<Variant>,
    /// A purchase within this long of a trigger (or would-be trigger) is a conversion.
    pub conversion_window_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub weight: f64,
    /// Replaces the absence rule's `within`.
    pub within_ms: Option<i64>,
    /// Added to (and overriding) the action's params.
    pub params: BTreeMap<String, String>,
    /// Computed parameters, added after the action's (and overriding them).
    pub computed: Vec<(String, Expr)>,
    pub template: Option<String>,
}

/// At most `max` delivered triggers per person within `per_ms`, across rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrequencyCap {
    pub max: u32,
    pub per_ms: i64,
}

/// A daily window of local time in which triggers are held back (suppressed).
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    /// Minutes after local midnight.
    pub from_minute: u32,
    pub to_minute: u32,
    pub local: LocalTime,
}

/// How UTC becomes the local time quiet hours are read in.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalTime {
    /// A fixed offset from UTC, in minutes (no daylight saving).
    Offset(i32),
    /// An IANA time zone with its daylight-saving rules (the tz database is bundled, so
    /// a machine without tzdata reads it the same).
    Zone(jiff::tz::TimeZone),
}

impl LocalTime {
    /// The offset from UTC at `millis`, in milliseconds.
    fn offset_ms(&self, millis: i64) -> i64 {
        match self {
            LocalTime::Offset(minutes) => i64::from(*minutes) * MINUTE_MS,
            LocalTime::Zone(zone) => jiff::Timestamp::from_millisecond(millis)
                .map_or(0, |t| i64::from(zone.to_offset(t).seconds()) * 1000),
        }
    }
}

impl QuietHours {
    /// Whether `millis` (UTC) falls in the window; a window may wrap past midnight.
    pub fn contains(&self, millis: i64) -> bool {
        let local = millis + self.local.offset_ms(millis);
        let minute = (local.rem_euclid(DAY_MS) / MINUTE_MS) as u32;
        if self.from_minute <= self.to_minute {
            (self.from_minute..self.to_minute).contains(&minute)
        } else {
            minute >= self.from_minute || minute < self.to_minute
        }
    }
}

/// The journey stage indicators: `decision` is checked first, then `consideration`;
/// everyone else is in `awareness`.
#[derive(Debug)]
pub struct Journey {
    pub decision: Expr,
    pub consideration: Expr,
}

/// The default indicators, used when the file has no `[journey]` table.
pub const DEFAULT_DECISION: &str = "cart_items > 0 || checkout_since_cart_add > 0";
pub const DEFAULT_CONSIDERATION: &str =
    "session_product_views >= 2 || product_views_30d >= 3 || searches_30d >= 2";

/// Parses a duration such as `30s`, `30m`, `24h` or `7d` into milliseconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let unit_ms = match unit {
        "s" => 1000,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(unit_ms) {
        Some(ms) if ms > 0 && ms <= 366 * DAY_MS => Ok(ms),
        _ => Err(format!("{text:?} must be more than 0 and at most 366d")),
    }
}

// The file's shape, as serde reads it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    limits: Option<LimitsFile>,
    #[serde(default)]
    quiet_hours: Option<QuietHoursFile>,
    #[serde(default)]
    journey: Option<JourneyFile>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_per_person: u32,
    per: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuietHoursFile {
    from: String,
    to: String,
    #[serde(default)]
    utc_offset: Option<String>,
    #[serde(default)]
    time_zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JourneyFile {
    decision: String,
    consideration: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    threshold: Option<ThresholdFile>,
    #[serde(default)]
    absence: Option<AbsenceFile>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    cooldown: Option<String>,
    #[serde(default)]
    cooldown_per: Option<String>,
    #[serde(default)]
    exclude: Option<ExcludeFile>,
    #[serde(default)]
    ignore_quiet_hours: bool,
    #[serde(default)]
    action: Option<ActionFile>,
    #[serde(default)]
    actions: Option<StageActionsFile>,
    #[serde(default)]
    context: Vec<String>,
    #[serde(default)]
    experiment: Option<ExperimentFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    params: BTreeMap<String, ParamFile>,
}

/// A parameter: literal text, or `{ expr = "..." }` computed when the rule fires.
#[derive(Deserialize)]
#[serde(untagged)]
enum ParamFile {
    Text(String),
    Computed(ComputedFile),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComputedFile {
    expr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageActionsFile {
    #[serde(default)]
    awareness: Option<ActionFile>,
    #[serde(default)]
    consideration: Option<ActionFile>,
    #[serde(default)]
    decision: Option<ActionFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdFile {
    score: String,
    above: f64,
    rearm_below: Option<f64>,
    #[serde(default)]
    recheck: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbsenceFile {
    after: Vec<String>,
    missing: Vec<String>,
    within: String,
    #[serde(default)]
    follow_ups: Vec<String>,
    #[serde(default = "default_schedule")]
    schedule: Schedule,
}

fn default_schedule() -> Schedule {
    Schedule::Action
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExcludeFile {
    #[serde(default)]
    purchased_within: Option<String>,
    #[serde(default)]
    received_within: Option<String>,
    #[serde(default)]
    unless: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentFile {
    name: String,
    #[serde(default)]
    holdout: f64,
    #[serde(default = "default_conversion_window")]
    conversion_window: String,
    variants: Vec<VariantFile>,
}

fn default_conversion_window() -> String {
    "7d".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantFile {
    name: String,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default)]
    within: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, ParamFile>,
}

fn one() -> f64 {
    1.0
}

/// Collects problems while converting, each prefixed with where it is.
struct Problems(Vec<String>);

impl Problems {
    fn duration(&mut self, at: &str, text: &str) -> i64 {
        parse_duration(text).unwrap_or_else(|e| {
            self.0.push(format!("{at}: {e}"));
            0
        })
    }

    /// A condition: it must compile and may only give true or false.
    fn expr(&mut self, at: &str, source: &str) -> Option<Expr> {
        Expr::compile(source)
            .and_then(|e| e.check_condition().map(|()| e))
            .map_err(|e| self.0.push(format!("{at}: {e}")))
            .ok()
    }

    /// Parameters: literal ones as they are, computed ones compiled and type-checked.
    fn params(
        &mut self,
        at: &str,
        params: BTreeMap<String, ParamFile>,
    ) -> (BTreeMap<String, String>, Vec<(String, Expr)>) {
        let mut literal = BTreeMap::new();
        let mut computed = Vec::new();
        for (name, param) in params {
            match param {
                ParamFile::Text(text) => {
                    literal.insert(name, text);
                }
                ParamFile::Computed(c) => {
                    match Expr::compile(&c.expr).and_then(|e| e.check_value().map(|()| e)) {
                        Ok(e) => computed.push((name, e)),
                        Err(e) => self.0.push(format!("{at}.params.{name}: {e}")),
                    }
                }
            }
        }
        (literal, computed)
    }

    fn action(&mut self, at: &str, a: ActionFile) -> RuleAction {
        if a.kind.is_empty() {
            self.0.push(format!("{at}.type must not be empty"));
        }
        let (params, computed) = self.params(at, a.params);
        RuleAction {
            action: Action {
                kind: a.kind,
                channel: a.channel,
                template: a.template,
                params,
            },
            computed,
        }
    }

    fn kinds(&mut self, at: &str, names: &[String]) -> Vec<EventKind> {
        if names.is_empty() {
            self.0.push(format!("{at}: list at least one event kind"));
        }
        names
            .iter()
            .filter_map(|n| {
                let kind = EventKind::parse(n);
                if kind.is_none() {
                    self.0.push(format!(
                        "{at}: {n:?} is not an event kind (one of {})",
                        EventKind::ALL.map(EventKind::as_str).join(", ")
                    ));
                }
                kind
            })
            .collect()
    }
}

fn clock_minute(text: &str) -> Result<u32, String> {
    let (h, m) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not HH:MM"))?;
    match (h.parse::<u32>(), m.parse::<u32>()) {
        (Ok(h), Ok(m)) if h < 24 && m < 60 => Ok(h * 60 + m),
        _ => Err(format!("{text:?} is not HH:MM")),
    }
}

fn utc_offset(text: &str) -> Result<i32, String> {
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(format!("{text:?} is not an offset like +01:00")),
    };
    let minutes =
        clock_minute(rest).map_err(|_| format!("{text:?} is not an offset like +01:00"))?;
    Ok(sign * minutes as i32)
}

impl RuleSet {
    /// Reads and checks a rules file.
    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|e| RulesError {
            problems: vec![format!("cannot read {}: {e}", path.display())],
        })?;
        RuleSet::parse(&text)
    }

    /// A rule set with no rules: nothing fires.
    pub fn empty() -> RuleSet {
        RuleSet::parse("").expect("an empty file is valid")
    }

    /// Parses and checks a rules file's text.
    pub fn parse(text: &str) -> Result<RuleSet, RulesError> {
        let file: File = toml::from_str(text).map_err(|e| RulesError {
            problems: vec![e.to_string().trim().replace('\n', " ")],
        })?;
        let mut p = Problems(Vec::new());
        let cap = file.limits.map(|l| {
            if l.max_per_person == 0 {
                p.0.push("limits.max_per_person must be at least 1".into());
            }
            FrequencyCap {
                max: l.max_per_person,
                per_ms: p.duration("limits.per", &l.per),
            }
        });
        let quiet_hours = file.quiet_hours.map(|q| {
            let mut minute = |at: &str, t: &str| {
                clock_minute(t).unwrap_or_else(|e| {
                    p.0.push(format!("quiet_hours.{at}: {e}"));
                    0
                })
            };
            let from_minute = minute("from", &q.from);
            let to_minute = minute("to", &q.to);
            let local = match (q.utc_offset.as_deref(), q.time_zone.as_deref()) {
                (Some(_), Some(_)) => {
                    p.0.push("quiet_hours: give utc_offset or time_zone, not both".into());
                    LocalTime::Offset(0)
                }
                (None, None) => LocalTime::Offset(0),
                (Some(offset), None) => match utc_offset(offset) {
                    Ok(m) => LocalTime::Offset(m),
                    Err(e) => {
                        p.0.push(format!("quiet_hours.utc_offset: {e}"));
                        LocalTime::Offset(0)
                    }
                },
                (None, Some(name)) => match jiff::tz::db().get(name) {
                    Ok(zone) => LocalTime::Zone(zone),
                    Err(e) => {
                        p.0.push(format!(
                            "quiet_hours.time_zone: {name:?} is not an IANA time zone such as \"Europe/Berlin\": {e}"
                        ));
                        LocalTime::Offset(0)
                    }
                },
            };
            if from_minute == to_minute {
                p.0.push("quiet_hours: from and to are the same time".into());
            }
            QuietHours {
                from_minute,
                to_minute,
                local,
            }
        });
        let (decision, consideration) = match &file.journey {
            Some(j) => (j.decision.as_str(), j.consideration.as_str()),
            None => (DEFAULT_DECISION, DEFAULT_CONSIDERATION),
        };
        let decision = p.expr("journey.decision", decision);
        let consideration = p.expr("journey.consideration", consideration);

        if file.rules.len() > MAX_RULES {
            p.0.push(format!(
                "{} rules; at most {MAX_RULES} are allowed",
                file.rules.len()
            ));
        }
        let mut names = BTreeSet::new();
        let mut experiments = BTreeSet::new();
        let mut rules = Vec::new();
        for (i, r) in file.rules.into_iter().enumerate() {
            let at = if r.name.is_empty() {
                format!("rules[{i}]")
            } else {
                format!("rule {:?}", r.name)
            };
            if !valid_name(&r.name) {
                p.0.push(format!(
                    "{at}: name must be 1 to 64 letters, digits, '_' or '-'"
                ));
            }
            if !names.insert(r.name.clone()) {
                p.0.push(format!("{at}: the name is used twice"));
            }
            if let Some(rule) = convert_rule(r, &at, &mut p, &mut experiments) {
                rules.push(rule);
            }
        }
        if !p.0.is_empty() {
            return Err(RulesError { problems: p.0 });
        }
        // Stable: equal priorities keep file order.
        rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
        let decision = decision.expect("checked above");
        let consideration = consideration.expect("checked above");
        let variables: BTreeSet<String> = rules
            .iter()
            .flat_map(Rule::expressions)
            .chain([&decision, &consideration])
            .flat_map(Expr::variables)
            .collect();
        let asks = |part: ContextPart| rules.iter().any(|r| r.context.contains(&part));
        let memory_needs = MemoryNeeds {
            product: variables.contains("product"),
            categories: variables.contains("top_category")
                || variables.contains("categories")
                || asks(ContextPart::TopCategories),
            cart: asks(ContextPart::Cart),
            top_products: asks(ContextPart::TopProducts),
        };
        let features_read = FEATURES
            .iter()
            .enumerate()
            .filter(|(_, f)| variables.contains(f.name))
            .map(|(i, _)| i)
            .collect();
        Ok(RuleSet {
            version: hex::encode(&Sha256::digest(text.as_bytes())[..8]),
            rules,
            cap,
            quiet_hours,
            journey: Journey {
                decision,
                consideration,
            },
            variables,
            memory_needs,
            features_read,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Whether some expression reads `name` (a feature or a context variable): what is
    /// not read need not be computed.
    pub fn reads(&self, name: &str) -> bool {
        self.variables.contains(name)
    }
}

impl Rule {
    /// One line saying when the rule fires, for `nudge check-rules`.
    pub fn describe(&self) -> String {
        let mut text = match &self.condition {
            Condition::Threshold {
                score,
                above,
                rearm_below,
                recheck_ms,
            } => format!(
                "{score} crosses {above} (re-arms below {rearm_below}){}",
                recheck_ms.map_or(String::new(), |r| format!(
                    ", rechecked every {} h without events",
                    r / HOUR_MS
                ))
            ),
            Condition::Predicate => "when becomes true".to_owned(),
            Condition::Absence {
                after,
                missing,
                within_ms,
                follow_ups_ms,
                schedule,
            } => format!(
                "{} without {} within {} min ({} follow-ups, {:?} schedule)",
                after
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join("|"),
                missing
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join("|"),
                within_ms / MINUTE_MS,
                follow_ups_ms.len(),
                schedule
            ),
        };
        if let Some(w) = &self.when {
            text.push_str(&format!(" [when {}]", w.source));
        }
        if let Some(e) = &self.experiment {
            text.push_str(&format!(
                " [experiment {}: {} variants, holdout {}]",
                e.name,
                e.variants.len(),
                e.holdout
            ));
        }
        text
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn convert_rule(
    r: RuleFile,
    at: &str,
    p: &mut Problems,
    experiments: &mut BTreeSet<String>,
) -> Option<Rule> {
    let when = r
        .when
        .as_deref()
        .and_then(|w| p.expr(&format!("{at}: when"), w));
    let condition = match (r.threshold, r.absence) {
        (Some(_), Some(_)) => {
            p.0.push(format!(
                "{at}: a rule has one of threshold, absence or (alone) when"
            ));
            return None;
        }
        (Some(t), None) => {
            let rearm_below = t.rearm_below.unwrap_or(t.above);
            if !(t.above > 0.0 && t.above <= 1.0) {
                p.0.push(format!("{at}: threshold.above must be in (0, 1]"));
            }
            if !(0.0..=t.above).contains(&rearm_below) {
                p.0.push(format!(
                    "{at}: threshold.rearm_below must be between 0 and above ({})",
                    t.above
                ));
            }
            if t.score.is_empty() {
                p.0.push(format!("{at}: threshold.score must name a model"));
            }
            Condition::Threshold {
                recheck_ms: t
                    .recheck
                    .as_deref()
                    .map(|r| p.duration(&format!("{at}: threshold.recheck"), r)),
                score: t.score,
                above: t.above,
                rearm_below,
            }
        }
        (None, Some(a)) => {
            let after = p.kinds(&format!("{at}: absence.after"), &a.after);
            let missing = p.kinds(&format!("{at}: absence.missing"), &a.missing);
            Condition::Absence {
                after,
                missing,
                within_ms: p.duration(&format!("{at}: absence.within"), &a.within),
                follow_ups_ms: a
                    .follow_ups
                    .iter()
                    .map(|f| p.duration(&format!("{at}: absence.follow_ups"), f))
                    .collect(),
                schedule: a.schedule,
            }
        }
        (None, None) => {
            if r.when.is_none() {
                p.0.push(format!(
                    "{at}: give a condition: threshold, absence or when"
                ));
            }
            Condition::Predicate
        }
    };
    let exclude = r.exclude.unwrap_or(ExcludeFile {
        purchased_within: None,
        received_within: None,
        unless: None,
    });
    let per_product = !matches!(condition, Condition::Absence { .. })
        && when
            .as_ref()
            .is_some_and(|w| w.variables().iter().any(|v| v == "product"));
    let cooldown_per_product = match r.cooldown_per.as_deref() {
        None | Some("person") => false,
        Some("product") => {
            if !per_product {
                p.0.push(format!(
                    "{at}: cooldown_per = \"product\" needs a product-level rule: a threshold or when whose when reads product"
                ));
            }
            if r.cooldown.is_none() {
                p.0.push(format!("{at}: cooldown_per is given without a cooldown"));
            }
            true
        }
        Some(other) => {
            p.0.push(format!(
                "{at}: cooldown_per is {other:?}; it is \"person\" or \"product\""
            ));
            false
        }
    };
    let mut context = Vec::new();
    for name in &r.context {
        match ContextPart::parse(name) {
            Some(part) if context.contains(&part) => {
                p.0.push(format!("{at}: context lists {name:?} twice"))
            }
            Some(part) => context.push(part),
            None => p.0.push(format!(
                "{at}: context {name:?} is not one of {}",
                ContextPart::ALL.map(ContextPart::as_str).join(", ")
            )),
        }
    }
    context.sort();
    let suppression = Suppression {
        cooldown_per_product,
        cooldown_ms: r
            .cooldown
            .as_deref()
            .map(|c| p.duration(&format!("{at}: cooldown"), c)),
        purchased_within_ms: exclude
            .purchased_within
            .as_deref()
            .map(|c| p.duration(&format!("{at}: exclude.purchased_within"), c)),
        received_within_ms: exclude
            .received_within
            .as_deref()
            .map(|c| p.duration(&format!("{at}: exclude.received_within"), c)),
        unless: exclude
            .unless
            .as_deref()
            .and_then(|u| p.expr(&format!("{at}: exclude.unless"), u)),
        ignore_quiet_hours: r.ignore_quiet_hours,
    };
    let mut stage_actions = [None, None, None];
    if let Some(a) = r.actions {
        for (i, action) in [a.awareness, a.consideration, a.decision]
            .into_iter()
            .enumerate()
        {
            stage_actions[i] =
                action.map(|action| p.action(&format!("{at}: actions.{}", STAGES[i]), action));
        }
    }
    let action = match r.action {
        Some(a) => p.action(&format!("{at}: action"), a),
        None if stage_actions.iter().all(Option::is_some) => RuleAction::default(),
        None => {
            p.0.push(format!(
                "{at}: give an action, or actions for all three stages (awareness, consideration, decision)"
            ));
            RuleAction::default()
        }
    };
    let experiment = r.experiment.map(|e| {
        if !valid_name(&e.name) {
            p.0.push(format!(
                "{at}: experiment.name must be 1 to 64 letters, digits, '_' or '-'"
            ));
        }
        if !experiments.insert(e.name.clone()) {
            p.0.push(format!(
                "{at}: experiment {:?} is used by two rules",
                e.name
            ));
        }
        if !(0.0..1.0).contains(&e.holdout) {
            p.0.push(format!("{at}: experiment.holdout must be in [0, 1)"));
        }
        if e.variants.is_empty() {
            p.0.push(format!("{at}: experiment.variants must list at least one"));
        }
        let mut seen = BTreeSet::new();
        let variants = e
            .variants
            .into_iter()
            .map(|v| {
                if !valid_name(&v.name) || v.name == super::HOLDOUT {
                    p.0.push(format!(
                        "{at}: variant name {:?} must be 1 to 64 letters, digits, '_' or '-', and not {:?}",
                        v.name,
                        super::HOLDOUT
                    ));
                }
                if !seen.insert(v.name.clone()) {
                    p.0.push(format!("{at}: variant {:?} is listed twice", v.name));
                }
                if !(v.weight.is_finite() && v.weight > 0.0) {
                    p.0.push(format!("{at}: variant {:?}: weight must be positive", v.name));
                }
                let within_ms = v
                    .within
                    .as_deref()
                    .map(|w| p.duration(&format!("{at}: variant {:?}: within", v.name), w));
                let (params, computed) =
                    p.params(&format!("{at}: variant {:?}", v.name), v.params);
                Variant {
                    name: v.name,
                    weight: v.weight,
                    within_ms,
                    params,
                    computed,
                    template: v.template,
                }
            })
            .collect();
        Experiment {
            name: e.name,
            holdout: e.holdout,
            variants,
            conversion_window_ms: p.duration(
                &format!("{at}: experiment.conversion_window"),
                &e.conversion_window,
            ),
        }
    });
    if let Some(e) = &experiment {
        if e.variants.iter().any(|v| v.within_ms.is_some())
            && !matches!(condition, Condition::Absence { .. })
        {
            p.0.push(format!(
                "{at}: a variant's within only applies to absence rules"
            ));
        }
    }
    Some(Rule {
        name: r.name,
        priority: r.priority,
        condition,
        when,
        suppression,
        action,
        stage_actions,
        experiment,
        context,
        per_product,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_rules_are_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.toml");
        let rules = RuleSet::load(&path).unwrap();
        assert!(rules.rules.len() >= 4);
        assert!(rules
            .rules
            .windows(2)
            .all(|w| w[0].priority >= w[1].priority));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let text = r#"
            [limits]
            max_per_person = 0
            per = "1y"

            [[rules]]
            name = "a"
            threshold = { score = "purchase", above = 0.75, rearm_below = 0.8 }
            action = { type = "x" }

            [[rules]]
            name = "a"
            when = "session_product_time_s > 300 && nonsense >= 3"
            action = { type = "" }

            [[rules]]
            name = "c"
            absence = { after = ["add_to_kart"], missing = ["purchase"], within = "30 minutes" }
            action = { type = "x" }
            experiment = { name = "e", holdout = 1.5, variants = [{ name = "holdout" }] }

            [[rules]]
            name = "d"
            when = "cart_items >"
            action = { type = "x" }
        "#;
        let problems = RuleSet::parse(text).unwrap_err().problems;
        let all = problems.join("\n");
        for expected in [
            "limits.max_per_person",
            "limits.per",
            "rearm_below",
            "used twice",
            "unknown name nonsense",
            "action.type",
            "\"add_to_kart\" is not an event kind",
            "absence.within",
            "holdout must be in",
            "variant name \"holdout\"",
            "rule \"d\": when",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn durations_and_quiet_hours() {
        assert_eq!(parse_duration("30m"), Ok(30 * MINUTE_MS));
        assert_eq!(parse_duration("24h"), Ok(DAY_MS));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-5m").is_err());
        let q = QuietHours {
            from_minute: 22 * 60,
            to_minute: 8 * 60,
            local: LocalTime::Offset(60),
        };
        // 21:30 UTC is 22:30 local: quiet. 07:30 UTC is 08:30 local: not.
        assert!(q.contains(21 * HOUR_MS + 30 * MINUTE_MS));
        assert!(!q.contains(7 * HOUR_MS + 30 * MINUTE_MS));
        assert!(q.contains(5 * HOUR_MS));
        assert!(!q.contains(12 * HOUR_MS));
    }

    #[test]
    fn quiet_hours_in_a_time_zone_follow_daylight_saving() {
        let rules = RuleSet::parse(
            "[quiet_hours]\nfrom = \"22:00\"\nto = \"08:00\"\ntime_zone = \"Europe/Berlin\"\n",
        )
        .unwrap();
        let q = rules.quiet_hours.unwrap();
        // 2026-01-15 (CET, +01:00) and 2026-07-15 (CEST, +02:00), at 06:30 UTC.
        let winter = 1_768_458_600_000;
        let summer = 1_784_097_000_000;
        assert!(q.contains(winter), "07:30 in Berlin in winter: still quiet");
        assert!(
            !q.contains(summer),
            "08:30 in Berlin in summer: quiet is over"
        );
        // 20:30 UTC in summer is 22:30 in Berlin.
        assert!(q.contains(summer + 14 * HOUR_MS));
        assert!(!q.contains(winter + 14 * HOUR_MS), "21:30 in winter");

        let both = RuleSet::parse(
            "[quiet_hours]\nfrom = \"22:00\"\nto = \"08:00\"\ntime_zone = \"Mars/Olympus\"\nutc_offset = \"+01:00\"\n",
        )
        .unwrap_err();
        assert!(both.problems[0].contains("not both"), "{both}");
        let unknown = RuleSet::parse(
            "[quiet_hours]\nfrom = \"22:00\"\nto = \"08:00\"\ntime_zone = \"Mars/Olympus\"\n",
        )
        .unwrap_err();
        assert!(unknown.problems[0].contains("Mars/Olympus"), "{unknown}");
    }
}
