//! Examples from histories: replay each person's events through the server's own
//! `Profile`/`features` code, taking a feature row after every event with the event's time
//! as `now`, and label it from that person's later events only.

use nudge::event::{Event, EventKind};
use nudge::features::{self, FeatureRow};
use nudge::profile::{Profile, SESSION_TIMEOUT_MS};
use nudge::time::{Time, DAY_MS, HOUR_MS};

use crate::simulate::History;

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

    /// Whether examples are taken at every event, or only where a session ends. Purchase
    /// scores are read live during sessions; churn is a question about a person between
    /// visits, and examples at every click would drown it in the most active people.
    pub const fn at_session_ends_only(self) -> bool {
        matches!(self, Target::Churn30d)
    }

    /// The label at `t` from the events strictly after it (`future`, in time order), or
    /// `None` when the history ends before the label's horizon does (censored).
    pub fn label(self, t: Time, future: &[Event], history_end: Time) -> Option<bool> {
        let until = t.plus_ms(self.horizon_ms());
        if until > history_end {
            return None;
        }
        let within = future.iter().take_while(|e| e.time <= until);
        Some(match self {
            Target::Purchase24h => within.clone().any(|e| e.kind == EventKind::Purchase),
            Target::Churn30d => !within.clone().any(|e| e.kind.is_visit()),
        })
    }
}

/// Feature rows with one label per target, and who each row belongs to.
#[derive(Default)]
pub struct Examples {
    pub rows: Vec<FeatureRow>,
    /// `labels[target][i]` for `Target::ALL`, `None` where censored.
    pub labels: [Vec<Option<bool>>; 2],
    /// The index of the history each row came from.
    pub person: Vec<usize>,
    /// Whether the row was taken at the last event of a session.
    pub session_end: Vec<bool>,
}

/// Replays every history and takes an example after each event.
pub fn examples(histories: &[History], history_end: Time) -> Examples {
    let mut out = Examples::default();
    for (p, history) in histories.iter().enumerate() {
        let mut profile = Profile::default();
        for (i, event) in history.events.iter().enumerate() {
            profile.apply(event);
            // Several events can share a timestamp; the label looks only past all of them.
            let future_start = history.events[i + 1..]
                .iter()
                .position(|e| e.time > event.time)
                .map_or(history.events.len(), |k| i + 1 + k);
            let future = &history.events[future_start..];
            out.rows.push(features::extract(&profile, event.time));
            for (k, target) in Target::ALL.iter().enumerate() {
                out.labels[k].push(target.label(event.time, future, history_end));
            }
            out.person.push(p);
            let next_visit = future.iter().find(|e| e.kind.is_visit());
            out.session_end.push(
                event.kind.is_visit()
                    && next_visit.is_none_or(|n| n.time.since(event.time) >= SESSION_TIMEOUT_MS),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nudge::event::{PersonKey, Properties};
    use nudge::time::MINUTE_MS;

    fn at(kind: EventKind, t: Time) -> Event {
        Event {
            id: "e".into(),
            person: PersonKey::User("u".into()),
            linked: None,
            kind,
            time: t,
            properties: Properties::default(),
            attributes: Default::default(),
        }
    }

    #[test]
    fn labels_look_only_forward_and_censor_at_the_end() {
        let t = Time(1_772_445_600_000);
        let end = t.plus_ms(60 * DAY_MS);
        let buy_soon = [at(EventKind::Purchase, t.plus_ms(23 * HOUR_MS))];
        let buy_late = [at(EventKind::Purchase, t.plus_ms(25 * HOUR_MS))];
        assert_eq!(Target::Purchase24h.label(t, &buy_soon, end), Some(true));
        assert_eq!(Target::Purchase24h.label(t, &buy_late, end), Some(false));
        let email_only = [at(EventKind::EmailOpen, t.plus_ms(DAY_MS))];
        let visit = [at(EventKind::PageView, t.plus_ms(29 * DAY_MS))];
        assert_eq!(Target::Churn30d.label(t, &email_only, end), Some(true));
        assert_eq!(Target::Churn30d.label(t, &visit, end), Some(false));
        // The horizon runs past the end of history: no label.
        assert_eq!(
            Target::Churn30d.label(t.plus_ms(31 * DAY_MS), &[], end),
            None
        );
        assert_eq!(
            Target::Purchase24h.label(end.plus_ms(-MINUTE_MS), &[], end),
            None
        );
    }
}
