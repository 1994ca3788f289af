//! Durable state on local disk, in one embedded fjall database (an LSM tree with a
//! write-ahead journal): profiles, identity aliases, idempotency records, trigger states,
//! the timer index, the audit of trigger decisions, the outbox of delivered triggers,
//! experiment totals, consumer cursors and dead letters.
//!
//! The engine hands the store data, not calls: a list of [`Write`]s committed as one atomic
//! batch, applied in order — a [`Write::Forget`] or [`Write::MoveSeen`] also covers the
//! records written earlier in the same batch.
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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use fjall::{AbstractTree as _, Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::config::{StoreConfig, SyncPolicy};
use crate::event::PersonKey;
use crate::profile::Profile;
use crate::time::Time;
use crate::trigger::state::{AuditDetail, AuditEntry, OutcomeTotals, TriggerState};

/// The version byte in front of every stored profile. Format 1 (a checkout flag in the
/// cart instead of its times) and format 2 (categories by views only, no product memory)
/// are still read, through `profile::v1` and `profile::v2`.
const PROFILE_FORMAT: u8 = 3;
/// The version byte in front of every stored trigger state; its own, so that a new
/// profile format does not invalidate trigger states, nor the other way round.
const TRIGGER_STATE_FORMAT: u8 = 1;

/// When Nudge writes the memtables out to tables: once they hold this many items, or
/// [`MAX_UNFLUSHED_BYTES`]. Together with [`MAX_JOURNALING_BYTES`] this bounds how long the
/// store takes to recover after a crash.
///
/// On open, fjall 3 replays every journal file still on disk, item by item: it looks the
/// item's keyspace up in its meta tree (a point read, about half the replay time in a
/// profile) and, unless that keyspace has the item in a table already, inserts it into the
/// memtable. A journal is sealed only at a flush once it is past 64 MB, a keyspace flushes
/// only when its memtable reaches 64 MiB, and a sealed journal is deleted only when every
/// keyspace with data in it has flushed — up to 512 MiB of journals by default. So a small
/// store (300 people) never flushed, its journal grew across restarts, and every restart
/// replayed all of it: over 30 kill -9 restarts during ingest, recovery took up to 9.3 s
/// (p50 3.1 s), about 85 ms per MiB of journal whose data was in no table yet and 30 ms per
/// MiB when it was (on 2 shared cores). With memtables written out at these bounds, every
/// keyspace at once (a keyspace that keeps data in memory keeps the journal holding it),
/// journals are sealed at 64 MB and deleted soon after: a recovery replays about one
/// journal, most of it already in tables (max 2.7 s, p50 1.5 s over the same 30 kills; see
/// benches/restart.rs). Below that, fjall's fixed 64 MB journal is the floor.
const MAX_UNFLUSHED_ITEMS: usize = 250_000;
/// The byte bound beside [`MAX_UNFLUSHED_ITEMS`] (fjall's estimate of the memtables' size).
const MAX_UNFLUSHED_BYTES: u64 = 32 * 1024 * 1024;
/// fjall's background workers, which flush memtables and compact tables. Its default is
/// one per CPU, up to four. With one CPU (a small container, or a pinned process) one
/// worker does both: a compaction holds the flushes up, sealed memtables pile up, and at
/// four in a keyspace fjall halts every write to it for 100 ms at a time (its
/// backpressure). Under the overload benchmark on one CPU that made the group commits'
/// p99 50–100 ms; with four workers it is 10–25 ms. Their work is mostly I/O.
const WORKER_THREADS: usize = 4;
/// The journals fjall keeps before it writes out the keyspaces that hold the oldest one:
/// its smallest allowed limit (the default is 512 MiB), a backstop to the bounds above.
const MAX_JOURNALING_BYTES: u64 = 64 * 1024 * 1024;

/// A record as stored: its format byte, then postcard.
fn encode<T: serde::Serialize>(format: u8, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = vec![format];
    postcard::to_io(value, &mut bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(bytes)
}

/// A profile or trigger state encoded for the store ahead of its commit: the shard hands
/// the bytes of what it keeps in its cache to the batch instead of a clone of it.
#[derive(Debug)]
pub struct Record<T> {
    bytes: Vec<u8>,
    of: std::marker::PhantomData<fn() -> T>,
}

impl Record<Profile> {
    pub fn profile(profile: &Profile) -> Result<Record<Profile>, StoreError> {
        Record::encode(PROFILE_FORMAT, profile)
    }
}

impl Record<TriggerState> {
    /// The record of a person's trigger state; `None` for an empty state, which deletes it.
    pub fn triggers(state: &TriggerState) -> Result<Option<Record<TriggerState>>, StoreError> {
        if state.is_empty() {
            return Ok(None);
        }
        Record::encode(TRIGGER_STATE_FORMAT, state).map(Some)
    }
}

impl<T: serde::Serialize> Record<T> {
    fn encode(format: u8, value: &T) -> Result<Record<T>, StoreError> {
        Ok(Record {
            bytes: encode(format, value)?,
            of: std::marker::PhantomData,
        })
    }
}

/// Decodes a record written by [`encode`] with the same format byte.
fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    format: u8,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&f, body)) if f == format => {
            postcard::from_bytes(body).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
        }
        Some((f, _)) => Err(StoreError::Corrupt(format!("{what}: unknown format {f}"))),
        None => Err(StoreError::Corrupt(format!("{what}: an empty record"))),
    }
}

/// When commits are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Before every commit returns.
    Always,
    /// In the background, every so often.
    Interval(Duration),
}

impl From<&StoreConfig> for SyncMode {
    fn from(config: &StoreConfig) -> SyncMode {
        match config.sync {
            SyncPolicy::Always => SyncMode::Always,
            SyncPolicy::Interval => {
                SyncMode::Interval(Duration::from_millis(config.sync_interval_ms))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Fjall(#[from] fjall::Error),
    #[error("store: a stored record does not decode: {0}")]
    Corrupt(String),
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    /// A write failed earlier; writes are refused until the store reopens.
    #[error("store: writes are refused until the store recovers from a failed write ({0})")]
    Faulted(String),
    /// Between closing and reopening, during recovery.
    #[error("store: the database is reopening")]
    Closed,
    /// A reopen found calls still using the old database; it is retried.
    #[error("store: the database is still in use; the reopen is retried")]
    Busy,
}

/// A change to commit, one of several in a batch.
#[derive(Debug)]
pub enum Write {
    Profile(PersonKey, Record<Profile>),
    DeleteProfile(PersonKey),
    /// An event id seen for a person, at `now`.
    Seen(PersonKey, String, Time),
    /// `anonymous` is now known as `person`.
    Alias {
        anonymous: PersonKey,
        person: PersonKey,
    },
    /// Moves a person's idempotency records and audit record to another (after a merge).
    MoveSeen {
        from: PersonKey,
        to: PersonKey,
    },
    /// Removes a person's idempotency records, audit record and every alias that points
    /// at them.
    Forget(PersonKey),
    /// A person's trigger state; `None` (an empty state) deletes the record.
    Triggers(PersonKey, Option<Record<TriggerState>>),
    /// A person has (`true`) or no longer has a timer due at a time.
    TimerIndex(Time, PersonKey, bool),
    /// A delivered trigger at its outbox sequence number (JSON).
    Outbox(u64, Vec<u8>),
    /// A trigger decision for the person's audit record, with a number that orders the
    /// decisions of one millisecond.
    Audit(PersonKey, Box<AuditEntry>, u64),
    /// One shard's running totals for an experiment variant.
    Outcome {
        rule: String,
        variant: String,
        shard: u16,
        totals: OutcomeTotals,
    },
    /// Nothing: what a write superseded within its batch becomes.
    Nothing,
}

/// The open database and its keyspaces.
struct Tables {
    db: Database,
    profiles: Keyspace,
    /// anonymous key → person key.
    aliases: Keyspace,
    /// person prefix + anonymous key → nothing: the aliases of a person, for erasure.
    members: Keyspace,
    /// person prefix + event id → time seen.
    seen: Keyspace,
    /// person key → trigger state.
    triggers: Keyspace,
    /// due time + person key → nothing: who has a timer when.
    timers: Keyspace,
    /// sequence number → delivered trigger (JSON).
    outbox: Keyspace,
    /// rule \0 variant \0 shard → exposures, conversions.
    outcomes: Keyspace,
    /// consumer name → the last outbox sequence it has taken care of.
    cursors: Keyspace,
    /// consumer name \0 sequence → why delivery gave up (JSON).
    dead_letters: Keyspace,
    /// person prefix + time + order + trigger id → a trigger decision (postcard).
    audit: Keyspace,
    /// Nudge's own records about the store: the probe a reopen writes.
    meta: Keyspace,
    /// Set while a thread writes the memtables out ([`Tables::bound_replay`]).
    rotating: Arc<AtomicBool>,
    /// That thread, joined before the database closes.
    rotation: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Tables {
    fn drop(&mut self) {
        let rotation = self.rotation.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = rotation.take() {
            let _ = thread.join();
        }
    }
}

/// The store: its tables while they are open and writable, and what went wrong when a
/// write failed.
///
/// A write that fails (a full disk, a read-only filesystem, an I/O error) leaves fjall
/// refusing every later write ("poisoned"): consistency is no longer guaranteed. The
/// store then records the fault, and [`Store::reopen`] — which the server retries until
/// it succeeds — closes the database and opens it again from disk, journal replay
/// included. Nothing that was acknowledged is lost: it was committed before the fault.
pub struct Store {
    dir: PathBuf,
    sync: SyncMode,
    /// `None` while a reopen has closed the database and not yet opened it again.
    tables: ArcSwapOption<Tables>,
    /// Why writes fail, from the first failed write until a reopen succeeds.
    fault: Mutex<Option<String>>,
    /// Set with `fault`, read on every write path without the lock.
    faulted: AtomicBool,
    /// Tells watchers (readiness, the recovery task) when a fault begins and ends.
    faults: tokio::sync::watch::Sender<bool>,
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

/// Writes, syncs and removes a small file in `dir`: whether the filesystem takes writes.
fn probe_dir(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write as _;
    let path = dir.join(".nudge-probe");
    let written = std::fs::File::create(&path).and_then(|mut file| {
        file.write_all(&[0; 4096])?;
        file.sync_data()
    });
    // Whatever part of it was written goes, so a full disk gets its space back.
    let removed = std::fs::remove_file(&path);
    written?;
    removed?;
    Ok(())
}

/// Where a vacuum puts the old database while it swaps in the new one.
fn aside_path(dir: &Path) -> std::path::PathBuf {
    dir.with_extension("vacuum-old")
}

/// A timer index key: the due time (big-endian, sign-flipped so that byte order is time
/// order for negative times too), then the person's key. The keyspace sorts by due time,
/// so the entries due in a range of time are one range scan.
fn timer_key(due: Time, person: &PersonKey) -> Vec<u8> {
    let mut k = due_prefix(due);
    k.extend(key(person));
    k
}

/// The first 8 bytes of the timer keys due at `due`.
fn due_prefix(due: Time) -> Vec<u8> {
    ((due.0 as u64) ^ (1 << 63)).to_be_bytes().to_vec()
}

/// The (due time, person) of a timer index key.
fn timer_entry(k: &[u8]) -> Option<(Time, PersonKey)> {
    let due = be_u64(k.get(..8)?).map(|d| Time((d ^ (1 << 63)) as i64))?;
    Some((due, person_from(k.get(8..)?)?))
}

/// A position in the timer index's order — due time, then the bytes of the person's key
/// (its tag, `a` or `u`, then the id) — standing for everything at or before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimerPosition {
    /// Before the first entry.
    Start,
    /// After every entry due at or before this time.
    Due(Time),
    /// After this entry and every entry before it.
    Entry(Time, PersonKey),
}

impl TimerPosition {
    /// Whether the entry (`due`, `person`) is at or before this position.
    pub fn covers(&self, due: Time, person: &PersonKey) -> bool {
        match self {
            TimerPosition::Start => false,
            TimerPosition::Due(t) => due <= *t,
            TimerPosition::Entry(t, p) => {
                due < *t || (due == *t && key_order(person) <= key_order(p))
            }
        }
    }
}

/// A person's key in the order the store sorts it.
fn key_order(person: &PersonKey) -> (u8, &[u8]) {
    match person {
        PersonKey::User(id) => (b'u', id.as_bytes()),
        PersonKey::Anonymous(id) => (b'a', id.as_bytes()),
    }
}

/// What a scan of the timer index found: the entries kept, earliest first, and how far it
/// got (the whole range, or the last entry it looked at).
#[derive(Debug, PartialEq, Eq)]
pub struct TimerScan {
    pub entries: Vec<(Time, PersonKey)>,
    pub reached: TimerPosition,
}

impl TimerScan {
    fn empty(reached: TimerPosition) -> TimerScan {
        TimerScan {
            entries: Vec::new(),
            reached,
        }
    }
}

fn outcome_key(rule: &str, variant: &str, shard: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(rule.len() + variant.len() + 4);
    k.extend_from_slice(rule.as_bytes());
    k.push(0);
    k.extend_from_slice(variant.as_bytes());
    k.push(0);
    k.extend(shard.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn seen_key(person: &PersonKey, event_id: &str) -> Vec<u8> {
    let mut k = prefix(person);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// Makes the batch mean what it says in order: the stored records a [`Write::Forget`] or
/// [`Write::MoveSeen`] reaches by scanning are only the committed ones, so the records the
/// same batch wrote before it — idempotency records and audit entries of the person — are
/// dropped or retargeted here.
fn in_order(mut writes: Vec<Write>) -> Vec<Write> {
    for i in 0..writes.len() {
        let (earlier, rest) = writes.split_at_mut(i);
        match &rest[0] {
            Write::Forget(person) => {
                let person = person.clone();
                for w in earlier.iter_mut() {
                    if matches!(w, Write::Seen(p, ..) | Write::Audit(p, ..) if *p == person) {
                        *w = Write::Nothing;
                    }
                }
            }
            Write::MoveSeen { from, to } => {
                for w in earlier.iter_mut() {
                    if let Write::Seen(p, ..) | Write::Audit(p, ..) = w {
                        if p == from {
                            *p = to.clone();
                        }
                    }
                }
            }
            _ => {}
        }
    }
    writes
}

/// Audit entries are bare postcard (they predate the format bytes; their keyspace is
/// expired by age, so a new format can start a new keyspace): the entry, then its detail
/// as JSON. Entries written before the detail existed end after the entry. The detail is
/// JSON because it is the trigger's context, whose optional parts JSON leaves out (a
/// layout postcard cannot read back) and which may gain fields a reader then defaults.
fn encode_audit(entry: &AuditEntry) -> Result<Vec<u8>, StoreError> {
    let mut bytes = postcard::to_stdvec(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if entry.detail != AuditDetail::default() {
        serde_json::to_writer(&mut bytes, &entry.detail)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    }
    Ok(bytes)
}

fn decode_audit(bytes: &[u8]) -> Result<AuditEntry, StoreError> {
    let (mut entry, rest): (AuditEntry, _) = postcard::take_from_bytes(bytes)
        .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
    if !rest.is_empty() {
        entry.detail = serde_json::from_slice(rest)
            .map_err(|e| StoreError::Corrupt(format!("audit entry's detail: {e}")))?;
    }
    Ok(entry)
}

impl Tables {
    fn open(dir: &Path) -> Result<Tables, StoreError> {
        let db = Database::builder(dir)
            .max_journaling_size(MAX_JOURNALING_BYTES)
            .worker_threads(WORKER_THREADS)
            .open()?;
        let open = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        Ok(Tables {
            profiles: open("profiles")?,
            aliases: open("aliases")?,
            members: open("members")?,
            seen: open("seen")?,
            triggers: open("triggers")?,
            timers: open("timers")?,
            outbox: open("outbox")?,
            outcomes: open("outcomes")?,
            cursors: open("cursors")?,
            dead_letters: open("dead_letters")?,
            audit: open("audit")?,
            meta: open("meta")?,
            rotating: Arc::default(),
            rotation: Mutex::default(),
            db,
        })
    }

    /// Writes the memtables out to tables once they hold [`MAX_UNFLUSHED_ITEMS`] items or
    /// [`MAX_UNFLUSHED_BYTES`] (fjall's own trigger is 64 MiB in one keyspace). Every
    /// keyspace is written out, not only the largest: a keyspace that keeps data in memory
    /// keeps the journal that holds it. The check is cheap (a count per keyspace) and runs
    /// after every commit; the rotation runs on a thread of its own, because sealing a
    /// memtable waits for the journal's lock and runs fjall's version and journal upkeep
    /// for every keyspace — up to 200 ms for the twelve under ingest, which a commit would
    /// otherwise add to the wait of every request in its group. The writing itself is
    /// fjall's flush workers'.
    fn bound_replay(&self) {
        let (mut items, mut bytes) = (0, 0);
        for keyspace in self.keyspaces().into_iter().chain([&self.meta]) {
            let memtable = keyspace.tree.active_memtable();
            items += memtable.len();
            bytes += memtable.size();
        }
        if items < MAX_UNFLUSHED_ITEMS && bytes < MAX_UNFLUSHED_BYTES {
            return;
        }
        if self.rotating.swap(true, Ordering::AcqRel) {
            return;
        }
        let keyspaces: Vec<Keyspace> = self
            .keyspaces()
            .into_iter()
            .chain([&self.meta])
            .cloned()
            .collect();
        let rotating = self.rotating.clone();
        let mut rotation = self.rotation.lock().unwrap_or_else(|e| e.into_inner());
        // The last rotation cleared the flag as its last act: joining it is immediate.
        if let Some(done) = rotation.take() {
            let _ = done.join();
        }
        let spawned = std::thread::Builder::new()
            .name("nudge-rotate".into())
            .spawn(move || {
                for keyspace in &keyspaces {
                    // A failure here is the disk's, and the next commit meets it too.
                    if let Err(e) = keyspace.rotate_memtable() {
                        tracing::warn!(error = %e, keyspace = %keyspace.name(), "writing a memtable out failed");
                    }
                }
                rotating.store(false, Ordering::Release);
            });
        match spawned {
            Ok(thread) => *rotation = Some(thread),
            Err(e) => {
                // fjall's own bounds still hold; the next commit tries again.
                tracing::warn!(error = %e, "no thread to write the memtables out");
                self.rotating.store(false, Ordering::Release);
            }
        }
    }

    /// Waits for a rotation in progress to finish.
    #[cfg(test)]
    fn rotated(&self) {
        let thread = self
            .rotation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = thread {
            thread.join().unwrap();
        }
    }

    /// A small durable write: whether the disk takes writes again.
    fn probe(&self) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        batch.insert(&self.meta, "probe", at.to_be_bytes());
        batch.durability(Some(PersistMode::SyncData)).commit()?;
        Ok(())
    }

    fn keyspaces(&self) -> [&Keyspace; 11] {
        [
            &self.profiles,
            &self.aliases,
            &self.members,
            &self.seen,
            &self.triggers,
            &self.timers,
            &self.outbox,
            &self.outcomes,
            &self.cursors,
            &self.dead_letters,
            &self.audit,
        ]
    }
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
        Ok(Store {
            dir: dir.to_owned(),
            sync,
            tables: ArcSwapOption::from_pointee(Tables::open(dir)?),
            fault: Mutex::new(None),
            faulted: AtomicBool::new(false),
            faults: tokio::sync::watch::channel(false).0,
        })
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.sync
    }

    /// The open tables, or why there are none.
    fn tables(&self) -> Result<Arc<Tables>, StoreError> {
        self.tables.load_full().ok_or(StoreError::Closed)
    }

    /// Why writes fail now, if they do: from the first failed write until a
    /// [`Store::reopen`] succeeds.
    pub fn fault(&self) -> Option<String> {
        if !self.faulted.load(Ordering::Acquire) {
            return None;
        }
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the store has a fault, as it changes: true from a failed write until a
    /// reopen succeeds.
    pub fn faults(&self) -> tokio::sync::watch::Receiver<bool> {
        self.faults.subscribe()
    }

    /// Refuses a write while the store has a fault: fjall would refuse it too, with a
    /// less helpful reason.
    fn writable(&self) -> Result<(), StoreError> {
        match self.fault() {
            Some(fault) => Err(StoreError::Faulted(fault)),
            None => Ok(()),
        }
    }

    /// A write's result, with a failure recorded as the store's fault.
    fn written<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            // A record that does not encode is a defect of ours, not of the disk.
            if !matches!(e, StoreError::Corrupt(_)) {
                let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
                if fault.is_none() {
                    tracing::error!(error = %e, dir = %self.dir.display(), "a store write failed; writes are refused until the store reopens");
                    *fault = Some(e.to_string());
                    self.faulted.store(true, Ordering::Release);
                    self.faults.send_replace(true);
                }
            }
        }
        result
    }

    /// Recovers from a write fault: once a file in the store's directory can be written
    /// and synced again, closes the database, opens it again from disk (replaying its
    /// journal) and proves it takes a durable write. Fails, to be retried, while the
    /// fault lasts; reads keep being served by the old database until the directory is
    /// writable. Writes stay refused until [`Store::resume`].
    pub fn reopen(&self) -> Result<(), StoreError> {
        probe_dir(&self.dir)?;
        if let Some(old) = self.tables.swap(None) {
            // A call that loaded the tables before the swap still uses them; fjall's lock
            // on the directory goes with the last of them.
            if Arc::strong_count(&old) > 1 {
                self.tables.store(Some(old));
                return Err(StoreError::Busy);
            }
        }
        let tables = Arc::new(Tables::open(&self.dir)?);
        let probed = tables.probe();
        self.tables.store(Some(tables));
        probed?;
        tracing::info!(dir = %self.dir.display(), "the store reopened");
        Ok(())
    }

    /// Takes writes again after a [`Store::reopen`], once the caller has rebuilt what it
    /// keeps in memory from the store (until then writes stay refused, so nothing is
    /// written from memory that predates the reopen).
    pub fn resume(&self) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.faulted.store(false, Ordering::Release);
        self.faults.send_replace(false);
        tracing::info!(dir = %self.dir.display(), "the store takes writes again");
    }

    pub fn load_profile(&self, person: &PersonKey) -> Result<Option<Profile>, StoreError> {
        self.tables()?.load_profile(person)
    }

    /// When `event_id` was seen for `person`, if it was.
    pub fn seen_at(&self, person: &PersonKey, event_id: &str) -> Result<Option<Time>, StoreError> {
        self.tables()?.seen_at(person, event_id)
    }

    /// Every alias: (anonymous key, the person it belongs to).
    pub fn aliases(&self) -> Result<Vec<(PersonKey, PersonKey)>, StoreError> {
        self.tables()?.aliases()
    }

    pub fn load_triggers(&self, person: &PersonKey) -> Result<Option<TriggerState>, StoreError> {
        self.tables()?.load_triggers(person)
    }

    /// A person's latest `limit` trigger decisions, oldest first.
    pub fn audit(&self, person: &PersonKey, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.tables()?.audit(person, limit)
    }

    /// Deletes audit entries decided before `before`; returns how many.
    pub fn expire_audit(&self, before: Time) -> Result<usize, StoreError> {
        self.writable()?;
        self.written(self.tables()?.expire_audit(before))
    }

    /// Timer index entries after `after` and due at or before `through`, earliest first,
    /// that `keep` wants; at most `limit` entries are looked at (kept or not), so a scan
    /// takes a bounded time. [`TimerScan::reached`] is where the next scan starts.
    pub fn timers_after(
        &self,
        after: &TimerPosition,
        through: Time,
        limit: usize,
        keep: impl Fn(&PersonKey) -> bool,
    ) -> Result<TimerScan, StoreError> {
        self.tables()?.timers_after(after, through, limit, keep)
    }

    /// How many entries the timer index holds: a scan of its keys (no values), whose
    /// memory does not grow with the count.
    pub fn timer_count(&self) -> Result<u64, StoreError> {
        self.tables()?.timer_count()
    }

    /// The highest outbox sequence number stored (0 when empty).
    pub fn outbox_last(&self) -> Result<u64, StoreError> {
        self.tables()?.outbox_last()
    }

    /// Outbox entries after `after` up to and including `up_to`, at most `limit`.
    pub fn outbox_range(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.tables()?.outbox_range(after, up_to, limit)
    }

    /// The lowest outbox sequence number still stored, if any.
    pub fn outbox_first(&self) -> Result<Option<u64>, StoreError> {
        self.tables()?.outbox_first()
    }

    /// Deletes outbox entries up to and including `up_to`; returns how many.
    pub fn trim_outbox(&self, up_to: u64) -> Result<usize, StoreError> {
        self.writable()?;
        self.written(self.tables()?.trim_outbox(up_to))
    }

    /// Every stored (rule, variant, shard, totals).
    pub fn outcomes(&self) -> Result<Vec<(String, String, u16, OutcomeTotals)>, StoreError> {
        self.tables()?.outcomes()
    }

    /// A consumer's cursor: the last outbox sequence it has taken care of (0 if none).
    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        self.tables()?.cursor(name)
    }

    /// Moves a consumer's cursor and records dead letters, in one batch. A cursor needs no
    /// fsync of its own: losing one only means redelivering (at least once).
    pub fn advance_cursor(
        &self,
        name: &str,
        to: u64,
        dead: &[(u64, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.writable()?;
        self.written(self.tables()?.advance_cursor(name, to, dead, self.sync))
    }

    /// Every dead letter of every consumer: (consumer, sequence, record).
    pub fn all_dead_letters(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
        self.tables()?.all_dead_letters()
    }

    /// Deletes outbox entries and dead letters (erasure), durably.
    pub fn remove_delivered(
        &self,
        outbox: &[u64],
        dead: &[(String, u64)],
    ) -> Result<(), StoreError> {
        self.writable()?;
        self.written(self.tables()?.remove_delivered(outbox, dead))
    }

    /// A consumer's dead letters, oldest first.
    pub fn dead_letters(&self, name: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.tables()?.dead_letters(name)
    }

    /// How many people have a stored profile: one per key, however many superseded
    /// versions the tables still hold (fjall's own length estimate counts those). A scan
    /// of the keys.
    pub fn people(&self) -> Result<usize, StoreError> {
        self.tables()?.people()
    }

    /// Commits every write atomically, with the configured durability.
    pub fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        // A group that only read has nothing to commit, fault or not.
        if writes.is_empty() {
            return Ok(());
        }
        self.writable()?;
        self.written(self.tables()?.commit(writes, self.sync))
    }

    /// Deletes idempotency records seen before `before`; returns how many.
    pub fn expire_seen(&self, before: Time) -> Result<usize, StoreError> {
        self.writable()?;
        self.written(self.tables()?.expire_seen(before))
    }

    /// fsyncs everything committed so far.
    pub fn sync_now(&self) -> Result<(), StoreError> {
        self.writable()?;
        self.written(self.tables()?.sync_now())
    }

    /// Syncs, then writes every memtable out to tables, so that the next open has nothing
    /// to replay (a graceful shutdown's last step).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.writable()?;
        self.written(self.tables()?.flush())
    }

    /// Writes every keyspace out to tables and compacts them fully, so deleted data leaves
    /// the files: the journal that still held it is dropped once everything is flushed.
    pub fn compact(&self) -> Result<(), StoreError> {
        self.writable()?;
        self.written(self.tables()?.compact())
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
            let old = Tables::open(dir)?;
            std::fs::create_dir_all(&fresh_dir)?;
            let fresh = Tables::open(&fresh_dir)?;
            for (from, to) in old.keyspaces().into_iter().zip(fresh.keyspaces()) {
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

/// The data operations on open tables; [`Store`] calls them through its fault handling.
impl Tables {
    fn load_profile(&self, person: &PersonKey) -> Result<Option<Profile>, StoreError> {
        let Some(bytes) = self.profiles.get(key(person))? else {
            return Ok(None);
        };
        match bytes.first() {
            Some(1) => {
                decode::<crate::profile::v1::Profile>("profile", 1, &bytes).map(|p| Some(p.into()))
            }
            Some(2) => {
                decode::<crate::profile::v2::Profile>("profile", 2, &bytes).map(|p| Some(p.into()))
            }
            _ => decode("profile", PROFILE_FORMAT, &bytes).map(Some),
        }
    }

    /// When `event_id` was seen for `person`, if it was.
    fn seen_at(&self, person: &PersonKey, event_id: &str) -> Result<Option<Time>, StoreError> {
        Ok(self.seen.get(seen_key(person, event_id))?.and_then(|v| {
            let bytes: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(Time(i64::from_be_bytes(bytes)))
        }))
    }

    /// Every alias: (anonymous key, the person it belongs to).
    fn aliases(&self) -> Result<Vec<(PersonKey, PersonKey)>, StoreError> {
        let mut out = Vec::new();
        for item in self.aliases.iter() {
            let (k, v) = item.into_inner()?;
            if let (Some(anonymous), Some(person)) = (person_from(&k), person_from(&v)) {
                out.push((anonymous, person));
            }
        }
        Ok(out)
    }

    fn load_triggers(&self, person: &PersonKey) -> Result<Option<TriggerState>, StoreError> {
        self.triggers
            .get(key(person))?
            .map(|bytes| decode("trigger state", TRIGGER_STATE_FORMAT, &bytes))
            .transpose()
    }

    /// A person's latest `limit` trigger decisions, oldest first.
    fn audit(&self, person: &PersonKey, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.audit.prefix(prefix(person)).rev().take(limit) {
            out.push(decode_audit(&item.value()?)?);
        }
        out.reverse();
        Ok(out)
    }

    /// Deletes audit entries decided before `before`; returns how many.
    fn expire_audit(&self, before: Time) -> Result<usize, StoreError> {
        let mut batch = self.db.batch();
        for item in self.audit.iter() {
            let (k, v) = item.into_inner()?;
            if decode_audit(&v).is_ok_and(|e| e.at < before) {
                batch.remove(&self.audit, k);
            }
        }
        let n = batch.len();
        batch.commit()?;
        Ok(n)
    }

    /// Timer index entries after `after` and due at or before `through` that `keep` wants,
    /// looking at most `limit` entries.
    fn timers_after(
        &self,
        after: &TimerPosition,
        through: Time,
        limit: usize,
        keep: impl Fn(&PersonKey) -> bool,
    ) -> Result<TimerScan, StoreError> {
        use std::ops::Bound;
        let start = match after {
            TimerPosition::Start => Bound::Unbounded,
            TimerPosition::Due(t) => match t.0.checked_add(1) {
                Some(next) => Bound::Included(due_prefix(Time(next))),
                None => return Ok(TimerScan::empty(after.clone())),
            },
            TimerPosition::Entry(t, p) => Bound::Excluded(timer_key(*t, p)),
        };
        let end = match through.0.checked_add(1) {
            Some(next) => Bound::Excluded(due_prefix(Time(next))),
            None => Bound::Unbounded,
        };
        if let (Bound::Included(from) | Bound::Excluded(from), Bound::Excluded(to)) = (&start, &end)
        {
            if from >= to {
                // `after` is at or past `through`: nothing in between.
                return Ok(TimerScan::empty(after.clone()));
            }
        }
        let mut scan = TimerScan::empty(after.clone());
        for (looked, item) in self.timers.range::<Vec<u8>, _>((start, end)).enumerate() {
            if looked == limit {
                // More may be in range: the next scan goes on after the last one seen.
                return Ok(scan);
            }
            let k = item.key()?;
            let Some((due, person)) = timer_entry(&k) else {
                continue;
            };
            if keep(&person) {
                scan.entries.push((due, person.clone()));
            }
            scan.reached = TimerPosition::Entry(due, person);
        }
        scan.reached = TimerPosition::Due(through);
        Ok(scan)
    }

    fn timer_count(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self.timers.iter() {
            item.key()?;
            n += 1;
        }
        Ok(n)
    }

    /// The highest outbox sequence number stored (0 when empty).
    fn outbox_last(&self) -> Result<u64, StoreError> {
        Ok(match self.outbox.last_key_value() {
            Some(item) => be_u64(&item.key()?).unwrap_or(0),
            None => 0,
        })
    }

    /// Outbox entries after `after` up to and including `up_to`, at most `limit`.
    fn outbox_range(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        if after >= up_to {
            return Ok(out);
        }
        for item in self
            .outbox
            .range((after + 1).to_be_bytes()..=up_to.to_be_bytes())
            .take(limit)
        {
            let (k, v) = item.into_inner()?;
            if let Some(seq) = be_u64(&k) {
                out.push((seq, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// The lowest outbox sequence number still stored, if any.
    fn outbox_first(&self) -> Result<Option<u64>, StoreError> {
        Ok(match self.outbox.first_key_value() {
            Some(item) => be_u64(&item.key()?),
            None => None,
        })
    }

    /// Deletes outbox entries up to and including `up_to`; returns how many.
    fn trim_outbox(&self, up_to: u64) -> Result<usize, StoreError> {
        let mut batch = self.db.batch();
        for item in self.outbox.range(..=up_to.to_be_bytes()) {
            batch.remove(&self.outbox, item.key()?);
        }
        let n = batch.len();
        batch.commit()?;
        Ok(n)
    }

    /// Every stored (rule, variant, shard, totals).
    fn outcomes(&self) -> Result<Vec<(String, String, u16, OutcomeTotals)>, StoreError> {
        let mut out = Vec::new();
        for item in self.outcomes.iter() {
            let (k, v) = item.into_inner()?;
            let mut parts = k.splitn(3, |b| *b == 0);
            let (Some(rule), Some(variant), Some(shard)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(shard), Some(exposures), Some(conversions)) = (
                <[u8; 2]>::try_from(shard).map(u16::from_be_bytes),
                v.get(..8).and_then(be_u64),
                v.get(8..16).and_then(be_u64),
            ) else {
                continue;
            };
            out.push((
                String::from_utf8_lossy(rule).into_owned(),
                String::from_utf8_lossy(variant).into_owned(),
                shard,
                OutcomeTotals {
                    exposures,
                    conversions,
                },
            ));
        }
        Ok(out)
    }

    /// A consumer's cursor: the last outbox sequence it has taken care of (0 if none).
    fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .cursors
            .get(name.as_bytes())?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0))
    }

    /// Moves a consumer's cursor and records dead letters, in one batch. A cursor needs no
    /// fsync of its own: losing one only means redelivering (at least once).
    fn advance_cursor(
        &self,
        name: &str,
        to: u64,
        dead: &[(u64, Vec<u8>)],
        sync: SyncMode,
    ) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        batch.insert(&self.cursors, name.as_bytes(), to.to_be_bytes());
        for (seq, record) in dead {
            let mut k = name.as_bytes().to_vec();
            k.push(0);
            k.extend(seq.to_be_bytes());
            batch.insert(&self.dead_letters, k, record.clone());
        }
        let batch = match (sync, dead.is_empty()) {
            (SyncMode::Always, false) => batch.durability(Some(PersistMode::SyncData)),
            _ => batch,
        };
        batch.commit()?;
        Ok(())
    }

    /// Every dead letter of every consumer: (consumer, sequence, record).
    fn all_dead_letters(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.dead_letters.iter() {
            let (k, v) = item.into_inner()?;
            let Some(split) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            if let Some(seq) = be_u64(&k[split + 1..]) {
                let consumer = String::from_utf8_lossy(&k[..split]).into_owned();
                out.push((consumer, seq, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Deletes outbox entries and dead letters (erasure), durably.
    fn remove_delivered(&self, outbox: &[u64], dead: &[(String, u64)]) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for seq in outbox {
            batch.remove(&self.outbox, seq.to_be_bytes());
        }
        for (consumer, seq) in dead {
            let mut k = consumer.as_bytes().to_vec();
            k.push(0);
            k.extend(seq.to_be_bytes());
            batch.remove(&self.dead_letters, k);
        }
        batch.durability(Some(PersistMode::SyncData)).commit()?;
        Ok(())
    }

    /// A consumer's dead letters, oldest first.
    fn dead_letters(&self, name: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.dead_letters.prefix(&prefix) {
            let (k, v) = item.into_inner()?;
            if let Some(seq) = be_u64(&k[prefix.len()..]) {
                out.push((seq, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// How many people have a stored profile: one per key, however many superseded
    /// versions the tables still hold (fjall's own length estimate counts those). A scan
    /// of the keys.
    fn people(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.profiles.iter() {
            item.key()?;
            n += 1;
        }
        Ok(n)
    }

    /// Commits every write atomically, with the configured durability.
    fn commit(&self, writes: Vec<Write>, sync: SyncMode) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let writes = in_order(writes);
        let mut batch = self.db.batch();
        for write in writes {
            match write {
                Write::Profile(person, profile) => {
                    batch.insert(&self.profiles, key(&person), profile.bytes);
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
                    for keyspace in [&self.seen, &self.audit] {
                        for item in keyspace.prefix(&from_prefix) {
                            let (k, v) = item.into_inner()?;
                            let rest = &k[from_prefix.len()..];
                            let mut moved = prefix(&to);
                            moved.extend_from_slice(rest);
                            batch.insert(keyspace, moved, v);
                            batch.remove(keyspace, k);
                        }
                    }
                }
                Write::Forget(person) => {
                    let p = prefix(&person);
                    for keyspace in [&self.seen, &self.audit] {
                        for item in keyspace.prefix(&p) {
                            batch.remove(keyspace, item.key()?);
                        }
                    }
                    for item in self.members.prefix(&p) {
                        let member = item.key()?;
                        batch.remove(&self.aliases, member[p.len()..].to_vec());
                        batch.remove(&self.members, member);
                    }
                    // The person may itself be an alias of someone.
                    batch.remove(&self.aliases, key(&person));
                }
                Write::Triggers(person, None) => batch.remove(&self.triggers, key(&person)),
                Write::Triggers(person, Some(state)) => {
                    batch.insert(&self.triggers, key(&person), state.bytes);
                }
                Write::TimerIndex(due, person, present) => {
                    let k = timer_key(due, &person);
                    if present {
                        batch.insert(&self.timers, k, []);
                    } else {
                        batch.remove(&self.timers, k);
                    }
                }
                Write::Outbox(seq, bytes) => batch.insert(&self.outbox, seq.to_be_bytes(), bytes),
                Write::Audit(person, entry, order) => {
                    let mut k = prefix(&person);
                    k.extend(((entry.at.0 as u64) ^ (1 << 63)).to_be_bytes());
                    k.extend(order.to_be_bytes());
                    // Unique even if the order number restarts within the millisecond.
                    k.extend_from_slice(entry.trigger_id.as_bytes());
                    batch.insert(&self.audit, k, encode_audit(&entry)?);
                }
                Write::Outcome {
                    rule,
                    variant,
                    shard,
                    totals,
                } => {
                    let mut value = totals.exposures.to_be_bytes().to_vec();
                    value.extend(totals.conversions.to_be_bytes());
                    batch.insert(&self.outcomes, outcome_key(&rule, &variant, shard), value);
                }
                Write::Nothing => {}
            }
        }
        let batch = match sync {
            SyncMode::Always => batch.durability(Some(PersistMode::SyncData)),
            SyncMode::Interval(_) => batch,
        };
        batch.commit()?;
        self.bound_replay();
        Ok(())
    }

    /// Deletes idempotency records seen before `before`; returns how many.
    fn expire_seen(&self, before: Time) -> Result<usize, StoreError> {
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
    fn sync_now(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Syncs, then writes every memtable out to tables and waits for it. fjall starts a
    /// new journal at a flush once the current one is past 64 MB, and the probe written
    /// first makes it see the journal's true length (a journal reopened after a restart
    /// counts from 0 until its first write), so a long one is dropped now.
    fn flush(&self) -> Result<(), StoreError> {
        self.probe()?;
        for keyspace in self.keyspaces().into_iter().chain([&self.meta]) {
            keyspace.rotate_memtable_and_wait()?;
        }
        Ok(())
    }

    /// Writes every keyspace out to tables and compacts them fully, so deleted data leaves
    /// the files: the journal that still held it is dropped once everything is flushed.
    fn compact(&self) -> Result<(), StoreError> {
        self.sync_now()?;
        for keyspace in self.keyspaces() {
            keyspace.rotate_memtable_and_wait()?;
            keyspace.major_compact()?;
        }
        self.sync_now()
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
    fn a_profile_stored_in_format_1_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        let mut bytes = vec![1];
        bytes.extend(hex::decode(crate::profile::v1::FORMAT_1_FIXTURE).unwrap());
        store
            .tables()
            .unwrap()
            .profiles
            .insert(key(&person("u1")), bytes)
            .unwrap();
        let profile = store.load_profile(&person("u1")).unwrap().unwrap();
        assert_eq!(profile.cart().items(), 2);
        assert!(profile.cart().checkout_started());
    }

    #[test]
    fn a_reopen_closes_and_opens_the_database_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        store
            .commit(vec![Write::Seen(person("u1"), "e1".into(), Time(7))])
            .unwrap();
        // A read that holds the tables keeps the reopen from closing them under it.
        let held = store.tables().unwrap();
        assert!(matches!(store.reopen(), Err(StoreError::Busy)));
        assert_eq!(store.seen_at(&person("u1"), "e1").unwrap(), Some(Time(7)));
        drop(held);
        store.reopen().unwrap();
        store.resume();
        assert_eq!(store.seen_at(&person("u1"), "e1").unwrap(), Some(Time(7)));
        store
            .commit(vec![Write::Seen(person("u1"), "e2".into(), Time(8))])
            .unwrap();
        assert_eq!(store.fault(), None);
        assert!(!dir.path().join(".nudge-probe").exists());
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
                    Write::Profile(person("u1"), Record::profile(&profile).unwrap()),
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

    #[test]
    fn the_audit_keeps_the_latest_decisions_moves_with_a_merge_and_goes_with_erasure() {
        use crate::trigger::state::{AuditEntry, Outcome, Suppressed};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        let entry = |at: i64, rule: &str| AuditEntry {
            at: Time(at),
            rule: rule.into(),
            trigger_id: format!("t{at}{rule}"),
            outcome: Outcome::Suppressed(Suppressed::Cooldown),
            variant: None,
            detail: Default::default(),
        };
        let visitor = PersonKey::Anonymous("a1".into());
        store
            .commit(
                (1..=5)
                    .map(|i| Write::Audit(visitor.clone(), Box::new(entry(i * 1000, "r")), 0))
                    .chain([Write::Audit(person("u10"), Box::new(entry(1, "other")), 0)])
                    .collect(),
            )
            .unwrap();
        let latest = store.audit(&visitor, 3).unwrap();
        assert_eq!(
            latest.iter().map(|e| e.at.0).collect::<Vec<_>>(),
            [3000, 4000, 5000]
        );
        store
            .commit(vec![Write::MoveSeen {
                from: visitor.clone(),
                to: person("u1"),
            }])
            .unwrap();
        assert!(store.audit(&visitor, 10).unwrap().is_empty());
        assert_eq!(store.audit(&person("u1"), 10).unwrap().len(), 5);
        // An entry with its detail keeps it; one written before details existed (the
        // first five fields alone) reads with none.
        let mut detailed = entry(9000, "d");
        detailed
            .detail
            .computed
            .insert("percent".into(), "5".into());
        // Optional parts left out, as a context usually has them.
        detailed.detail.context = Some(crate::trigger::TriggerContext {
            top_categories: Some(vec![crate::trigger::context::CategoryShare {
                category: "outdoor".into(),
                share: 0.75,
            }]),
            ..Default::default()
        });
        let bytes = encode_audit(&detailed).unwrap();
        assert_eq!(decode_audit(&bytes).unwrap(), detailed);
        let old = postcard::to_stdvec(&detailed).unwrap();
        assert!(old.len() < bytes.len());
        assert_eq!(decode_audit(&old).unwrap(), entry(9000, "d"));
        assert_eq!(
            store.expire_audit(Time(2500)).unwrap(),
            3,
            "two of u1's and u10's"
        );
        store.commit(vec![Write::Forget(person("u1"))]).unwrap();
        assert!(store.audit(&person("u1"), 10).unwrap().is_empty());
    }

    #[test]
    fn a_forget_or_a_move_covers_what_the_same_batch_wrote_before_it() {
        use crate::trigger::state::{AuditEntry, Outcome};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        let entry = |at: i64| AuditEntry {
            at: Time(at),
            rule: "r".into(),
            trigger_id: format!("t{at}"),
            outcome: Outcome::Delivered,
            variant: None,
            detail: Default::default(),
        };
        // An event and its trigger decision, then the person's erasure, in one group.
        store
            .commit(vec![
                Write::Seen(person("u1"), "e1".into(), Time(1)),
                Write::Audit(person("u1"), Box::new(entry(1)), 1),
                Write::DeleteProfile(person("u1")),
                Write::Forget(person("u1")),
            ])
            .unwrap();
        assert!(store.audit(&person("u1"), 10).unwrap().is_empty());
        assert_eq!(store.seen_at(&person("u1"), "e1").unwrap(), None);

        // A visitor's event and decision, then the merge into a user, in one group.
        let visitor = PersonKey::Anonymous("a1".into());
        store
            .commit(vec![
                Write::Seen(visitor.clone(), "e2".into(), Time(2)),
                Write::Audit(visitor.clone(), Box::new(entry(2)), 2),
                Write::MoveSeen {
                    from: visitor.clone(),
                    to: person("u2"),
                },
            ])
            .unwrap();
        assert!(store.audit(&visitor, 10).unwrap().is_empty());
        assert_eq!(store.audit(&person("u2"), 10).unwrap(), vec![entry(2)]);
        assert_eq!(store.seen_at(&person("u2"), "e2").unwrap(), Some(Time(2)));
        assert_eq!(store.seen_at(&visitor, "e2").unwrap(), None);

        // What comes after a forget in the batch is kept.
        store
            .commit(vec![
                Write::Forget(person("u3")),
                Write::Seen(person("u3"), "e3".into(), Time(3)),
            ])
            .unwrap();
        assert_eq!(store.seen_at(&person("u3"), "e3").unwrap(), Some(Time(3)));
    }

    #[test]
    fn the_timer_index_scans_by_due_time_a_bounded_number_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        let anon = PersonKey::Anonymous("zz".into());
        let entries = [
            (Time(-5), person("b")),
            (Time(10), person("a")),
            (Time(10), anon.clone()),
            (Time(10), person("b")),
            (Time(20), person("c")),
            (Time(30), person("a")),
        ];
        store
            .commit(
                entries
                    .iter()
                    .rev()
                    .map(|(t, p)| Write::TimerIndex(*t, p.clone(), true))
                    .collect(),
            )
            .unwrap();
        assert_eq!(store.timer_count().unwrap(), 6);
        let all = |_: &PersonKey| true;

        // Store order: due time (negative ones first), then the key bytes ('a' < 'u').
        let scan = store
            .timers_after(&TimerPosition::Start, Time(20), 100, all)
            .unwrap();
        assert_eq!(
            scan.entries,
            vec![
                (Time(-5), person("b")),
                (Time(10), anon.clone()),
                (Time(10), person("a")),
                (Time(10), person("b")),
                (Time(20), person("c")),
            ]
        );
        assert_eq!(scan.reached, TimerPosition::Due(Time(20)));
        for (t, p) in &scan.entries {
            assert!(scan.reached.covers(*t, p));
        }
        assert!(!scan.reached.covers(Time(30), &person("a")));

        // At most `limit` looked at, kept or not; the next scan goes on after the last.
        let only_b = |p: &PersonKey| *p == person("b");
        let first = store
            .timers_after(&TimerPosition::Start, Time(30), 3, only_b)
            .unwrap();
        assert_eq!(first.entries, vec![(Time(-5), person("b"))]);
        assert_eq!(first.reached, TimerPosition::Entry(Time(10), person("a")));
        assert!(first.reached.covers(Time(10), &anon));
        assert!(!first.reached.covers(Time(10), &person("b")));
        let next = store
            .timers_after(&first.reached, Time(30), 3, only_b)
            .unwrap();
        assert_eq!(next.entries, vec![(Time(10), person("b"))]);
        let last = store
            .timers_after(&next.reached, Time(30), 3, only_b)
            .unwrap();
        assert_eq!(last.entries, vec![]);
        assert_eq!(last.reached, TimerPosition::Due(Time(30)));

        // After a time: from the next millisecond; nothing past `through`.
        let after = store
            .timers_after(&TimerPosition::Due(Time(10)), Time(25), 100, all)
            .unwrap();
        assert_eq!(after.entries, vec![(Time(20), person("c"))]);
        let none = store
            .timers_after(&TimerPosition::Due(Time(30)), Time(25), 100, all)
            .unwrap();
        assert_eq!(none.entries, vec![]);
        assert_eq!(
            none.reached,
            TimerPosition::Due(Time(30)),
            "never backwards"
        );
    }

    /// Items in the active memtables of every keyspace: what a crash would replay.
    fn unflushed(store: &Store) -> usize {
        let tables = store.tables().unwrap();
        tables
            .keyspaces()
            .into_iter()
            .chain([&tables.meta])
            .map(|k| k.tree.active_memtable().len())
            .sum()
    }

    #[test]
    fn memtables_are_written_out_before_a_crash_would_replay_more_than_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Interval(Duration::from_secs(60))).unwrap();
        // Outbox entries of 1 MiB: the byte bound is passed within a few dozen commits.
        let entry = vec![7u8; 1 << 20];
        let commits = (MAX_UNFLUSHED_BYTES >> 20) + 2;
        for seq in 1..=commits {
            store
                .commit(vec![Write::Outbox(seq, entry.clone())])
                .unwrap();
        }
        // The memtables are sealed on a thread of the store's own.
        store.tables().unwrap().rotated();
        assert!(
            unflushed(&store) < commits as usize - 1,
            "{} of {commits} entries are still only in memory",
            unflushed(&store)
        );
        assert_eq!(
            store.outbox_range(0, commits, 1000).unwrap().len(),
            commits as usize
        );
    }

    #[test]
    fn after_a_flush_the_next_open_replays_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), SyncMode::Always).unwrap();
            store
                .commit(vec![
                    Write::Seen(person("u1"), "e1".into(), Time(7)),
                    Write::TimerIndex(Time(9), person("u1"), true),
                ])
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        assert_eq!(
            unflushed(&store),
            0,
            "the journal's items were all in tables"
        );
        assert_eq!(store.seen_at(&person("u1"), "e1").unwrap(), Some(Time(7)));
        assert_eq!(store.timer_count().unwrap(), 1);
    }

    #[test]
    fn people_are_counted_once_however_often_their_profile_was_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Interval(Duration::from_secs(60))).unwrap();
        for round in 0..50 {
            let mut profile = Profile::default();
            profile.apply(&Event {
                id: format!("e{round}"),
                person: person("u1"),
                linked: None,
                kind: EventKind::PageView,
                time: Time(1_772_445_600_000 + round),
                properties: Properties::default(),
                attributes: Default::default(),
            });
            store
                .commit(vec![
                    Write::Profile(person("u1"), Record::profile(&profile).unwrap()),
                    Write::Profile(person("u2"), Record::profile(&profile).unwrap()),
                ])
                .unwrap();
            if round % 10 == 0 {
                store
                    .tables()
                    .unwrap()
                    .profiles
                    .rotate_memtable_and_wait()
                    .unwrap();
            }
        }
        assert_eq!(store.people().unwrap(), 2);
    }
}
