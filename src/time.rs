//! Time as Nudge's core sees it: a `Time` is milliseconds since the Unix epoch, in UTC.
//!
//! Two kinds of time meet in Nudge and are never mixed up: an event's `event_time` (what the
//! client said) and `now` (the server's clock, or the event time during training replay).
//! The core never reads a clock itself; callers pass `now`, and the server gets it from a
//! [`Clock`] so tests can set it.

use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds in one minute, hour and day.
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// An instant, as milliseconds since the Unix epoch (UTC).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub i64);

impl Time {
    pub const fn from_millis(ms: i64) -> Time {
        Time(ms)
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    /// The day number since the epoch (day 0 is 1970-01-01, UTC).
    pub const fn day(self) -> i32 {
        self.0.div_euclid(DAY_MS) as i32
    }

    /// Hour of the day, 0 to 23, UTC.
    pub const fn hour_of_day(self) -> u32 {
        (self.0.rem_euclid(DAY_MS) / HOUR_MS) as u32
    }

    /// Day of the week, 0 = Monday to 6 = Sunday, UTC. 1970-01-01 was a Thursday.
    pub const fn day_of_week(self) -> u32 {
        ((self.0.div_euclid(DAY_MS) + 3).rem_euclid(7)) as u32
    }

    /// Milliseconds from `earlier` to `self`; negative if `earlier` is later.
    pub const fn since(self, earlier: Time) -> i64 {
        self.0 - earlier.0
    }

    pub const fn plus_ms(self, ms: i64) -> Time {
        Time(self.0.saturating_add(ms))
    }
}

/// Where the server gets `now` from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Time;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time(since_epoch.as_millis() as i64)
    }
}

/// A clock that only moves when told to; for tests and replays.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now: Time) -> ManualClock {
        ManualClock(AtomicI64::new(now.0))
    }

    pub fn set(&self, now: Time) {
        self.0.store(now.0, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Time {
        Time(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_fields_are_utc() {
        // 2026-11-30T10:24:06Z is a Monday.
        let t = Time(1_796_034_246_000);
        assert_eq!(t.hour_of_day(), 10);
        assert_eq!(t.day_of_week(), 0);
        // The epoch was a Thursday, and times before it still land on the right day.
        assert_eq!(Time(0).day_of_week(), 3);
        assert_eq!(Time(-1).day(), -1);
        assert_eq!(Time(-1).day_of_week(), 2);
        assert_eq!(Time(-1).hour_of_day(), 23);
    }
}
