//! The pure trigger core: every condition kind, suppression and experiments, with time
//! given by the test.

use std::collections::BTreeMap;

use super::experiment::{assign_variant, record_purchase};
use super::rules::RuleSet;
use super::*;
use crate::event::{Event, EventKind, Properties};
use crate::features::Feature;
use crate::time::{HOUR_MS, MINUTE_MS};

const T0: Time = Time(1_772_445_600_000); // 2026-03-02T10:00:00Z

fn person() -> PersonKey {
    PersonKey::User("u1".into())
}

fn event(id: &str, kind: EventKind, at: Time) -> Event {
    Event {
        id: id.into(),
        person: person(),
        linked: None,
        kind,
        time: at,
        properties: Properties::default(),
        attributes: Default::default(),
    }
}

/// A person to evaluate rules for, with their features and scores.
struct Person {
    state: TriggerState,
    row: FeatureRow,
    scores: Vec<(String, f64)>,
    segments: Vec<&'static str>,
    last_purchase: Option<Time>,
    last_seen: Option<Time>,
    /// The profile the events build, for the product and category memory rules read.
    profile: crate::profile::Profile,
    memory: Memory,
}

impl Person {
    fn new() -> Person {
        Person {
            state: TriggerState::default(),
            row: FeatureRow([0.0; crate::features::FEATURE_COUNT]),
            scores: vec![("purchase".into(), 0.1), ("churn".into(), 0.1)],
            segments: vec!["browser"],
            last_purchase: None,
            last_seen: None,
            profile: Default::default(),
            memory: Memory::default(),
        }
    }

    fn facts<'a>(&'a self, now: Time, explain: &'a dyn Fn(&str) -> Vec<Contribution>) -> Facts<'a> {
        static PERSON: std::sync::OnceLock<PersonKey> = std::sync::OnceLock::new();
        Facts {
            person: PERSON.get_or_init(person),
            row: &self.row,
            scores: &self.scores,
            segment: Some("casual"),
            segments: &self.segments,
            history: History {
                last_purchase: self.last_purchase,
                last_seen: self.last_seen,
            },
            memory: &self.memory,
            explain,
            now,
        }
    }

    /// Applies an event at `at` and returns the outcomes as (rule, outcome) strings.
    fn on(&mut self, rules: &RuleSet, e: Event) -> Vec<(String, String)> {
        summary(&self.firings(rules, e))
    }

    /// Applies an event at `at` and returns the firings.
    fn firings(&mut self, rules: &RuleSet, e: Event) -> Vec<Firing> {
        self.last_seen = self.last_seen.max(Some(e.time));
        self.profile.apply(&e);
        self.memory = Memory::of(&self.profile, Some(&e), e.time, rules.memory_needs);
        let explain = |_: &str| Vec::new();
        let mut state = std::mem::take(&mut self.state);
        let firings = evaluate(
            rules,
            &mut state,
            &self.facts(e.time, &explain),
            Cause::Event(&e),
        )
        .firings;
        self.state = state;
        firings
    }

    fn tick(&mut self, rules: &RuleSet, now: Time) -> Vec<(String, String)> {
        self.memory = Memory::of(&self.profile, None, now, rules.memory_needs);
        let explain = |_: &str| Vec::new();
        let mut state = std::mem::take(&mut self.state);
        let firings = evaluate(rules, &mut state, &self.facts(now, &explain), Cause::Due).firings;
        self.state = state;
        summary(&firings)
    }

    fn set_score(&mut self, model: &str, p: f64) {
        self.scores.iter_mut().find(|(m, _)| m == model).unwrap().1 = p;
    }
}

fn summary(firings: &[Firing]) -> Vec<(String, String)> {
    firings
        .iter()
        .map(|f| (f.trigger.rule.clone(), f.outcome.as_str().to_owned()))
        .collect()
}

fn fired(rule: &str) -> Vec<(String, String)> {
    vec![(rule.into(), "delivered".into())]
}

fn rules(text: &str) -> RuleSet {
    RuleSet::parse(text).unwrap()
}

const THRESHOLD: &str = r#"
    [[rules]]
    name = "intent"
    threshold = { score = "purchase", above = 0.75, rearm_below = 0.70 }
    action = { type = "discount", channel = "email", template = "d10" }
"#;

#[test]
fn a_threshold_fires_on_crossing_not_while_above_and_rearms_below_the_lower_level() {
    let rules = rules(THRESHOLD);
    let mut p = Person::new();
    let mut t = T0;
    let mut step = |p: &mut Person, score: f64| {
        p.set_score("purchase", score);
        t = t.plus_ms(MINUTE_MS);
        p.on(&rules, event(&format!("e{}", t.0), EventKind::PageView, t))
    };
    assert!(step(&mut p, 0.5).is_empty());
    assert_eq!(
        step(&mut p, 0.75),
        fired("intent"),
        "at the threshold fires"
    );
    assert!(
        step(&mut p, 0.9).is_empty(),
        "staying above does not fire again"
    );
    assert!(
        step(&mut p, 0.72).is_empty(),
        "dipping above the re-arm level does not re-arm"
    );
    assert!(step(&mut p, 0.8).is_empty());
    assert!(
        step(&mut p, 0.69).is_empty(),
        "falling below the re-arm level re-arms"
    );
    assert_eq!(step(&mut p, 0.76), fired("intent"));
}

#[test]
fn a_threshold_is_rechecked_while_the_person_stays_away() {
    let rules = rules(
        r#"
        [[rules]]
        name = "churn"
        threshold = { score = "churn", above = 0.75, rearm_below = 0.6, recheck = "24h" }
        action = { type = "win_back" }
        "#,
    );
    let mut p = Person::new();
    p.set_score("churn", 0.3);
    assert!(p
        .on(&rules, event("e1", EventKind::PageView, T0))
        .is_empty());
    assert_eq!(p.state.dues(), [T0.plus_ms(24 * HOUR_MS)]);
    // A day without events: the score (computed at the tick) has risen.
    p.set_score("churn", 0.8);
    assert_eq!(p.tick(&rules, T0.plus_ms(24 * HOUR_MS)), fired("churn"));
    assert_eq!(
        p.state.dues(),
        [T0.plus_ms(48 * HOUR_MS)],
        "rechecked daily"
    );
    assert!(
        p.tick(&rules, T0.plus_ms(48 * HOUR_MS)).is_empty(),
        "still above: no repeat"
    );
    // An event moves the next recheck to a day after it.
    p.on(
        &rules,
        event("e2", EventKind::PageView, T0.plus_ms(50 * HOUR_MS)),
    );
    assert_eq!(p.state.dues(), [T0.plus_ms(74 * HOUR_MS)]);
    // Rechecks stop once the person has been away for the whole history.
    let far = T0.plus_ms(50 * HOUR_MS + 91 * 24 * HOUR_MS);
    p.tick(&rules, far);
    assert!(p.state.timers.is_empty());
}

#[test]
fn a_predicate_fires_when_it_becomes_true_and_can_read_segments_and_the_event() {
    let rules = rules(
        r#"
        [[rules]]
        name = "engaged"
        when = "session_product_time_s > 300.0 && session_distinct_products >= 3.0"
        action = { type = "recommend" }

        [[rules]]
        name = "vip_cart"
        when = "event.kind == 'add_to_cart' && segment == 'casual' && 'browser' in segments && stage == 'decision'"
        action = { type = "vip" }
        "#,
    );
    let mut p = Person::new();
    p.row.0[Feature::SessionProductTimeS as usize] = 301.0;
    p.row.0[Feature::SessionDistinctProducts as usize] = 2.0;
    assert!(p
        .on(&rules, event("e1", EventKind::ProductView, T0))
        .is_empty());
    p.row.0[Feature::SessionDistinctProducts as usize] = 3.0;
    assert_eq!(
        p.on(&rules, event("e2", EventKind::ProductView, T0)),
        fired("engaged")
    );
    assert!(p
        .on(&rules, event("e3", EventKind::ProductView, T0))
        .is_empty());
    // The cart makes the journey stage "decision".
    p.row.0[Feature::CartItems as usize] = 1.0;
    assert_eq!(
        p.on(&rules, event("e4", EventKind::AddToCart, T0)),
        fired("vip_cart")
    );
}

const ABANDONED: &str = r#"
    [[rules]]
    name = "cart_abandoned"
    absence = { after = ["add_to_cart"], missing = ["checkout_started", "purchase"], within = "30m", follow_ups = ["24h"] }
    action = { type = "reminder" }
"#;

#[test]
fn an_absence_fires_at_its_deadline_then_follows_up_unless_the_action_happens() {
    let rules = rules(ABANDONED);
    let mut p = Person::new();
    assert!(p
        .on(&rules, event("add", EventKind::AddToCart, T0))
        .is_empty());
    assert_eq!(p.state.dues(), [T0.plus_ms(30 * MINUTE_MS)]);
    assert!(p.tick(&rules, T0.plus_ms(30 * MINUTE_MS - 1)).is_empty());
    let at_deadline = T0.plus_ms(30 * MINUTE_MS);
    assert_eq!(p.tick(&rules, at_deadline), fired("cart_abandoned"));
    assert!(p.tick(&rules, at_deadline).is_empty(), "a timer fires once");
    // The follow-up is due 24 hours after the first reminder.
    assert_eq!(p.state.dues(), [at_deadline.plus_ms(24 * HOUR_MS)]);
    assert_eq!(
        p.tick(&rules, at_deadline.plus_ms(24 * HOUR_MS)),
        fired("cart_abandoned")
    );
    assert!(p.state.timers.is_empty());

    // A checkout before the deadline cancels the wait.
    let mut p = Person::new();
    p.on(&rules, event("add", EventKind::AddToCart, T0));
    p.on(
        &rules,
        event("co", EventKind::CheckoutStarted, T0.plus_ms(10 * MINUTE_MS)),
    );
    assert!(p.state.timers.is_empty());
    assert!(p.tick(&rules, T0.plus_ms(HOUR_MS)).is_empty());
}

#[test]
fn trigger_ids_are_stable_per_rule_person_and_cause() {
    let rules = rules(ABANDONED);
    let run = || {
        let mut p = Person::new();
        p.on(&rules, event("add", EventKind::AddToCart, T0));
        let explain = |_: &str| Vec::new();
        let mut state = std::mem::take(&mut p.state);
        evaluate(
            &rules,
            &mut state,
            &p.facts(T0.plus_ms(HOUR_MS), &explain),
            Cause::Due,
        )
        .firings
    };
    let (a, b) = (run(), run());
    assert_eq!(a[0].trigger.trigger_id, b[0].trigger.trigger_id);
    assert_eq!(a[0].trigger.cause, "timer:add:0");
    assert_ne!(
        a[0].trigger.trigger_id,
        trigger_id("cart_abandoned", &person(), "timer:add:1")
    );
}

#[test]
fn time_based_reminders_keep_their_schedule_whatever_the_person_does() {
    let rules = rules(
        r#"
        [[rules]]
        name = "remind"
        absence = { after = ["add_to_cart"], missing = ["purchase"], within = "1h", follow_ups = ["24h"], schedule = "time" }
        action = { type = "reminder" }
        "#,
    );
    let mut p = Person::new();
    p.on(&rules, event("add", EventKind::AddToCart, T0));
    // Neither another addition nor a purchase moves or cancels a time-based schedule.
    p.on(
        &rules,
        event("add2", EventKind::AddToCart, T0.plus_ms(30 * MINUTE_MS)),
    );
    p.on(
        &rules,
        event("buy", EventKind::Purchase, T0.plus_ms(40 * MINUTE_MS)),
    );
    assert_eq!(p.state.dues(), [T0.plus_ms(HOUR_MS)]);
    // Fired late (say, after a restart), the follow-up still keeps the fixed schedule.
    assert_eq!(p.tick(&rules, T0.plus_ms(3 * HOUR_MS)), fired("remind"));
    assert_eq!(p.state.dues(), [T0.plus_ms(25 * HOUR_MS)]);
}

#[test]
fn suppression_records_a_reason_for_each_kind() {
    let text = r#"
        [limits]
        max_per_person = 2
        per = "24h"

        [[rules]]
        name = "a"
        priority = 3
        when = "event.kind == 'page_view'"
        cooldown = "1h"
        action = { type = "x" }

        [[rules]]
        name = "b"
        priority = 2
        when = "event.kind == 'page_view'"
        exclude = { purchased_within = "24h" }
        action = { type = "x" }

        [[rules]]
        name = "c"
        priority = 1
        when = "event.kind == 'page_view'"
        exclude = { unless = "'vip' in segments" }
        action = { type = "x" }
    "#;
    let rules = rules(text);
    let mut p = Person::new();
    let mut t = T0;
    let mut view = |p: &mut Person, minutes: i64| {
        t = t.plus_ms(minutes * MINUTE_MS);
        // Predicates fire on becoming true: a search in between makes them false.
        p.on(&rules, event(&format!("s{}", t.0), EventKind::Search, t));
        p.on(&rules, event(&format!("v{}", t.0), EventKind::PageView, t))
    };
    let pairs = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        view(&mut p, 0),
        pairs(&[
            ("a", "delivered"),
            ("b", "delivered"),
            ("c", "frequency_cap")
        ])
    );
    assert_eq!(
        view(&mut p, 10),
        pairs(&[
            ("a", "cooldown"),
            ("b", "frequency_cap"),
            ("c", "frequency_cap")
        ])
    );
    p.last_purchase = Some(T0.plus_ms(20 * MINUTE_MS));
    p.segments = vec!["vip"];
    assert_eq!(
        view(&mut p, 24 * 60),
        pairs(&[
            ("a", "delivered"),
            ("b", "purchased_recently"),
            ("c", "excluded")
        ])
    );
}

#[test]
fn quiet_hours_hold_back_triggers_unless_a_rule_ignores_them() {
    let rules = rules(
        r#"
        [quiet_hours]
        from = "22:00"
        to = "08:00"

        [[rules]]
        name = "quiet"
        when = "event.kind == 'page_view'"
        action = { type = "x" }

        [[rules]]
        name = "urgent"
        when = "event.kind == 'page_view'"
        ignore_quiet_hours = true
        action = { type = "x" }
        "#,
    );
    let mut p = Person::new();
    let night = T0.plus_ms(13 * HOUR_MS); // 23:00 UTC
    assert_eq!(
        p.on(&rules, event("n", EventKind::PageView, night)),
        vec![
            ("quiet".to_owned(), "quiet_hours".to_owned()),
            ("urgent".to_owned(), "delivered".to_owned())
        ]
    );
}

#[test]
fn variants_are_sticky_split_by_weight_and_holdouts_are_not_delivered() {
    let rules = rules(
        r#"
        [[rules]]
        name = "intent"
        threshold = { score = "purchase", above = 0.75 }
        action = { type = "discount", template = "base" }
        experiment = { name = "exp", holdout = 0.2, variants = [
            { name = "a", weight = 1, template = "A" },
            { name = "b", weight = 3, params = { percent = "15" } },
        ] }
        "#,
    );
    let experiment = rules.rules[0].experiment.as_ref().unwrap();
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let n = 20_000;
    for i in 0..n {
        let key = PersonKey::User(format!("user-{i}"));
        let v = assign_variant(experiment, &key);
        assert_eq!(v, assign_variant(experiment, &key), "sticky");
        *counts.entry(v).or_default() += 1;
    }
    // Expected shares 0.2 / 0.2 / 0.6; five standard deviations of a binomial share at
    // n = 20,000 is at most 0.018.
    for (variant, share) in [(HOLDOUT, 0.2), ("a", 0.2), ("b", 0.6)] {
        let got = f64::from(counts[variant]) / f64::from(n);
        assert!((got - share).abs() < 0.018, "{variant}: {got} vs {share}");
    }

    // One person in each variant, so every branch below runs.
    let mut seen = BTreeMap::new();
    for i in 0.. {
        let key = PersonKey::User(format!("user-{i}"));
        seen.entry(assign_variant(experiment, &key)).or_insert(key);
        if seen.len() == 3 {
            break;
        }
    }
    for (variant, key) in seen {
        let mut p = Person::new();
        p.set_score("purchase", 0.9);
        let explain = |_: &str| Vec::new();
        let mut state = TriggerState::default();
        let mut facts = p.facts(T0, &explain);
        facts.person = &key;
        let mut e = event("e", EventKind::PageView, T0);
        e.person = key.clone();
        let firings = evaluate(&rules, &mut state, &facts, Cause::Event(&e)).firings;
        let f = &firings[0];
        assert_eq!(f.trigger.variant.as_deref(), Some(variant));
        match variant {
            HOLDOUT => assert_eq!(f.outcome, Outcome::Holdout),
            "a" => {
                assert_eq!(f.outcome, Outcome::Delivered);
                assert_eq!(f.trigger.action.template, "A");
            }
            "b" => {
                assert_eq!(f.outcome, Outcome::Delivered);
                assert_eq!(f.trigger.action.params["percent"], "15");
            }
            other => panic!("unexpected variant {other}"),
        }
        // The exposure (holdout included) converts on a purchase inside the window, once.
        assert_eq!(state.exposures.len(), 1);
        assert_eq!(
            record_purchase(&mut state, T0.plus_ms(HOUR_MS)),
            vec![("intent".to_owned(), variant.to_owned())]
        );
        assert!(record_purchase(&mut state, T0.plus_ms(2 * HOUR_MS)).is_empty());
    }
}

#[test]
fn a_trigger_carries_scores_stage_contributions_and_the_action() {
    let rules = rules(THRESHOLD);
    let mut p = Person::new();
    p.set_score("purchase", 0.8);
    p.row.0[Feature::CartItems as usize] = 2.0;
    let explain = |model: &str| {
        vec![Contribution {
            feature: format!("{model}_top"),
            value: 1.5,
        }]
    };
    let mut state = TriggerState::default();
    let e = event("e", EventKind::AddToCart, T0);
    let firings = evaluate(&rules, &mut state, &p.facts(T0, &explain), Cause::Event(&e)).firings;
    let t = &firings[0].trigger;
    assert_eq!(t.cause, "event:e");
    assert!(
        t.trigger_id.len() == 36
            && t.trigger_id.starts_with("trg_")
            && t.trigger_id[4..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        t.trigger_id
    );
    assert_eq!(t.user_id.as_deref(), Some("u1"));
    assert_eq!(t.time_ms, T0.millis());
    assert_eq!(t.scores["purchase"], 0.8);
    assert_eq!(t.journey_stage, "decision");
    assert_eq!(t.contributions["purchase"][0].feature, "purchase_top");
    assert_eq!(t.action.template, "d10");
    assert_eq!(t.action.channel, "email");
}

#[test]
fn merging_states_keeps_the_earlier_timer_and_the_latest_firing() {
    let rules = rules(ABANDONED);
    let mut a = Person::new();
    a.on(
        &rules,
        event("a1", EventKind::AddToCart, T0.plus_ms(MINUTE_MS)),
    );
    let mut b = Person::new();
    b.on(&rules, event("b1", EventKind::AddToCart, T0));
    a.state.merge(b.state);
    assert_eq!(a.state.timers.len(), 1);
    assert_eq!(a.state.timers[0].cause, "b1");
}

#[test]
fn the_state_stays_bounded_without_limits_and_forgets_removed_rules() {
    // No [limits]: nothing reads delivery times, so none are kept, however often a
    // threshold fires and re-arms.
    let rules = rules(THRESHOLD);
    let mut p = Person::new();
    for i in 0..200 {
        let at = T0.plus_ms(i * HOUR_MS);
        p.set_score("purchase", 0.9);
        assert_eq!(
            p.on(&rules, event(&format!("up{i}"), EventKind::PageView, at)),
            [("intent".to_owned(), "delivered".to_owned())]
        );
        p.set_score("purchase", 0.1);
        p.on(&rules, event(&format!("down{i}"), EventKind::PageView, at));
    }
    assert!(
        p.state.delivered.is_empty(),
        "{:?}",
        p.state.delivered.len()
    );

    // With a cap, only the cap's window is kept.
    let capped = self::rules(&format!(
        "[limits]\nmax_per_person = 100\nper = \"1d\"\n{THRESHOLD}"
    ));
    let mut p = Person::new();
    for i in 0..200 {
        let at = T0.plus_ms(i * HOUR_MS);
        p.set_score("purchase", 0.9);
        p.on(&capped, event(&format!("up{i}"), EventKind::PageView, at));
        p.set_score("purchase", 0.1);
        p.on(&capped, event(&format!("down{i}"), EventKind::PageView, at));
    }
    assert_eq!(
        p.state.delivered.len(),
        24,
        "one a hour within the last day"
    );

    // A rule taken out of the file leaves nothing behind at the next evaluation.
    p.set_score("purchase", 0.9);
    p.on(
        &rules,
        event("latch", EventKind::PageView, T0.plus_ms(300 * HOUR_MS)),
    );
    assert_eq!(p.state.rules.len(), 1);
    let other = self::rules(ABANDONED);
    p.on(
        &other,
        event("other", EventKind::PageView, T0.plus_ms(301 * HOUR_MS)),
    );
    assert!(p.state.rules.is_empty(), "{:?}", p.state.rules);
}

#[test]
fn expressions_read_every_event_field_and_scores_and_nothing_of_the_evaluation_before() {
    let rules = rules(
        r#"
        [[rules]]
        name = "fields"
        when = "event.kind == 'add_to_cart' && event.product_id == 'p9' && event.category == 'shoes' && event.page == '/p9' && event.search_query == 'red' && event.campaign_id == 'c1' && event.price == 25.0 && event.order_value == 50.0 && event.attributes.tier == 'gold' && scores.purchase == 0.25 && scores.churn == 0.5"
        action = { type = "t", channel = "email", template = "t" }

        [[rules]]
        name = "bare_view"
        when = "event.kind == 'page_view' && event.product_id == '' && size(event.attributes) == 0"
        action = { type = "t", channel = "email", template = "t" }
        "#,
    );
    let mut p = Person::new();
    p.set_score("purchase", 0.25);
    p.set_score("churn", 0.5);
    let mut e = event("e1", EventKind::AddToCart, T0);
    e.properties = Properties {
        product_id: Some("p9".into()),
        category: Some("shoes".into()),
        page: Some("/p9".into()),
        search_query: Some("red".into()),
        campaign_id: Some("c1".into()),
        price: Some(25.0),
        order_value: Some(50.0),
        ..Properties::default()
    };
    e.attributes = BTreeMap::from([("tier".to_owned(), "gold".to_owned())]);
    assert_eq!(p.on(&rules, e.clone()), fired("fields"));

    // One field different: the whole condition is false.
    let mut other = e.clone();
    other.id = "e2".into();
    other.attributes.clear();
    let mut q = Person::new();
    q.set_score("purchase", 0.25);
    q.set_score("churn", 0.5);
    assert_eq!(q.on(&rules, other), vec![]);

    // The next evaluation on this thread sees its own event, none of the previous one's
    // fields (the variables map is reused between evaluations).
    let mut r = Person::new();
    let bare = event("e3", EventKind::PageView, T0.plus_ms(MINUTE_MS));
    assert_eq!(r.on(&rules, bare), fired("bare_view"));
}

/// CEL's interpreter (cel-interpreter 0.8.1) divides integers with Rust's `/` and `%`,
/// which panic on a zero divisor: `1 / 0` compiles and then panics when it runs. A rule
/// whose expression panics must count as false for that evaluation, with the panic
/// counted, and every other rule must be decided as if it were not there.
#[test]
fn a_rule_whose_expression_panics_is_false_and_the_other_rules_still_fire() {
    let rules = rules(
        r#"
        [journey]
        decision = "1 % 0 == 0"
        consideration = "session_page_views >= 0.0"

        [[rules]]
        name = "divides_by_zero"
        priority = 20
        when = "session_page_views >= 0.0 && 1 / 0 > 0"
        action = { type = "t" }

        [[rules]]
        name = "visits"
        priority = 10
        when = "session_page_views >= 0.0"
        action = { type = "t" }
        "#,
    );
    let mut p = Person::new();
    let explain = |_: &str| Vec::new();
    let mut state = TriggerState::default();
    let e = event("e1", EventKind::PageView, T0);
    let decisions = evaluate(&rules, &mut state, &p.facts(T0, &explain), Cause::Event(&e));
    assert_eq!(summary(&decisions.firings), fired("visits"));
    // The journey's decision and the rule's `when`, once each.
    assert_eq!(decisions.expression_panics, 2);
    // The stage fell back as if the decision expression were false.
    assert_eq!(decisions.firings[0].trigger.journey_stage, "consideration");
    p.state = state;
}

/// cel-parser 0.7.1 unwraps its integer parse, so an integer literal past i64's range
/// panics while compiling (found by the fuzz target `rules_mutated`); the compile guard
/// turns it into a problem of the rules file, which is refused, instead of a panic in
/// whatever loads it (a reload, `nudge check-rules`).
#[test]
fn an_integer_literal_out_of_range_is_a_problem_of_the_file_not_a_panic() {
    for literal in [
        "-9223372036854775809",
        "9223372036854775808",
        "18446744073709551616u",
    ] {
        let text = format!(
            "[[rules]]\nname = \"r\"\nwhen = \"session_page_views > {literal}\"\naction = {{ type = \"t\" }}\n"
        );
        let problems = RuleSet::parse(&text).unwrap_err().problems;
        assert_eq!(problems.len(), 1, "{literal}: {problems:?}");
        assert!(
            problems[0].starts_with("rules[0].when") || problems[0].contains("when"),
            "{problems:?}"
        );
    }
}

/// A product event with the catalog's fields.
fn product_event(id: &str, kind: EventKind, at: Time, product: &str, price: f64) -> Event {
    let mut e = event(id, kind, at);
    e.properties = Properties {
        product_id: Some(product.into()),
        category: Some("cameras".into()),
        price: Some(price),
        ..Properties::default()
    };
    e
}

const CAMERA: &str = r#"
    [[rules]]
    name = "considered_expensive_product"
    when = "product.views_7d >= 3 && product.price >= 500 && !product.in_cart"
    cooldown = "7d"
    cooldown_per = "product"
    context = ["top_products", "event"]
    action = { type = "content", channel = "email", template = "reviews", params = { product = { expr = "product.product_id" }, financing = { expr = "product.price >= 1000 ? 'yes' : 'no'" } } }
"#;

#[test]
fn a_product_level_rule_fires_once_per_product_and_a_second_product_gets_its_own_firing() {
    let rules = rules(CAMERA);
    assert!(rules.rules[0].per_product && rules.memory_needs.product);
    let mut p = Person::new();
    let mut t = T0;
    let mut view = |p: &mut Person, product: &str, price: f64| {
        t = t.plus_ms(MINUTE_MS);
        p.firings(
            &rules,
            product_event(
                &format!("v{}", t.0),
                EventKind::ProductView,
                t,
                product,
                price,
            ),
        )
    };
    assert!(view(&mut p, "cam-1", 899.0).is_empty());
    assert!(view(&mut p, "cam-1", 899.0).is_empty());
    // A cheap product viewed as often never fires.
    for _ in 0..4 {
        assert!(view(&mut p, "strap", 19.0).is_empty());
    }
    let third = view(&mut p, "cam-1", 1099.0);
    assert_eq!(summary(&third), fired("considered_expensive_product"));
    let trigger = &third[0].trigger;
    let context = trigger
        .context
        .as_ref()
        .expect("the rule asks for a context");
    let product = context
        .product
        .as_ref()
        .expect("a product-level rule names its product");
    assert_eq!(
        (product.product_id.as_str(), product.views_7d, product.price),
        ("cam-1", 3, 1099.0)
    );
    assert_eq!(context.event.as_ref().unwrap().product_id, "cam-1");
    let top = context.top_products.as_ref().unwrap();
    assert_eq!(top[0].product_id, "strap", "four views beat three");
    assert!(context.cart.is_none(), "only what the rule asked for");
    assert_eq!(trigger.action.params["product"], "cam-1");
    assert_eq!(trigger.action.params["financing"], "yes");
    assert_eq!(
        third[0].computed,
        BTreeMap::from([
            ("financing".to_owned(), "yes".to_owned()),
            ("product".to_owned(), "cam-1".to_owned())
        ])
    );
    assert_eq!(third[0].audit_entry().detail.computed, third[0].computed);
    assert_eq!(
        third[0].audit_entry().detail.context.as_ref(),
        Some(context)
    );

    // Still true on the next views: latched, no second firing for the same product.
    assert!(view(&mut p, "cam-1", 1099.0).is_empty());
    // Another camera crosses on its own: the first one's cooldown is per product.
    for _ in 0..2 {
        assert!(view(&mut p, "cam-2", 650.0).is_empty());
    }
    let other = view(&mut p, "cam-2", 650.0);
    assert_eq!(summary(&other), fired("considered_expensive_product"));
    assert_eq!(other[0].trigger.action.params["financing"], "no");
    // A view of another product in between leaves cam-1's latch alone.
    assert!(view(&mut p, "cam-1", 1099.0).is_empty());

    // Added to the cart: cam-1 no longer holds; taken out again, it crosses again, but its
    // cooldown (per product) holds it back.
    let add = product_event("add", EventKind::AddToCart, t.plus_ms(1), "cam-1", 1099.0);
    assert!(p.firings(&rules, add).is_empty());
    let remove = product_event(
        "rm",
        EventKind::RemoveFromCart,
        t.plus_ms(2),
        "cam-1",
        1099.0,
    );
    let again = p.firings(&rules, remove);
    assert_eq!(
        summary(&again),
        vec![("considered_expensive_product".into(), "cooldown".into())]
    );
}

#[test]
fn a_person_cooldown_silences_every_product_and_product_states_stay_bounded() {
    let rules = rules(&CAMERA.replace("cooldown_per = \"product\"\n", ""));
    let mut p = Person::new();
    let mut t = T0;
    let mut outcomes = Vec::new();
    for product in 0..20 {
        for _ in 0..3 {
            t = t.plus_ms(MINUTE_MS);
            let e = product_event(
                "v",
                EventKind::ProductView,
                t,
                &format!("cam-{product}"),
                900.0,
            );
            let mut e = e;
            e.id = format!("v{}", t.0);
            outcomes.extend(p.on(&rules, e));
        }
    }
    assert_eq!(outcomes[0], fired("considered_expensive_product")[0]);
    assert!(
        outcomes[1..].iter().all(|(_, o)| o == "cooldown"),
        "{outcomes:?}"
    );
    // Twenty products crossed; the state keeps the rule's own entry and at most eight
    // products.
    assert!(p.state.rules.len() <= 1 + crate::profile::interest::MAX_PRODUCTS);
}

#[test]
fn category_preference_reads_affinity_and_actions_follow_the_journey_stage() {
    let rules = rules(
        r#"
        [[rules]]
        name = "category_fan"
        when = "top_category != '' && category_share(top_category) >= 0.6 && event.kind == 'page_view'"
        context = ["top_categories", "segment", "cart"]
        actions.awareness = { type = "content", template = "new-in", params = { category = { expr = "top_category" } } }
        actions.decision = { type = "discount", template = "category-discount", params = { category = { expr = "top_category" }, percent = { expr = "scores.purchase >= 0.9 ? 5 : 10" } } }
        action = { type = "content", template = "compare" }
        "#,
    );
    let mut p = Person::new();
    let mut t = T0;
    let mut at = |p: &mut Person, kind: EventKind, category: &str| {
        t = t.plus_ms(MINUTE_MS);
        let mut e = event(&format!("e{}", t.0), kind, t);
        e.properties.product_id = Some(format!("{category}-{}", t.0 % 7));
        e.properties.category = Some(category.into());
        e.properties.order_value = Some(80.0);
        p.firings(&rules, e)
    };
    // Views spread over three categories, purchases lean to one.
    for category in ["outdoor", "kitchen", "books", "kitchen", "books"] {
        at(&mut p, EventKind::ProductView, category);
    }
    assert!(at(&mut p, EventKind::PageView, "").is_empty());
    at(&mut p, EventKind::Purchase, "outdoor");
    at(&mut p, EventKind::Purchase, "outdoor");
    p.row.0[Feature::CartItems as usize] = 1.0;
    p.set_score("purchase", 0.95);
    let fired_now = at(&mut p, EventKind::PageView, "");
    assert_eq!(summary(&fired_now), fired("category_fan"));
    let trigger = &fired_now[0].trigger;
    assert_eq!(trigger.journey_stage, "decision");
    assert_eq!(trigger.action.template, "category-discount");
    assert_eq!(trigger.action.params["category"], "outdoor");
    assert_eq!(trigger.action.params["percent"], "5");
    let context = trigger.context.as_ref().unwrap();
    let top = context.top_categories.as_ref().unwrap();
    // outdoor: 1 view + 2 purchases × 5 = 11 of 15.
    assert_eq!(top[0].category, "outdoor");
    assert!((top[0].share - 11.0 / 15.0).abs() < 1e-9, "{top:?}");
    assert_eq!(context.segment.as_ref().unwrap().stage, "decision");
    assert_eq!(context.cart.as_deref(), Some(&[][..]), "an empty cart");
    assert!(context.product.is_none() && context.event.is_none());
}

#[test]
fn bad_expressions_in_params_are_refused_with_the_rule_and_field_named() {
    let problems = RuleSet::parse(
        r#"
        [[rules]]
        name = "mixed"
        when = "cart_items > 0"
        action = { type = "t", params = { percent = { expr = "scores.purchase >= 0.9 ? 5 : 'ten'" }, list = { expr = "segments" }, typo = { expr = "top_categroy" }, field = { expr = "product.colour" }, sum = { expr = "top_category + 1" } } }

        [[rules]]
        name = "not_a_condition"
        when = "cart_value * 2"
        cooldown_per = "product"
        context = ["cart", "basket"]
        actions.decision = { type = "d", params = { share = { expr = "category_share(3)" } } }
        "#,
    )
    .unwrap_err()
    .problems
    .join("\n");
    for expected in [
        "rule \"mixed\": action.params.percent: the branches of ? : give a number and a string",
        "rule \"mixed\": action.params.list: the expression gives a list",
        "rule \"mixed\": action.params.typo: unknown name top_categroy",
        "rule \"mixed\": action.params.field: product has no field colour",
        "rule \"mixed\": action.params.sum: arithmetic on a string and a number",
        "rule \"not_a_condition\": when: the expression gives a number, not true or false",
        "rule \"not_a_condition\": cooldown_per = \"product\" needs a product-level rule",
        "rule \"not_a_condition\": context \"basket\" is not one of",
        "rule \"not_a_condition\": actions.decision.params.share: category_share takes a category name",
        "rule \"not_a_condition\": give an action, or actions for all three stages",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
}
