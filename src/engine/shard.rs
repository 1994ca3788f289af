//! One shard: the thread that owns a slice of the people — their profiles, their trigger
//! states while a group touches them, their timers — and its work loop.
//!
//! Group commit: a shard takes every command waiting in its queue (up to a limit), applies
//! them, writes all their changes — each changed profile once, plus an idempotency record
//! per event, trigger states, timer index entries, audit and outbox entries — in one
//! atomic store batch with one fsync, and only then answers. If the commit fails, the
//! group's people are dropped from memory (the store still has their last good state) and
//! every answer is the error.
//!
//! A panic while handling a command is a defect, and it must not take the shard with it:
//! the command answers `Panicked` (INTERNAL), it is counted, and its group is abandoned —
//! nothing of it is written, every other answer of the group is `GroupFailed` (nothing
//! of theirs was applied; they retry), and the shard forgets what it holds in memory
//! (profiles, trigger states, experiment totals) so that nothing a half-run command
//! changed survives. A shard thread that dies anyway turns readiness off.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::admission::Load;
use super::cache::Cache;
use super::merge::Resume;
use super::timers::TimerIndex;
use super::{EngineError, Outcome};
use crate::delivery::outbox::Outbox;
use crate::event::{Event, PersonKey};
use crate::features::{self, FeatureRow};
use crate::metrics::Metrics;
use crate::model::{score_each, score_row, Model, ModelRegistry, Scores};
use crate::profile::Profile;
use crate::readiness::{Readiness, Reason};
use crate::segments;
use crate::store::{Record, Store, StoreError, Write};
use crate::time::Time;
use crate::trigger::rules::RuleSet;
use crate::trigger::{
    self, Cause, Contribution, Explanation, Facts, Firing, History, Live, Memory,
    Outcome as Decision, OutcomeTotals, Trigger, TriggerState,
};

/// The most commands one shard folds into one commit.
const MAX_GROUP: usize = 512;
/// The most people whose timers one tick handles (the rest wait for the next tick).
const MAX_TIMERS_PER_TICK: usize = 2048;

pub(super) type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// What a shard is asked to do.
pub(super) enum Command {
    Track {
        events: Vec<(usize, Event)>,
        now: Time,
        received: Instant,
        /// The caller's gRPC deadline: past it, the events are dropped unapplied.
        deadline: Option<Instant>,
        reply: Reply<Vec<(usize, Outcome)>>,
    },
    /// Fire the timers due at `now`; `done`, if any, answers once they are committed.
    Tick { now: Time, done: Option<Reply<()>> },
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
    /// Stop after everything queued before this is committed, until resumed (a merge).
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
    /// The store reopened after a fault: forget what memory holds, load the timers again
    /// and take the experiment totals as the store has them.
    Resync {
        outcomes: BTreeMap<(String, String), OutcomeTotals>,
        reply: Reply<()>,
    },
    /// The drain token: commit and answer everything queued before it, then stop.
    Stop,
    /// Panics while handled (a test of the isolation).
    #[cfg(test)]
    Panic { reply: Reply<()> },
    /// Panics outside any command (a test of a shard thread dying).
    #[cfg(test)]
    Die,
}

impl Command {
    /// The units of work admission counted for this command when it was queued (events,
    /// or one for a request through `Engine::ask`); internal commands are not admitted.
    fn units(&self) -> u64 {
        match self {
            Command::Track { events, .. } => events.len() as u64,
            Command::Explain { .. }
            | Command::Score { .. }
            | Command::Profile { .. }
            | Command::Erase { .. } => 1,
            _ => 0,
        }
    }
}

/// An answer held back until the group's commit: the value, unless the commit fails.
struct Answer<T> {
    reply: Reply<T>,
    value: Result<T, EngineError>,
}

impl<T> Answer<T> {
    fn send(self, committed: &Result<(), EngineError>) {
        let value = match (committed, self.value) {
            (Ok(()), value) => value,
            // The command that panicked says so, whatever became of its group.
            (Err(_), Err(EngineError::Panicked)) => Err(EngineError::Panicked),
            (Err(e), _) => Err(e.clone()),
        };
        // Callers that gave up (deadline, cancellation) no longer listen; that is fine.
        let _ = self.reply.send(value);
    }
}

enum Pending {
    Track(Answer<Vec<(usize, Outcome)>>),
    Explain(Answer<Explanation>),
    Score(Answer<Option<Scores>>),
    /// Boxed: a profile is several times the size of the other answers.
    Profile(Box<Answer<Option<Profile>>>),
    Absorbed(Answer<()>),
    Erased(Answer<bool>),
    Ticked(Answer<()>),
    Done(Answer<()>),
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
            Pending::Done(a) => a.send(committed),
        }
    }
}

/// The writes and answers of one group of commands.
#[derive(Default)]
pub(super) struct Group {
    pub(super) writes: Vec<Write>,
    pending: Vec<Pending>,
    /// People whose profile changed: written once at the end.
    pub(super) dirty: HashSet<PersonKey>,
    /// Event ids recorded in this group, not yet in the store.
    pub(super) seen: HashSet<(PersonKey, String)>,
    /// People whose trigger state changed.
    pub(super) dirty_states: HashSet<PersonKey>,
    /// Delivered triggers for the outbox, with when their event was received.
    delivered: Vec<(Trigger, Option<Instant>)>,
    /// Experiment totals that changed.
    dirty_outcomes: HashSet<(String, String)>,
    /// Timer index entries taken out of memory, put back if the commit fails.
    pub(super) unindexed: Vec<(Time, PersonKey)>,
    /// A command of the group panicked: the group is abandoned, not committed.
    panicked: bool,
}

/// What one command's evaluation shares: the models and rules it started with, and `now`.
struct Round<'a> {
    models: &'a [Arc<Model>],
    rules: &'a RuleSet,
    now: Time,
}

/// A person as scored at `now`: what rules are evaluated on.
struct Scored<'a> {
    person: &'a PersonKey,
    row: &'a FeatureRow,
    scores: &'a Scores,
    history: History,
    memory: &'a Memory,
}

/// One shard: the profiles and trigger states of its people, their timers, and the work
/// loop.
pub(super) struct Shard {
    index: u16,
    /// This shard's queue and speed, for admission.
    load: Arc<Load>,
    /// The profiles and trigger states of the people used lately, within a budget.
    pub(super) cache: Cache,
    pub(super) timers: TimerIndex,
    /// This shard's share of each (rule, variant)'s experiment totals.
    outcomes: BTreeMap<(String, String), OutcomeTotals>,
    /// Decisions made since start: orders the audit entries of one millisecond.
    decisions: u64,
    pub(super) store: Arc<Store>,
    models: Arc<ModelRegistry>,
    rules: Arc<Live>,
    outbox: Arc<Outbox>,
    pub(super) metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    dedup_horizon_ms: i64,
}

/// Lives as long as the shard thread's work loop: a loop that unwinds says so.
struct Alive<'a> {
    index: u16,
    readiness: &'a Readiness,
}

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.readiness.set(
                Reason::Shard,
                format!(
                    "shard {} stopped after a panic; its people cannot be served until a restart",
                    self.index
                ),
            );
        }
    }
}

impl Shard {
    #[allow(clippy::too_many_arguments)] // one constructor, called once, with named parts
    pub(super) fn new(
        load: Arc<Load>,
        index: u16,
        timers: TimerIndex,
        outcomes: BTreeMap<(String, String), OutcomeTotals>,
        store: Arc<Store>,
        models: Arc<ModelRegistry>,
        rules: Arc<Live>,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        dedup_horizon_ms: i64,
        cache_bytes: usize,
    ) -> Shard {
        Shard {
            index,
            load,
            cache: Cache::new(cache_bytes, metrics.clone()),
            timers,
            outcomes,
            decisions: 0,
            store,
            models,
            rules,
            outbox,
            metrics,
            readiness,
            dedup_horizon_ms,
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let readiness = self.readiness.clone();
        let _alive = Alive {
            index: self.index,
            readiness: &readiness,
        };
        while let Some(first) = rx.blocking_recv() {
            let mut commands = vec![first];
            while commands.len() < MAX_GROUP
                && !matches!(commands.last(), Some(Command::Pause { .. } | Command::Stop))
            {
                match rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }

            let units: u64 = commands.iter().map(Command::units).sum();
            self.load.started(units);
            let started = Instant::now();
            let mut committing = std::time::Duration::ZERO;
            let mut group = Group::default();
            let mut pause = None;
            let mut stop = false;
            for command in commands {
                match command {
                    Command::Pause { paused, resume } => pause = Some((paused, resume)),
                    Command::Stop => stop = true,
                    #[cfg(test)]
                    Command::Die => panic!("a shard dies (test)"),
                    command => {
                        self.handle(command, &mut group);
                        if group.panicked {
                            // Abandoned at once; the commands after it start a new group.
                            self.commit(std::mem::take(&mut group));
                        }
                    }
                }
            }
            let commit = Instant::now();
            self.commit(group);
            committing += commit.elapsed();
            self.load
                .finished(units, started.elapsed() - committing, committing);
            if stop {
                // What is still queued is dropped with the receiver: its callers hear
                // `ShuttingDown`, and none of it was acknowledged.
                return;
            }
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

    /// Runs one command's work; a panic in it becomes `Panicked`, counted, and marks the
    /// group abandoned.
    fn guarded<T>(
        &mut self,
        group: &mut Group,
        work: impl FnOnce(&mut Shard, &mut Group) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| work(self, group))) {
            Ok(value) => value,
            Err(_) => {
                // The panic hook has logged the message and where.
                tracing::error!(
                    shard = self.index,
                    "a command panicked; its group is abandoned"
                );
                self.metrics.panics.with_label_values(&["shard"]).inc();
                group.panicked = true;
                Err(EngineError::Panicked)
            }
        }
    }

    fn handle(&mut self, command: Command, group: &mut Group) {
        let pending = match command {
            Command::Track {
                events,
                now,
                received,
                deadline,
                reply,
            } => {
                self.metrics
                    .queue_wait
                    .observe(received.elapsed().as_secs_f64());
                if deadline.is_some_and(|d| d <= Instant::now()) {
                    // The caller has gone: no work, and no answer anyone reads.
                    self.metrics.shed.with_label_values(&["expired"]).inc();
                    let value = Err(EngineError::DeadlineExpired);
                    group.pending.push(Pending::Track(Answer { reply, value }));
                    return;
                }
                let value = self.guarded(group, |shard, group| {
                    let (models, rules) = shard.serving();
                    let round = Round {
                        models: &models,
                        rules: &rules,
                        now,
                    };
                    shard.track(&events, &round, received, group)
                });
                Pending::Track(Answer { reply, value })
            }
            Command::Tick { now, done } => {
                let value = self.guarded(group, |shard, group| shard.fire_timers(now, group));
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
                value: self.guarded(group, |shard, _| shard.explain(&person)),
            }),
            Command::Score {
                person,
                models,
                now,
                reply,
            } => {
                let value = self.guarded(group, |shard, _| {
                    let profile = shard.read(&person)?;
                    Ok(profile
                        .map(|p| score_row(&models, &features::extract(&p, now), &shard.metrics)))
                });
                Pending::Score(Answer { reply, value })
            }
            Command::Profile { person, reply } => Pending::Profile(Box::new(Answer {
                reply,
                value: self.guarded(group, |shard, _| shard.read(&person)),
            })),
            Command::Absorb { from, into, reply } => Pending::Absorbed(Answer {
                reply,
                value: self.guarded(group, |shard, group| shard.absorb(&from, &into, group)),
            }),
            Command::Erase { person, reply } => Pending::Erased(Answer {
                reply,
                value: self.guarded(group, |shard, group| shard.erase(person, group)),
            }),
            Command::Resync { outcomes, reply } => {
                self.forget_memory();
                self.timers.reset();
                self.outcomes = outcomes;
                Pending::Done(Answer {
                    reply,
                    value: Ok(()),
                })
            }
            #[cfg(test)]
            Command::Panic { reply } => Pending::Done(Answer {
                reply,
                value: self.guarded(group, |_, _| panic!("a command panics (test)")),
            }),
            #[cfg(test)]
            Command::Die => unreachable!("handled by the work loop"),
            Command::Pause { .. } | Command::Stop => unreachable!("pauses and stops end a group"),
        };
        group.pending.push(pending);
    }

    /// The models and rules serving now; a command keeps them to its end, whatever a
    /// reload swaps in meanwhile.
    fn serving(&self) -> (Vec<Arc<Model>>, Arc<RuleSet>) {
        (
            self.models.current().iter().cloned().collect(),
            self.rules.current(),
        )
    }

    /// Applies a Track command's events, scores them, and evaluates the rules for each.
    ///
    /// Every event is applied first, then all rows are scored in one call per model (a
    /// batch walks the trees several times faster than its rows one by one), then the
    /// rules run in the events' order. That order of effects is the same as one event at
    /// a time: an evaluation reads the row, scores and history taken at its own event and
    /// the person's trigger state, never the profile a later event changed.
    fn track(
        &mut self,
        events: &[(usize, Event)],
        round: &Round<'_>,
        received: Instant,
        group: &mut Group,
    ) -> Result<Vec<(usize, Outcome)>, EngineError> {
        let mut rows = Vec::with_capacity(events.len());
        let mut histories = Vec::with_capacity(events.len());
        for (_, event) in events {
            let (row, history) = self.apply(event, round, group)?;
            rows.push(row);
            histories.push(history);
        }
        let scores = score_each(round.models, &rows, &self.metrics);
        let mut outcomes = Vec::with_capacity(events.len());
        for ((((index, event), row), scores), history) in
            events.iter().zip(&rows).zip(scores).zip(histories)
        {
            let Some((history, memory)) = history else {
                outcomes.push((*index, Outcome::Duplicate(scores)));
                continue;
            };
            if !round.rules.rules.is_empty() {
                let scored = Scored {
                    person: &event.person,
                    row,
                    scores: &scores,
                    history,
                    memory: &memory,
                };
                self.evaluate(scored, Cause::Event(event), Some(received), round, group)?;
            }
            outcomes.push((*index, Outcome::Accepted(scores)));
        }
        Ok(outcomes)
    }

    /// Applies one event to its person's profile (unless it is a duplicate) and records
    /// its id: the person's feature row after it, and their history and memory as the
    /// rules read them (`None` for a duplicate, which changes nothing and is not
    /// evaluated).
    fn apply(
        &mut self,
        event: &Event,
        round: &Round<'_>,
        group: &mut Group,
    ) -> Result<(FeatureRow, Option<(History, Memory)>), EngineError> {
        let now = round.now;
        let duplicate = self.is_duplicate(event, now, group)?;
        let profile = self.load(&event.person)?;
        if duplicate {
            return Ok((features::extract(profile, now), None));
        }
        profile.apply(event);
        let row = features::extract(profile, now);
        // Taken now: a later event of the batch must not change what this one's rules see.
        let memory = Memory::of(profile, Some(event), now, round.rules.memory_needs);
        let history = (History::of(profile), memory);
        group.dirty.insert(event.person.clone());
        group.seen.insert((event.person.clone(), event.id.clone()));
        group
            .writes
            .push(Write::Seen(event.person.clone(), event.id.clone(), now));
        Ok((row, Some(history)))
    }

    /// Evaluates the rules for one person and one cause, and turns the decisions into
    /// metrics, experiment totals, timer index changes, audit and outbox entries. Returns
    /// the pending timers' due times.
    fn evaluate(
        &mut self,
        scored: Scored<'_>,
        cause: Cause<'_>,
        received: Option<Instant>,
        round: &Round<'_>,
        group: &mut Group,
    ) -> Result<Vec<Time>, EngineError> {
        let Scored {
            person,
            row,
            scores,
            history,
            memory,
        } = scored;
        let rules = round.rules;
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
            .filter(|_| rules.reads("segment"))
            .and_then(|s| s.assign(row))
            .map(|s| s.name.as_str());
        let rule_segments = if rules.reads("segments") {
            segments::rule_segments(row)
        } else {
            Vec::new()
        };
        // Once per model however many triggers this evaluation delivers.
        let explained: RefCell<HashMap<String, Vec<Contribution>>> = Default::default();
        let explain = |model: &str| -> Vec<Contribution> {
            if let Some(c) = explained.borrow().get(model) {
                return c.clone();
            }
            let contributions: Vec<Contribution> = round
                .models
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
        let facts = Facts {
            person,
            row,
            scores: &named,
            segment,
            segments: &rule_segments,
            history,
            memory,
            explain: &explain,
            now: round.now,
        };
        let state = self.load_state(person)?;
        let unchanged = state.clone();
        let before = state.dues();
        let decisions = trigger::evaluate(rules, state, &facts, cause);
        let after = state.dues();
        // Most evaluations of most people change nothing: no write then.
        if *state != unchanged {
            group.dirty_states.insert(person.clone());
        }
        if decisions.expression_panics > 0 {
            // Each panicked expression counted as false (the evaluator logged which);
            // the rest of the evaluation stands.
            self.metrics
                .panics
                .with_label_values(&["rule_expression"])
                .inc_by(decisions.expression_panics);
        }
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
        self.timers
            .remove(person, &removed, &mut group.writes, &mut group.unindexed);
        self.timers.add(person, &added, &mut group.writes);
        for firing in &decisions.firings {
            self.decisions += 1;
            group.writes.push(Write::Audit(
                person.clone(),
                Box::new(firing.audit_entry()),
                self.decisions,
            ));
        }
        for Firing {
            trigger, outcome, ..
        } in decisions.firings
        {
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
                    // Its zero, so a conversion rate has a denominator's partner from the
                    // first exposure on.
                    self.metrics
                        .conversions
                        .with_label_values(&[&key.0, &key.1]);
                    self.outcomes.entry(key.clone()).or_default().exposures += 1;
                    group.dirty_outcomes.insert(key);
                }
            }
            if matches!(cause, Cause::Due) {
                self.metrics.timers_fired.inc();
            }
            if outcome == Decision::Delivered {
                group.delivered.push((trigger, received));
            }
        }
        for key in decisions.conversions {
            self.metrics
                .conversions
                .with_label_values(&[&key.0, &key.1])
                .inc();
            self.outcomes.entry(key.clone()).or_default().conversions += 1;
            group.dirty_outcomes.insert(key);
        }
        Ok(after)
    }

    /// Fires the timers due at `now`, person by person.
    fn fire_timers(&mut self, now: Time, group: &mut Group) -> Result<(), EngineError> {
        let due = self.timers.pop_due(now, MAX_TIMERS_PER_TICK);
        if due.is_empty() {
            return Ok(());
        }
        for (at, _) in &due {
            let late_ms = now.since(*at).max(0);
            self.metrics.timer_lateness.observe(late_ms as f64 / 1000.0);
        }
        let (models, rules) = self.serving();
        let round = Round {
            models: &models,
            rules: &rules,
            now,
        };
        let mut people: Vec<PersonKey> = due.iter().map(|(_, p)| p.clone()).collect();
        people.sort_unstable();
        people.dedup();
        group.unindexed.extend(due.iter().cloned());
        for person in people {
            let profile = self.read(&person)?;
            let row = profile
                .as_ref()
                .map_or(FeatureRow::missing(), |p| features::extract(p, now));
            let scores = score_row(&models, &row, &self.metrics);
            let history = profile.as_ref().map(History::of).unwrap_or_default();
            let memory = profile
                .as_ref()
                .map(|p| Memory::of(p, None, now, rules.memory_needs))
                .unwrap_or_default();
            let scored = Scored {
                person: &person,
                row: &row,
                scores: &scores,
                history,
                memory: &memory,
            };
            let remaining = self.evaluate(scored, Cause::Due, None, &round, group)?;
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

    fn erase(&mut self, person: PersonKey, group: &mut Group) -> Result<bool, EngineError> {
        let existed = match self.cache.take_profile(&person) {
            Some(_) => true,
            None => self.store.load_profile(&person)?.is_some(),
        };
        group.dirty.remove(&person);
        group.seen.retain(|(p, _)| *p != person);
        group.writes.push(Write::DeleteProfile(person.clone()));
        let state = self.take_state(&person)?;
        self.timers.remove(
            &person,
            &state.dues(),
            &mut group.writes,
            &mut group.unindexed,
        );
        group.dirty_states.remove(&person);
        group.writes.push(Write::Triggers(person.clone(), None));
        // Also covers what this group wrote for the person before (idempotency records,
        // audit entries): the store applies a batch in order.
        group.writes.push(Write::Forget(person));
        Ok(existed)
    }

    /// The person's trigger state and latest decisions.
    fn explain(&self, person: &PersonKey) -> Result<Explanation, EngineError> {
        let state = match self.cache.peek_state(person) {
            Some(s) => s.clone(),
            None => self.store.load_triggers(person)?.unwrap_or_default(),
        };
        Ok(Explanation {
            decisions: self.store.audit(person, trigger::AUDIT_LEN)?,
            timers: state.timers,
        })
    }

    /// The person's trigger state for writing, loaded into memory.
    pub(super) fn load_state(
        &mut self,
        person: &PersonKey,
    ) -> Result<&mut TriggerState, EngineError> {
        // A lookup, then an insert: returning the lookup's borrow on a hit would hold the
        // cache across the miss's branch.
        if self.cache.state(person).is_none() {
            let stored = self.store.load_triggers(person)?.unwrap_or_default();
            return Ok(self.cache.insert_state(person, stored));
        }
        Ok(self.cache.state_cached(person).expect("just found"))
    }

    /// Removes the person's trigger state from memory, returning it (from the store if it
    /// was not in memory).
    pub(super) fn take_state(&mut self, person: &PersonKey) -> Result<TriggerState, EngineError> {
        match self.cache.take_state(person) {
            Some(s) => Ok(s),
            None => Ok(self.store.load_triggers(person)?.unwrap_or_default()),
        }
    }

    /// The person's profile, from memory or the store, without creating one.
    fn read(&mut self, person: &PersonKey) -> Result<Option<Profile>, EngineError> {
        match self.cache.profile(person) {
            Some(p) => Ok(Some(p.clone())),
            None => Ok(self.store.load_profile(person)?),
        }
    }

    /// The person's profile for writing, loaded into memory (a new one if unknown).
    pub(super) fn load(&mut self, person: &PersonKey) -> Result<&mut Profile, EngineError> {
        if self.cache.profile(person).is_none() {
            let stored = self.store.load_profile(person)?.unwrap_or_default();
            return Ok(self.cache.insert_profile(person, stored));
        }
        Ok(self.cache.profile_cached(person).expect("just found"))
    }

    /// Drops a person from memory (the store has them, or they were merged away).
    pub(super) fn evict(&mut self, person: &PersonKey) {
        self.cache.evict(person);
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

    /// Forgets every profile and trigger state held in memory (the store has them).
    fn forget_memory(&mut self) {
        self.cache.clear();
    }

    /// Takes this shard's experiment totals from the store again, dropping changes made
    /// in memory by a group that did not commit.
    fn reload_outcomes(&mut self) {
        match self.store.outcomes() {
            Ok(stored) => {
                self.outcomes = stored
                    .into_iter()
                    .filter(|(_, _, shard, _)| *shard == self.index)
                    .map(|(rule, variant, _, totals)| ((rule, variant), totals))
                    .collect();
            }
            // The resync after the store reopens takes them from the store then.
            Err(e) => tracing::warn!(error = %e, "reloading experiment totals failed"),
        }
    }

    /// Writes the group in one batch, then answers. If the store fails, the people the
    /// group changed are dropped from memory (the store still has their last good state)
    /// and every answer is the error. A group in which a command panicked is not written:
    /// memory is forgotten whole, and every answer but the panicked one's is
    /// `GroupFailed`.
    /// The group's writes of changed profiles, trigger states and experiment totals,
    /// encoded straight from the cache (no clone of what it keeps).
    fn encode_changes(&mut self, group: &mut Group) -> Result<(), StoreError> {
        for person in &group.dirty {
            let (profile, state) = self.cache.changed(person);
            if let Some(profile) = profile {
                let record = Record::profile(profile)?;
                group.writes.push(Write::Profile(person.clone(), record));
            }
            if let Some(state) = state.filter(|_| group.dirty_states.contains(person)) {
                let record = Record::triggers(state)?;
                group.writes.push(Write::Triggers(person.clone(), record));
            }
        }
        for person in group.dirty_states.difference(&group.dirty) {
            if let (_, Some(state)) = self.cache.changed(person) {
                let record = Record::triggers(state)?;
                group.writes.push(Write::Triggers(person.clone(), record));
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
        Ok(())
    }

    fn commit(&mut self, mut group: Group) {
        if group.panicked {
            self.forget_memory();
            self.reload_outcomes();
            self.timers.restore(group.unindexed);
            let failed = Err(EngineError::GroupFailed);
            for pending in group.pending {
                pending.send(&failed);
            }
            return;
        }
        // One look at each changed person: their writes, encoded from the cache, and their
        // weight counted again (if the commit fails they are evicted, weight and all).
        let encoded = self.encode_changes(&mut group);
        let reservation = self.outbox.reserve(group.delivered.len());
        for (seq, (trigger, _)) in reservation.numbers().zip(&group.delivered) {
            match serde_json::to_vec(trigger) {
                Ok(bytes) => group.writes.push(Write::Outbox(seq, bytes)),
                Err(e) => tracing::error!(error = %e, "a trigger does not encode; dropped"),
            }
        }
        let started = Instant::now();
        let result = encoded
            .and_then(|()| self.store.commit(group.writes))
            .map_err(EngineError::from);
        self.metrics
            .store_commit_duration
            .observe(started.elapsed().as_secs_f64());
        self.outbox.complete(reservation);
        match &result {
            Ok(()) => {
                self.timers.committed();
                // Everything cached is clean now: the cache goes back under its budget.
                self.cache.shrink();
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
                for person in group.dirty.iter().chain(&group.dirty_states) {
                    self.evict(person);
                }
                self.reload_outcomes();
                // The store still has the timers as they were before the group.
                self.timers.restore(group.unindexed);
            }
        }
        for pending in group.pending {
            pending.send(&result);
        }
    }
}
