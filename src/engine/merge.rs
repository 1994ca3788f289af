//! The identity merge protocol: making an anonymous visitor one person with a known user,
//! when the two may live in different shards. Both halves are here.
//!
//! 1. The handle takes the engine's merge lock and sets the alias in memory, so new work
//!    for the visitor routes to the user from now on.
//! 2. It pauses the visitor's shard with a [`Command::Pause`] queued behind everything
//!    already routed there, and waits until that shard has committed it all.
//! 3. The user's shard absorbs the visitor ([`Shard::absorb`]): it folds the profile and
//!    trigger state in and commits the profile, the alias, the deletion, the moved
//!    idempotency records and audit entries, and the timers in one batch.
//! 4. The visitor's shard resumes, evicting its stale copy of the visitor.
//!
//! If anything fails before the commit, the alias is taken back out.

use tokio::sync::oneshot;

use super::shard::{Command, Group, Shard};
use super::{Engine, EngineError};
use crate::event::PersonKey;
use crate::identity::{self, Link};
use crate::store::Write;
use crate::time::Time;

/// What an identity merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    Merged,
    AlreadyMerged,
}

/// What a paused shard does when it resumes.
pub(super) struct Resume {
    /// A person whose cached profile is stale (merged away).
    pub(super) evict: Option<PersonKey>,
}

impl Engine {
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
        self.writable()?;
        let _merging = self.merges.lock().await;
        let (from_shard, into_shard) = (self.shard_of(&from), self.shard_of(&into));
        let mut paused = None;
        {
            let mut aliases = self.identities.write();
            // The same decision the trainer's replay takes.
            match identity::link(&mut aliases, &from, &into) {
                Ok(Link::New) => {}
                Ok(Link::Already) => return Ok(Merge::AlreadyMerged),
                Err(refused) => return Err(refused.into()),
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
                    return Err(self.full_or_closed(e));
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
}

impl Shard {
    /// Folds `from` into `into`, in this shard's group. `from` is this shard's (then the
    /// group may hold its changes) or its shard is paused with everything committed.
    pub(super) fn absorb(
        &mut self,
        from: &PersonKey,
        into: &PersonKey,
        group: &mut Group,
    ) -> Result<(), EngineError> {
        let absorbed = match self.cache.take_profile(from) {
            Some(p) => Some(p),
            None => self.store.load_profile(from)?,
        };
        group.dirty.remove(from);
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
            for due in from_state.dues() {
                self.timers.forget(due, from);
                group
                    .writes
                    .push(Write::TimerIndex(due, from.clone(), false));
            }
            let state = self.load_state(into)?;
            let before = state.dues();
            state.merge(from_state);
            let added: Vec<Time> = state
                .dues()
                .into_iter()
                .filter(|d| !before.contains(d))
                .collect();
            self.timers.add(into, &added, &mut group.writes);
            group.dirty_states.insert(into.clone());
        }
        group.dirty_states.remove(from);
        group.writes.push(Write::Triggers(from.clone(), None));
        group.writes.push(Write::DeleteProfile(from.clone()));
        // Also moves what this group wrote for the visitor before (idempotency records,
        // audit entries): the store applies a batch in order.
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
}
