//! CEL, in one place: compiling a rule's expression (refusing names that are neither
//! features nor context variables) and the context an evaluation runs them in. This is the
//! only file that imports the CEL crate, so changing or upgrading it touches nothing else.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock};

use cel_interpreter::objects::{Key, Map};
use cel_interpreter::{Context, ExecutionError, FunctionContext, Value};
use cel_parser::parser::ExpressionParser;
use cel_parser::{ArithmeticOp, Atom, Expression, Member, UnaryOp};

use super::context::ProductFacts;
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
    ("product", "the current event's product from the person's memory: product_id, category, price, views_7d, views_30d, cart_adds_7d, cart_adds_30d, purchases_30d, dwell_seconds_7d, dwell_seconds_30d, in_cart (a rule that reads it is a product-level rule)"),
    ("top_category", "the category of the person's highest affinity over 30 days (\"\" if none)"),
    ("categories", "map of category to its share of the person's affinity over 30 days; category_share('x') reads it"),
];

/// The fields of `product`, and whether each is a number (else a string or, for
/// `in_cart`, a bool).
const PRODUCT_FIELDS: [(&str, Ty); 11] = [
    ("product_id", Ty::String),
    ("category", Ty::String),
    ("price", Ty::Number),
    ("views_7d", Ty::Number),
    ("views_30d", Ty::Number),
    ("cart_adds_7d", Ty::Number),
    ("cart_adds_30d", Ty::Number),
    ("purchases_30d", Ty::Number),
    ("dwell_seconds_7d", Ty::Number),
    ("dwell_seconds_30d", Ty::Number),
    ("in_cart", Ty::Bool),
];

/// Functions Nudge adds to CEL's own.
const CATEGORY_SHARE: &str = "category_share";

/// A compiled CEL expression and its source.
#[derive(Clone)]
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

/// Two expressions are the same when their sources are.
impl PartialEq for Expr {
    fn eq(&self, other: &Expr) -> bool {
        self.source == other.source
    }
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

    /// The variables the expression names, and those the functions it calls read.
    pub fn variables(&self) -> Vec<String> {
        let references = self.expression.references();
        let mut variables: Vec<String> = references
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect();
        if references.has_function(CATEGORY_SHARE) {
            variables.push("categories".to_owned());
        }
        variables
    }

    /// Refuses an expression that cannot be a condition: one whose value is known, from
    /// the types of its names, to be something other than true or false.
    pub fn check_condition(&self) -> Result<(), String> {
        match infer(&self.expression)? {
            Ty::Bool | Ty::Dynamic => Ok(()),
            other => Err(format!(
                "the expression gives {}, not true or false",
                other.describe()
            )),
        }
    }

    /// Refuses an expression that cannot be an action parameter: one whose value is not a
    /// single string, number or bool, or mixes types (a string plus a number; a ternary
    /// whose branches differ in type).
    pub fn check_value(&self) -> Result<(), String> {
        match infer(&self.expression)? {
            Ty::List | Ty::Map => Err(format!(
                "the expression gives {}; a parameter is a string, a number or a bool",
                infer(&self.expression)?.describe()
            )),
            _ => Ok(()),
        }
    }
}

/// What an expression's value is known to be before it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    Bool,
    Number,
    String,
    List,
    Map,
    Null,
    /// Known only when it runs (a map's value, an event attribute).
    Dynamic,
}

impl Ty {
    fn describe(self) -> &'static str {
        match self {
            Ty::Bool => "true or false",
            Ty::Number => "a number",
            Ty::String => "a string",
            Ty::List => "a list",
            Ty::Map => "a map",
            Ty::Null => "null",
            Ty::Dynamic => "a value",
        }
    }

    /// The type of a value that is one of `a` or `b` (a ternary's branches).
    fn either(a: Ty, b: Ty) -> Result<Ty, String> {
        match (a, b) {
            (Ty::Dynamic, t) | (t, Ty::Dynamic) => Ok(t),
            (a, b) if a == b => Ok(a),
            (a, b) => Err(format!(
                "the branches of ? : give {} and {}",
                a.describe(),
                b.describe()
            )),
        }
    }
}

/// Infers an expression's type from the types of the names it reads; refuses the
/// combinations that can only fail when they run.
fn infer(e: &Expression) -> Result<Ty, String> {
    Ok(match e {
        Expression::Atom(atom) => match atom {
            Atom::Int(_) | Atom::UInt(_) | Atom::Float(_) => Ty::Number,
            Atom::String(_) => Ty::String,
            Atom::Bool(_) => Ty::Bool,
            Atom::Bytes(_) => Ty::Dynamic,
            Atom::Null => Ty::Null,
        },
        Expression::Ident(name) => ident_type(name),
        Expression::Relation(a, _, b) => {
            infer(a)?;
            infer(b)?;
            Ty::Bool
        }
        Expression::And(a, b) | Expression::Or(a, b) => {
            for side in [a, b] {
                if !matches!(infer(side)?, Ty::Bool | Ty::Dynamic) {
                    return Err(format!(
                        "&& and || join conditions, not {}",
                        infer(side)?.describe()
                    ));
                }
            }
            Ty::Bool
        }
        Expression::Unary(op, a) => {
            let t = infer(a)?;
            match (op, t) {
                (UnaryOp::Not | UnaryOp::DoubleNot, Ty::Bool | Ty::Dynamic) => Ty::Bool,
                (UnaryOp::Minus | UnaryOp::DoubleMinus, Ty::Number | Ty::Dynamic) => t,
                (UnaryOp::Not | UnaryOp::DoubleNot, t) => {
                    return Err(format!("! applies to a condition, not {}", t.describe()))
                }
                (_, t) => return Err(format!("- applies to a number, not {}", t.describe())),
            }
        }
        Expression::Arithmetic(a, op, b) => match (infer(a)?, infer(b)?) {
            (Ty::Dynamic, t) | (t, Ty::Dynamic) if t != Ty::Bool => {
                if t == Ty::String && *op != ArithmeticOp::Add {
                    return Err("only + applies to strings".into());
                }
                Ty::Dynamic
            }
            (Ty::Number, Ty::Number) => Ty::Number,
            (Ty::String, Ty::String) if *op == ArithmeticOp::Add => Ty::String,
            (Ty::List, Ty::List) if *op == ArithmeticOp::Add => Ty::List,
            (x, y) => {
                return Err(format!(
                    "arithmetic on {} and {}",
                    x.describe(),
                    y.describe()
                ))
            }
        },
        Expression::Ternary(c, a, b) => {
            if !matches!(infer(c)?, Ty::Bool | Ty::Dynamic) {
                return Err(format!(
                    "the condition of ? : gives {}, not true or false",
                    infer(c)?.describe()
                ));
            }
            Ty::either(infer(a)?, infer(b)?)?
        }
        Expression::Member(base, member) => member_type(base, member)?,
        Expression::FunctionCall(name, target, args) => {
            if let Some(t) = target {
                infer(t)?;
            }
            for a in args {
                infer(a)?;
            }
            match &**name {
                Expression::Ident(f) if f.as_str() == CATEGORY_SHARE => {
                    if target.is_some() || args.len() != 1 {
                        return Err(format!("{CATEGORY_SHARE} takes one category name"));
                    }
                    if !matches!(infer(&args[0])?, Ty::String | Ty::Dynamic) {
                        return Err(format!("{CATEGORY_SHARE} takes a category name (a string)"));
                    }
                    Ty::Number
                }
                Expression::Ident(f) => match f.as_str() {
                    "size" | "int" | "uint" | "double" => Ty::Number,
                    "contains" | "startsWith" | "endsWith" | "matches" | "has" | "all"
                    | "exists" | "exists_one" => Ty::Bool,
                    "string" => Ty::String,
                    "map" | "filter" => Ty::List,
                    _ => Ty::Dynamic,
                },
                _ => Ty::Dynamic,
            }
        }
        Expression::List(items) => {
            for i in items {
                infer(i)?;
            }
            Ty::List
        }
        Expression::Map(entries) => {
            for (k, v) in entries {
                infer(k)?;
                infer(v)?;
            }
            Ty::Map
        }
    })
}

fn ident_type(name: &str) -> Ty {
    match name {
        "scores" | "event" | "product" | "categories" => Ty::Map,
        "segments" => Ty::List,
        "segment" | "stage" | "top_category" => Ty::String,
        _ if FEATURES.iter().any(|f| f.name == name) => Ty::Number,
        _ => Ty::Dynamic,
    }
}

fn member_type(base: &Expression, member: &Member) -> Result<Ty, String> {
    let base_name = match base {
        Expression::Ident(name) => Some(name.as_str()),
        _ => None,
    };
    infer(base)?;
    Ok(match (base_name, member) {
        (Some("product"), Member::Attribute(field)) => PRODUCT_FIELDS
            .iter()
            .find(|(f, _)| f == &field.as_str())
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                format!(
                    "product has no field {field}: it has {}",
                    PRODUCT_FIELDS.map(|(f, _)| f).join(", ")
                )
            })?,
        (Some("event"), Member::Attribute(field)) => match field.as_str() {
            "price" | "order_value" => Ty::Number,
            "attributes" => Ty::Map,
            f if EVENT_FIELDS.contains(&f) => Ty::String,
            f => {
                return Err(format!(
                    "event has no field {f}: it has {}",
                    EVENT_FIELDS.join(", ")
                ))
            }
        },
        (Some("scores" | "categories"), Member::Attribute(_) | Member::Index(_)) => Ty::Number,
        _ => Ty::Dynamic,
    })
}

pub fn is_known_variable(name: &str) -> bool {
    FEATURES.iter().any(|f| f.name == name) || CONTEXT_VARIABLES.iter().any(|(n, _)| *n == name)
}

/// The functions every expression may call, registered once: building CEL's default
/// context allocates a registry of a few dozen boxed functions, which per evaluation was
/// the largest single cost of an event (a quarter of the server's CPU under load).
static FUNCTIONS: LazyLock<Context<'static>> = LazyLock::new(|| {
    let mut functions = Context::default();
    functions.add_function(CATEGORY_SHARE, category_share);
    functions
});

/// `category_share('outdoor')`: the category's share of the person's affinity over the
/// last 30 days, 0 for a category they showed none for.
fn category_share(ftx: &FunctionContext, name: Arc<String>) -> Result<f64, ExecutionError> {
    match ftx.ptx.get_variable("categories")? {
        Value::Map(m) => Ok(match m.map.get(&Key::from(name.as_str())) {
            Some(Value::Float(share)) => *share,
            _ => 0.0,
        }),
        _ => Err(ftx.error("categories is not a map")),
    }
}

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
        if read("product") {
            set(
                &mut variables,
                "product",
                facts
                    .memory
                    .product
                    .as_ref()
                    .map_or_else(|| map(std::iter::empty()), product_value),
            );
        }
        if read("top_category") {
            set(
                &mut variables,
                "top_category",
                facts.memory.top_category().to_owned(),
            );
        }
        if read("categories") {
            let shares = facts
                .memory
                .categories
                .iter()
                .map(|c| (Key::from(c.category.as_str()), Value::Float(c.share)));
            set(&mut variables, "categories", map(shares));
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
        matches!(self.resolve(expr), Some(Ok(Value::Bool(true))))
    }

    /// An action parameter's value, as text: a string as it is, a number or a bool as CEL
    /// writes it. `None` when it fails (a missing score) or gives a list or a map: the
    /// parameter is left out of the action.
    pub fn value(&self, expr: &Expr) -> Option<String> {
        match self.resolve(expr)? {
            Ok(Value::String(s)) => Some((*s).clone()),
            Ok(Value::Int(i)) => Some(i.to_string()),
            Ok(Value::UInt(u)) => Some(u.to_string()),
            Ok(Value::Float(f)) if f.is_finite() => Some(f.to_string()),
            Ok(Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        }
    }

    /// Runs an expression, catching a panic of the interpreter (`None`).
    fn resolve(&self, expr: &Expr) -> Option<Result<Value, ExecutionError>> {
        // Unwind safety: `resolve` only reads the context; nothing of ours is left half
        // changed when it unwinds.
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            Value::resolve(&expr.expression, &self.context)
        })) {
            Ok(result) => Some(result),
            Err(_) => {
                self.panics.set(self.panics.get() + 1);
                // The panic hook has logged the message and where; this says which rule
                // expression (operator text, no personal data) and what became of it.
                tracing::error!(
                    expression = %expr.source,
                    "a rule expression panicked while it ran; it counts as false"
                );
                None
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

static PRODUCT_KEYS: LazyLock<Vec<Key>> =
    LazyLock::new(|| PRODUCT_FIELDS.iter().map(|&(f, _)| Key::from(f)).collect());

fn product_value(p: &ProductFacts) -> Value {
    let s = |v: &str| Value::String(Arc::new(v.to_owned()));
    let n = |v: u32| Value::Float(f64::from(v));
    let values = [
        s(&p.product_id),
        s(&p.category),
        Value::Float(p.price),
        n(p.views_7d),
        n(p.views_30d),
        n(p.cart_adds_7d),
        n(p.cart_adds_30d),
        n(p.purchases_30d),
        n(p.dwell_seconds_7d),
        n(p.dwell_seconds_30d),
        Value::Bool(p.in_cart),
    ];
    map(PRODUCT_KEYS.iter().cloned().zip(values))
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
