//! Admission by time: a shard's queue is bounded in how long a request waits in it, not
//! only in how many requests it holds.
//!
//! Each shard keeps [`Load`]: the work units queued and not yet started (an event is one,
//! a read or another command is one), and moving averages of what a unit and a commit
//! cost it, measured as it works. A caller predicts its queueing before queuing — the
//! units ahead of it, the group in progress included, at the measured rate — and is
//! refused at once when that exceeds the budget (`RESOURCE_EXHAUSTED`, with the excess
//! as a retry hint), or when its whole wait (the commit in progress too) plus its own
//! work and commit runs past its gRPC deadline (`DEADLINE_EXCEEDED`, before any work).
//! Commits are outside the budget: every durable request waits for one, and refusing
//! callers does not make a slow disk faster.
//!
//! A TrackStream's batches are admitted by count only (`Admit::Flow`): the stream's window
//! and HTTP/2 flow control already bound what it queues, and ending a stream for latency
//! would cost more than its batches wait. They count in the queue all the same, so unary
//! callers are shed first. The shard drops, unapplied, a request whose deadline passed
//! while it waited: a wrong prediction costs latency, never work for a caller who has
//! gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How much a new measurement moves an average: 1/8, as TCP's smoothed RTT.
const SMOOTHING: u64 = 8;

/// A shard's queue and its measured speed, shared by the shard and the callers.
#[derive(Default)]
pub struct Load {
    /// Units queued and not yet started.
    queued: AtomicU64,
    /// Whether a group is being handled or committed now.
    busy: AtomicBool,
    /// The units of the group being handled now: a request queued behind it waits for
    /// them too (counted whole, as if the group had just begun: the bound errs long).
    in_progress: AtomicU64,
    /// The average cost of one unit's handling, in nanoseconds.
    unit_ns: AtomicU64,
    /// The average cost of one group's commit, in nanoseconds.
    commit_ns: AtomicU64,
}

/// Why a request is not admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// It would wait longer than the budget; retry after about this long.
    Overloaded { retry_after: Duration },
    /// It could not be done before its deadline.
    Deadline,
}

impl Load {
    /// How long the work ahead of a request queued now takes to handle, at the measured
    /// rate, not counting commits: what the budget bounds. A commit in progress is a wait
    /// no refusal shortens — every durable request waits for one commit of its own — so a
    /// slow disk alone never turns callers away.
    pub fn queueing(&self) -> Duration {
        let ahead = self
            .queued
            .load(Ordering::Relaxed)
            .saturating_add(self.in_progress.load(Ordering::Relaxed));
        Duration::from_nanos(ahead.saturating_mul(self.unit_ns.load(Ordering::Relaxed)))
    }

    /// How long a request queued now would wait before its work starts: the queueing,
    /// and the commit in progress, if any.
    pub fn predicted_wait(&self) -> Duration {
        let commit = if self.busy.load(Ordering::Relaxed) {
            Duration::from_nanos(self.commit_ns.load(Ordering::Relaxed))
        } else {
            Duration::ZERO
        };
        self.queueing() + commit
    }

    /// Admits `units` with `budget` for their queueing and `left` until their deadline,
    /// if any; an admitted request is counted as queued.
    pub fn admit(
        &self,
        units: u64,
        budget: Duration,
        left: Option<Duration>,
    ) -> Result<(), Refusal> {
        let queueing = self.queueing();
        if queueing > budget {
            return Err(Refusal::Overloaded {
                retry_after: queueing - budget,
            });
        }
        if let Some(left) = left {
            let own = units.saturating_mul(self.unit_ns.load(Ordering::Relaxed))
                + self.commit_ns.load(Ordering::Relaxed);
            if self.predicted_wait() + Duration::from_nanos(own) > left {
                return Err(Refusal::Deadline);
            }
        }
        self.queued.fetch_add(units, Ordering::Relaxed);
        Ok(())
    }

    /// Counts `units` queued by a caller whose own window bounds its wait (a stream).
    pub fn admit_flow(&self, units: u64) {
        self.queued.fetch_add(units, Ordering::Relaxed);
    }

    /// Takes back an admission whose request was not queued after all.
    pub fn withdraw(&self, units: u64) {
        self.queued.fetch_sub(units, Ordering::Relaxed);
    }

    /// The shard takes `units` out of its queue and starts on them.
    pub fn started(&self, units: u64) {
        self.busy.store(true, Ordering::Relaxed);
        self.in_progress.store(units, Ordering::Relaxed);
        self.queued.fetch_sub(units, Ordering::Relaxed);
    }

    /// The shard finished a group: `units` handled in `handling`, committed in `commit`.
    pub fn finished(&self, units: u64, handling: Duration, commit: Duration) {
        if let Some(per_unit) = (handling.as_nanos() as u64).checked_div(units) {
            smooth(&self.unit_ns, per_unit);
        }
        smooth(&self.commit_ns, commit.as_nanos() as u64);
        self.in_progress.store(0, Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
    }
}

/// Moves the average in `average` toward `sample`; the first sample sets it.
fn smooth(average: &AtomicU64, sample: u64) {
    let old = average.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old - old / SMOOTHING + sample / SMOOTHING
    };
    // One shard writes its own averages; callers only read them.
    average.store(new.max(1), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_disk_alone_never_turns_callers_away() {
        let load = Load::default();
        load.started(0);
        // Every commit takes 100 ms, four times the budget.
        load.finished(1, MS, 100 * MS);
        assert_eq!(load.predicted_wait(), Duration::ZERO, "idle");
        assert_eq!(load.admit(10, 25 * MS, None), Ok(()));
        // Busy committing, with 10 units queued: 10 ms of queueing is within the budget,
        // though the wait is 110 ms.
        load.started(0);
        assert_eq!(load.predicted_wait(), 110 * MS);
        assert_eq!(load.admit(1, 25 * MS, None), Ok(()));
    }

    #[test]
    fn a_queue_that_would_wait_past_the_budget_refuses_with_the_excess() {
        let load = Load::default();
        load.started(0);
        load.finished(100, 100 * MS, 2 * MS); // 1 ms a unit, 2 ms a commit
        load.started(0); // busy with a group
        for _ in 0..20 {
            load.admit(1, 25 * MS, None).unwrap();
        }
        // 20 units ahead: 20 ms of queueing, and the commit in progress (2 ms).
        assert_eq!(load.queueing(), 20 * MS);
        assert_eq!(load.predicted_wait(), 22 * MS);
        load.admit(3, 25 * MS, None).unwrap();
        // 23 ms of queueing: a budget of 22 ms is exceeded by 1 ms.
        assert_eq!(
            load.admit(1, 22 * MS, None),
            Err(Refusal::Overloaded { retry_after: MS })
        );
        // The shard takes all 23: a request behind them waits for the whole group.
        load.started(23);
        assert_eq!(load.queueing(), 23 * MS);
        load.finished(23, 23 * MS, 2 * MS);
        assert_eq!(load.predicted_wait(), Duration::ZERO, "drained and idle");
    }

    #[test]
    fn a_deadline_that_cannot_be_met_is_refused_before_any_work() {
        let load = Load::default();
        load.started(0);
        load.finished(1, MS, 2 * MS);
        load.started(0);
        load.admit(10, Duration::from_secs(1), None).unwrap();
        // 10 units ahead and the commit in progress (12 ms), then 5 ms of its own work
        // and its commit (2 ms): 19 ms.
        assert_eq!(
            load.admit(5, Duration::from_secs(1), Some(18 * MS)),
            Err(Refusal::Deadline)
        );
        assert_eq!(load.admit(5, Duration::from_secs(1), Some(20 * MS)), Ok(()));
    }
}
