//! The fuzz targets' generators, in one place: interesting numbers and strings, structured
//! wire messages, CEL expressions over the names rules read, and mutations of valid files.
//!
//! Random bytes rarely decode into a message with interesting values, and a random text
//! is rarely near a valid TOML file or model, so most targets start from structure (a
//! message with random field values, an expression from a grammar) or from a valid file
//! mutated a few places (bytes flipped, numbers swapped for extreme ones, tokens of the
//! format inserted). Every strategy shrinks, so a failure is reported at a small input.

use std::collections::HashMap;

use proptest::collection::{hash_map, vec};
use proptest::prelude::*;

use nudge::features::FEATURES;
use nudge::pb;

/// Numbers at and beyond every bound a parser or a validator checks.
pub fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e3..1e3f64,
        2 => any::<f64>(),
        1 => Just(f64::NAN),
        1 => Just(-f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(f64::MAX),
        1 => Just(f64::MIN),
        1 => Just(f64::MIN_POSITIVE),
        1 => Just(-0.0),
        1 => Just(1e12),
        1 => Just(1e12 + 1.0),
        1 => Just(86_400.0),
        1 => Just(86_401.0),
        1 => Just(9.007_199_254_740_993e15),
    ]
}

/// Integers at the edges of every width, and timestamps' own edges.
pub fn int() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -1000..1000i64,
        2 => any::<i64>(),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(i64::from(i32::MIN)),
        1 => Just(i64::from(i32::MAX)),
        1 => Just(i64::from(u32::MAX)),
        1 => Just(253_402_300_799),
        1 => Just(253_402_300_800),
        1 => Just(-62_135_596_800),
        1 => Just(-62_135_596_801),
        // Around the fuzz clock (2026-12-01), where the event-time checks are.
        2 => (NOW_SECONDS - 100 * 86_400)..(NOW_SECONDS + 2 * 86_400),
    ]
}

/// The server clock the event targets judge times against: 2026-12-01T00:00:00Z.
pub const NOW_SECONDS: i64 = 1_796_083_200;

/// Strings: empty, short names, the names the code knows, Unicode, control characters and
/// strings far over every length bound (events allow 256-byte ids, 64-byte names).
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_-]{0,12}",
        2 => prop::sample::select(known_names()).prop_map(str::to_owned),
        1 => Just(String::new()),
        1 => any::<String>(),
        1 => "[\\x00-\\x1f\"'\\\\{}\\[\\]\u{FEFF}\u{202E}é日本]{0,8}",
        1 => (0usize..5, prop::sample::select(vec![63usize, 64, 65, 255, 256, 257, 70_000]))
            .prop_map(|(c, n)| ["a", "é", "\u{10FFFF}", "\0", " "][c].repeat(n)),
    ]
}

/// Names Nudge reads somewhere: features, event kinds, models, context variables.
pub fn known_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = FEATURES.iter().map(|f| f.name).collect();
    names.extend([
        "purchase",
        "churn",
        "page_view",
        "product_view",
        "add_to_cart",
        "checkout_started",
        "scores",
        "event",
        "segment",
        "segments",
        "stage",
        "kind",
        "price",
        "attributes",
    ]);
    names
}

pub fn timestamp() -> impl Strategy<Value = prost_types::Timestamp> {
    (
        int(),
        prop_oneof![
            3 => 0..1_000_000_000i32,
            1 => any::<i32>(),
            1 => Just(-1),
            1 => Just(1_000_000_000),
            1 => Just(i32::MAX),
        ],
    )
        .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos })
}

/// An event type: every defined value and values beyond the enum.
pub fn event_type() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0..10i32, 1 => any::<i32>(), 1 => Just(i32::MIN), 1 => Just(-1)]
}

pub fn properties() -> impl Strategy<Value = pb::EventProperties> {
    let opt_text = || prop::option::of(text());
    let opt_float = || prop::option::of(float());
    (
        (
            opt_text(),
            opt_text(),
            opt_float(),
            prop::option::of(any::<u32>()),
        ),
        (opt_float(), opt_text(), opt_text(), opt_float()),
        (opt_text(), opt_text()),
    )
        .prop_map(
            |(
                (product_id, category, price, quantity),
                (order_value, page, search_query, dwell_seconds),
                (order_id, campaign_id),
            )| pb::EventProperties {
                product_id,
                category,
                price,
                quantity,
                order_value,
                page,
                search_query,
                dwell_seconds,
                order_id,
                campaign_id,
            },
        )
}

pub fn attributes() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        4 => hash_map(text(), text(), 0..4),
        1 => (0usize..3).prop_map(|k| {
            // Over the attribute count bound, with valid names and values.
            (0..[33, 64, 1000][k]).map(|i| (format!("a{i}"), "v".to_owned())).collect()
        }),
    ]
}

/// A wire event whose every field is drawn from the interesting values above.
pub fn event() -> impl Strategy<Value = pb::Event> {
    (
        (text(), text(), text()),
        event_type(),
        prop::option::of(timestamp()),
        prop::option::of(properties()),
        attributes(),
    )
        .prop_map(
            |((event_id, user_id, anonymous_id), r#type, event_time, properties, attributes)| {
                pb::Event {
                    event_id,
                    user_id,
                    anonymous_id,
                    r#type,
                    event_time,
                    properties,
                    attributes,
                }
            },
        )
}

/// A wire event that passes most checks, so that the checks behind the first are reached.
pub fn plausible_event() -> impl Strategy<Value = pb::Event> {
    (
        "[a-z0-9]{1,8}",
        "u[0-9]{1,3}",
        prop::option::of("a[0-9]{1,3}"),
        1..10i32,
        (NOW_SECONDS - 95 * 86_400)..(NOW_SECONDS + 86_400),
        properties(),
    )
        .prop_map(
            |(event_id, user, anonymous, r#type, seconds, properties)| pb::Event {
                event_id,
                user_id: user,
                anonymous_id: anonymous.unwrap_or_default(),
                r#type,
                event_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                properties: Some(properties),
                attributes: HashMap::new(),
            },
        )
}

/// A column name for packed rows: mostly features (so shapes and values are reached).
pub fn column() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(FEATURES.iter().map(|f| f.name).collect::<Vec<_>>())
            .prop_map(str::to_owned),
        1 => text(),
    ]
}

/// Score rows in either form, or both, with values at every edge.
pub fn feature_rows() -> impl Strategy<Value = pb::FeatureRows> {
    let mapped = vec(
        hash_map(column(), float(), 0..6).prop_map(|values| pb::FeatureRow { values }),
        0..4,
    );
    let packed = (vec(column(), 0..8), vec(float(), 0..40));
    prop_oneof![
        4 => packed.prop_map(|(columns, values)| pb::FeatureRows { rows: Vec::new(), columns, values }),
        2 => mapped.prop_map(|rows| pb::FeatureRows { rows, columns: Vec::new(), values: Vec::new() }),
        1 => (vec(hash_map(column(), float(), 0..3), 0..2), vec(column(), 0..3), vec(float(), 0..6))
            .prop_map(|(rows, columns, values)| pb::FeatureRows {
                rows: rows.into_iter().map(|values| pb::FeatureRow { values }).collect(),
                columns,
                values,
            }),
    ]
}

/// A packed form the conversion accepts except for its values: distinct feature columns
/// and a whole number of rows.
pub fn packed_rows() -> impl Strategy<Value = (Vec<usize>, Vec<f64>)> {
    (1usize..FEATURES.len(), 1usize..20).prop_flat_map(|(width, rows)| {
        (
            prop::sample::subsequence((0..FEATURES.len()).collect::<Vec<_>>(), width)
                .prop_shuffle(),
            vec(float(), width * rows),
        )
    })
}

// ---- CEL ----

/// The names an expression reads: every feature, the context variables and their fields.
fn cel_atom() -> impl Strategy<Value = String> {
    let features: Vec<&'static str> = FEATURES.iter().map(|f| f.name).collect();
    prop_oneof![
        6 => prop::sample::select(features).prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "scores.purchase", "scores.churn", "scores.missing", "scores['purchase']",
            "event.kind", "event.price", "event.order_value", "event.product_id",
            "event.category", "event.page", "event.attributes", "event.attributes.source",
            "event.attributes['x']", "segment", "segments", "stage", "event",
        ])
        .prop_map(str::to_owned),
        3 => float().prop_map(|v| format!("{v:?}")),
        3 => int().prop_map(|v| v.to_string()),
        1 => any::<u64>().prop_map(|v| format!("{v}u")),
        1 => prop::sample::select(vec![
            "0", "0u", "0.0", "-1", "9223372036854775807", "-9223372036854775808",
            "18446744073709551615u", "true", "false", "null", "''", "'abc'", "\"x\"",
            "b'\\xff'", "[]", "{}", "[1, 2.0, 'a']", "{'a': 1}", "duration('1h')",
            "timestamp('2026-12-01T00:00:00Z')", "'\\u00e9'", "1e308", "1e309",
            "r'\\d+'", "'a'.size()", "size('')",
        ])
        .prop_map(str::to_owned),
    ]
}

/// A CEL expression from a grammar over [`cel_atom`]: every operator, the functions and
/// macros the interpreter offers, and ill-typed combinations of them.
pub fn cel_expression() -> impl Strategy<Value = String> {
    cel_atom().prop_recursive(4, 24, 3, |inner| {
        let binary = prop::sample::select(vec![
            "+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "&&", "||", "in",
        ]);
        let function = prop::sample::select(vec![
            "size",
            "int",
            "uint",
            "double",
            "string",
            "bytes",
            "has",
            "duration",
            "timestamp",
            "max",
            "min",
            "type",
        ]);
        let method = prop::sample::select(vec![
            "contains",
            "startsWith",
            "endsWith",
            "matches",
            "size",
        ]);
        let macro_ = prop::sample::select(vec!["all", "exists", "exists_one", "map", "filter"]);
        prop_oneof![
            4 => (inner.clone(), binary, inner.clone())
                .prop_map(|(l, op, r)| format!("({l} {op} {r})")),
            1 => (prop::sample::select(vec!["!", "-", "--"]), inner.clone())
                .prop_map(|(op, e)| format!("{op}({e})")),
            1 => (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("({c} ? {a} : {b})")),
            1 => (function, vec(inner.clone(), 0..3))
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            1 => (inner.clone(), method, inner.clone())
                .prop_map(|(s, m, a)| format!("{s}.{m}({a})")),
            1 => (inner.clone(), macro_, inner.clone())
                .prop_map(|(l, m, body)| format!("{l}.{m}(x, {body})")),
            1 => (inner.clone(), inner.clone()).prop_map(|(l, i)| format!("{l}[{i}]")),
            1 => vec(inner.clone(), 0..3).prop_map(|items| format!("[{}]", items.join(", "))),
            1 => (inner.clone(), inner).prop_map(|(k, v)| format!("{{{k}: {v}}}")),
        ]
    })
}

/// A feature row with the shapes a profile gives and values past them.
pub fn feature_row() -> impl Strategy<Value = [f64; nudge::features::FEATURE_COUNT]> {
    vec(
        prop_oneof![3 => 0.0..100.0f64, 2 => float()],
        nudge::features::FEATURE_COUNT,
    )
    .prop_map(|v| v.try_into().expect("the length asked for"))
}

// ---- Mutations of valid files ----

/// One edit of a file's bytes. Positions are taken modulo the file's length, so any
/// position applies to any file and shrinking moves toward the start.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Flips one bit.
    Flip { at: usize, bit: u8 },
    /// Overwrites one byte.
    Byte { at: usize, value: u8 },
    /// Overwrites up to 8 bytes with an extreme little-endian integer (lengths, counts
    /// and varints in binary formats).
    Word { at: usize, value: u64, width: u8 },
    /// Inserts a token of the format (or any bytes).
    Insert { at: usize, bytes: Vec<u8> },
    /// Removes up to `len` bytes.
    Delete { at: usize, len: usize },
    /// Copies a range elsewhere (a repeated line, key or message).
    Copy { from: usize, len: usize, to: usize },
    /// Replaces the number at or after `at` with an extreme one.
    Number { at: usize, text: &'static str },
    /// Cuts the file.
    Truncate { at: usize },
}

/// Numbers past every bound: widths, signs, exponents, special values.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "0.5",
    "-0.5",
    "127",
    "128",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e308",
    "1e309",
    "-1e309",
    "1e-320",
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-inf",
    "Infinity",
    "1.",
    ".5",
    "0x10",
    "1_000",
    "",
    "-",
    "e",
    "1e",
    "00001",
];

const WORDS: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Mutations for a file whose format `tokens` describes (its punctuation, keywords, keys).
pub fn mutations(tokens: &'static [&'static str]) -> impl Strategy<Value = Vec<Mutation>> {
    let at = || any::<usize>();
    let one = prop_oneof![
        2 => (at(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (at(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        1 => (at(), prop::sample::select(WORDS), prop::sample::select(vec![1u8, 2, 4, 8]))
            .prop_map(|(at, value, width)| Mutation::Word { at, value, width }),
        3 => (at(), prop_oneof![
                4 => prop::sample::select(tokens).prop_map(|t| t.as_bytes().to_vec()),
                1 => vec(any::<u8>(), 1..8),
            ])
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (at(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (at(), 1usize..256, at()).prop_map(|(from, len, to)| Mutation::Copy { from, len, to }),
        4 => (at(), prop::sample::select(NUMBERS)).prop_map(|(at, text)| Mutation::Number { at, text }),
        1 => at().prop_map(|at| Mutation::Truncate { at }),
    ];
    vec(one, 1..6)
}

/// Applies `mutations` to a copy of `seed`.
pub fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for m in mutations {
        let n = out.len();
        let pos = |at: usize| if n == 0 { 0 } else { at % n };
        match *m {
            Mutation::Flip { at, bit } if n > 0 => out[pos(at)] ^= 1 << bit,
            Mutation::Byte { at, value } if n > 0 => out[pos(at)] = value,
            Mutation::Word { at, value, width } if n > 0 => {
                let at = pos(at);
                let end = (at + usize::from(width)).min(n);
                out[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
            Mutation::Insert { at, ref bytes } => {
                let at = if n == 0 { 0 } else { at % (n + 1) };
                out.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete { at, len } if n > 0 => {
                let at = pos(at);
                out.drain(at..(at + len).min(n));
            }
            Mutation::Copy { from, len, to } if n > 0 => {
                let from = pos(from);
                let piece = out[from..(from + len).min(n)].to_vec();
                let to = to % (n + 1);
                out.splice(to..to, piece);
            }
            Mutation::Number { at, text } if n > 0 => {
                let number = |b: u8| b.is_ascii_digit() || b"+-.eE".contains(&b);
                let Some(start) = (pos(at)..n).find(|&i| out[i].is_ascii_digit()) else {
                    continue;
                };
                let start = (0..start)
                    .rev()
                    .take_while(|&i| number(out[i]))
                    .last()
                    .unwrap_or(start);
                let end = (start..n).find(|&i| !number(out[i])).unwrap_or(n);
                out.splice(start..end, text.bytes());
            }
            Mutation::Truncate { at } => out.truncate(if n == 0 { 0 } else { at % n }),
            _ => {}
        }
    }
    out
}

/// The tokens of TOML: what turns one valid file into another, or into a near miss.
pub const TOML_TOKENS: &[&str] = &[
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "\\u",
    "\\uD800",
    "\\U0010FFFF",
    "\\U00110000",
    "true",
    "false",
    "nan",
    "inf",
    "-inf",
    "1979-05-27T07:32:00Z",
    "1979-05-27",
    "07:32:00",
    "[]",
    "{}",
    " = 1\n",
    " = \"\"\n",
    "\n[[rules]]\nname = \"x\"\n",
    "\n[limits]\n",
    "\nx = 1\n",
    "\0",
    "\r\n",
    "\u{FEFF}",
    "é",
];
