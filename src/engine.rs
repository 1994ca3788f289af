//! The engine owns every profile. People are spread over shards by a stable hash of their
//! key; each shard is one thread that alone applies events to its people, extracts their
//! features and scores them, so the hot path takes no locks. Queues to the shards are
//! bounded: when one is full the caller is told at once ([`EngineError::Overloaded`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, PersonKey};
use crate::features::{self, FeatureRow};
use crate::metrics::Metrics;
use crate::model::{Model, ModelRegistry, ScoreError};
use crate::profile::Profile;
use crate::time::Time;

/// How the engine is laid out.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Shard threads; each owns a slice of the people.
    pub shards: usize,
    /// Requests waiting per shard before callers are turned away.
    pub queue_capacity: usize,
}

/// Why the engine could not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is overloaded (a shard queue is full); retry with backoff")]
    Overloaded,
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// One model's probability for one row.
#[derive(Debug, Clone)]
pub struct Score {
    pub model: Arc<Model>,
    pub probability: f64,
}

/// The scores after one event, or the error of the model that failed.
pub type Scores = Vec<Result<Score, (Arc<Model>, ScoreError)>>;

enum Command {
    /// Apply events (each with its position in the caller's batch) and score after each.
    Track {
        events: Vec<(usize, Event)>,
        now: Time,
        reply: oneshot::Sender<Vec<(usize, Scores)>>,
    },
    /// Score a person's profile with the given models; `None` if the person is unknown.
    Score {
        person: PersonKey,
        models: Vec<Arc<Model>>,
        now: Time,
        reply: oneshot::Sender<Option<Scores>>,
    },
    /// A copy of a person's profile.
    Profile {
        person: PersonKey,
        reply: oneshot::Sender<Option<Profile>>,
    },
}

/// The handle to the shard threads.
pub struct Engine {
    shards: Vec<mpsc::Sender<Command>>,
    threads: Vec<JoinHandle<()>>,
}

impl Engine {
    pub fn start(
        options: &EngineOptions,
        models: Arc<ModelRegistry>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let count = options.shards.max(1);
        let mut shards = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
            let shard = Shard {
                profiles: HashMap::new(),
                models: models.clone(),
                metrics: metrics.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("nudge-shard-{i}"))
                .spawn(move || shard.run(rx))
                .expect("spawning a shard thread");
            shards.push(tx);
            threads.push(thread);
        }
        Engine { shards, threads }
    }

    fn shard_of(&self, person: &PersonKey) -> usize {
        (person.stable_hash() % self.shards.len() as u64) as usize
    }

    /// Applies validated events in order and answers each event's scores afterwards. Either
    /// every event is queued or none is: capacity on every shard involved is reserved first.
    pub async fn track(
        &self,
        events: Vec<(usize, Event)>,
        now: Time,
    ) -> Result<Vec<(usize, Scores)>, EngineError> {
        let mut per_shard: Vec<Vec<(usize, Event)>> = vec![Vec::new(); self.shards.len()];
        for (index, event) in events {
            per_shard[self.shard_of(&event.person)].push((index, event));
        }
        let mut permits = Vec::new();
        for (shard, batch) in self.shards.iter().zip(per_shard) {
            if batch.is_empty() {
                continue;
            }
            let permit = shard.try_reserve().map_err(|e| match e {
                mpsc::error::TrySendError::Full(()) => EngineError::Overloaded,
                mpsc::error::TrySendError::Closed(()) => EngineError::ShuttingDown,
            })?;
            permits.push((permit, batch));
        }
        let mut replies = Vec::with_capacity(permits.len());
        for (permit, events) in permits {
            let (reply, answer) = oneshot::channel();
            permit.send(Command::Track { events, now, reply });
            replies.push(answer);
        }
        let mut results = Vec::new();
        for answer in replies {
            results.extend(answer.await.map_err(|_| EngineError::ShuttingDown)?);
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
        let (reply, answer) = oneshot::channel();
        let shard = self.shard_of(&person);
        self.send(
            shard,
            Command::Score {
                person,
                models,
                now,
                reply,
            },
        )?;
        answer.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// A copy of a person's profile; `None` if Nudge has no events for them.
    pub async fn profile(&self, person: PersonKey) -> Result<Option<Profile>, EngineError> {
        let (reply, answer) = oneshot::channel();
        let shard = self.shard_of(&person);
        self.send(shard, Command::Profile { person, reply })?;
        answer.await.map_err(|_| EngineError::ShuttingDown)
    }

    fn send(&self, shard: usize, command: Command) -> Result<(), EngineError> {
        self.shards[shard].try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => EngineError::ShuttingDown,
        })
    }

    /// Stops taking work, lets the shards finish what is queued, and joins them.
    pub fn shutdown(self) {
        drop(self.shards);
        for thread in self.threads {
            // A shard that panicked has already reported it through the panic hook.
            let _ = thread.join();
        }
    }
}

/// One shard: the profiles of its people, and the work loop.
struct Shard {
    profiles: HashMap<PersonKey, Profile>,
    models: Arc<ModelRegistry>,
    metrics: Arc<Metrics>,
}

impl Shard {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::Track { events, now, reply } => {
                    let models = self.models.current();
                    let models: Vec<Arc<Model>> = models.iter().cloned().collect();
                    let results = events
                        .into_iter()
                        .map(|(index, event)| (index, self.track(&event, &models, now)))
                        .collect();
                    // The caller may have gone (deadline, cancellation); the events are
                    // applied either way.
                    let _ = reply.send(results);
                }
                Command::Score {
                    person,
                    models,
                    now,
                    reply,
                } => {
                    let scores = self.profiles.get(&person).map(|profile| {
                        let row = features::extract(profile, now);
                        score_row(&self.metrics, &models, &row)
                    });
                    let _ = reply.send(scores);
                }
                Command::Profile { person, reply } => {
                    let _ = reply.send(self.profiles.get(&person).cloned());
                }
            }
        }
    }

    fn track(&mut self, event: &Event, models: &[Arc<Model>], now: Time) -> Scores {
        let profile = self
            .profiles
            .entry(event.person.clone())
            .or_insert_with(|| {
                self.metrics.profiles.inc();
                Profile::default()
            });
        profile.apply(event);
        let row = features::extract(profile, now);
        score_row(&self.metrics, models, &row)
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
