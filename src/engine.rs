//! The engine owns every profile. People are spread over shards by a stable hash of their
//! key; each shard is one thread that alone applies events to its people, extracts their
//! features, scores them and writes them to the store, so the hot path takes no locks.
//!
//! Group commit: a shard takes every command waiting in its queue (up to a limit), applies
//! them, writes all their changes — each changed profile once, plus an idempotency record
//! per event — in one atomic store batch with one fsync, and only then answers. An answer
//! is a promise: what was acknowledged is in the store.
//!
//! Queues are bounded: when one is full the caller is told at once
//! ([`EngineError::Overloaded`]).
//!
//! Identity merges touch two people who may live in two shards. The merge takes the
//! engine's merge lock, sets the alias in memory (so new work routes to the known user),
//! pauses the anonymous person's shard once everything queued before the alias is done, and
//! has the user's shard fold the anonymous profile in and commit the profile, the alias,
//! the deletion and the moved idempotency records in one batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, EventKind, PersonKey};
use crate::features::{self, FeatureRow};
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::model::{Model, ModelRegistry, ScoreError};
use crate::profile::Profile;
use crate::segments;
use crate::store::{OutcomeTotals, Store, StoreError, Write};
use crate::time::Time;
use crate::trigger::rules::RuleSet;
use crate::trigger::{
    self, Contribution, Firing, History, Outcome as Decision, TriggerState, Triggers,
};

/// How the engine is laid out.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Shard threads; each owns a slice of the people.
    pub shards: usize,
    /// Requests waiting per shard before callers are turned away.
    pub queue_capacity: usize,
    /// How long an event id is remembered for idempotency.
    pub dedup_horizon_ms: i64,
}

/// The most commands one shard folds into one commit.
const MAX_GROUP: usize = 512;
/// The most people whose timers one tick handles (the rest wait for the next tick).
const MAX_TIMERS_PER_TICK: usize = 2048;

/// Why the engine could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is overloaded (a shard queue is full); retry with backoff")]
    Overloaded,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the store failed; nothing of this request was acknowledged: {0}")]
    Store(String),
    #[error("{0}")]
    Conflict(String),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(e.to_string())
    }
}

/// One model's probability for one row.
#[derive(Debug, Clone)]
pub struct Score {
    pub model: Arc<Model>,
    pub probability: f64,
}

/// The scores after one event, or the error of the model that failed.
pub type Scores = Vec<Result<Score, (Arc<Model>, ScoreError)>>;

/// What became of a tracked event.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; the person's scores after it.
    Accepted(Scores),
    /// Its id was seen within the horizon: nothing changed; the person's current scores.
    Duplicate(Scores),
}

/// Why a person got (or did not get) triggers: the latest decisions, oldest first, and the
/// timers still pending.
#[derive(Debug, Default)]
pub struct Explanation {
    pub decisions: Vec<trigger::AuditEntry>,
    pub timers: Vec<trigger::Timer>,
}

/// What an identity merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    Merged,
    AlreadyMerged,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Command {
    Track {
        events: Vec<(usize, Event)>,
        now: Time,
        received: Instant,
        reply: Reply<Vec<(usize, Outcome)>>,
    },
    /// Fire the timers due at `now`; `done`, if any, answers once they are committed.
    Tick {
        now: Time,
        done: Option<Reply<()>>,
    },
    /// A person's trigger state (decisions, timers), for explaining.
    Explain {
        person: PersonKey,
        reply: Reply<Explanation>,
    },
    Score {
        person: PersonKey,
        models: Vec<Arc<Model>>,
        now: Time,
        reply: Reply<Option<Scores>>,
    },
    Profile {
        person: PersonKey,
        reply: Reply<Option<Profile>>,
    },
    /// Stop after everything queued before this is committed, until resumed.
    Pause {
        paused: oneshot::Sender<()>,
        resume: std::sync::mpsc::Receiver<Resume>,
    },
    /// Fold `from` (whose shard is paused, or this one) into `into`.
    Absorb {
        from: PersonKey,
        into: PersonKey,
        reply: Reply<()>,
    },
    /// Delete everything about a person; answers whether there was a profile.
    Erase {
        person: PersonKey,
        reply: Reply<bool>,
    },
}

/// What a paused shard does when it resumes.
struct Resume {
    /// A person whose cached profile is stale (merged away).
    evict: Option<PersonKey>,
}

/// The handle to the shard threads.
pub struct Engine {
    shards: Vec<mpsc::Sender<Command>>,
    threads: Vec<JoinHandle<()>>,
    identities: Arc<Identities>,
    triggers: Arc<Triggers>,
    merges: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn start(
        options: &EngineOptions,
        store: Arc<Store>,
        identities: Arc<Identities>,
        models: Arc<ModelRegistry>,
        triggers: Arc<Triggers>,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, EngineError> {
        let count = options.shards.max(1);
        let mut shards = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        // Each shard takes its own people's timers and its own experiment totals.
        let mut timers = vec![BTreeSet::new(); count];
        for (due, person) in store.timer_index()? {
            timers[(person.stable_hash() % count as u64) as usize].insert((due, person));
        }
        metrics
            .timers_pending
            .set(timers.iter().map(BTreeSet::len).sum::<usize>() as i64);
        let mut outcomes = vec![BTreeMap::new(); count];
        for (rule, variant, shard, totals) in store.outcomes()? {
            if let Some(o) = outcomes.get_mut(usize::from(shard)) {
                o.insert((rule, variant), totals);
            }
        }
        for (i, (timers, outcomes)) in timers.into_iter().zip(outcomes).enumerate() {
            let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
            let shard = Shard {
                index: i as u16,
                profiles: HashMap::new(),
                states: HashMap::new(),
                timers,
                outcomes,
                decisions: 0,
                store: store.clone(),
                models: models.clone(),
                triggers: triggers.clone(),
                metrics: metrics.clone(),
                dedup_horizon_ms: options.dedup_horizon_ms,
            };
            let thread = std::thread::Builder::new()
                .name(format!("nudge-shard-{i}"))
                .spawn(move || shard.run(rx))
                .expect("spawning a shard thread");
            shards.push(tx);
            threads.push(thread);
        }
        Ok(Engine {
            shards,
            threads,
            identities,
            triggers,
            merges: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    fn shard_of(&self, person: &PersonKey) -> usize {
        (person.stable_hash() % self.shards.len() as u64) as usize
    }

    /// Applies validated events in order and answers each event's outcome. An event that
    /// carries both a user id and a not-yet-linked anonymous id first merges the anonymous
    /// visitor into the user. Either every event is queued or none is: capacity on every
    /// shard involved is reserved first.
    pub async fn track(
        &self,
        events: Vec<(usize, Event)>,
        now: Time,
    ) -> Result<Vec<(usize, Outcome)>, EngineError> {
        let received = Instant::now();
        for (_, event) in &events {
            if let Some(anonymous) = &event.linked {
                // Most events that carry both ids belong to a link made long ago: check
                // without the merge lock first.
                if self.identities.read().alias_of(anonymous) == Some(&event.person) {
                    continue;
                }
                match self.merge(anonymous.clone(), event.person.clone()).await {
                    Ok(_) => {}
                    // The event still belongs to its user; only the link is refused.
                    Err(EngineError::Conflict(reason)) => {
                        tracing::warn!(%reason, "identity link refused");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let mut replies = Vec::new();
        {
            // Resolve and queue under the read lock, so no merge slips in between.
            let resolver = self.identities.read();
            let mut per_shard: Vec<Vec<(usize, Event)>> = vec![Vec::new(); self.shards.len()];
            for (index, mut event) in events {
                event.person = resolver.resolve(&event.person);
                per_shard[self.shard_of(&event.person)].push((index, event));
            }
            let mut permits = Vec::new();
            for (shard, batch) in self.shards.iter().zip(per_shard) {
                if batch.is_empty() {
                    continue;
                }
                permits.push((shard.try_reserve().map_err(full_or_closed)?, batch));
            }
            for (permit, events) in permits {
                let (reply, answer) = oneshot::channel();
                permit.send(Command::Track {
                    events,
                    now,
                    received,
                    reply,
                });
                replies.push(answer);
            }
        }
        let mut results = Vec::new();
        for answer in replies {
            results.extend(answer.await.map_err(|_| EngineError::ShuttingDown)??);
        }
        results.sort_unstable_by_key(|(index, _)| *index);
        Ok(results)
    }

    /// Scores a person's live profile; `None` if Nudge has no events for them.
    pub async fn score(
        &self,
        person: PersonKey,
        models: Vec<Arc<Model>>,
        now: Time,
    ) -> Result<Option<Scores>, EngineError> {
        self.ask(&person, |person, reply| Command::Score {
            person,
            models,
            now,
            reply,
        })
        .await
    }

    /// Asks every shard to fire the timers due at `now`. A shard whose queue is full
    /// skips this tick; its timers fire at the next one.
    pub fn tick(&self, now: Time) {
        for shard in &self.shards {
            let _ = shard.try_send(Command::Tick { now, done: None });
        }
    }

    /// Fires the timers due at `now` on every shard, waiting for room in their queues,
    /// and returns once every shard has committed what fired. For callers that drive time
    /// themselves (tests, tools); the server's ticker uses [`Engine::tick`].
    pub async fn tick_and_wait(&self, now: Time) -> Result<(), EngineError> {
        let mut answers = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (done, answer) = oneshot::channel();
            shard
                .send(Command::Tick {
                    now,
                    done: Some(done),
                })
                .await
                .map_err(|_| EngineError::ShuttingDown)?;
            answers.push(answer);
        }
        for answer in answers {
            answer.await.map_err(|_| EngineError::ShuttingDown)??;
        }
        Ok(())
    }

    /// A person's recent trigger decisions with reasons, and pending timers.
    pub async fn explain(&self, person: PersonKey) -> Result<Explanation, EngineError> {
        self.ask(&person, |person, reply| Command::Explain { person, reply })
            .await
    }

    /// A copy of a person's profile; `None` if Nudge has no events for them.
    pub async fn profile(&self, person: PersonKey) -> Result<Option<Profile>, EngineError> {
        self.ask(&person, |person, reply| Command::Profile { person, reply })
            .await
    }

    /// Deletes everything about a person — profile, aliases, idempotency records —
    /// durably. Answers whether there was a profile; erasing twice is harmless.
    pub async fn erase(&self, person: PersonKey) -> Result<bool, EngineError> {
        let _merging = self.merges.lock().await;
        let person = self.identities.read().resolve(&person);
        let mut people: Vec<PersonKey> = self
            .identities
            .write()
            .iter()
            .filter(|(_, owner)| **owner == person)
            .map(|(alias, _)| alias.clone())
            .collect();
        people.push(person.clone());
        let existed = self
            .ask(&person, |person, reply| Command::Erase { person, reply })
            .await?;
        self.identities.forget(&person);
        // Delivered triggers name the person too.
        let triggers = self.triggers.clone();
        tokio::task::spawn_blocking(move || triggers.forget(&people))
            .await
            .map_err(|e| EngineError::Store(e.to_string()))??;
        self.metrics.erasures.inc();
        Ok(existed)
    }

    /// Sends a command for `person` (resolved through aliases) to its shard and waits.
    async fn ask<T>(
        &self,
        person: &PersonKey,
        command: impl FnOnce(PersonKey, Reply<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        {
            let person = self.identities.read().resolve(person);
            let shard = self.shard_of(&person);
            self.shards[shard]
                .try_send(command(person, reply))
                .map_err(full_or_closed)?;
        }
        answer.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Makes the anonymous visitor `anonymous` one person with the known user `user`.
    pub async fn merge(&self, anonymous: PersonKey, user: PersonKey) -> Result<Merge, EngineError> {
        let outcome = self.merge_inner(anonymous, user).await;
        let label = match &outcome {
            Ok(Merge::Merged) => "merged",
            Ok(Merge::AlreadyMerged) => "already_merged",
            Err(EngineError::Conflict(_)) => "conflict",
            Err(_) => "failed",
        };
        self.metrics.merges.with_label_values(&[label]).inc();
        outcome
    }

    async fn merge_inner(&self, from: PersonKey, into: PersonKey) -> Result<Merge, EngineError> {
        let _merging = self.merges.lock().await;
        let (from_shard, into_shard) = (self.shard_of(&from), self.shard_of(&into));
        let mut paused = None;
        {
            let mut aliases = self.identities.write();
            // The same decision the trainer's replay takes.
            match crate::identity::link(&mut aliases, &from, &into) {
                Ok(crate::identity::Link::New) => {}
                Ok(crate::identity::Link::Already) => return Ok(Merge::AlreadyMerged),
                Err(refused) => return Err(EngineError::Conflict(refused.to_string())),
            }
            if from_shard != into_shard {
                // Queued behind everything already routed to the anonymous key.
                let (paused_tx, paused_rx) = oneshot::channel();
                let (resume_tx, resume_rx) = std::sync::mpsc::channel();
                let pause = Command::Pause {
                    paused: paused_tx,
                    resume: resume_rx,
                };
                if let Err(e) = self.shards[from_shard].try_send(pause) {
                    aliases.remove(&from);
                    return Err(full_or_closed(e));
                }
                paused = Some((paused_rx, resume_tx));
            }
        }
        let resume = match paused {
            Some((paused_rx, resume_tx)) => {
                if paused_rx.await.is_err() {
                    self.identities.write().remove(&from);
                    return Err(EngineError::ShuttingDown);
                }
                Some(resume_tx)
            }
            None => None,
        };
        let (reply, answer) = oneshot::channel();
        let absorb = Command::Absorb {
            from: from.clone(),
            into,
            reply,
        };
        let result = match self.shards[into_shard].send(absorb).await {
            Ok(()) => answer.await.unwrap_or(Err(EngineError::ShuttingDown)),
            Err(_) => Err(EngineError::ShuttingDown),
        };
        if result.is_err() {
            self.identities.write().remove(&from);
        }
        if let Some(resume) = resume {
            let evict = result.is_ok().then(|| from.clone());
            // A shard that is gone has nothing to resume.
            let _ = resume.send(Resume { evict });
        }
        result.map(|()| Merge::Merged)
    }

    /// Stops taking work, lets the shards finish and commit what is queued, and joins them.
    pub fn shutdown(self) {
        drop(self.shards);
        for thread in self.threads {
            // A shard that panicked has already reported it through the panic hook.
            let _ = thread.join();
        }
    }
}

fn full_or_closed<T>(e: mpsc::error::TrySendError<T>) -> EngineError {
    match e {
        mpsc::error::TrySendError::Full(_) => EngineError::Overloaded,
        mpsc::error::TrySendError::Closed(_) => EngineError::ShuttingDown,
    }
}

/// An answer held back until the group's commit: the value, unless the commit fails.
struct Answer<T> {
    reply: Reply<T>,
    value: Result<T, EngineError>,
}

impl<T> Answer<T> {
    fn send(self, committed: &Result<(), EngineError>) {
        let value = match committed {
            Ok(()) => self.value,
            Err(e) => Err(e.clone()),
        };
        // Callers that gave up (deadline, cancellation) no longer listen; that is fine.
        let _ = self.reply.send(value);
    }
}

enum Pending {
    Track(Answer<Vec<(usize, Outcome)>>),
    Explain(Answer<Explanation>),
    Score(Answer<Option<Scores>>),
    Profile(Answer<Option<Profile>>),
    Absorbed(Answer<()>),
    Erased(Answer<bool>),
    Ticked(Answer<()>),
}

impl Pending {
    fn send(self, committed: &Result<(), EngineError>) {
        match self {
            Pending::Track(a) => a.send(committed),
            Pending::Explain(a) => a.send(committed),
            Pending::Score(a) => a.send(committed),
            Pending::Profile(a) => a.send(committed),
            Pending::Absorbed(a) => a.send(committed),
            Pending::Erased(a) => a.send(committed),
            Pending::Ticked(a) => a.send(committed),
        }
    }
}

/// The writes and answers of one group of commands.
#[derive(Default)]
struct Group {
    writes: Vec<Write>,
    pending: Vec<Pending>,
    /// People whose profile changed: written once at the end.
    dirty: HashSet<PersonKey>,
    /// Event ids recorded in this group, not yet in the store.
    seen: HashSet<(PersonKey, String)>,
    /// People whose trigger state changed.
    dirty_states: HashSet<PersonKey>,
    /// Delivered triggers for the outbox, with when their event was received.
    delivered: Vec<(trigger::Trigger, Option<Instant>)>,
    /// Experiment totals that changed.
    dirty_outcomes: HashSet<(String, String)>,
    /// Timer index entries taken out of memory, put back if the commit fails.
    unindexed: Vec<(Time, PersonKey)>,
}

/// One shard: the profiles and trigger states of its people, their timers, and the work
/// loop.
struct Shard {
    index: u16,
    profiles: HashMap<PersonKey, Profile>,
    /// The trigger states this group touched (the store holds them between groups).
    states: HashMap<PersonKey, TriggerState>,
    /// (due, person) for every pending timer of this shard's people.
    timers: BTreeSet<(Time, PersonKey)>,
    /// This shard's share of each (rule, variant)'s experiment totals.
    outcomes: BTreeMap<(String, String), OutcomeTotals>,
    /// Decisions made since start: orders the audit entries of one millisecond.
    decisions: u64,
    store: Arc<Store>,
    models: Arc<ModelRegistry>,
    triggers: Arc<Triggers>,
    metrics: Arc<Metrics>,
    dedup_horizon_ms: i64,
}

impl Shard {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut commands = vec![first];
            while commands.len() < MAX_GROUP
                && !matches!(commands.last(), Some(Command::Pause { .. }))
            {
                match rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            let mut group = Group::default();
            let mut pause = None;
            for command in commands {
                match command {
                    Command::Pause { paused, resume } => pause = Some((paused, resume)),
                    command => self.handle(command, &mut group),
                }
            }
            self.commit(group);
            if let Some((paused, resume)) = pause {
                let _ = paused.send(());
                // Blocks until the merge is done; an engine that is gone resumes us too.
                if let Ok(Resume {
                    evict: Some(person),
                }) = resume.recv()
                {
                    self.evict(&person);
                }
            }
        }
    }

    fn handle(&mut self, command: Command, group: &mut Group) {
        let pending = match command {
            Command::Track {
                events,
                now,
                received,
                reply,
            } => {
                let models: Vec<Arc<Model>> = self.models.current().iter().cloned().collect();
                let rules = self.triggers.rules.load_full();
                let value = events
                    .into_iter()
                    .map(|(index, event)| {
                        Ok((
                            index,
                            self.track(&event, &models, &rules, now, received, group)?,
                        ))
                    })
                    .collect();
                Pending::Track(Answer { reply, value })
            }
            Command::Tick { now, done } => {
                let value = self.fire_timers(now, group);
                if let Err(e) = &value {
                    tracing::error!(error = %e, "firing timers failed; they stay pending");
                }
                match done {
                    Some(reply) => Pending::Ticked(Answer { reply, value }),
                    None => return,
                }
            }
            Command::Explain { person, reply } => Pending::Explain(Answer {
                reply,
                value: self.explain(&person),
            }),
            Command::Score {
                person,
                models,
                now,
                reply,
            } => {
                let value = self.read(&person).map(|profile| {
                    profile.map(|p| score_row(&self.metrics, &models, &features::extract(&p, now)))
                });
                Pending::Score(Answer { reply, value })
            }
            Command::Profile { person, reply } => Pending::Profile(Answer {
                reply,
                value: self.read(&person),
            }),
            Command::Absorb { from, into, reply } => Pending::Absorbed(Answer {
                reply,
                value: self.absorb(&from, &into, group),
            }),
            Command::Erase { person, reply } => Pending::Erased(Answer {
                reply,
                value: self.erase(person, group),
            }),
            Command::Pause { .. } => unreachable!("pauses end a group"),
        };
        group.pending.push(pending);
    }

    fn erase(&mut self, person: PersonKey, group: &mut Group) -> Result<bool, EngineError> {
        let existed = match self.profiles.remove(&person) {
            Some(_) => {
                self.metrics.profiles.dec();
                true
            }
            None => self.store.load_profile(&person)?.is_some(),
        };
        group.dirty.remove(&person);
        group.seen.retain(|(p, _)| *p != person);
        group
            .writes
            .retain(|w| !matches!(w, Write::Seen(p, _, _) if *p == person));
        group.writes.push(Write::DeleteProfile(person.clone()));
        let state = self.take_state(&person)?;
        self.unindex(&person, &state.dues(), group);
        group.dirty_states.remove(&person);
        group
            .writes
            .push(Write::Triggers(person.clone(), Box::default()));
        group.writes.push(Write::Forget(person));
        Ok(existed)
    }

    /// The person's trigger state and latest decisions.
    fn explain(&self, person: &PersonKey) -> Result<Explanation, EngineError> {
        let state = match self.states.get(person) {
            Some(s) => s.clone(),
            None => self.store.load_triggers(person)?.unwrap_or_default(),
        };
        Ok(Explanation {
            decisions: self.store.audit(person, trigger::AUDIT_LEN)?,
            timers: state.timers,
        })
    }

    /// The person's trigger state for writing, loaded into memory.
    fn load_state(&mut self, person: &PersonKey) -> Result<&mut TriggerState, EngineError> {
        if !self.states.contains_key(person) {
            let stored = self.store.load_triggers(person)?.unwrap_or_default();
            self.states.insert(person.clone(), stored);
        }
        Ok(self.states.get_mut(person).expect("just inserted"))
    }

    /// Removes the person's trigger state from memory, returning it (from the store if it
    /// was not in memory).
    fn take_state(&mut self, person: &PersonKey) -> Result<TriggerState, EngineError> {
        match self.states.remove(person) {
            Some(s) => Ok(s),
            None => Ok(self.store.load_triggers(person)?.unwrap_or_default()),
        }
    }

    fn index(&mut self, person: &PersonKey, dues: &[Time], group: &mut Group) {
        for due in dues {
            if self.timers.insert((*due, person.clone())) {
                self.metrics.timers_pending.inc();
            }
            group
                .writes
                .push(Write::TimerIndex(*due, person.clone(), true));
        }
    }

    fn unindex(&mut self, person: &PersonKey, dues: &[Time], group: &mut Group) {
        for due in dues {
            let entry = (*due, person.clone());
            if self.timers.remove(&entry) {
                self.metrics.timers_pending.dec();
                group.unindexed.push(entry);
            }
            group
                .writes
                .push(Write::TimerIndex(*due, person.clone(), false));
        }
    }

    /// Fires the timers due at `now`, person by person.
    fn fire_timers(&mut self, now: Time, group: &mut Group) -> Result<(), EngineError> {
        let mut due: Vec<(Time, PersonKey)> = Vec::new();
        while let Some(first) = self.timers.first() {
            if first.0 > now || due.len() >= MAX_TIMERS_PER_TICK {
                break;
            }
            due.push(self.timers.pop_first().expect("just seen"));
            self.metrics.timers_pending.dec();
        }
        if due.is_empty() {
            return Ok(());
        }
        let models: Vec<Arc<Model>> = self.models.current().iter().cloned().collect();
        let rules = self.triggers.rules.load_full();
        let mut people: Vec<PersonKey> = due.iter().map(|(_, p)| p.clone()).collect();
        people.sort_unstable();
        people.dedup();
        group.unindexed.extend(due.iter().cloned());
        for person in people {
            let profile = self.read(&person)?;
            let row = profile
                .as_ref()
                .map_or(FeatureRow::missing(), |p| features::extract(p, now));
            let scores = score_row(&self.metrics, &models, &row);
            let history = profile.as_ref().map(History::of).unwrap_or_default();
            let remaining = self.evaluate(
                &person,
                &row,
                &scores,
                history,
                &models,
                &rules,
                now,
                group,
                |rules, state, facts| {
                    (
                        trigger::evaluate_timers(rules, state, facts),
                        Vec::new(),
                        None,
                    )
                },
            )?;
            // Index entries that came due and no longer match a timer leave the store.
            for (at, _) in due.iter().filter(|(_, p)| *p == person) {
                if !remaining.contains(at) {
                    group
                        .writes
                        .push(Write::TimerIndex(*at, person.clone(), false));
                }
            }
        }
        Ok(())
    }

    /// Runs `decide` on the person's trigger state and turns its firings into metrics,
    /// experiment totals, timer index changes and outbox entries. Returns the pending
    /// timers' due times.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &mut self,
        person: &PersonKey,
        row: &FeatureRow,
        scores: &Scores,
        history: History,
        models: &[Arc<Model>],
        rules: &RuleSet,
        now: Time,
        group: &mut Group,
        decide: impl FnOnce(
            &RuleSet,
            &mut TriggerState,
            &trigger::Facts<'_>,
        ) -> (Vec<Firing>, Vec<(String, String)>, Option<Instant>),
    ) -> Result<Vec<Time>, EngineError> {
        let named: Vec<(String, f64)> = scores
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .map(|s| (s.model.name().to_owned(), s.probability))
            .collect();
        // Segments only when some rule reads them (nearest-centroid search per event).
        let segment_set = self.models.segments();
        let segment = segment_set
            .as_ref()
            .as_ref()
            .filter(|_| rules.variables.contains("segment"))
            .and_then(|s| s.assign(row))
            .map(|s| s.name.as_str());
        let rule_segments = if rules.variables.contains("segments") {
            segments::rule_segments(row)
        } else {
            Vec::new()
        };
        // Once per model however many triggers this evaluation delivers.
        let explained: std::cell::RefCell<HashMap<String, Vec<Contribution>>> = Default::default();
        let explain = |model: &str| -> Vec<Contribution> {
            if let Some(c) = explained.borrow().get(model) {
                return c.clone();
            }
            let contributions: Vec<Contribution> = models
                .iter()
                .find(|m| m.name() == model)
                .map(|m| {
                    m.contributions(row, trigger::TOP_CONTRIBUTIONS)
                        .into_iter()
                        .map(|(feature, value)| Contribution {
                            feature: feature.to_owned(),
                            value,
                        })
                        .collect()
                })
                .unwrap_or_default();
            explained
                .borrow_mut()
                .insert(model.to_owned(), contributions.clone());
            contributions
        };
        let facts = trigger::Facts {
            person,
            row,
            scores: &named,
            segment,
            segments: &rule_segments,
            history,
            explain: &explain,
            now,
        };
        let state = self.load_state(person)?;
        let before = state.dues();
        let (firings, conversions, received) = decide(rules, state, &facts);
        let after = state.dues();
        let removed: Vec<Time> = before
            .iter()
            .filter(|d| !after.contains(d))
            .copied()
            .collect();
        let added: Vec<Time> = after
            .iter()
            .filter(|d| !before.contains(d))
            .copied()
            .collect();
        self.unindex(person, &removed, group);
        self.index(person, &added, group);
        // Latches move on most evaluations; the state is small.
        group.dirty_states.insert(person.clone());
        for firing in &firings {
            self.decisions += 1;
            group.writes.push(Write::Audit(
                person.clone(),
                Box::new(firing.audit_entry()),
                self.decisions,
            ));
        }
        for Firing { trigger, outcome } in firings {
            self.metrics
                .triggers
                .with_label_values(&[trigger.rule.as_str(), outcome.as_str()])
                .inc();
            if matches!(outcome, Decision::Delivered | Decision::Holdout) {
                if let Some(variant) = &trigger.variant {
                    let key = (trigger.rule.clone(), variant.clone());
                    self.metrics
                        .exposures
                        .with_label_values(&[&key.0, &key.1])
                        .inc();
                    self.outcomes.entry(key.clone()).or_default().exposures += 1;
                    group.dirty_outcomes.insert(key);
                }
            }
            if received.is_none() {
                self.metrics.timers_fired.inc();
            }
            if outcome == Decision::Delivered {
                group.delivered.push((trigger, received));
            }
        }
        for key in conversions {
            self.metrics
                .conversions
                .with_label_values(&[&key.0, &key.1])
                .inc();
            self.outcomes.entry(key.clone()).or_default().conversions += 1;
            group.dirty_outcomes.insert(key);
        }
        Ok(after)
    }

    /// The person's profile, from memory or the store, without creating one.
    fn read(&self, person: &PersonKey) -> Result<Option<Profile>, EngineError> {
        match self.profiles.get(person) {
            Some(p) => Ok(Some(p.clone())),
            None => Ok(self.store.load_profile(person)?),
        }
    }

    /// The person's profile for writing, loaded into memory (a new one if unknown).
    fn load(&mut self, person: &PersonKey) -> Result<&mut Profile, EngineError> {
        if !self.profiles.contains_key(person) {
            let stored = self.store.load_profile(person)?.unwrap_or_default();
            self.profiles.insert(person.clone(), stored);
            self.metrics.profiles.inc();
        }
        Ok(self.profiles.get_mut(person).expect("just inserted"))
    }

    /// Drops a person from memory (the store has them, or they were merged away).
    fn evict(&mut self, person: &PersonKey) {
        if self.profiles.remove(person).is_some() {
            self.metrics.profiles.dec();
        }
        self.states.remove(person);
    }

    fn is_duplicate(&self, event: &Event, now: Time, group: &Group) -> Result<bool, EngineError> {
        if group
            .seen
            .contains(&(event.person.clone(), event.id.clone()))
        {
            return Ok(true);
        }
        Ok(self
            .store
            .seen_at(&event.person, &event.id)?
            .is_some_and(|at| now.since(at) < self.dedup_horizon_ms))
    }

    #[allow(clippy::too_many_arguments)]
    fn track(
        &mut self,
        event: &Event,
        models: &[Arc<Model>],
        rules: &RuleSet,
        now: Time,
        received: Instant,
        group: &mut Group,
    ) -> Result<Outcome, EngineError> {
        let duplicate = self.is_duplicate(event, now, group)?;
        let metrics = self.metrics.clone();
        let profile = self.load(&event.person)?;
        if duplicate {
            let row = features::extract(profile, now);
            return Ok(Outcome::Duplicate(score_row(&metrics, models, &row)));
        }
        profile.apply(event);
        let row = features::extract(profile, now);
        group.dirty.insert(event.person.clone());
        group.seen.insert((event.person.clone(), event.id.clone()));
        group
            .writes
            .push(Write::Seen(event.person.clone(), event.id.clone(), now));
        let history = History::of(profile);
        let scores = score_row(&metrics, models, &row);
        if !rules.rules.is_empty() {
            let decide = |rules: &RuleSet, state: &mut TriggerState, facts: &trigger::Facts<'_>| {
                let firings = trigger::evaluate_event(rules, state, facts, event);
                let conversions = if event.kind == EventKind::Purchase {
                    trigger::record_purchase(state, event.time)
                } else {
                    Vec::new()
                };
                (firings, conversions, Some(received))
            };
            self.evaluate(
                &event.person,
                &row,
                &scores,
                history,
                models,
                rules,
                now,
                group,
                decide,
            )?;
        }
        Ok(Outcome::Accepted(scores))
    }

    fn absorb(
        &mut self,
        from: &PersonKey,
        into: &PersonKey,
        group: &mut Group,
    ) -> Result<(), EngineError> {
        // `from` is this shard's (then the group may hold its changes) or its shard is
        // paused with everything committed.
        let absorbed = match self.profiles.remove(from) {
            Some(p) => {
                self.metrics.profiles.dec();
                Some(p)
            }
            None => self.store.load_profile(from)?,
        };
        group.dirty.remove(from);
        for write in &mut group.writes {
            if let Write::Seen(p, _, _) = write {
                if p == from {
                    *p = into.clone();
                }
            }
        }
        group.seen = std::mem::take(&mut group.seen)
            .into_iter()
            .map(|(p, id)| (if p == *from { into.clone() } else { p }, id))
            .collect();
        let profile = self.load(into)?;
        if let Some(absorbed) = absorbed {
            profile.merge(absorbed);
        }
        group.dirty.insert(into.clone());
        // The visitor's timers and decisions become the user's. The visitor's shard may
        // still hold index entries in memory; they find no state and are dropped.
        let from_state = self.take_state(from)?;
        if !from_state.is_empty() {
            let from_dues = from_state.dues();
            for due in &from_dues {
                self.timers.remove(&(*due, from.clone()));
                group
                    .writes
                    .push(Write::TimerIndex(*due, from.clone(), false));
            }
            let state = self.load_state(into)?;
            let before = state.dues();
            state.merge(from_state);
            let added: Vec<Time> = state
                .dues()
                .into_iter()
                .filter(|d| !before.contains(d))
                .collect();
            self.index(into, &added, group);
            group.dirty_states.insert(into.clone());
        }
        group.dirty_states.remove(from);
        group
            .writes
            .push(Write::Triggers(from.clone(), Box::default()));
        group.writes.push(Write::DeleteProfile(from.clone()));
        group.writes.push(Write::MoveSeen {
            from: from.clone(),
            to: into.clone(),
        });
        group.writes.push(Write::Alias {
            anonymous: from.clone(),
            person: into.clone(),
        });
        Ok(())
    }

    /// Writes the group in one batch, then answers. If the store fails, the people the
    /// group changed are dropped from memory (the store still has their last good state)
    /// and every answer is the error.
    fn commit(&mut self, mut group: Group) {
        for person in &group.dirty {
            if let Some(profile) = self.profiles.get(person) {
                group
                    .writes
                    .push(Write::Profile(person.clone(), Box::new(profile.clone())));
            }
        }
        for person in &group.dirty_states {
            if let Some(state) = self.states.get(person) {
                group
                    .writes
                    .push(Write::Triggers(person.clone(), Box::new(state.clone())));
            }
        }
        for key in &group.dirty_outcomes {
            group.writes.push(Write::Outcome {
                rule: key.0.clone(),
                variant: key.1.clone(),
                shard: self.index,
                totals: self.outcomes.get(key).copied().unwrap_or_default(),
            });
        }
        let reservation = self.triggers.outbox.reserve(group.delivered.len());
        for (seq, (trigger, _)) in reservation.numbers().zip(&group.delivered) {
            match serde_json::to_vec(trigger) {
                Ok(bytes) => group.writes.push(Write::Outbox(seq, bytes)),
                Err(e) => tracing::error!(error = %e, "a trigger does not encode; dropped"),
            }
        }
        let started = Instant::now();
        let result = self.store.commit(group.writes).map_err(EngineError::from);
        self.metrics
            .store_commit_duration
            .observe(started.elapsed().as_secs_f64());
        self.triggers.outbox.complete(reservation);
        // Trigger states live in memory only for the group: they are small and read
        // quickly, and most people are between triggers most of the time.
        self.states.clear();
        match &result {
            Ok(()) => {
                for (_, received) in &group.delivered {
                    if let Some(received) = received {
                        self.metrics
                            .trigger_latency
                            .observe(received.elapsed().as_secs_f64());
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; answering UNAVAILABLE");
                self.metrics.store_errors.inc();
                for person in &group.dirty {
                    self.evict(person);
                }
                // The store still has the timers as they were before the group.
                for entry in group.unindexed {
                    if self.timers.insert(entry) {
                        self.metrics.timers_pending.inc();
                    }
                }
            }
        }
        for pending in group.pending {
            pending.send(&result);
        }
    }
}

/// Scores one row with each model, timing each.
fn score_row(metrics: &Metrics, models: &[Arc<Model>], row: &FeatureRow) -> Scores {
    models
        .iter()
        .map(|model| {
            let started = Instant::now();
            let result = model.score(std::slice::from_ref(row));
            metrics.observe_model(model.name(), started.elapsed(), result.is_ok());
            match result {
                Ok(p) => Ok(Score {
                    model: model.clone(),
                    probability: p[0],
                }),
                Err(e) => Err((model.clone(), e)),
            }
        })
        .collect()
}
