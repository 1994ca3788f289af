//! Point-in-time examples: replay each person's events, in time order, through the
//! server's own `Profile::apply` and `features::extract` with the event's time as `now`,
//! take examples, and label each from that person's later events only.
//!
//! Identities are stitched as the server stitches them ([`crate::replay`]): an event that
//! carries both ids merges the anonymous visitor into the user before it is applied, so
//! every example's features are the ones the server had at that moment. Examples taken
//! before a login keep the visitor's features; their labels come from the one person's
//! later events, the user's included.
//!
//! Input streams: only the profiles, the examples and the examples still waiting for their
//! label's horizon to pass are held. Each person's events must be in time order (from a
//! login on, the visitor's and the user's together); people may interleave.
//!
//! Sampling: purchase examples after every event (its score is read live, during
//! sessions); churn examples at the last event of every session (a question about a person
//! between visits — examples at every click would drown it in the most active people).

use std::collections::{HashMap, VecDeque};

use anyhow::bail;

use crate::replay::People;
use nudge::event::{Event, EventKind, PersonKey};
use nudge::features::{self, FeatureRow};
use nudge::profile::{Profile, SESSION_TIMEOUT_MS};
use nudge::time::{Time, DAY_MS, HOUR_MS};

use crate::input::GivenLabel;

/// What a model predicts, as a label over a person's future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A purchase within the next 24 hours.
    Purchase24h,
    /// No visit (browsing event) within the next 30 days.
    Churn30d,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Purchase24h, Target::Churn30d];

    /// The model name the server serves this target under.
    pub const fn model_name(self) -> &'static str {
        match self {
            Target::Purchase24h => "purchase",
            Target::Churn30d => "churn",
        }
    }

    /// What the model predicts, for people.
    pub const fn description(self) -> &'static str {
        match self {
            Target::Purchase24h => "purchase within the next 24 hours",
            Target::Churn30d => "no visit within the next 30 days",
        }
    }

    /// How far past an example its label looks.
    pub const fn horizon_ms(self) -> i64 {
        match self {
            Target::Purchase24h => 24 * HOUR_MS,
            Target::Churn30d => 30 * DAY_MS,
        }
    }
}

/// One point-in-time example: features as of `time` from events up to `time`, and the label
/// from events after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The index of the person, in order of first appearance.
    pub person: usize,
    pub time: Time,
    pub row: FeatureRow,
    pub label: bool,
}

/// An example still waiting for its label.
struct Waiting {
    time: Time,
    row: FeatureRow,
}

#[derive(Default)]
struct PersonState {
    index: usize,
    profile: Profile,
    last: Option<Time>,
    last_visit: Option<Time>,
    /// Purchase examples within 24 hours of the latest event, oldest first.
    purchase: VecDeque<Waiting>,
    /// The latest session's last event, a churn example once the session has ended.
    session_end: Option<Waiting>,
}

impl PersonState {
    /// Folds a visitor who just logged in into this user: the profile as the server merges
    /// it, the waiting examples joined. Of the two latest session ends, the later waits on;
    /// the earlier is labeled now from the merged sessions if it ended a session (it may
    /// have been part of one visit with the other's), and dropped when that is past the
    /// kept session history and so cannot be told.
    fn absorb(&mut self, visitor: PersonState, churn: &mut Vec<Example>) {
        self.profile.merge(visitor.profile);
        self.last = self.last.max(visitor.last);
        self.last_visit = self.last_visit.max(visitor.last_visit);
        let mut purchase: Vec<Waiting> = std::mem::take(&mut self.purchase)
            .into_iter()
            .chain(visitor.purchase)
            .collect();
        purchase.sort_by_key(|w| w.time);
        self.purchase = purchase.into();
        let mut ends: Vec<Waiting> = [self.session_end.take(), visitor.session_end]
            .into_iter()
            .flatten()
            .collect();
        ends.sort_by_key(|w| w.time);
        self.session_end = ends.pop();
        let sessions: Vec<_> = self.profile.sessions().iter().collect();
        for w in ends {
            let Some(at) = sessions
                .iter()
                .position(|s| s.start <= w.time && w.time <= s.last)
            else {
                continue;
            };
            if let (true, Some(next)) = (sessions[at].last == w.time, sessions.get(at + 1)) {
                churn.push(Example {
                    person: self.index,
                    time: w.time,
                    row: w.row,
                    label: next.start.since(w.time) > Target::Churn30d.horizon_ms(),
                });
            }
        }
    }
}

/// Builds examples for both derived targets from one pass over the events.
#[derive(Default)]
pub struct Builder {
    people: People<PersonState>,
    next_index: usize,
    pub purchase: Vec<Example>,
    pub churn: Vec<Example>,
    latest: Option<Time>,
    pub events: usize,
}

impl Builder {
    pub fn push(&mut self, event: &Event) -> anyhow::Result<()> {
        let Builder {
            people,
            next_index,
            churn,
            ..
        } = self;
        let new = || {
            *next_index += 1;
            PersonState {
                index: *next_index - 1,
                ..PersonState::default()
            }
        };
        let (_, st) = people.route(event, new, |user, visitor| {
            if let Some(visitor) = visitor {
                user.absorb(visitor, churn);
            }
        });
        let t = event.time;
        if st.last.is_some_and(|last| t < last) {
            bail!(
                "event {:?} is older than the person's previous event: each person's events must be in time order",
                event.id
            );
        }
        // Purchase examples whose 24 hours have passed without a purchase.
        while st
            .purchase
            .front()
            .is_some_and(|w| t.since(w.time) > Target::Purchase24h.horizon_ms())
        {
            let w = st.purchase.pop_front().expect("checked");
            self.purchase.push(Example {
                person: st.index,
                time: w.time,
                row: w.row,
                label: false,
            });
        }
        if event.kind == EventKind::Purchase {
            // Strictly later than the example: a purchase at the same instant is its past.
            while st.purchase.front().is_some_and(|w| w.time < t) {
                let w = st.purchase.pop_front().expect("checked");
                self.purchase.push(Example {
                    person: st.index,
                    time: w.time,
                    row: w.row,
                    label: true,
                });
            }
        }
        if event.kind.is_visit() {
            let ended = st
                .last_visit
                .is_some_and(|v| t.since(v) >= SESSION_TIMEOUT_MS);
            if ended {
                if let Some(w) = st.session_end.take() {
                    let churned = t.since(w.time) > Target::Churn30d.horizon_ms();
                    self.churn.push(Example {
                        person: st.index,
                        time: w.time,
                        row: w.row,
                        label: churned,
                    });
                }
            }
        }
        st.profile.apply(event);
        let row = features::extract(&st.profile, t);
        st.purchase.push_back(Waiting { time: t, row });
        if event.kind.is_visit() {
            st.session_end = Some(Waiting { time: t, row });
            st.last_visit = Some(t);
        }
        st.last = Some(t);
        self.latest = self.latest.max(Some(t));
        self.events += 1;
        Ok(())
    }

    /// The features of the person `key` names as of `now`, from the events pushed so far;
    /// `None` if no event reached them.
    pub fn features(&self, key: &PersonKey, now: Time) -> Option<FeatureRow> {
        self.people
            .get(key)
            .map(|st| features::extract(&st.profile, now))
    }

    /// How many logins linked a visitor to a user, and how many the rule refused.
    pub fn links(&self) -> (usize, usize) {
        (self.people.links, self.people.refused_links)
    }

    /// Labels what is still waiting as of `history_end` (default: the latest event) and
    /// drops the examples whose horizon reaches past it (censored).
    pub fn finish(mut self, history_end: Option<Time>) -> (Vec<Example>, Vec<Example>) {
        let end = history_end.or(self.latest).unwrap_or_default();
        for (_, st) in self.people.into_states() {
            for w in st.purchase {
                if end.since(w.time) >= Target::Purchase24h.horizon_ms() {
                    self.purchase.push(Example {
                        person: st.index,
                        time: w.time,
                        row: w.row,
                        label: false,
                    });
                }
            }
            if let Some(w) = st.session_end {
                if end.since(w.time) >= Target::Churn30d.horizon_ms() {
                    self.churn.push(Example {
                        person: st.index,
                        time: w.time,
                        row: w.row,
                        label: true,
                    });
                }
            }
        }
        // Censoring: an example whose horizon reaches past the end of history is dropped
        // whatever its label. Keeping the ones whose outcome happened to show early (a
        // purchase, a return visit) would bias the latest examples — the test set.
        for (examples, target) in [
            (&mut self.purchase, Target::Purchase24h),
            (&mut self.churn, Target::Churn30d),
        ] {
            examples.retain(|e| end.since(e.time) >= target.horizon_ms());
            examples.sort_by_key(|e| (e.time, e.person));
        }
        (self.purchase, self.churn)
    }
}

/// Examples at the times of given labels: features as of each label's time, from the
/// person's events up to it, identities stitched as in [`Builder`]. A label given under an
/// anonymous id takes the visitor's features while the visitor is on their own, and the
/// user's once the visitor has logged in — what the server answers for that id then.
pub fn examples_for_labels(
    events: impl Iterator<Item = anyhow::Result<Event>>,
    labels: Vec<GivenLabel>,
) -> anyhow::Result<Vec<Example>> {
    struct Labeled {
        index: usize,
        profile: Profile,
        last: Time,
    }
    /// Takes the labels of `waiting` before `t` with `profile`'s features.
    fn take(
        waiting: Option<&mut VecDeque<GivenLabel>>,
        index: usize,
        profile: &Profile,
        t: Time,
        out: &mut Vec<Example>,
    ) {
        let Some(waiting) = waiting else { return };
        while waiting.front().is_some_and(|l| l.time < t) {
            let l = waiting.pop_front().expect("checked");
            out.push(Example {
                person: index,
                time: l.time,
                row: features::extract(profile, l.time),
                label: l.label,
            });
        }
    }
    let mut by_person: HashMap<PersonKey, VecDeque<GivenLabel>> = HashMap::new();
    let mut sorted = labels;
    sorted.sort_by_key(|l| l.time);
    for l in sorted {
        by_person.entry(l.person.clone()).or_default().push_back(l);
    }
    let mut people: People<Labeled> = People::default();
    let mut next_index = 0;
    let mut out = Vec::new();
    for event in events {
        let event = event?;
        let new = || {
            next_index += 1;
            Labeled {
                index: next_index - 1,
                profile: Profile::default(),
                last: Time(i64::MIN),
            }
        };
        let (person, state) = people.route(&event, new, |user, visitor| {
            // Labels before the login see each side as it was; later ones, the one person.
            let anonymous = event.linked.as_ref().expect("a link names the visitor");
            take(
                by_person.get_mut(&event.person),
                user.index,
                &user.profile,
                event.time,
                &mut out,
            );
            let (index, profile) = match &visitor {
                Some(v) => (v.index, v.profile.clone()),
                None => (usize::MAX, Profile::default()),
            };
            take(
                by_person.get_mut(anonymous),
                index,
                &profile,
                event.time,
                &mut out,
            );
            if let Some(rest) = by_person.remove(anonymous) {
                let mine = by_person.entry(event.person.clone()).or_default();
                let mut all: Vec<GivenLabel> = mine.drain(..).chain(rest).collect();
                all.sort_by_key(|l| l.time);
                *mine = all.into();
            }
            if let Some(v) = visitor {
                user.profile.merge(v.profile);
                user.last = user.last.max(v.last);
            }
        });
        if event.time < state.last {
            bail!(
                "event {:?} is older than the person's previous event",
                event.id
            );
        }
        take(
            by_person.get_mut(&person),
            state.index,
            &state.profile,
            event.time,
            &mut out,
        );
        state.profile.apply(&event);
        state.last = event.time;
    }
    for (key, waiting) in by_person {
        let (index, profile) = match people.get(&key) {
            Some(st) => (st.index, st.profile.clone()),
            None => (usize::MAX, Profile::default()),
        };
        for l in waiting {
            out.push(Example {
                person: index,
                time: l.time,
                row: features::extract(&profile, l.time),
                label: l.label,
            });
        }
    }
    out.sort_by_key(|e| (e.time, e.person));
    Ok(out)
}

/// A split by time: the earliest examples train, later ones validate, the latest test.
pub struct Split<'a> {
    pub train: Vec<&'a Example>,
    pub valid: Vec<&'a Example>,
    pub test: Vec<&'a Example>,
}

impl<'a> Split<'a> {
    /// `examples` must be sorted by time. 70% / 15% / 15% by count, cut at time
    /// boundaries so that no two examples of the same instant fall on both sides.
    pub fn by_time(examples: &'a [Example]) -> Split<'a> {
        let cut = |share: f64| {
            let at = ((examples.len() as f64) * share) as usize;
            let t = examples.get(at).map(|e| e.time);
            examples.partition_point(|e| Some(e.time) < t)
        };
        let (a, b) = (cut(0.70), cut(0.85));
        Split {
            train: examples[..a].iter().collect(),
            valid: examples[a..b].iter().collect(),
            test: examples[b..].iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nudge::event::Properties;
    use nudge::time::MINUTE_MS;

    const T: Time = Time(1_772_445_600_000);

    fn at(id: &str, person: &str, kind: EventKind, t: Time) -> Event {
        Event {
            id: id.into(),
            person: PersonKey::User(person.into()),
            linked: None,
            kind,
            time: t,
            properties: Properties {
                order_value: Some(10.0),
                ..Properties::default()
            },
            attributes: Default::default(),
        }
    }

    fn build(events: &[Event], end: Time) -> (Vec<Example>, Vec<Example>) {
        let mut b = Builder::default();
        events.iter().for_each(|e| b.push(e).unwrap());
        b.finish(Some(end))
    }

    #[test]
    fn labels_look_only_forward_and_censor_at_the_end() {
        let events = [
            at("1", "a", EventKind::PageView, T),
            at("2", "a", EventKind::PageView, T.plus_ms(MINUTE_MS)),
            at("3", "a", EventKind::Purchase, T.plus_ms(23 * HOUR_MS)),
            // A visit 40 days later: the session before it churned (40 > 30).
            at("4", "a", EventKind::PageView, T.plus_ms(40 * DAY_MS)),
            at("5", "a", EventKind::PageView, T.plus_ms(50 * DAY_MS)),
        ];
        let (purchase, churn) = build(&events, T.plus_ms(60 * DAY_MS));
        let labels: Vec<(i64, bool)> = purchase
            .iter()
            .map(|e| (e.time.since(T) / MINUTE_MS, e.label))
            .collect();
        // Both page views see the purchase within 24 hours; the purchase itself does not
        // see itself; the later views see none.
        assert_eq!(
            labels,
            [
                (0, true),
                (1, true),
                (23 * 60, false),
                (40 * 1440, false),
                (50 * 1440, false)
            ]
        );
        let churn: Vec<(i64, bool)> = churn
            .iter()
            .map(|e| (e.time.since(T) / DAY_MS, e.label))
            .collect();
        // Sessions end at minute 1 (the purchase visit 23 hours later: no churn), at hour 23
        // (next visit day 40: churned), day 40 and day 50. The last two are censored — 30
        // days after them pass the end of history (day 60) — even though the visit on day 50
        // already shows that day 40 did not churn: keeping only outcomes that showed early
        // would bias the latest examples.
        assert_eq!(churn, [(0, false), (0, true)]);
    }

    #[test]
    fn events_after_t_never_change_an_example_taken_at_t() {
        let history: Vec<Event> = (0..200)
            .map(|i| {
                let kind = [
                    EventKind::PageView,
                    EventKind::ProductView,
                    EventKind::AddToCart,
                    EventKind::Purchase,
                ][i % 4];
                let mut e = at(
                    &i.to_string(),
                    ["a", "b", "c"][i % 3],
                    kind,
                    T.plus_ms(i as i64 * 37 * MINUTE_MS),
                );
                e.properties.product_id = Some(format!("p{}", i % 7));
                e
            })
            .collect();
        let cut = T.plus_ms(100 * 37 * MINUTE_MS);
        let end = T.plus_ms(200 * DAY_MS);
        // The history up to t, then the same with 99 more events after t.
        let (before, _) = build(&history[..101], end);
        let (after, _) = build(&history, end);
        let upto = |xs: &[Example]| {
            xs.iter()
                .filter(|e| e.time <= cut)
                .map(|e| (e.person, e.time, e.row.0.map(f64::to_bits)))
                .collect::<Vec<_>>()
        };
        assert!(!upto(&before).is_empty());
        assert_eq!(
            upto(&before),
            upto(&after),
            "features at t depend only on events up to t"
        );
    }

    #[test]
    fn a_login_stitches_the_visitor_into_the_user_for_features_and_labels() {
        let anonymous = |id: &str, kind, t| Event {
            person: PersonKey::Anonymous("a".into()),
            ..at(id, "-", kind, t)
        };
        let mut cart = anonymous("2", EventKind::AddToCart, T.plus_ms(MINUTE_MS));
        cart.properties.product_id = Some("p".into());
        cart.properties.price = Some(5.0);
        let login = Event {
            linked: Some(PersonKey::Anonymous("a".into())),
            ..at("3", "u", EventKind::PageView, T.plus_ms(2 * MINUTE_MS))
        };
        let events = [
            anonymous("1", EventKind::PageView, T),
            cart,
            login,
            at("4", "u", EventKind::Purchase, T.plus_ms(3 * HOUR_MS)),
        ];
        let mut b = Builder::default();
        events.iter().take(3).for_each(|e| b.push(e).unwrap());
        let now = T.plus_ms(3 * MINUTE_MS);
        let user = b.features(&PersonKey::User("u".into()), now).unwrap();
        assert_eq!(
            user.get(nudge::features::Feature::CartItems),
            1.0,
            "the visitor's cart is the user's"
        );
        assert_eq!(
            b.features(&PersonKey::Anonymous("a".into()), now)
                .map(|r| r.0.map(f64::to_bits)),
            Some(user.0.map(f64::to_bits)),
            "the visitor's id reaches the user"
        );
        assert_eq!(b.links(), (1, 0));
        b.push(&events[3]).unwrap();
        let (purchase, _) = b.finish(Some(T.plus_ms(10 * DAY_MS)));
        let labels: Vec<(i64, bool)> = purchase
            .iter()
            .map(|e| (e.time.since(T) / MINUTE_MS, e.label))
            .collect();
        // The visitor's examples see the purchase the user made after logging in.
        assert_eq!(labels, [(0, true), (1, true), (2, true), (180, false)]);
    }

    #[test]
    fn out_of_order_events_of_a_person_are_refused() {
        let mut b = Builder::default();
        b.push(&at("1", "a", EventKind::PageView, T)).unwrap();
        b.push(&at("2", "b", EventKind::PageView, T.plus_ms(-1)))
            .unwrap();
        assert!(b
            .push(&at("3", "a", EventKind::PageView, T.plus_ms(-1)))
            .is_err());
    }

    #[test]
    fn given_labels_take_features_as_of_their_time() {
        let events = vec![
            Ok(at("1", "a", EventKind::PageView, T)),
            Ok(at("2", "a", EventKind::Purchase, T.plus_ms(HOUR_MS))),
        ];
        let labels = vec![
            GivenLabel {
                person: PersonKey::User("a".into()),
                time: T.plus_ms(MINUTE_MS),
                label: true,
            },
            GivenLabel {
                person: PersonKey::User("a".into()),
                time: T.plus_ms(2 * HOUR_MS),
                label: false,
            },
        ];
        let examples = examples_for_labels(events.into_iter(), labels).unwrap();
        let purchases = nudge::features::Feature::LifetimePurchases;
        let seen: Vec<(bool, f64)> = examples
            .iter()
            .map(|e| (e.label, e.row.get(purchases)))
            .collect();
        assert_eq!(seen, [(true, 0.0), (false, 1.0)]);
    }
}
