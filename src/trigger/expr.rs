//! CEL, in one place: compiling a rule's expression (refusing names that are neither
//! features nor context variables) and the context an evaluation runs them in. This is the
//! only file that imports the CEL crate, so changing or upgrading it touches nothing else.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock};

use cel_interpreter::objects::{Key, Map};
use cel_interpreter::{Context, Value};
use cel_parser::parser::ExpressionParser;
use cel_parser::Expression;

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
    expression: Expression,
}

thread_local! {
    /// This thread's CEL parser. Building one compiles its lexer's regular expressions,
    /// about 1.3 ms, against under 10 µs to parse a rule's expression with it; the
    /// interpreter's `Program::compile` builds one per call, which made a 200-rule file
    /// take half a second to load. So parsing goes through the parser crate directly and
    /// evaluation through `Value::resolve`, which is all `Program` does.
    static PARSER: ExpressionParser = ExpressionParser::new();
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
        let expression = std::panic::catch_unwind(|| {
            PARSER.with(|parser| parser.parse(source).map_err(|e| e.to_string()))
        })
        .map_err(|_| "the expression does not parse".to_owned())?
        .map_err(|message| {
            // The first line names the position; the rest lists every token the
            // grammar expected, which is noise here.
            message.lines().next().unwrap_or("").to_owned()
        })?;
        let unknown: Vec<String> = expression
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
            expression,
        })
    }

    /// The variables the expression names.
    pub fn variables(&self) -> Vec<String> {
        let references = self.expression.references();
        references
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }
}

pub fn is_known_variable(name: &str) -> bool {
    FEATURES.iter().any(|f| f.name == name) || CONTEXT_VARIABLES.iter().any(|(n, _)| *n == name)
}

/// The functions every expression may call, registered once: building CEL's default
/// context allocates a registry of a few dozen boxed functions, which per evaluation was
/// the largest single cost of an event (a quarter of the server's CPU under load).
static FUNCTIONS: LazyLock<Context<'static>> = LazyLock::new(Context::default);

type Variables = HashMap<String, Value>;

thread_local! {
    /// The variables map of this thread's previous evaluation, kept for the next: its
    /// names are the same from one evaluation to the next (those the rules read), so
    /// values are overwritten in place instead of names and a table allocated per event.
    static SPARE: RefCell<Variables> = RefCell::default();
}

/// The CEL context for one evaluation, built once and shared by every rule: the
/// evaluation's variables in a scope over the shared functions.
pub struct Env {
    context: Context<'static>,
    pub stage: &'static str,
    /// Expressions that panicked while they ran in this context.
    panics: Cell<u64>,
}

impl Env {
    pub fn new(rules: &RuleSet, facts: &Facts<'_>, event: Option<&Event>) -> Env {
        let mut variables = SPARE.with(|spare| std::mem::take(&mut *spare.borrow_mut()));
        // Only what some expression reads: building the context is most of the cost. Every
        // name read is set below, so nothing of the previous evaluation is seen.
        for &column in &rules.features_read {
            set(&mut variables, FEATURES[column].name, facts.row.0[column]);
        }
        let read = |name: &str| rules.variables.contains(name);
        if read("scores") {
            let scores = facts
                .scores
                .iter()
                .map(|(name, p)| (Key::from(name.as_str()), Value::Float(*p)));
            set(&mut variables, "scores", map(scores));
        }
        if read("segment") {
            set(
                &mut variables,
                "segment",
                facts.segment.unwrap_or("").to_owned(),
            );
        }
        if read("segments") {
            let segments: Vec<String> = facts.segments.iter().map(|s| (*s).to_owned()).collect();
            set(&mut variables, "segments", segments);
        }
        if read("event") {
            set(&mut variables, "event", event_value(event));
        }
        // The journey's expressions are evaluated before the stage exists.
        variables.remove("stage");
        let mut env = Env {
            context: Context::Child {
                parent: &FUNCTIONS,
                variables,
            },
            stage: "awareness",
            panics: Cell::new(0),
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
    ///
    /// So does a panic. The interpreter panics on some inputs that compile — `1 / 0` and
    /// `x % 0` on integers, which it divides with Rust's `/` and `%` — and a rules file is
    /// operator input: one bad expression must cost its rule this evaluation, not the
    /// shard's whole group of requests. It is counted ([`Env::panics`]) and logged.
    pub fn holds(&self, expr: &Expr) -> bool {
        // Unwind safety: `execute` only reads the context; nothing of ours is left half
        // changed when it unwinds.
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            Value::resolve(&expr.expression, &self.context)
        })) {
            Ok(result) => matches!(result, Ok(Value::Bool(true))),
            Err(_) => {
                self.panics.set(self.panics.get() + 1);
                // The panic hook has logged the message and where; this says which rule
                // expression (operator text, no personal data) and what became of it.
                tracing::error!(
                    expression = %expr.source,
                    "a rule expression panicked while it ran; it counts as false"
                );
                false
            }
        }
    }

    /// Expressions that panicked while they ran in this context so far.
    pub fn panics(&self) -> u64 {
        self.panics.get()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Context::Child { variables, .. } = &mut self.context {
            let variables = std::mem::take(variables);
            SPARE.with(|spare| *spare.borrow_mut() = variables);
        }
    }
}

/// Sets a variable, reusing its name's allocation when the map has it already.
fn set(variables: &mut Variables, name: &str, value: impl Into<Value>) {
    match variables.get_mut(name) {
        Some(slot) => *slot = value.into(),
        None => {
            variables.insert(name.to_owned(), value.into());
        }
    }
}

/// The fields of `event` in expressions, each name allocated once for every evaluation.
const EVENT_FIELDS: [&str; 9] = [
    "kind",
    "product_id",
    "category",
    "page",
    "search_query",
    "campaign_id",
    "price",
    "order_value",
    "attributes",
];
static EVENT_KEYS: LazyLock<Vec<Key>> =
    LazyLock::new(|| EVENT_FIELDS.iter().map(|&f| Key::from(f)).collect());

/// A CEL map built directly (converting a `HashMap<String, _>` copies every entry again).
fn map(entries: impl Iterator<Item = (Key, Value)>) -> Value {
    Value::Map(Map {
        map: Arc::new(entries.collect()),
    })
}

fn event_value(event: Option<&Event>) -> Value {
    let s = |v: &str| Value::String(Arc::new(v.to_owned()));
    let keys = EVENT_KEYS.iter().cloned();
    let Some(e) = event else {
        return map(keys.zip([s("timer")]));
    };
    let p = &e.properties;
    let text = |v: &Option<String>| s(v.as_deref().unwrap_or(""));
    let attributes = map(e
        .attributes
        .iter()
        .map(|(k, v)| (Key::from(k.as_str()), s(v))));
    let values = [
        s(e.kind.as_str()),
        text(&p.product_id),
        text(&p.category),
        text(&p.page),
        text(&p.search_query),
        text(&p.campaign_id),
        Value::Float(p.price.unwrap_or(f64::NAN)),
        Value::Float(p.order_value.unwrap_or(f64::NAN)),
        attributes,
    ];
    map(keys.zip(values))
}
