//! CEL, in one place: compiling a rule's expression (refusing names that are neither
//! features nor context variables) and the context an evaluation runs them in. This is the
//! only file that imports the CEL crate, so changing or upgrading it touches nothing else.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel_interpreter::{Context, Program, Value};

use super::rules::RuleSet;
use super::Facts;
use crate::event::Event;
use crate::features::FEATURES;

/// Variables a CEL expression may name, besides the FeatureSpec's feature names.
pub const CONTEXT_VARIABLES: &[(&str, &str)] = &[
    ("scores", "map of model name to probability, e.g. scores.purchase"),
    ("event", "the current event: kind, product_id, category, price, order_value, page, attributes (for timers, kind is \"timer\")"),
    ("segment", "the person's k-means segment name (\"\" without a segments file)"),
    ("segments", "the person's rule-based segments, e.g. 'at_risk' in segments"),
    ("stage", "the journey stage: awareness, consideration or decision"),
];

/// A compiled CEL expression and its source.
pub struct Expr {
    pub source: String,
    pub program: Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

impl Expr {
    /// Compiles `source`, refusing names that are neither features nor context variables.
    pub fn compile(source: &str) -> Result<Expr, String> {
        if source.trim().is_empty() {
            return Err("the expression is empty".into());
        }
        // The parser must not take the server down on any input; it returns errors for
        // every input tried, and this guard holds if one is missed.
        let program = std::panic::catch_unwind(|| Program::compile(source))
            .map_err(|_| "the expression does not parse".to_owned())?
            .map_err(|e| {
                let message = e.to_string();
                // The first line names the position; the rest lists every token the
                // grammar expected, which is noise here.
                message.lines().next().unwrap_or("").to_owned()
            })?;
        let unknown: Vec<String> = program
            .references()
            .variables()
            .into_iter()
            .filter(|v| !is_known_variable(v))
            .map(str::to_owned)
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown name{} {}: use feature names (see GetProfile) or {}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", "),
                CONTEXT_VARIABLES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Expr {
            source: source.to_owned(),
            program,
        })
    }
}

pub fn is_known_variable(name: &str) -> bool {
    FEATURES.iter().any(|f| f.name == name) || CONTEXT_VARIABLES.iter().any(|(n, _)| *n == name)
}

/// The functions every expression may call, registered once: building CEL's default
/// context allocates a registry of a few dozen boxed functions, which per evaluation was
/// the largest single cost of an event (a quarter of the server's CPU under load).
static FUNCTIONS: LazyLock<Context<'static>> = LazyLock::new(Context::default);

/// The CEL context for one evaluation, built once and shared by every rule: the
/// evaluation's variables in a scope over the shared functions.
pub struct Env {
    context: Context<'static>,
    pub stage: &'static str,
}

impl Env {
    pub fn new(rules: &RuleSet, facts: &Facts<'_>, event: Option<&Event>) -> Env {
        // Only what some expression reads: building the context is most of the cost.
        let read = |name: &str| rules.variables.contains(name);
        let mut context = FUNCTIONS.new_inner_scope();
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
    pub fn holds(&self, expr: &Expr) -> bool {
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
