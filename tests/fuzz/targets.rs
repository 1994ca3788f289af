//! The fuzz targets, one function each, over Nudge's public entry points.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use prost::Message;

use nudge::api::convert;
use nudge::config::Config;
use nudge::event::FieldError;
use nudge::features::{FeatureRow, FEATURES, FEATURE_COUNT};
use nudge::identity::Pseudonymizer;
use nudge::metrics::Metrics;
use nudge::model::manifest::sha256_hex;
use nudge::model::native::Forest;
use nudge::model::{LoadOptions, Manifest, Model};
use nudge::pb;
use nudge::profile::Profile;
use nudge::time::{Time, DAY_MS};
use nudge::trigger::rules::RuleSet;
use nudge::trigger::{evaluate, Cause, Contribution, Facts, History, TriggerState};

use crate::gen::{self, mutate, mutations, Mutation, TOML_TOKENS};
use crate::{check, Target};

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "event_bytes",
            about: "random bytes decoded as each request message, then converted",
            short: 20_000,
            run: event_bytes,
            replay: None,
        },
        Target {
            name: "event_mutated",
            about: "valid Track/Identify/Score requests' bytes mutated, decoded, converted",
            short: 10_000,
            run: event_mutated,
            replay: None,
        },
        Target {
            name: "event_fields",
            about: "structured events (extreme times, NaN/inf, long strings, odd enums) -> convert::event",
            short: 5_000,
            run: event_fields,
            replay: None,
        },
        Target {
            name: "profile",
            about: "accepted events applied to a profile: every feature stays finite",
            short: 3_000,
            run: profile,
            replay: None,
        },
        Target {
            name: "identify",
            about: "structured IdentifyRequests and PersonRefs, with and without pseudonymization",
            short: 10_000,
            run: identify,
            replay: None,
        },
        Target {
            name: "score_rows",
            about: "Score rows in either form -> convert::feature_rows -> the shipped models",
            short: 5_000,
            run: score_rows,
            replay: None,
        },
        Target {
            name: "score_packed",
            about: "packed rows: converted position by position, scored as the map form is",
            short: 5_000,
            run: score_packed,
            replay: None,
        },
        Target {
            name: "rules_fields",
            about: "rules files built from random values of every key -> RuleSet::parse",
            short: 3_000,
            run: rules_fields,
            replay: None,
        },
        Target {
            name: "rules_mutated",
            about: "config/rules.toml mutated -> RuleSet::parse",
            short: 5_000,
            run: rules_mutated,
            replay: None,
        },
        Target {
            name: "cel",
            about: "random CEL over the rules' names: compiled, then evaluated for random people",
            short: 5_000,
            run: cel,
            replay: None,
        },
        Target {
            name: "cel_execute",
            about: "a corpus of compiled random CEL, 200 rules a file, run for random people",
            short: 5_000,
            run: cel_execute,
            replay: None,
        },
        Target {
            name: "manifest",
            about: "the shipped manifests mutated -> Manifest::parse, to_toml round trip",
            short: 10_000,
            run: manifest,
            replay: None,
        },
        Target {
            name: "config",
            about: "config/nudge.toml mutated, plus random NUDGE__ overrides -> Config::load",
            short: 3_000,
            run: config,
            replay: None,
        },
        Target {
            name: "lightgbm_native",
            about: "the shipped LightGBM models (cut to 3 trees) mutated -> the native forest parser",
            short: 3_000,
            run: lightgbm_native,
            replay: Some(|b| lightgbm_native_one(&String::from_utf8_lossy(b))),
        },
        Target {
            name: "lightgbm_load",
            about: "the same mutated models -> Model::load_unwritten (LightGBM's C API, parity)",
            short: 2_000,
            run: lightgbm_load,
            replay: Some(|b| drop(load(&LIGHTGBM_SEEDS[0].0, b))),
        },
        Target {
            name: "onnx_native",
            about: "the parity ONNX model mutated -> the native ONNX importer",
            short: 5_000,
            run: onnx_native,
            replay: Some(onnx_native_one),
        },
        Target {
            name: "onnx_load",
            about: "the parity ONNX model mutated -> Model::load_unwritten (ONNX Runtime)",
            short: 3_000,
            run: onnx_load,
            replay: Some(|b| drop(load(&ONNX_SEED.0, b))),
        },
    ]
}

/// The repository's files, for seeds.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The server clock of the event targets.
const NOW: Time = Time(gen::NOW_SECONDS * 1000);
const RETENTION_MS: i64 = 90 * DAY_MS;

/// A refusal must say which field and why.
fn explained(e: &FieldError) -> Result<(), TestCaseError> {
    prop_assert!(!e.field.is_empty(), "a FieldError without a field: {e:?}");
    prop_assert!(
        !e.message.is_empty(),
        "a FieldError without a message: {e:?}"
    );
    Ok(())
}

/// Converts an event as Track does; an accepted one has finite numbers.
fn convert_event(e: pb::Event) -> Result<Option<nudge::event::Event>, TestCaseError> {
    match convert::event(e, NOW, RETENTION_MS) {
        Ok(event) => {
            let p = &event.properties;
            for (name, v) in [
                ("price", p.price),
                ("order_value", p.order_value),
                ("dwell_seconds", p.dwell_seconds),
            ] {
                prop_assert!(v.is_none_or(f64::is_finite), "accepted {name} {v:?}");
            }
            Ok(Some(event))
        }
        Err(e) => explained(&e).map(|()| None),
    }
}

fn convert_rows(rows: pb::FeatureRows) -> Result<Option<Vec<FeatureRow>>, TestCaseError> {
    match convert::feature_rows(rows, 1000) {
        Ok(rows) => {
            prop_assert!(!rows.is_empty() && rows.len() <= 1000);
            for row in &rows {
                prop_assert!(
                    row.0.iter().all(|v| !v.is_infinite()),
                    "an accepted row holds an infinity: {row:?}"
                );
            }
            Ok(Some(rows))
        }
        Err(e) => explained(&e).map(|()| None),
    }
}

/// Decodes `bytes` as the request `kind` names and converts what it holds.
fn decode_and_convert(kind: u8, bytes: &[u8]) -> Result<(), TestCaseError> {
    let pseudonymizer = Pseudonymizer::new(Some(b"fuzz".to_vec()));
    match kind % 6 {
        0 => {
            if let Ok(m) = pb::TrackRequest::decode(bytes) {
                for e in m.events {
                    convert_event(e)?;
                }
            }
        }
        1 => {
            if let Ok(e) = pb::Event::decode(bytes) {
                convert_event(e)?;
            }
        }
        2 => {
            if let Ok(m) = pb::IdentifyRequest::decode(bytes) {
                if let Err(e) = convert::identify(m, &pseudonymizer) {
                    explained(&e)?;
                }
            }
        }
        3 => {
            if let Ok(m) = pb::FeatureRows::decode(bytes) {
                convert_rows(m)?;
            }
        }
        4 => {
            if let Ok(m) = pb::ScoreRequest::decode(bytes) {
                match m.subject {
                    Some(pb::score_request::Subject::FeatureRows(rows)) => {
                        convert_rows(rows)?;
                    }
                    Some(pb::score_request::Subject::Person(p)) => {
                        if let Err(e) = convert::person(Some(p), "person", &pseudonymizer) {
                            explained(&e)?;
                        }
                    }
                    None => {}
                }
            }
        }
        _ => {
            if let Ok(m) = pb::TrackStreamRequest::decode(bytes) {
                for e in m.events {
                    convert_event(e)?;
                }
            }
        }
    }
    Ok(())
}

fn event_bytes(runner: &mut TestRunner) -> Result<(), String> {
    check(
        runner,
        (any::<u8>(), vec(any::<u8>(), 0..512)),
        |(kind, bytes)| decode_and_convert(kind, &bytes),
    )
}

/// Valid encodings of each request, for [`event_mutated`] to mutate.
fn request_seeds() -> Vec<(u8, Vec<u8>)> {
    let event = |id: &str, kind: pb::EventType| pb::Event {
        event_id: id.into(),
        user_id: "u-1".into(),
        anonymous_id: "a-1".into(),
        r#type: kind.into(),
        event_time: Some(prost_types::Timestamp {
            seconds: gen::NOW_SECONDS - 3600,
            nanos: 5,
        }),
        properties: Some(pb::EventProperties {
            product_id: Some("sku-1".into()),
            category: Some("shoes".into()),
            price: Some(59.5),
            quantity: Some(2),
            order_value: Some(119.0),
            page: Some("/p/sku-1".into()),
            search_query: Some("red shoes".into()),
            dwell_seconds: Some(12.5),
            order_id: Some("o-1".into()),
            campaign_id: Some("c-1".into()),
        }),
        attributes: [("source".to_owned(), "web".to_owned())].into(),
    };
    let events = vec![
        event("e-1", pb::EventType::ProductView),
        event("e-2", pb::EventType::Purchase),
    ];
    let rows = pb::FeatureRows {
        rows: Vec::new(),
        columns: vec!["cart_value".into(), "sessions_7d".into()],
        values: vec![59.0, 3.0, 12.5, f64::NAN],
    };
    let mapped = pb::FeatureRows {
        rows: vec![pb::FeatureRow {
            values: [("cart_value".to_owned(), 1.0)].into(),
        }],
        columns: Vec::new(),
        values: Vec::new(),
    };
    vec![
        (
            0,
            pb::TrackRequest {
                events: events.clone(),
            }
            .encode_to_vec(),
        ),
        (1, events[0].encode_to_vec()),
        (
            2,
            pb::IdentifyRequest {
                anonymous_id: "a-1".into(),
                user_id: "u-1".into(),
            }
            .encode_to_vec(),
        ),
        (3, rows.encode_to_vec()),
        (3, mapped.encode_to_vec()),
        (
            4,
            pb::ScoreRequest {
                subject: Some(pb::score_request::Subject::FeatureRows(rows)),
                models: vec!["purchase".into()],
            }
            .encode_to_vec(),
        ),
        (
            5,
            pb::TrackStreamRequest {
                sequence: 7,
                events,
            }
            .encode_to_vec(),
        ),
    ]
}

/// Binary tokens of protobuf: tags of the fields above, varints, lengths.
const PROTO_TOKENS: &[&str] = &[
    "\x0a",
    "\x12",
    "\x1a",
    "\x22",
    "\x2a",
    "\x32",
    "\x3a",
    "\x08",
    "\x10",
    "\x19",
    "\x20",
    "\x29",
    "\x7f",
    "\u{7f}\u{7f}",
    "\x00",
    "\x0a\x00",
    "\x0a\x7f",
];

fn event_mutated(runner: &mut TestRunner) -> Result<(), String> {
    let seeds = request_seeds();
    check(
        runner,
        (0..seeds.len(), mutations(PROTO_TOKENS)),
        |(seed, edits)| {
            let (kind, bytes) = &seeds[seed];
            decode_and_convert(*kind, &mutate(bytes, &edits))
        },
    )
}

fn event_fields(runner: &mut TestRunner) -> Result<(), String> {
    check(
        runner,
        prop_oneof![gen::event(), gen::plausible_event()],
        |event| {
            // Through the wire as a client sends it: what the server decodes is what
            // prost makes of these bytes.
            let bytes = pb::TrackRequest {
                events: vec![event],
            }
            .encode_to_vec();
            let decoded = pb::TrackRequest::decode(bytes.as_slice())
                .map_err(|e| TestCaseError::fail(format!("a valid encoding: {e}")))?;
            for e in decoded.events {
                convert_event(e)?;
            }
            Ok(())
        },
    )
}

fn profile(runner: &mut TestRunner) -> Result<(), String> {
    check(runner, vec(gen::plausible_event(), 1..30), |events| {
        let mut profile = Profile::default();
        for e in events {
            if let Some(event) = convert_event(e)? {
                profile.apply(&event);
            }
        }
        for at in [NOW, Time(NOW.0 + DAY_MS), Time(NOW.0 + 200 * DAY_MS)] {
            let row = nudge::features::extract(&profile, at);
            for (f, v) in FEATURES.iter().zip(row.0) {
                prop_assert!(!v.is_infinite(), "{} is {v} at {at:?}", f.name);
            }
        }
        Ok(())
    })
}

fn identify(runner: &mut TestRunner) -> Result<(), String> {
    check(
        runner,
        (gen::text(), gen::text(), any::<bool>()),
        |(anonymous_id, user_id, keyed)| {
            let pseudonymizer = Pseudonymizer::new(keyed.then(|| b"k".to_vec()));
            let person = pb::PersonRef {
                user_id: user_id.clone(),
                anonymous_id: anonymous_id.clone(),
            };
            if let Err(e) = convert::person(Some(person), "person", &pseudonymizer) {
                explained(&e)?;
            }
            let request = pb::IdentifyRequest {
                anonymous_id,
                user_id,
            };
            match convert::identify(request, &pseudonymizer) {
                Ok((visitor, user)) => {
                    let id = |p: &nudge::event::PersonKey| match p {
                        nudge::event::PersonKey::User(id)
                        | nudge::event::PersonKey::Anonymous(id) => id.clone(),
                    };
                    prop_assert!(!id(&visitor).is_empty() && !id(&user).is_empty());
                }
                Err(e) => explained(&e)?,
            }
            Ok(())
        },
    )
}

/// The shipped models, loaded once, as the server loads them.
static MODELS: LazyLock<Vec<Arc<Model>>> = LazyLock::new(|| {
    ["purchase", "churn"]
        .iter()
        .map(|name| {
            let path = repo(&format!("models/{name}.manifest.toml"));
            Arc::new(
                Model::load_from_manifest(&path, &load_options(), NOW)
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        })
        .collect()
});
static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn load_options() -> LoadOptions {
    let mut config = Config::default();
    config.models.max_file_bytes = 1 << 30;
    LoadOptions::from(&config)
}

/// Scores rows with the shipped models; every probability is one.
fn score(rows: &[FeatureRow]) -> Result<Vec<Vec<f64>>, TestCaseError> {
    let mut out = Vec::new();
    for scores in nudge::model::score_each(&MODELS, rows, &METRICS) {
        let mut row = Vec::new();
        for s in scores {
            let s = s.map_err(|(_, e)| TestCaseError::fail(format!("scoring failed: {e}")))?;
            prop_assert!(
                (0.0..=1.0).contains(&s.probability),
                "probability {}",
                s.probability
            );
            row.push(s.probability);
        }
        out.push(row);
    }
    Ok(out)
}

fn score_rows(runner: &mut TestRunner) -> Result<(), String> {
    LazyLock::force(&MODELS);
    check(runner, gen::feature_rows(), |rows| {
        if let Some(rows) = convert_rows(rows)? {
            score(&rows)?;
        }
        Ok(())
    })
}

fn score_packed(runner: &mut TestRunner) -> Result<(), String> {
    LazyLock::force(&MODELS);
    check(runner, gen::packed_rows(), |(positions, values)| {
        let width = positions.len();
        let columns: Vec<String> = positions
            .iter()
            .map(|&p| FEATURES[p].name.to_owned())
            .collect();
        let packed = pb::FeatureRows {
            rows: Vec::new(),
            columns: columns.clone(),
            values: values.clone(),
        };
        let result = convert::feature_rows(packed, 1000);
        if let Some(at) = values.iter().position(|v| v.is_infinite()) {
            let e = result
                .err()
                .ok_or_else(|| TestCaseError::fail("infinity accepted"))?;
            prop_assert_eq!(e.field, format!("feature_rows.values[{at}]"));
            return Ok(());
        }
        let rows = result.map_err(|e| TestCaseError::fail(format!("refused: {e:?}")))?;
        prop_assert_eq!(rows.len(), values.len() / width);
        for (r, row) in rows.iter().enumerate() {
            for f in 0..FEATURE_COUNT {
                let want = positions
                    .iter()
                    .position(|&p| p == f)
                    .map_or(f64::NAN, |c| values[r * width + c]);
                prop_assert!(
                    row.0[f].to_bits() == want.to_bits() || (row.0[f].is_nan() && want.is_nan()),
                    "row {r} feature {f}: {} for {want}",
                    row.0[f]
                );
            }
        }
        // The map form of the same rows (a NaN is an absent key) scores identically.
        let mapped = pb::FeatureRows {
            rows: values
                .chunks_exact(width)
                .map(|chunk| pb::FeatureRow {
                    values: columns
                        .iter()
                        .zip(chunk)
                        .filter(|(_, v)| !v.is_nan())
                        .map(|(c, v)| (c.clone(), *v))
                        .collect(),
                })
                .collect(),
            columns: Vec::new(),
            values: Vec::new(),
        };
        let mapped = convert::feature_rows(mapped, 1000)
            .map_err(|e| TestCaseError::fail(format!("map form refused: {e:?}")))?;
        let (a, b) = (score(&rows)?, score(&mapped)?);
        prop_assert!(
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "packed {a:?} != mapped {b:?}"
        );
        Ok(())
    })
}

// ---- Rules and CEL ----

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "0s", "1s", "30m", "24h", "7d", "366d", "367d", "-1h", "1.5h", "1 h", "30", "h", "",
            "9223372036854775807s", "99999999999999999999d", "1w", "01m", " 5m ", "5M", "٣m",
        ])
        .prop_map(str::to_owned),
        1 => (gen::int(), prop::sample::select(vec!["s", "m", "h", "d", "ms", ""]))
            .prop_map(|(n, u)| format!("{n}{u}")),
    ]
}

fn kind_list() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            3 => prop::sample::select(vec![
                "page_view", "product_view", "search", "add_to_cart", "remove_from_cart",
                "checkout_started", "purchase", "email_open", "email_click",
            ])
            .prop_map(str::to_owned),
            1 => gen::text(),
        ],
        0..4,
    )
    .prop_map(|k| {
        format!(
            "[{}]",
            k.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ")
        )
    })
}

fn float_text() -> impl Strategy<Value = String> {
    gen::float().prop_map(|v| toml::Value::Float(v).to_string())
}

/// One `[[rules]]` entry: each key present or not, each value valid or a near miss.
fn rule_entry() -> impl Strategy<Value = String> {
    let opt = |s: BoxedStrategy<String>| prop::option::weighted(0.5, s);
    let expr = || gen::cel_expression().prop_map(|e| quoted(&e)).boxed();
    let threshold = (
        prop::sample::select(vec!["purchase", "churn", "", "nope"]),
        float_text(),
        prop::option::of(float_text()),
        prop::option::of(duration()),
    )
        .prop_map(|(score, above, rearm, recheck)| {
            let mut t = format!("{{ score = {}, above = {above}", quoted(score));
            if let Some(r) = rearm {
                t += &format!(", rearm_below = {r}");
            }
            if let Some(r) = recheck {
                t += &format!(", recheck = {}", quoted(&r));
            }
            t + " }"
        })
        .boxed();
    let absence = (
        kind_list(),
        kind_list(),
        duration(),
        vec(duration(), 0..3),
        prop::sample::select(vec!["action", "time", "never"]),
    )
        .prop_map(|(after, missing, within, follow_ups, schedule)| {
            format!(
                "{{ after = {after}, missing = {missing}, within = {}, follow_ups = [{}], schedule = {} }}",
                quoted(&within),
                follow_ups.iter().map(|f| quoted(f)).collect::<Vec<_>>().join(", "),
                quoted(schedule)
            )
        })
        .boxed();
    let exclude = (
        prop::option::of(duration()),
        prop::option::of(duration()),
        prop::option::of(gen::cel_expression()),
    )
        .prop_map(|(p, r, u)| {
            let mut parts = Vec::new();
            if let Some(p) = p {
                parts.push(format!("purchased_within = {}", quoted(&p)));
            }
            if let Some(r) = r {
                parts.push(format!("received_within = {}", quoted(&r)));
            }
            if let Some(u) = u {
                parts.push(format!("unless = {}", quoted(&u)));
            }
            format!("{{ {} }}", parts.join(", "))
        })
        .boxed();
    let variant = (gen::text(), float_text(), prop::option::of(duration())).prop_map(
        |(name, weight, within)| {
            let within = within.map_or(String::new(), |w| format!(", within = {}", quoted(&w)));
            format!("{{ name = {}, weight = {weight}{within} }}", quoted(&name))
        },
    );
    let experiment = (gen::text(), float_text(), duration(), vec(variant, 0..4))
        .prop_map(|(name, holdout, window, variants)| {
            format!(
                "{{ name = {}, holdout = {holdout}, conversion_window = {}, variants = [{}] }}",
                quoted(&name),
                quoted(&window),
                variants.join(", ")
            )
        })
        .boxed();
    (
        (gen::text(), any::<i32>()),
        (opt(threshold), opt(absence), opt(expr())),
        (
            opt(duration().prop_map(|d| quoted(&d)).boxed()),
            opt(exclude),
        ),
        (any::<bool>(), gen::text(), opt(experiment)),
    )
        .prop_map(
            |(
                (name, priority),
                (threshold, absence, when),
                (cooldown, exclude),
                (quiet, kind, experiment),
            )| {
                let mut r = format!(
                    "[[rules]]\nname = {}\npriority = {priority}\n",
                    quoted(&name)
                );
                for (key, value) in [
                    ("threshold", threshold),
                    ("absence", absence),
                    ("when", when),
                    ("cooldown", cooldown),
                    ("exclude", exclude),
                    ("experiment", experiment),
                ] {
                    if let Some(v) = value {
                        r += &format!("{key} = {v}\n");
                    }
                }
                r += &format!(
                    "ignore_quiet_hours = {quiet}\naction = {{ type = {}, channel = \"email\" }}\n",
                    quoted(&kind)
                );
                r
            },
        )
}

fn clock() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "22:00",
        "08:00",
        "00:00",
        "23:59",
        "24:00",
        "23:60",
        "-1:00",
        "7:5",
        "",
        ":",
        "1:2:3",
        "+01:00",
        "-00:00",
        "+14:00",
        "+99:99",
        "+23:59",
        "-24:00",
        "٠٨:٠٠",
    ])
    .prop_map(str::to_owned)
}

fn rules_file() -> impl Strategy<Value = String> {
    (
        prop::option::of((any::<u32>(), duration())),
        prop::option::of((
            clock(),
            clock(),
            prop::option::of(clock()),
            prop::option::of(prop::sample::select(vec![
                "Europe/Berlin",
                "UTC",
                "Nope/Zone",
                "",
                "../../etc/passwd",
                "EST5EDT",
            ])),
        )),
        prop::option::of((gen::cel_expression(), gen::cel_expression())),
        vec(rule_entry(), 0..4),
    )
        .prop_map(|(limits, quiet, journey, rules)| {
            let mut f = String::new();
            if let Some((max, per)) = limits {
                f += &format!("[limits]\nmax_per_person = {max}\nper = {}\n", quoted(&per));
            }
            if let Some((from, to, offset, zone)) = quiet {
                f += &format!(
                    "[quiet_hours]\nfrom = {}\nto = {}\n",
                    quoted(&from),
                    quoted(&to)
                );
                if let Some(o) = offset {
                    f += &format!("utc_offset = {}\n", quoted(&o));
                }
                if let Some(z) = zone {
                    f += &format!("time_zone = {}\n", quoted(z));
                }
            }
            if let Some((d, c)) = journey {
                f += &format!(
                    "[journey]\ndecision = {}\nconsideration = {}\n",
                    quoted(&d),
                    quoted(&c)
                );
            }
            for r in rules {
                f += &r;
            }
            f
        })
}

/// A parsed rule set must describe itself (what `nudge check-rules` prints) and name its
/// problems when refused.
fn parse_rules(text: &str) -> Result<Option<RuleSet>, TestCaseError> {
    match RuleSet::parse(text) {
        Ok(rules) => {
            for rule in &rules.rules {
                let _ = rule.describe();
            }
            Ok(Some(rules))
        }
        Err(e) => {
            prop_assert!(!e.problems.is_empty() && e.problems.iter().all(|p| !p.is_empty()));
            Ok(None)
        }
    }
}

/// Evaluates `rules` for a person with `row` and `scores`, after `event`, then their timers
/// at several later times: every expression of the file runs.
fn run_rules(
    rules: &RuleSet,
    row: [f64; FEATURE_COUNT],
    scores: &[(String, f64)],
    event: &nudge::event::Event,
) {
    let row = FeatureRow(row);
    let explain = |_: &str| Vec::<Contribution>::new();
    let segments = ["at_risk", "browser"];
    let mut state = TriggerState::default();
    let mut now = event.time;
    let mut profile = nudge::profile::Profile::default();
    profile.apply(event);
    let memory = nudge::trigger::Memory::of(&profile, Some(event), now, rules.memory_needs);
    for step in 0..4 {
        let facts = Facts {
            person: &event.person,
            row: &row,
            scores,
            segment: Some("casual"),
            segments: &segments,
            history: History {
                last_purchase: Some(event.time),
                last_seen: Some(event.time),
            },
            memory: &memory,
            explain: &explain,
            now,
        };
        let cause = if step == 0 {
            Cause::Event(event)
        } else {
            Cause::Due
        };
        evaluate(rules, &mut state, &facts, cause);
        now = state
            .dues()
            .into_iter()
            .min()
            .unwrap_or(Time(now.0 + DAY_MS));
    }
}

fn fixed_event() -> nudge::event::Event {
    convert::event(
        pb::Event {
            event_id: "e-1".into(),
            user_id: "u-1".into(),
            anonymous_id: String::new(),
            r#type: pb::EventType::AddToCart.into(),
            event_time: Some(prost_types::Timestamp {
                seconds: gen::NOW_SECONDS,
                nanos: 0,
            }),
            properties: Some(pb::EventProperties {
                product_id: Some("sku-1".into()),
                price: Some(10.0),
                ..Default::default()
            }),
            attributes: [("source".to_owned(), "web".to_owned())].into(),
        },
        NOW,
        RETENTION_MS,
    )
    .expect("a valid event")
}

fn rules_fields(runner: &mut TestRunner) -> Result<(), String> {
    let event = fixed_event();
    let scores = vec![("purchase".to_owned(), 0.9), ("churn".to_owned(), 0.2)];
    check(runner, (rules_file(), gen::feature_row()), |(text, row)| {
        if let Some(rules) = parse_rules(&text)? {
            run_rules(&rules, row, &scores, &event);
        }
        Ok(())
    })
}

const RULES_TOKENS: &[&str] = &[
    "\"",
    "'",
    "'''",
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    "\n",
    "#",
    "\\",
    "\\u",
    "\\uD800",
    "true",
    "false",
    "nan",
    "inf",
    "30m",
    "0s",
    "24h",
    "367d",
    "-1d",
    "purchase",
    "churn",
    "add_to_cart",
    "timer",
    " && ",
    " || ",
    " > ",
    "(",
    ")",
    "scores.",
    "event.",
    "1 / 0",
    "\n[[rules]]\nname = \"x\"\naction = { type = \"t\" }\n",
    "\n[limits]\n",
    "\n[journey]\n",
    "weight = ",
    "holdout = ",
    "within = ",
    "rearm_below = ",
    "\0",
    "é",
];

fn rules_mutated(runner: &mut TestRunner) -> Result<(), String> {
    let seed = read("config/rules.toml");
    let event = fixed_event();
    let scores = vec![("purchase".to_owned(), 0.9), ("churn".to_owned(), 0.2)];
    check(
        runner,
        (mutations(RULES_TOKENS), gen::feature_row()),
        |(edits, row)| {
            let text = String::from_utf8_lossy(&mutate(&seed, &edits)).into_owned();
            if let Some(rules) = parse_rules(&text)? {
                run_rules(&rules, row, &scores, &event);
            }
            Ok(())
        },
    )
}

fn cel(runner: &mut TestRunner) -> Result<(), String> {
    let strategy = (
        gen::cel_expression(),
        gen::cel_expression(),
        gen::feature_row(),
        vec(
            (
                prop::sample::select(vec!["purchase", "churn", "other"]),
                gen::float(),
            ),
            0..3,
        ),
        gen::plausible_event(),
    );
    check(runner, strategy, |(when, decision, row, scores, event)| {
        // A condition must compile and be able to give true or false.
        let condition = |source: &str| {
            nudge::trigger::expr::Expr::compile(source).is_ok_and(|e| e.check_condition().is_ok())
        };
        let text = format!(
            "[journey]\ndecision = {}\nconsideration = \"true\"\n\n\
             [[rules]]\nname = \"when\"\nwhen = {}\naction = {{ type = \"t\" }}\n\n\
             [[rules]]\nname = \"crossing\"\nthreshold = {{ score = \"purchase\", above = 0.5 }}\n\
             exclude = {{ unless = {} }}\naction = {{ type = \"t\" }}\n",
            quoted(&decision),
            quoted(&when),
            quoted(&when),
        );
        let parsed = parse_rules(&text)?;
        // The file holds only these expressions, so it parses exactly when they are
        // conditions.
        prop_assert_eq!(parsed.is_some(), condition(&when) && condition(&decision));
        if let Some(rules) = parsed {
            let scores: Vec<(String, f64)> =
                scores.into_iter().map(|(n, p)| (n.to_owned(), p)).collect();
            let event = convert_event(event)?.unwrap_or_else(fixed_event);
            run_rules(&rules, row, &scores, &event);
        }
        Ok(())
    })
}

/// Execution apart from compilation: this target compiles a corpus once — random
/// expressions from the same grammar, those that compile as conditions, 200 rules (the most a file may
/// hold) to a rule set — and each case runs one rule set's every expression for a random
/// person and event, so a case is all execution.
fn cel_execute(runner: &mut TestRunner) -> Result<(), String> {
    use proptest::strategy::ValueTree;
    const CORPUS: usize = 400;
    let strategy = gen::cel_expression();
    let mut compiled = Vec::new();
    while compiled.len() < CORPUS {
        let source = strategy
            .new_tree(runner)
            .map_err(|e| e.to_string())?
            .current();
        if nudge::trigger::expr::Expr::compile(&source).is_ok_and(|e| e.check_condition().is_ok()) {
            compiled.push(source);
        }
    }
    let sets: Vec<RuleSet> = compiled
        .chunks(nudge::trigger::rules::MAX_RULES)
        .map(|chunk| {
            let text: String = chunk
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    format!(
                        "[[rules]]\nname = \"r{i}\"\nwhen = {}\naction = {{ type = \"t\" }}\n",
                        quoted(e)
                    )
                })
                .collect();
            RuleSet::parse(&text).map_err(|e| format!("the corpus's rules: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let strategy = (
        0..sets.len(),
        gen::feature_row(),
        vec(
            (
                prop::sample::select(vec!["purchase", "churn", "other"]),
                gen::float(),
            ),
            0..3,
        ),
        gen::plausible_event(),
    );
    check(runner, strategy, |(set, row, scores, event)| {
        let scores: Vec<(String, f64)> =
            scores.into_iter().map(|(n, p)| (n.to_owned(), p)).collect();
        let event = convert_event(event)?.unwrap_or_else(fixed_event);
        run_rules(&sets[set], row, &scores, &event);
        Ok(())
    })
}

// ---- Manifests and config ----

const MANIFEST_TOKENS: &[&str] = &[
    "\"",
    "'",
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    "\n",
    "#",
    "lightgbm",
    "onnx",
    "\n[training]\n",
    "\n[training.x]\ny = 1\n",
    "\n[[training.a]]\n",
    "features = []\n",
    "sha256 = \"\"\n",
    "file = \"../x\"\n",
    "\nfeature_spec_version = \"1\"\n",
    "1979-05-27T07:32:00Z",
    "nan",
    "inf",
    "\\u",
    "é",
    "\0",
];

fn manifest(runner: &mut TestRunner) -> Result<(), String> {
    let seeds = [
        read("models/purchase.manifest.toml"),
        read("models/churn.manifest.toml"),
        read("tests/fixtures/parity/parity_onnx.manifest.toml"),
    ];
    let tokens: &'static [&'static str] = {
        let mut all = TOML_TOKENS.to_vec();
        all.extend(MANIFEST_TOKENS);
        all.leak()
    };
    check(
        runner,
        (0..seeds.len(), mutations(tokens)),
        |(seed, edits)| {
            let text = String::from_utf8_lossy(&mutate(&seeds[seed], &edits)).into_owned();
            if let Ok(m) = Manifest::parse(&text) {
                // What `nudge manifest` writes reads back as the same manifest.
                let written = m.to_toml();
                let again = Manifest::parse(&written)
                    .map_err(|e| TestCaseError::fail(format!("to_toml wrote {written:?}: {e}")))?;
                prop_assert_eq!(again.to_toml(), written);
            }
            Ok(())
        },
    )
}

/// `NUDGE__` overrides: real keys and near misses, any case, values of every type.
fn overrides() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![
        4 => prop::sample::select(vec![
            "SERVER__GRPC_ADDR", "SERVER__MAX_MESSAGE_BYTES", "SERVER__MAX_BATCH_EVENTS",
            "SERVER__MAX_SCORE_ROWS", "SERVER__SHUTDOWN_GRACE_SECONDS", "ENGINE__SHARDS",
            "ENGINE__QUEUE_CAPACITY", "ENGINE__QUEUE_BUDGET_MS", "ENGINE__CACHE_MB", "STORE__DIR",
            "STORE__SYNC", "STORE__SYNC_INTERVAL_MS", "STORE__RETENTION_DAYS",
            "STORE__DEDUP_HORIZON_HOURS", "MODELS__ENGINE", "MODELS__MAX_FILE_BYTES",
            "TRIGGERS__TICK_MS", "TRIGGERS__WEBHOOKS", "LOG__LEVEL", "LOG__FORMAT", "server",
            "SERVER", "SERVER__", "__", "SERVER____X", "server__grpc_addr", "X__Y__Z",
            "SERVER__GRPC_ADDR__X", "IDENTITY__PSEUDONYMIZE_KEY_FILE",
        ])
        .prop_map(str::to_owned),
        1 => gen::text(),
    ];
    let value = prop_oneof![
        3 => prop::sample::select(vec![
            "0", "-1", "1", "18446744073709551615", "18446744073709551616", "1e308", "nan",
            "true", "[]", "{}", "[1, 2]", "{ a = 1 }", "\"x\"", "127.0.0.1:0", "[::1]:65536",
            "always", "interval", "json", "text", "lightgbm", "native", "", "=", "1\n[x]\ny = 2",
            "[{ url = \"http://127.0.0.1:1/\" }]", "\"\\uD800\"",
        ])
        .prop_map(str::to_owned),
        1 => gen::int().prop_map(|n| n.to_string()),
        1 => gen::text(),
    ];
    vec(
        (key, value).prop_map(|(k, v)| (format!("NUDGE__{k}"), v)),
        0..4,
    )
}

fn config(runner: &mut TestRunner) -> Result<(), String> {
    let seed = read("config/nudge.toml");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("nudge.toml");
    check(
        runner,
        (
            prop::option::weighted(0.9, mutations(TOML_TOKENS)),
            overrides(),
        ),
        |(edits, env)| {
            let bytes = edits.map_or_else(|| seed.clone(), |e| mutate(&seed, &e));
            std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Ok(config) = Config::load(Some(&path), env.clone()) {
                // What the server derives from a valid config right after loading it.
                let _ = (
                    config.shards(),
                    config.cache_bytes(),
                    config.onnxruntime_library(),
                );
            } else if let Err(e) = Config::load(Some(&path), env) {
                prop_assert!(!e.problems.is_empty());
            }
            Ok(())
        },
    )
}

// ---- Model files ----

/// A LightGBM text model cut to its first `keep` trees, still whole: the header's
/// `tree_sizes` lists only those, and the file ends as LightGBM writes it. Whole shipped
/// models take milliseconds to parse, which would make a million cases take hours;
/// every line kind and every key of the format is in the first trees.
fn first_trees(text: &str, keep: usize) -> String {
    let (head, rest) = text.split_once("\nTree=").expect("a LightGBM model");
    let trees_end = rest.find("\nend of trees").expect("a whole model");
    let trees: Vec<&str> = rest[..trees_end].split("\nTree=").take(keep).collect();
    let sizes: Vec<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("tree_sizes="))
        .expect("tree_sizes")
        .split(' ')
        .take(keep)
        .map(|s| s.parse().expect("a size"))
        .collect();
    let head = head
        .lines()
        .map(|l| {
            if l.starts_with("tree_sizes=") {
                format!(
                    "tree_sizes={}",
                    sizes
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = head;
    for t in trees {
        out += "\nTree=";
        out += t;
    }
    out + &rest[trees_end..]
}

/// The shipped LightGBM models, cut to their first trees, with their manifests.
static LIGHTGBM_SEEDS: LazyLock<Vec<(Manifest, Vec<u8>)>> = LazyLock::new(|| {
    ["purchase", "churn"]
        .iter()
        .map(|name| {
            let manifest = Manifest::parse(
                &String::from_utf8(read(&format!("models/{name}.manifest.toml"))).expect("utf-8"),
            )
            .expect("a shipped manifest");
            let text =
                String::from_utf8(read(&format!("models/{}", manifest.file))).expect("utf-8");
            let cut = first_trees(&text, 3).into_bytes();
            (manifest, cut)
        })
        .collect()
});

const LIGHTGBM_TOKENS: &[&str] = &[
    "\n",
    "=",
    " ",
    "\nTree=",
    "\nend of trees",
    "tree_sizes=",
    "num_leaves=",
    "num_cat=",
    "split_feature=",
    "threshold=",
    "decision_type=",
    "left_child=",
    "right_child=",
    "leaf_value=",
    "cat_boundaries=",
    "cat_threshold=",
    "shrinkage=",
    "is_linear=",
    "max_feature_idx=",
    "num_class=",
    "objective=",
    "sigmoid:",
    "binary",
    "multiclass",
    "feature_names=",
    "feature_infos=",
    "version=v4",
    "\nparameters:\n",
    "-1",
    "-2",
    "nan",
    "inf",
    "1e308",
    "\0",
    "é",
];

fn lightgbm_native(runner: &mut TestRunner) -> Result<(), String> {
    let seeds = &*LIGHTGBM_SEEDS;
    check(
        runner,
        (0..seeds.len(), mutations(LIGHTGBM_TOKENS)),
        |(seed, edits)| {
            lightgbm_native_one(&String::from_utf8_lossy(&mutate(&seeds[seed].1, &edits)));
            Ok(())
        },
    )
}

fn lightgbm_native_one(text: &str) {
    crate::remember(text.as_bytes());
    if let Ok(forest) = Forest::from_lightgbm(text) {
        exercise(&forest);
    }
}

fn onnx_native_one(bytes: &[u8]) {
    crate::remember(bytes);
    if let Ok(forest) = Forest::from_onnx(bytes) {
        exercise(&forest);
    }
}

/// A forest that imported scores its own probe rows, and attributes one.
fn exercise(forest: &Forest) {
    let rows = forest.probe_rows(16);
    let _ = forest.predict(&rows);
    if let Some(row) = rows.get(..forest.n_features()) {
        let _ = forest.predict_raw_one(row);
        let _ = forest.contributions(row);
    }
}

/// Loads `bytes` as the server would from a manifest naming them (its hash made to match,
/// so every check after the hash's is reached).
fn load(manifest: &Manifest, bytes: &[u8]) -> Result<(), TestCaseError> {
    crate::remember(bytes);
    let _quiet = crate::Quiet::output();
    let mut manifest = manifest.clone();
    manifest.sha256 = sha256_hex(bytes);
    if let Ok(model) = Model::load_unwritten(manifest, bytes, &load_options(), NOW) {
        let mut row = FeatureRow::missing();
        row.0[0] = 1.0;
        let _ = model.score(&[row, FeatureRow::missing()]);
        let _ = model.contributions(&row, 5);
    }
    Ok(())
}

fn lightgbm_load(runner: &mut TestRunner) -> Result<(), String> {
    let seeds = &*LIGHTGBM_SEEDS;
    check(
        runner,
        (0..seeds.len(), mutations(LIGHTGBM_TOKENS)),
        |(seed, edits)| {
            let (manifest, bytes) = &seeds[seed];
            load(manifest, &mutate(bytes, &edits))
        },
    )
}

/// ONNX's messages as the importer reads them: generated by the build script from
/// `src/model/native/onnx.proto`, the one definition.
mod onnx {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// An ONNX tree ensemble cut to the trees with ids below `keep`, still whole: each
/// `nodes_*` attribute keeps the entries of those trees' nodes and each `class_*` those of
/// their leaves. The whole parity model takes milliseconds to import and to check
/// against ONNX Runtime, which would make a million cases take hours; every attribute
/// and operator of the file is still there.
fn first_onnx_trees(bytes: &[u8], keep: i64) -> Vec<u8> {
    let mut model = onnx::ModelProto::decode(bytes).expect("an ONNX model");
    let graph = model.graph.as_mut().expect("a graph");
    let ensemble = graph
        .node
        .iter_mut()
        .find(|n| n.op_type() == "TreeEnsembleClassifier")
        .expect("a tree ensemble");
    let kept = |name: &str| -> Vec<bool> {
        let ids = &ensemble
            .attribute
            .iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("{name}"))
            .ints;
        ids.iter().map(|&tree| tree < keep).collect()
    };
    let (nodes, leaves) = (kept("nodes_treeids"), kept("class_treeids"));
    for attribute in &mut ensemble.attribute {
        let mask = if attribute.name().starts_with("nodes_") {
            &nodes
        } else if attribute.name().starts_with("class_") {
            &leaves
        } else {
            continue;
        };
        fn retain<T>(values: &mut Vec<T>, mask: &[bool]) {
            if !values.is_empty() {
                assert_eq!(values.len(), mask.len(), "an attribute per node or leaf");
                let mut keep = mask.iter();
                values.retain(|_| *keep.next().unwrap());
            }
        }
        retain(&mut attribute.ints, mask);
        retain(&mut attribute.floats, mask);
        retain(&mut attribute.strings, mask);
    }
    model.encode_to_vec()
}

static ONNX_SEED: LazyLock<(Manifest, Vec<u8>)> = LazyLock::new(|| {
    let manifest = Manifest::parse(
        &String::from_utf8(read("tests/fixtures/parity/parity_onnx.manifest.toml")).expect("utf-8"),
    )
    .expect("the parity manifest");
    let bytes = first_onnx_trees(
        &read(&format!("tests/fixtures/parity/{}", manifest.file)),
        3,
    );
    // The cut model is one the server serves: mutations start from a valid file.
    let mut whole = manifest.clone();
    whole.sha256 = sha256_hex(&bytes);
    if let Err(e) = Model::load_unwritten(whole, &bytes, &load_options(), NOW) {
        panic!("the cut ONNX seed does not load: {e}");
    }
    if let Err(e) = Forest::from_onnx(&bytes) {
        panic!("the cut ONNX seed does not import natively: {e}");
    }
    (manifest, bytes)
});

/// Protobuf's tags and the ONNX names the importer reads.
const ONNX_TOKENS: &[&str] = &[
    "\x0a",
    "\x12",
    "\x1a",
    "\x22",
    "\x2a",
    "\x3a",
    "\x42",
    "\x08",
    "\x10",
    "\x7f",
    "\x00",
    "TreeEnsembleClassifier",
    "TreeEnsembleRegressor",
    "ai.onnx.ml",
    "probabilities",
    "nodes_modes",
    "BRANCH_LEQ",
    "BRANCH_LT",
    "BRANCH_EQ",
    "LEAF",
    "nodes_treeids",
    "nodes_nodeids",
    "nodes_truenodeids",
    "nodes_falsenodeids",
    "class_weights",
    "post_transform",
    "LOGISTIC",
    "base_values",
    "Identity",
    "Cast",
    "Mul",
];

fn onnx_native(runner: &mut TestRunner) -> Result<(), String> {
    let (_, seed) = &*ONNX_SEED;
    check(runner, onnx_mutations(), |edits| {
        onnx_native_one(&mutate(seed, &edits));
        Ok(())
    })
}

fn onnx_mutations() -> impl Strategy<Value = Vec<Mutation>> {
    mutations(ONNX_TOKENS)
}

fn onnx_load(runner: &mut TestRunner) -> Result<(), String> {
    let (manifest, seed) = &*ONNX_SEED;
    check(runner, onnx_mutations(), |edits| {
        load(manifest, &mutate(seed, &edits))
    })
}
