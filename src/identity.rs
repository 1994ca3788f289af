//! Who is who: pseudonymization of raw identifiers, and the aliases that make an anonymous
//! visitor who logged in one person with the known user.
//!
//! Aliases always point from an anonymous key to a user key, and user keys are never
//! aliases, so resolving takes one lookup and chains (several devices of one user, merged
//! one after another) need nothing more. Merging two different known users is refused.

use std::collections::HashMap;
use std::sync::RwLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::event::{Event, PersonKey};

/// Replaces raw identifiers (user ids, device ids, event ids) by HMAC-SHA256 under a secret
/// key before anything is stored or logged. Without a key, identifiers pass unchanged.
#[derive(Clone, Default)]
pub struct Pseudonymizer {
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Pseudonymizer")
            .field("enabled", &self.key.is_some())
            .finish()
    }
}

impl Pseudonymizer {
    pub fn new(key: Option<Vec<u8>>) -> Pseudonymizer {
        Pseudonymizer { key }
    }

    fn hash(&self, id: &str) -> Option<String> {
        let key = self.key.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    pub fn person(&self, person: PersonKey) -> PersonKey {
        match person {
            PersonKey::User(id) => PersonKey::User(self.hash(&id).unwrap_or(id)),
            PersonKey::Anonymous(id) => PersonKey::Anonymous(self.hash(&id).unwrap_or(id)),
        }
    }

    /// Pseudonymizes every identifier of an event.
    pub fn event(&self, mut event: Event) -> Event {
        if self.key.is_none() {
            return event;
        }
        event.person = self.person(event.person);
        event.linked = event.linked.map(|p| self.person(p));
        event.id = self.hash(&event.id).unwrap_or(event.id);
        event
    }
}

/// What linking an anonymous visitor to a known user does to the aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// A new alias was set: the visitor's profile must now be folded into the user's
    /// (`Profile::merge`, the user's profile taking the visitor's).
    New,
    /// The visitor already belongs to this user: nothing changes.
    Already,
}

/// Why a link was refused. Either way the event still belongs to the user it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefused {
    #[error("only an anonymous id can be merged into a user id; two known users are never merged")]
    NotAnonymousToUser,
    #[error("the anonymous id already belongs to another user; two known users are never merged")]
    OtherUser,
}

/// Links `anonymous` to `user` in `aliases` if the rules allow it: only an anonymous key is
/// ever an alias, only of a user key, and an anonymous key already linked to one user is
/// never linked to another. The one decision the server's merges and the trainer's replay
/// both take, so that training stitches identities exactly as serving does.
pub fn link(
    aliases: &mut HashMap<PersonKey, PersonKey>,
    anonymous: &PersonKey,
    user: &PersonKey,
) -> Result<Link, LinkRefused> {
    let (PersonKey::Anonymous(_), PersonKey::User(_)) = (anonymous, user) else {
        return Err(LinkRefused::NotAnonymousToUser);
    };
    match aliases.get(anonymous) {
        Some(current) if current == user => Ok(Link::Already),
        Some(_) => Err(LinkRefused::OtherUser),
        None => {
            aliases.insert(anonymous.clone(), user.clone());
            Ok(Link::New)
        }
    }
}

/// The aliases in force: anonymous key → the person it belongs to.
#[derive(Debug, Default)]
pub struct Identities {
    aliases: RwLock<HashMap<PersonKey, PersonKey>>,
}

/// What resolving needs while routing: a read guard, so that no merge changes an alias
/// between resolving a key and queueing the work for its owner.
pub struct Resolver<'a> {
    aliases: std::sync::RwLockReadGuard<'a, HashMap<PersonKey, PersonKey>>,
}

impl Resolver<'_> {
    /// The person a key names: its alias target, or itself.
    pub fn resolve(&self, key: &PersonKey) -> PersonKey {
        self.aliases.get(key).unwrap_or(key).clone()
    }

    pub fn alias_of(&self, key: &PersonKey) -> Option<&PersonKey> {
        self.aliases.get(key)
    }
}

impl Identities {
    pub fn new(aliases: impl IntoIterator<Item = (PersonKey, PersonKey)>) -> Identities {
        Identities {
            aliases: RwLock::new(aliases.into_iter().collect()),
        }
    }

    pub fn read(&self) -> Resolver<'_> {
        Resolver {
            aliases: self.aliases.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PersonKey, PersonKey>> {
        self.aliases.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.read().aliases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets `person` as an alias and every alias pointing at it (erasure).
    pub fn forget(&self, person: &PersonKey) {
        let mut aliases = self.write();
        aliases.remove(person);
        aliases.retain(|_, target| target != person);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_keyed_stable_and_hide_the_raw_id() {
        let a = Pseudonymizer::new(Some(b"secret-1".to_vec()));
        let b = Pseudonymizer::new(Some(b"secret-2".to_vec()));
        let email = PersonKey::User("jane@example.com".into());
        let pa = a.person(email.clone());
        assert_eq!(pa, a.person(email.clone()), "stable");
        assert_ne!(pa, b.person(email.clone()), "keyed");
        let PersonKey::User(id) = &pa else { panic!() };
        assert_eq!(id.len(), 64);
        assert!(!id.contains("jane"));
        assert_eq!(Pseudonymizer::default().person(email.clone()), email);
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[test]
    fn links_go_from_an_anonymous_id_to_one_user_only() {
        let (jane, joe) = (
            PersonKey::User("jane".into()),
            PersonKey::User("joe".into()),
        );
        let phone = PersonKey::Anonymous("phone".into());
        let mut aliases = HashMap::new();
        let check = |aliases: &mut HashMap<_, _>, from: &PersonKey, to: &PersonKey, want| {
            assert_eq!(link(aliases, from, to), want, "{from:?} -> {to:?}");
        };
        check(&mut aliases, &phone, &jane, Ok(Link::New));
        check(&mut aliases, &phone, &jane, Ok(Link::Already));
        check(&mut aliases, &phone, &joe, Err(LinkRefused::OtherUser));
        check(
            &mut aliases,
            &joe,
            &jane,
            Err(LinkRefused::NotAnonymousToUser),
        );
        check(
            &mut aliases,
            &phone,
            &phone,
            Err(LinkRefused::NotAnonymousToUser),
        );
        assert_eq!(
            aliases,
            HashMap::from([(phone, jane)]),
            "refusals change nothing"
        );
    }

    #[test]
    fn aliases_resolve_in_one_step_and_erasure_forgets_them() {
        let user = PersonKey::User("u".into());
        let phone = PersonKey::Anonymous("phone".into());
        let laptop = PersonKey::Anonymous("laptop".into());
        let ids = Identities::new([
            (phone.clone(), user.clone()),
            (laptop.clone(), user.clone()),
        ]);
        assert_eq!(ids.read().resolve(&phone), user);
        assert_eq!(ids.read().resolve(&user), user);
        ids.forget(&user);
        assert!(ids.is_empty());
    }
}
