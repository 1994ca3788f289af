//! Durable state on local disk: profiles, identity aliases and idempotency records, in one
//! embedded fjall database (an LSM tree with a write-ahead journal).
//!
//! Why fjall: it is crash-safe (the journal is replayed on open), it commits writes to
//! several keyspaces atomically in one batch — so an event's profile change and its
//! idempotency record land together or not at all — and deleted data leaves the files at
//! compaction, which erasure needs. redb, the other well-kept choice, rewrites B-tree pages
//! copy-on-write and does not promise that freed pages are ever overwritten.
//!
//! Durability: with [`SyncMode::Always`] every commit is fsynced before it returns, so an
//! acknowledged event survives power loss; callers batch many events into one commit (group
//! commit). With [`SyncMode::Interval`] commits reach the OS before they return (they survive
//! a crash of the process) and are fsynced every interval, so power loss may lose up to one
//! interval.

use std::path::Path;
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::event::PersonKey;
use crate::profile::Profile;
use crate::time::Time;

/// The version byte in front of every stored profile.
const PROFILE_FORMAT: u8 = 1;

/// When commits are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Before every commit returns.
    Always,
    /// In the background, every so often.
    Interval(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Fjall(#[from] fjall::Error),
    #[error("store: a stored profile does not decode: {0}")]
    Corrupt(String),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
}

/// A change to commit, one of several in a batch.
#[derive(Debug)]
pub enum Write {
    Profile(PersonKey, Box<Profile>),
    DeleteProfile(PersonKey),
    /// An event id seen for a person, at `now`.
    Seen(PersonKey, String, Time),
    /// `anonymous` is now known as `person`.
    Alias {
        anonymous: PersonKey,
        person: PersonKey,
    },
    /// Moves a person's idempotency records to another (after a merge).
    MoveSeen {
        from: PersonKey,
        to: PersonKey,
    },
    /// Removes a person's idempotency records and every alias that points at them.
    Forget(PersonKey),
}

/// The database and its keyspaces.
pub struct Store {
    db: Database,
    profiles: Keyspace,
    /// anonymous key → person key.
    aliases: Keyspace,
    /// person prefix + anonymous key → nothing: the aliases of a person, for erasure.
    members: Keyspace,
    /// person prefix + event id → time seen.
    seen: Keyspace,
    sync: SyncMode,
}

/// A person's key as bytes: a tag and the id.
fn key(person: &PersonKey) -> Vec<u8> {
    let (tag, id) = match person {
        PersonKey::User(id) => (b'u', id),
        PersonKey::Anonymous(id) => (b'a', id),
    };
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(tag);
    k.extend_from_slice(id.as_bytes());
    k
}

fn person_from(bytes: &[u8]) -> Option<PersonKey> {
    let (tag, id) = bytes.split_first()?;
    let id = String::from_utf8(id.to_vec()).ok()?;
    match tag {
        b'u' => Some(PersonKey::User(id)),
        b'a' => Some(PersonKey::Anonymous(id)),
        _ => None,
    }
}

/// A length-prefixed person key, so that one person's prefix is never another's.
fn prefix(person: &PersonKey) -> Vec<u8> {
    let k = key(person);
    let mut p = Vec::with_capacity(k.len() + 2);
    p.extend_from_slice(&(k.len() as u16).to_be_bytes());
    p.extend_from_slice(&k);
    p
}

/// Where a vacuum puts the old database while it swaps in the new one.
fn aside_path(dir: &Path) -> std::path::PathBuf {
    dir.with_extension("vacuum-old")
}

fn seen_key(person: &PersonKey, event_id: &str) -> Vec<u8> {
    let mut k = prefix(person);
    k.extend_from_slice(event_id.as_bytes());
    k
}

impl Store {
    /// Opens (or creates) the database in `dir`, replaying its journal.
    pub fn open(dir: &Path, sync: SyncMode) -> Result<Store, StoreError> {
        // A vacuum that stopped between its two renames left the old database aside.
        let aside = aside_path(dir);
        if !dir.exists() && aside.exists() {
            std::fs::rename(&aside, dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir).open()?;
        let open = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        Ok(Store {
            profiles: open("profiles")?,
            aliases: open("aliases")?,
            members: open("members")?,
            seen: open("seen")?,
            db,
            sync,
        })
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.sync
    }

    pub fn load_profile(&self, person: &PersonKey) -> Result<Option<Profile>, StoreError> {
        let Some(bytes) = self.profiles.get(key(person))? else {
            return Ok(None);
        };
        match bytes.split_first() {
            Some((&PROFILE_FORMAT, body)) => postcard::from_bytes(body)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
            Some((version, _)) => Err(StoreError::Corrupt(format!(
                "unknown profile format {version}"
            ))),
            None => Err(StoreError::Corrupt("empty profile record".into())),
        }
    }

    /// When `event_id` was seen for `person`, if it was.
    pub fn seen_at(&self, person: &PersonKey, event_id: &str) -> Result<Option<Time>, StoreError> {
        Ok(self.seen.get(seen_key(person, event_id))?.and_then(|v| {
            let bytes: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(Time(i64::from_be_bytes(bytes)))
        }))
    }

    /// Every alias: (anonymous key, the person it belongs to).
    pub fn aliases(&self) -> Result<Vec<(PersonKey, PersonKey)>, StoreError> {
        let mut out = Vec::new();
        for item in self.aliases.iter() {
            let (k, v) = item.into_inner()?;
            if let (Some(anonymous), Some(person)) = (person_from(&k), person_from(&v)) {
                out.push((anonymous, person));
            }
        }
        Ok(out)
    }

    /// How many profiles are stored (approximate; exact for insert-only workloads).
    pub fn approximate_profiles(&self) -> usize {
        self.profiles.approximate_len()
    }

    /// Commits every write atomically, with the configured durability.
    pub fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        for write in writes {
            match write {
                Write::Profile(person, profile) => {
                    let mut bytes = vec![PROFILE_FORMAT];
                    bytes.extend(
                        postcard::to_stdvec(&profile)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
                    batch.insert(&self.profiles, key(&person), bytes);
                }
                Write::DeleteProfile(person) => batch.remove(&self.profiles, key(&person)),
                Write::Seen(person, event_id, at) => {
                    batch.insert(&self.seen, seen_key(&person, &event_id), at.0.to_be_bytes())
                }
                Write::Alias { anonymous, person } => {
                    batch.insert(&self.aliases, key(&anonymous), key(&person));
                    let mut member = prefix(&person);
                    member.extend(key(&anonymous));
                    batch.insert(&self.members, member, []);
                }
                Write::MoveSeen { from, to } => {
                    let from_prefix = prefix(&from);
                    for item in self.seen.prefix(&from_prefix) {
                        let (k, v) = item.into_inner()?;
                        let event_id = &k[from_prefix.len()..];
                        let mut moved = prefix(&to);
                        moved.extend_from_slice(event_id);
                        batch.insert(&self.seen, moved, v);
                        batch.remove(&self.seen, k);
                    }
                }
                Write::Forget(person) => {
                    let p = prefix(&person);
                    for item in self.seen.prefix(&p) {
                        batch.remove(&self.seen, item.key()?);
                    }
                    for item in self.members.prefix(&p) {
                        let member = item.key()?;
                        batch.remove(&self.aliases, member[p.len()..].to_vec());
                        batch.remove(&self.members, member);
                    }
                    // The person may itself be an alias of someone.
                    batch.remove(&self.aliases, key(&person));
                }
            }
        }
        let batch = match self.sync {
            SyncMode::Always => batch.durability(Some(PersistMode::SyncData)),
            SyncMode::Interval(_) => batch,
        };
        batch.commit()?;
        Ok(())
    }

    /// Deletes idempotency records seen before `before`; returns how many.
    pub fn expire_seen(&self, before: Time) -> Result<usize, StoreError> {
        let mut batch = self.db.batch();
        for item in self.seen.iter() {
            let (k, v) = item.into_inner()?;
            let at = v
                .as_ref()
                .try_into()
                .map(|b: [u8; 8]| i64::from_be_bytes(b))
                .unwrap_or(i64::MIN);
            if at < before.0 {
                batch.remove(&self.seen, k);
            }
        }
        let n = batch.len();
        batch.commit()?;
        self.sync_now()?;
        Ok(n)
    }

    /// fsyncs everything committed so far.
    pub fn sync_now(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Writes every keyspace out to tables and compacts them fully, so deleted data leaves
    /// the files: the journal that still held it is dropped once everything is flushed.
    pub fn compact(&self) -> Result<(), StoreError> {
        self.sync_now()?;
        for keyspace in [&self.profiles, &self.aliases, &self.members, &self.seen] {
            keyspace.rotate_memtable_and_wait()?;
            keyspace.major_compact()?;
        }
        self.sync_now()
    }

    /// Rewrites the database in `dir` with only its live data, like SQLite's VACUUM: the
    /// files afterwards hold nothing that was deleted, whatever the journal still held.
    /// Offline: nothing else may have the database open.
    pub fn vacuum(dir: &Path) -> Result<(), StoreError> {
        let fresh_dir = dir.with_extension("vacuum");
        if fresh_dir.exists() {
            std::fs::remove_dir_all(&fresh_dir)?;
        }
        {
            let old = Store::open(dir, SyncMode::Always)?;
            let fresh = Store::open(&fresh_dir, SyncMode::Always)?;
            for (from, to) in [
                (&old.profiles, &fresh.profiles),
                (&old.aliases, &fresh.aliases),
                (&old.members, &fresh.members),
                (&old.seen, &fresh.seen),
            ] {
                let mut batch = fresh.db.batch();
                for item in from.iter() {
                    let (k, v) = item.into_inner()?;
                    batch.insert(to, k, v);
                    if batch.len() >= 10_000 {
                        std::mem::replace(&mut batch, fresh.db.batch()).commit()?;
                    }
                }
                batch.commit()?;
            }
            fresh.compact()?;
        }
        let aside = aside_path(dir);
        std::fs::rename(dir, &aside)?;
        std::fs::rename(&fresh_dir, dir)?;
        std::fs::remove_dir_all(&aside)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind, Properties};

    fn person(id: &str) -> PersonKey {
        PersonKey::User(id.into())
    }

    #[test]
    fn profiles_aliases_and_seen_records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut profile = Profile::default();
        profile.apply(&Event {
            id: "e1".into(),
            person: person("u1"),
            linked: None,
            kind: EventKind::PageView,
            time: Time(1_772_445_600_000),
            properties: Properties::default(),
            attributes: Default::default(),
        });
        {
            let store = Store::open(dir.path(), SyncMode::Always).unwrap();
            store
                .commit(vec![
                    Write::Profile(person("u1"), Box::new(profile.clone())),
                    Write::Seen(person("u1"), "e1".into(), Time(7)),
                    Write::Alias {
                        anonymous: PersonKey::Anonymous("a1".into()),
                        person: person("u1"),
                    },
                ])
                .unwrap();
        }
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        assert_eq!(store.load_profile(&person("u1")).unwrap(), Some(profile));
        assert_eq!(store.seen_at(&person("u1"), "e1").unwrap(), Some(Time(7)));
        assert_eq!(store.seen_at(&person("u1"), "e2").unwrap(), None);
        assert_eq!(store.seen_at(&person("u10"), "e1").unwrap(), None);
        assert_eq!(
            store.aliases().unwrap(),
            vec![(PersonKey::Anonymous("a1".into()), person("u1"))]
        );

        store
            .commit(vec![Write::MoveSeen {
                from: person("u1"),
                to: person("u2"),
            }])
            .unwrap();
        assert_eq!(store.seen_at(&person("u2"), "e1").unwrap(), Some(Time(7)));
        assert_eq!(store.seen_at(&person("u1"), "e1").unwrap(), None);

        store
            .commit(vec![
                Write::DeleteProfile(person("u1")),
                Write::Forget(person("u1")),
            ])
            .unwrap();
        assert_eq!(store.load_profile(&person("u1")).unwrap(), None);
        assert!(store.aliases().unwrap().is_empty());
        assert_eq!(store.expire_seen(Time(8)).unwrap(), 1);
        assert_eq!(store.seen_at(&person("u2"), "e1").unwrap(), None);
    }
}
