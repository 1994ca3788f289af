//! Identity stitching in the trainer's replay, as the server does it: an event that carries
//! both a user id and an anonymous id links the anonymous visitor to the user through the
//! server's own rule ([`nudge::identity::link`]: an anonymous id already linked to one user
//! is never linked to another, two users are never merged), and a new link folds the
//! visitor's state into the user's — `Profile::merge`, the user's profile taking the
//! visitor's — before the event itself is applied, which is where the server merges too.
//! From then on events under either id reach the one person.

use std::collections::HashMap;

use nudge::event::{Event, PersonKey};
use nudge::identity::{self, Link};

/// Every person's replay state `S`, reached through the aliases in force.
#[derive(Debug)]
pub struct People<S> {
    aliases: HashMap<PersonKey, PersonKey>,
    states: HashMap<PersonKey, S>,
    /// Links refused by the rule (the event still counts for the user it names).
    pub refused_links: usize,
    /// Links made (new aliases).
    pub links: usize,
}

impl<S> Default for People<S> {
    fn default() -> Self {
        People {
            aliases: HashMap::new(),
            states: HashMap::new(),
            refused_links: 0,
            links: 0,
        }
    }
}

impl<S> People<S> {
    /// The person `key` names: its alias target, or itself.
    pub fn resolve<'a>(&'a self, key: &'a PersonKey) -> &'a PersonKey {
        self.aliases.get(key).unwrap_or(key)
    }

    /// The state of the person `key` names, if any event reached them.
    pub fn get(&self, key: &PersonKey) -> Option<&S> {
        self.states.get(self.resolve(key))
    }

    /// Routes an event: first stitches (when it carries an anonymous id beside its user id
    /// and the rule allows a new link, `absorb(user's state, visitor's state)` folds the
    /// visitor in — `None` when no event reached the visitor — the user's state made by
    /// `new` if they had none, as the server's merge loads or creates the user's profile),
    /// then answers the person the event belongs to and their state, made by `new` if this
    /// is their first event.
    pub fn route(
        &mut self,
        event: &Event,
        mut new: impl FnMut() -> S,
        absorb: impl FnOnce(&mut S, Option<S>),
    ) -> (PersonKey, &mut S) {
        if let Some(anonymous) = &event.linked {
            match identity::link(&mut self.aliases, anonymous, &event.person) {
                Ok(Link::New) => {
                    self.links += 1;
                    let visitor = self.states.remove(anonymous);
                    let user = self
                        .states
                        .entry(event.person.clone())
                        .or_insert_with(&mut new);
                    absorb(user, visitor);
                }
                Ok(Link::Already) => {}
                Err(_) => self.refused_links += 1,
            }
        }
        let person = self.resolve(&event.person).clone();
        let state = self.states.entry(person.clone()).or_insert_with(new);
        (person, state)
    }

    /// Every person and their state, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&PersonKey, &S)> {
        self.states.iter()
    }

    pub fn into_states(self) -> impl Iterator<Item = (PersonKey, S)> {
        self.states.into_iter()
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nudge::event::{EventKind, Properties};
    use nudge::time::Time;

    fn event(user: &str, anonymous: &str) -> Event {
        Event {
            id: "e".into(),
            person: PersonKey::from_ids(user, anonymous).unwrap(),
            linked: (!user.is_empty() && !anonymous.is_empty())
                .then(|| PersonKey::Anonymous(anonymous.into())),
            kind: EventKind::PageView,
            time: Time(0),
            properties: Properties::default(),
            attributes: Default::default(),
        }
    }

    /// Replays (user id, anonymous id) pairs, each state the list of ids its events
    /// carried, and answers who ended up with what.
    fn check(events: &[(&str, &str)], expected: &[(&str, &[&str])], refused: usize) {
        let mut people: People<Vec<String>> = People::default();
        for (user, anonymous) in events {
            let (_, state) = people.route(&event(user, anonymous), Vec::new, |u, v| {
                u.extend(v.into_iter().flatten())
            });
            state.push(format!("{user}/{anonymous}"));
        }
        let mut got: Vec<(String, Vec<String>)> = people
            .iter()
            .map(|(k, v)| (format!("{k:?}"), v.clone()))
            .collect();
        got.sort();
        let mut want: Vec<(String, Vec<String>)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(people.refused_links, refused);
    }

    #[test]
    fn visitors_join_their_user_once_and_never_another() {
        // Browsing, the login, then both ids reach the user.
        check(
            &[("", "a"), ("u", "a"), ("", "a"), ("u", "")],
            &[(r#"User("u")"#, &["/a", "u/a", "/a", "u/"])],
            0,
        );
        // A second device joins the same user; a login whose user had no events yet
        // creates them.
        check(
            &[("", "a"), ("", "b"), ("u", "a"), ("u", "b")],
            &[(r#"User("u")"#, &["/a", "u/a", "/b", "u/b"])],
            0,
        );
        // A device already linked to u stays u's: v's login there is refused, the event is
        // still v's, and later anonymous events stay with u.
        check(
            &[("", "a"), ("u", "a"), ("v", "a"), ("", "a")],
            &[
                (r#"User("u")"#, &["/a", "u/a", "/a"]),
                (r#"User("v")"#, &["v/a"]),
            ],
            1,
        );
    }
}
