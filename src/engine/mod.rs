//! The engine owns every profile. People are spread over shards by a stable hash of their
//! key; each shard is one thread that alone applies events to its people, extracts their
//! features, scores them, evaluates their trigger rules and writes them to the store, so
//! no lock guards profile state.
//!
//! - this file: [`Engine`], the handle the API and the server hold, and routing (alias
//!   resolution, the shard of a person, bounded queues);
//! - [`shard`]: the shard thread, its commands and the group commit;
//! - [`merge`]: the identity merge protocol across two shards, both halves;
//! - [`timers`]: each shard's index of pending timers by due time.
//!
//! Queues are bounded in count (memory) and in time ([`admission`]): a request that
//! would wait past the budget, or could not finish before its deadline, is told at once
//! ([`EngineError::Overloaded`], [`EngineError::DeadlineUnmeetable`]). An answer is a
//! promise: a shard answers only after the store batch holding the request's effects is
//! committed.

mod admission;
mod cache;
mod merge;
mod shard;
mod timers;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, PersonKey};
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::model::{Model, ModelRegistry, Scores};
use crate::profile::Profile;
use crate::readiness::Readiness;
use crate::store::{Store, StoreError};
use crate::time::Time;
use crate::trigger::rules::{RuleSet, RulesError};
use crate::trigger::{Explanation, Live, OutcomeTotals, VariantOutcome};
use admission::{Load, Refusal};
pub use merge::Merge;
use shard::{Command, Reply, Shard};
use timers::TimerIndex;

/// How the engine is laid out.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Shard threads; each owns a slice of the people.
    pub shards: usize,
    /// Requests waiting per shard before callers are turned away.
    pub queue_capacity: usize,
    /// How long an event id is remembered for idempotency.
    pub dedup_horizon_ms: i64,
    /// The most work (at the measured rate) that may be ahead of a request in a shard's
    /// queue.
    pub queue_budget: Duration,
    /// The bytes the shards may keep people in, shared equally.
    pub cache_bytes: usize,
}

/// Why the engine could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is overloaded: more work is queued ahead of this request than the queue budget; retry in {} ms", retry_after.as_millis())]
    Overloaded { retry_after: Duration },
    #[error("the request's deadline cannot be met at the current load; nothing of it was applied")]
    DeadlineUnmeetable,
    #[error("the request's deadline passed while it waited; nothing of it was applied")]
    DeadlineExpired,
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Shared by every request of the group whose commit failed.
    #[error("the store failed; nothing of this request was acknowledged: {0}")]
    Store(#[source] Arc<StoreError>),
    #[error("{0}")]
    Conflict(#[from] crate::identity::LinkRefused),
    /// Handling the request panicked (a defect, logged and counted); nothing of it was
    /// applied.
    #[error("the request failed inside the server (a defect, logged); nothing of it was applied")]
    Panicked,
    /// Another request committed together with this one panicked, so none of the group
    /// was applied; this one may be retried as it is.
    #[error("a request handled together with this one failed inside the server; nothing of this request was applied; retry")]
    GroupFailed,
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(Arc::new(e))
    }
}

/// How a request is admitted to the shards' queues.
#[derive(Debug, Clone, Copy)]
pub enum Admit {
    /// Within the queue budget, and only if it can finish before `deadline` (a unary
    /// call): refused at once otherwise.
    Shed { deadline: Option<Instant> },
    /// Within the queues' count bound only: the caller's own window bounds what it has
    /// queued (a TrackStream, at most a few batches in flight and held back by HTTP/2
    /// flow control), so its batches wait rather than end the stream.
    Flow,
}

/// What became of a tracked event.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; the person's scores after it.
    Accepted(Scores),
    /// Its id was seen within the horizon: nothing changed; the person's current scores.
    Duplicate(Scores),
}

/// The handle to the shard threads.
pub struct Engine {
    shards: Vec<mpsc::Sender<Command>>,
    /// Each shard's queue and speed, for admission.
    loads: Vec<Arc<Load>>,
    queue_budget: Duration,
    /// Taken by [`Engine::shutdown`].
    threads: Mutex<Vec<JoinHandle<()>>>,
    identities: Arc<Identities>,
    rules: Arc<Live>,
    store: Arc<Store>,
    /// One identity merge (or erasure) at a time.
    merges: tokio::sync::Mutex<()>,
    /// The store's count of timer index entries that `nudge_timers_pending` started from
    /// (the shards add their changes since).
    stored_timers: Mutex<i64>,
    metrics: Arc<Metrics>,
    /// Holds an erasure between its commit and its outbox scan (a test's gate): tells the
    /// first sender it arrived, then waits for the second.
    #[cfg(test)]
    before_forget: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)] // the parts the shards share, each named once
    pub fn start(
        options: &EngineOptions,
        store: Arc<Store>,
        identities: Arc<Identities>,
        models: Arc<ModelRegistry>,
        rules: Arc<Live>,
        outbox: Arc<crate::delivery::outbox::Outbox>,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Result<Engine, EngineError> {
        let count = options.shards.max(1);
        metrics
            .cache_budget
            .set(i64::try_from(options.cache_bytes).unwrap_or(i64::MAX));
        // Each shard loads its own people's timers from the store as time moves, from its
        // first tick on (timers.rs); none is read here. The count of pending timers starts
        // from the store's, a scan of the index's keys.
        let timers = TimerIndex::for_shards(count, &store, &metrics);
        let counting = Instant::now();
        let stored_timers = store.timer_count()? as i64;
        metrics.timers_pending.add(stored_timers);
        tracing::info!(
            timers = stored_timers,
            elapsed_ms = counting.elapsed().as_millis() as u64,
            "pending timers counted"
        );
        // Each shard takes its own experiment totals.
        let mut outcomes = vec![BTreeMap::new(); count];
        for (rule, variant, shard, totals) in store.outcomes()? {
            if let Some(o) = outcomes.get_mut(usize::from(shard)) {
                o.insert((rule, variant), totals);
            }
        }
        let mut shards = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        let loads: Vec<Arc<Load>> = (0..count).map(|_| Arc::default()).collect();
        for (i, (timers, outcomes)) in timers.into_iter().zip(outcomes).enumerate() {
            let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
            let shard = Shard::new(
                loads[i].clone(),
                i as u16,
                timers,
                outcomes,
                store.clone(),
                models.clone(),
                rules.clone(),
                outbox.clone(),
                metrics.clone(),
                readiness.clone(),
                options.dedup_horizon_ms,
                options.cache_bytes / count,
            );
            let thread = std::thread::Builder::new()
                .name(format!("nudge-shard-{i}"))
                .spawn(move || shard.run(rx))
                .expect("spawning a shard thread");
            shards.push(tx);
            threads.push(thread);
        }
        Ok(Engine {
            shards,
            loads,
            queue_budget: options.queue_budget,
            threads: Mutex::new(threads),
            identities,
            rules,
            store,
            merges: tokio::sync::Mutex::new(()),
            stored_timers: Mutex::new(stored_timers),
            metrics,
            #[cfg(test)]
            before_forget: Mutex::new(None),
        })
    }

    fn shard_of(&self, person: &PersonKey) -> usize {
        shard_index(person, self.shards.len())
    }

    /// Applies validated events in order and answers each event's outcome. An event that
    /// carries both a user id and a not-yet-linked anonymous id first merges the anonymous
    /// visitor into the user. Either every event is queued or none is: capacity on every
    /// shard involved is reserved first, and each must admit its part as `admit` says.
    pub async fn track(
        &self,
        events: Vec<(usize, Event)>,
        now: Time,
        admit: Admit,
    ) -> Result<Vec<(usize, Outcome)>, EngineError> {
        let received = Instant::now();
        self.writable()?;
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
            let mut admitted = Admitted::new(&self.loads);
            for (i, batch) in per_shard.into_iter().enumerate() {
                if batch.is_empty() {
                    continue;
                }
                self.admit(&mut admitted, i, batch.len() as u64, admit)?;
                let permit = self.shards[i]
                    .try_reserve()
                    .map_err(|e| self.full_or_closed(e))?;
                permits.push((permit, batch));
            }
            admitted.keep();
            for (permit, events) in permits {
                let (reply, answer) = oneshot::channel();
                permit.send(Command::Track {
                    events,
                    now,
                    received,
                    deadline: match admit {
                        Admit::Shed { deadline } => deadline,
                        Admit::Flow => None,
                    },
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

    /// Refuses work that writes while the store has a fault, at once: it would be applied
    /// in memory and then fail at its commit.
    fn writable(&self) -> Result<(), EngineError> {
        match self.store.fault() {
            Some(fault) => Err(StoreError::Faulted(fault).into()),
            None => Ok(()),
        }
    }

    /// After the store reopened: every shard forgets what it holds in memory and loads
    /// its timers again, and takes its experiment totals, from the store, which is the
    /// truth (a commit that failed may still have reached the disk); the pending count
    /// starts again from the store's. Waits for room in each queue. Writes are still
    /// refused, so the store holds still meanwhile.
    pub async fn resync(&self) -> Result<(), EngineError> {
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.outcomes())
            .await
            .map_err(|_| EngineError::ShuttingDown)??;
        let count = self.shards.len();
        let mut outcomes = vec![BTreeMap::new(); count];
        for (rule, variant, shard, totals) in stored {
            if let Some(o) = outcomes.get_mut(usize::from(shard)) {
                o.insert((rule, variant), totals);
            }
        }
        let mut answers = Vec::with_capacity(count);
        for (shard, outcomes) in self.shards.iter().zip(outcomes) {
            let (reply, answer) = oneshot::channel();
            shard
                .send(Command::Resync { outcomes, reply })
                .await
                .map_err(|_| EngineError::ShuttingDown)?;
            answers.push(answer);
        }
        for answer in answers {
            answer.await.map_err(|_| EngineError::ShuttingDown)??;
        }
        // Each shard took its share of the count out as it reset.
        let store = self.store.clone();
        let recount = tokio::task::spawn_blocking(move || store.timer_count())
            .await
            .map_err(|_| EngineError::ShuttingDown)?? as i64;
        let mut stored_timers = self.stored_timers.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics.timers_pending.add(recount - *stored_timers);
        *stored_timers = recount;
        Ok(())
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

    /// Deletes everything about a person — profile, aliases, idempotency records, trigger
    /// state and timers, audit — durably, then their delivered triggers. Answers whether
    /// there was a profile; erasing twice is harmless.
    pub async fn erase(&self, person: PersonKey) -> Result<bool, EngineError> {
        self.writable()?;
        let (existed, people) = {
            // The person and their aliases must not change while they are erased.
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
            (existed, people)
        };
        // Delivered triggers name the person too. The scan of the outbox runs without the
        // merge lock: logins (merges) must not wait behind it, and nothing can deliver a
        // new trigger for ids that no longer resolve to a person.
        #[cfg(test)]
        {
            let gate = self.before_forget.lock().unwrap().take();
            if let Some((arrived, release)) = gate {
                let _ = arrived.send(());
                let _ = release.await;
            }
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || crate::delivery::forget(&store, &people))
            .await
            .map_err(|_| EngineError::ShuttingDown)??;
        self.metrics.erasures.inc();
        Ok(existed)
    }

    /// Reads the rules file again; a file with problems is refused (and counted) and the
    /// running rules stay. `cause` is for the log.
    pub fn reload_rules(&self, cause: &str) -> Result<Arc<RuleSet>, RulesError> {
        match self.rules.reload() {
            Ok(reloaded) => {
                if reloaded.changed {
                    let rules = &reloaded.rules;
                    self.metrics.rules_reloads.with_label_values(&["ok"]).inc();
                    self.metrics.rules_loaded.set(rules.rules.len() as i64);
                    tracing::info!(cause, version = %rules.version, rules = rules.rules.len(), "rules now running");
                }
                Ok(reloaded.rules)
            }
            Err(e) => {
                self.metrics
                    .rules_reloads
                    .with_label_values(&["refused"])
                    .inc();
                tracing::error!(cause, file = %self.rules.path().display(), error = %e, "rules refused; the running rules stay");
                Err(e)
            }
        }
    }

    /// Exposures and conversions per rule and variant, summed over the shards' committed
    /// totals.
    pub async fn experiment_report(&self) -> Result<Vec<VariantOutcome>, EngineError> {
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.outcomes())
            .await
            .map_err(|_| EngineError::ShuttingDown)??;
        let mut sums: BTreeMap<(String, String), OutcomeTotals> = BTreeMap::new();
        for (rule, variant, _, t) in stored {
            let sum = sums.entry((rule, variant)).or_default();
            sum.exposures += t.exposures;
            sum.conversions += t.conversions;
        }
        let rules = self.rules.current();
        Ok(sums
            .into_iter()
            .map(|((rule, variant), totals)| VariantOutcome {
                experiment: rules
                    .get(&rule)
                    .and_then(|r| r.experiment.as_ref())
                    .map(|e| e.name.clone())
                    .unwrap_or_default(),
                rule,
                variant,
                totals,
            })
            .collect())
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
            let mut admitted = Admitted::new(&self.loads);
            self.admit(&mut admitted, shard, 1, Admit::Shed { deadline: None })?;
            self.shards[shard]
                .try_send(command(person, reply))
                .map_err(|e| self.full_or_closed(e))?;
            admitted.keep();
        }
        answer.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Drains the engine: every shard commits and answers what was queued before this
    /// call, then stops; the threads are joined. A drain token per shard
    /// ([`Command::Stop`]) marks the end of its queue, so no reference counting decides
    /// when the shards may go: handles that outlive this (a cancelled call's) get
    /// `ShuttingDown`. A second call finds nothing left to stop.
    pub async fn shutdown(&self) {
        for shard in &self.shards {
            // A shard that is already gone needs no token.
            let _ = shard.send(Command::Stop).await;
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                // A shard that panicked has already reported it through the panic hook.
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// The shard that owns `person` among `shards`.
pub fn shard_index(person: &PersonKey, shards: usize) -> usize {
    (person.stable_hash() % shards as u64) as usize
}

/// Units admitted to shards' queues for one request, taken back unless the request was
/// queued whole ([`Admitted::keep`]).
struct Admitted<'a> {
    loads: &'a [Arc<Load>],
    units: Vec<(usize, u64)>,
}

impl<'a> Admitted<'a> {
    fn new(loads: &'a [Arc<Load>]) -> Admitted<'a> {
        Admitted {
            loads,
            units: Vec::new(),
        }
    }

    /// The request was queued: its units stay counted until the shard starts on them.
    fn keep(mut self) {
        self.units.clear();
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        for (shard, units) in self.units.drain(..) {
            self.loads[shard].withdraw(units);
        }
    }
}

impl Engine {
    /// Refuses at once when every shard's queue would make a request wait past the
    /// budget: such a request cannot be admitted wherever its events go, so the caller
    /// need not spend validating it first.
    pub fn refuse_if_saturated(&self) -> Result<(), EngineError> {
        let least = self.loads.iter().map(|l| l.queueing()).min();
        match least {
            Some(wait) if wait > self.queue_budget => {
                self.metrics.shed.with_label_values(&["overloaded"]).inc();
                Err(EngineError::Overloaded {
                    retry_after: wait - self.queue_budget,
                })
            }
            _ => Ok(()),
        }
    }

    /// Admits `units` of work to `shard` as `admit` says, or says why not (counted).
    fn admit(
        &self,
        admitted: &mut Admitted<'_>,
        shard: usize,
        units: u64,
        admit: Admit,
    ) -> Result<(), EngineError> {
        let verdict = match admit {
            Admit::Shed { deadline } => {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                self.loads[shard].admit(units, self.queue_budget, left)
            }
            Admit::Flow => {
                self.loads[shard].admit_flow(units);
                Ok(())
            }
        };
        match verdict {
            Ok(()) => {
                admitted.units.push((shard, units));
                Ok(())
            }
            Err(Refusal::Overloaded { retry_after }) => {
                self.metrics.shed.with_label_values(&["overloaded"]).inc();
                Err(EngineError::Overloaded { retry_after })
            }
            Err(Refusal::Deadline) => {
                self.metrics.shed.with_label_values(&["deadline"]).inc();
                Err(EngineError::DeadlineUnmeetable)
            }
        }
    }

    fn full_or_closed<T>(&self, e: mpsc::error::TrySendError<T>) -> EngineError {
        match e {
            mpsc::error::TrySendError::Full(_) => {
                self.metrics.shed.with_label_values(&["queue_full"]).inc();
                EngineError::Overloaded {
                    retry_after: self.queue_budget,
                }
            }
            mpsc::error::TrySendError::Closed(_) => EngineError::ShuttingDown,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{EventKind, Properties};
    use crate::model::ModelSet;
    use crate::store::Write;

    const T0: Time = Time(1_772_445_600_000);

    pub(crate) fn start(dir: &std::path::Path, shards: usize) -> (Arc<Engine>, Arc<Store>) {
        let (engine, store, _) = start_with_readiness(dir, shards);
        (engine, store)
    }

    fn start_with_readiness(
        dir: &std::path::Path,
        shards: usize,
    ) -> (Arc<Engine>, Arc<Store>, Arc<Readiness>) {
        start_with_rules(dir, shards, Live::open(Default::default()).unwrap())
    }

    fn start_with_rules(
        dir: &std::path::Path,
        shards: usize,
        rules: Live,
    ) -> (Arc<Engine>, Arc<Store>, Arc<Readiness>) {
        let store = Arc::new(Store::open(dir, crate::store::SyncMode::Always).unwrap());
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::new(metrics.clone()));
        let engine = Engine::start(
            &EngineOptions {
                shards,
                queue_capacity: 64,
                dedup_horizon_ms: 3_600_000,
                queue_budget: Duration::from_millis(25),
                cache_bytes: 64 << 20,
            },
            store.clone(),
            Arc::new(Identities::default()),
            Arc::new(ModelRegistry::new(ModelSet::default())),
            Arc::new(rules),
            Arc::new(crate::delivery::outbox::Outbox::open(store.clone()).unwrap()),
            metrics.clone(),
            readiness.clone(),
        )
        .unwrap();
        (Arc::new(engine), store, readiness)
    }

    fn view(id: &str, person: PersonKey) -> (usize, Event) {
        (
            0,
            Event {
                id: id.into(),
                person,
                linked: None,
                kind: EventKind::PageView,
                time: T0,
                properties: Properties::default(),
                attributes: Default::default(),
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_drains_every_shard_while_other_handles_still_exist() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, store) = start(dir.path(), 2);
        // Another holder of the engine, as the ticker or a cancelled call may be: the
        // drain must not depend on it letting go.
        let other = engine.clone();
        let queued = {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .track(vec![view("e1", PersonKey::User("u1".into()))], T0, UNARY)
                    .await
            })
        };
        // The track is answered (committed) before the shards stop, or refused whole.
        engine.shutdown().await;
        let user = PersonKey::User("u1".into());
        match queued.await.unwrap() {
            Ok(_) => assert!(store.load_profile(&user).unwrap().is_some()),
            Err(e) => {
                assert!(matches!(e, EngineError::ShuttingDown), "{e}");
                assert!(store.load_profile(&user).unwrap().is_none());
            }
        }
        let late = other
            .track(vec![view("e2", PersonKey::User("u2".into()))], T0, UNARY)
            .await;
        assert!(matches!(late, Err(EngineError::ShuttingDown)), "{late:?}");
        assert!(
            engine.threads.lock().unwrap().is_empty(),
            "every shard joined"
        );
        // Draining twice is harmless.
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_login_does_not_wait_for_an_erasures_outbox_scan() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _store) = start(dir.path(), 2);
        let gone = PersonKey::User("gone".into());
        engine
            .track(vec![view("e1", gone.clone())], T0, UNARY)
            .await
            .unwrap();
        let (arrived, at_gate) = oneshot::channel();
        let (open_gate, gate) = oneshot::channel();
        *engine.before_forget.lock().unwrap() = Some((arrived, gate));
        let erasure = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.erase(gone).await })
        };
        at_gate.await.unwrap();
        // The erasure waits before its outbox scan; a merge must still go through.
        let merged = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            engine.merge(
                PersonKey::Anonymous("visitor".into()),
                PersonKey::User("u1".into()),
            ),
        )
        .await
        .expect("the merge is not held up by the erasure");
        assert_eq!(merged.unwrap(), Merge::Merged);
        assert!(!erasure.is_finished(), "the erasure is still at its gate");
        open_gate.send(()).unwrap();
        assert!(erasure.await.unwrap().unwrap(), "there was a profile");
        engine.shutdown().await;
    }

    /// How a unary call without a deadline is admitted.
    const UNARY: Admit = Admit::Shed { deadline: None };

    /// Sends a test command to the shard of `person` and waits for its answer.
    async fn send_to(
        engine: &Engine,
        person: &PersonKey,
        command: impl FnOnce(Reply<()>) -> Command,
    ) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        engine.shards[engine.shard_of(person)]
            .send(command(reply))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        answer.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// A rule whose CEL expression panics while it runs (the interpreter's integer `/ 0`)
    /// costs only that rule: the event is applied and answered, the other rule fires, and
    /// the panic is counted as `rule_expression`, not as a failed command.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rule_expression_that_panics_is_counted_and_the_event_still_applies() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        std::fs::write(
            &rules,
            r#"
            [[rules]]
            name = "divides_by_zero"
            when = "session_page_views >= 0.0 && 1 / 0 > 0"
            action = { type = "t" }

            [[rules]]
            name = "visits"
            when = "session_page_views >= 0.0"
            action = { type = "t" }
            "#,
        )
        .unwrap();
        let (engine, store, readiness) =
            start_with_rules(&dir.path().join("store"), 1, Live::open(rules).unwrap());
        let user = PersonKey::User("u1".into());
        engine
            .track(vec![view("e1", user.clone())], T0, UNARY)
            .await
            .expect("the event is applied whatever one rule's expression does");
        assert!(store.load_profile(&user).unwrap().is_some());
        let metrics = &engine.metrics;
        assert_eq!(
            metrics.panics.with_label_values(&["rule_expression"]).get(),
            1
        );
        assert_eq!(metrics.panics.with_label_values(&["shard"]).get(), 0);
        assert_eq!(
            metrics
                .triggers
                .with_label_values(&["visits", "delivered"])
                .get(),
            1
        );
        assert_eq!(
            metrics
                .triggers
                .with_label_values(&["divides_by_zero", "delivered"])
                .get(),
            0
        );
        assert!(readiness.is_ready());
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_fails_its_command_and_the_shard_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, store, readiness) = start_with_readiness(dir.path(), 1);
        let user = PersonKey::User("u1".into());
        engine
            .track(vec![view("e1", user.clone())], T0, UNARY)
            .await
            .unwrap();
        let panicked = send_to(&engine, &user, |reply| Command::Panic { reply }).await;
        assert!(
            matches!(panicked, Err(EngineError::Panicked)),
            "{panicked:?}"
        );
        assert_eq!(engine.metrics.panics.with_label_values(&["shard"]).get(), 1);
        assert!(
            readiness.is_ready(),
            "a caught panic leaves the shard serving"
        );
        // What was committed before is there, and the shard takes new work.
        engine
            .track(vec![view("e2", user.clone())], T0, UNARY)
            .await
            .unwrap();
        let profile = store.load_profile(&user).unwrap().unwrap();
        assert_eq!(
            profile,
            engine.profile(user.clone()).await.unwrap().unwrap()
        );
        let again = engine
            .track(vec![view("e2", user.clone())], T0, UNARY)
            .await
            .unwrap();
        assert!(
            matches!(again[0].1, Outcome::Duplicate(_)),
            "e2 was applied once"
        );
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_shard_turns_readiness_off_and_its_callers_hear_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _store, readiness) = start_with_readiness(dir.path(), 1);
        let user = PersonKey::User("u1".into());
        engine.shards[0].send(Command::Die).await.unwrap();
        // The next caller is answered (not left waiting) once the thread is gone.
        let late = engine
            .track(vec![view("e1", user.clone())], T0, UNARY)
            .await;
        assert!(matches!(late, Err(EngineError::ShuttingDown)), "{late:?}");
        // The unwinding thread turns readiness off; its dropped queue may be heard first.
        let mut ready = readiness.watch();
        let off = tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| !*r)).await;
        assert!(off.is_ok(), "readiness stayed on after the shard died");
        assert_eq!(readiness.reasons()[0].0, crate::readiness::Reason::Shard);
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_deadline_passed_in_the_queue_is_dropped_unapplied() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, store) = start(dir.path(), 1);
        let user = PersonKey::User("u1".into());
        // Admitted (the shard is idle), then found expired when the shard gets to it.
        let late = engine
            .track(
                vec![view("e1", user.clone())],
                T0,
                Admit::Shed {
                    deadline: Some(Instant::now()),
                },
            )
            .await;
        assert!(
            matches!(late, Err(EngineError::DeadlineExpired)),
            "{late:?}"
        );
        assert!(
            store.load_profile(&user).unwrap().is_none(),
            "no work was done"
        );
        assert_eq!(engine.metrics.shed.with_label_values(&["expired"]).get(), 1);
        // The same event with time to spare applies.
        let soon = Some(Instant::now() + Duration::from_secs(30));
        let done = engine
            .track(
                vec![view("e1", user.clone())],
                T0,
                Admit::Shed { deadline: soon },
            )
            .await;
        assert!(matches!(done.unwrap()[0].1, Outcome::Accepted(_)));
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pending_count_starts_from_the_store_at_start_and_again_at_a_resync() {
        let dir = tempfile::tempdir().unwrap();
        let index = |n: i64| -> Vec<Write> {
            (0..n)
                .map(|i| Write::TimerIndex(T0.plus_ms(i), PersonKey::User(format!("u{i}")), true))
                .collect()
        };
        {
            let store = Store::open(dir.path(), crate::store::SyncMode::Always).unwrap();
            store.commit(index(3)).unwrap();
        }
        let (engine, store) = start(dir.path(), 2);
        assert_eq!(
            engine.metrics.timers_pending.get(),
            3,
            "counted, none loaded"
        );
        // What a reopened store holds (a commit reported failed may have reached the disk)
        // is what counts after the resync.
        store.commit(index(5)).unwrap();
        engine.resync().await.unwrap();
        assert_eq!(engine.metrics.timers_pending.get(), 5);
        engine.shutdown().await;
    }

    /// The metrics `engine` counts in.
    pub(crate) fn metrics_of(engine: &Engine) -> &Metrics {
        &engine.metrics
    }

    /// Every shard has measured 10 ms an event and has `queued` events waiting; 3 is past
    /// the 25 ms budget of [`start`]'s engine, 0 (after a 3) empties them again.
    pub(crate) fn queue_on_every_shard(engine: &Engine, queued: u64) {
        for load in &engine.loads {
            load.started(0);
            load.finished(1, Duration::from_millis(10), Duration::from_millis(1));
            let now = load.queueing().as_millis() as u64 / 10;
            if queued >= now {
                load.admit_flow(queued - now);
            } else {
                load.withdraw(now - queued);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_is_refused_before_validation_only_when_every_shard_is_saturated() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _store) = start(dir.path(), 2);
        let ms = Duration::from_millis(1);
        // Each shard has measured 10 ms an event; 10 events wait on the first one.
        for load in &engine.loads {
            load.started(0);
            load.finished(1, 10 * ms, ms);
        }
        engine.loads[0].admit_flow(10);
        assert!(engine.refuse_if_saturated().is_ok(), "shard 1 is idle");
        engine.loads[1].admit_flow(10);
        let refused = engine.refuse_if_saturated();
        assert!(
            matches!(refused, Err(EngineError::Overloaded { retry_after }) if retry_after == 100 * ms - 25 * ms),
            "{refused:?}"
        );
        for load in &engine.loads {
            load.withdraw(10);
        }
        engine.shutdown().await;
    }
}
