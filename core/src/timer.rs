//! Typed deadlines in one ordered table, so the next wake-up and its reason are always known.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::id::{ConnKey, ServerId};

/// Why a shard wants to be woken.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Send the next heartbeat ping (§9).
    Ping(ConnKey),
    /// No pong since the last ping: close 1011 "heartbeat timeout".
    PongDeadline(ConnKey),
    /// A data message begun but not finished: close 1008 "read timeout".
    ReadDeadline(ConnKey),
    /// The oldest queued message has not been written: the write failed.
    WriteDeadline(ConnKey),
    /// The peer has not answered the relay's close frame: drop TCP.
    CloseDeadline(ConnKey),
    /// The incumbent has not answered the liveness probe: takeover (§6).
    Probe(ServerId),
    /// The grace window ended: close the phones, free the id (§6).
    Grace(ServerId),
    /// The shutdown drain deadline (§13): drop whatever is left.
    Drain,
}

/// Identifies one armed timer, for cancelling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TimerKey {
    at: Instant,
    seq: u64,
}

/// Armed timers ordered by deadline, then by arming order, so equal deadlines fire
/// deterministically.
#[derive(Debug, Default)]
pub(crate) struct TimerTable {
    armed: BTreeMap<TimerKey, Timer>,
    seq: u64,
}

impl TimerTable {
    pub(crate) fn set(&mut self, at: Instant, timer: Timer) -> TimerKey {
        self.seq += 1;
        let key = TimerKey { at, seq: self.seq };
        self.armed.insert(key, timer);
        key
    }

    /// Re-arms the timer held in `slot` (cancelling the old one) to fire at `at`.
    pub(crate) fn reset(&mut self, slot: &mut Option<TimerKey>, at: Instant, timer: Timer) {
        self.cancel(slot);
        *slot = Some(self.set(at, timer));
    }

    /// Arms `slot` unless it is armed already.
    pub(crate) fn ensure(&mut self, slot: &mut Option<TimerKey>, at: Instant, timer: Timer) {
        if slot.is_none() {
            *slot = Some(self.set(at, timer));
        }
    }

    pub(crate) fn cancel(&mut self, slot: &mut Option<TimerKey>) {
        if let Some(key) = slot.take() {
            self.armed.remove(&key);
        }
    }

    pub(crate) fn next(&self) -> Option<(Instant, &Timer)> {
        self.armed.first_key_value().map(|(k, t)| (k.at, t))
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.armed.first_key_value() {
            Some((k, _)) if k.at <= now => self.armed.pop_first().map(|(_, t)| t),
            _ => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.armed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    #[allow(clippy::disallowed_methods)] // a test clock origin
    fn fires_in_deadline_then_arming_order() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        table.set(t0 + Duration::from_secs(2), Timer::Drain);
        table.set(t0 + Duration::from_secs(1), Timer::Ping(ConnKey(2)));
        table.set(t0 + Duration::from_secs(1), Timer::Ping(ConnKey(1)));
        let mut slot = Some(table.set(t0, Timer::Ping(ConnKey(9))));
        table.cancel(&mut slot);
        assert_eq!(
            table.next().map(|(at, _)| at),
            Some(t0 + Duration::from_secs(1))
        );
        assert_eq!(table.pop_due(t0), None);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(table.pop_due(later), Some(Timer::Ping(ConnKey(2))));
        assert_eq!(table.pop_due(later), Some(Timer::Ping(ConnKey(1))));
        assert_eq!(table.pop_due(later), Some(Timer::Drain));
        assert_eq!(table.len(), 0);
    }
}
