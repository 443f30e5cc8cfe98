//! Typed deadlines in one ordered table, so the next wake-up and its reason are always known.

use std::collections::{BTreeMap, VecDeque};
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
///
/// Write deadlines are armed for every queued message and cancelled when it is written, so
/// they would be most of the ordered table's traffic. Each is `now + write_timeout`, and `now`
/// never goes back, so they are armed in deadline order: they wait in a queue instead, where
/// arming is a push and cancelling marks the entry (found by binary search), and both sources
/// are merged by the same order. A marked entry is dropped when it reaches the front, or when
/// marked entries are over half the queue.
#[derive(Debug, Default)]
pub(crate) struct TimerTable {
    armed: BTreeMap<TimerKey, Timer>,
    writes: VecDeque<Queued>,
    /// Entries of `writes` that were cancelled; the front one never is.
    cancelled: usize,
    seq: u64,
}

#[derive(Debug)]
struct Queued {
    key: TimerKey,
    timer: Timer,
    live: bool,
}

impl TimerTable {
    pub(crate) fn set(&mut self, at: Instant, timer: Timer) -> TimerKey {
        self.seq += 1;
        let key = TimerKey { at, seq: self.seq };
        let in_order = self.writes.back().is_none_or(|last| last.key.at <= at);
        if matches!(timer, Timer::WriteDeadline(_)) && in_order {
            self.writes.push_back(Queued {
                key,
                timer,
                live: true,
            });
        } else {
            self.armed.insert(key, timer);
        }
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
        let Some(key) = slot.take() else {
            return;
        };
        match self.writes.binary_search_by(|q| q.key.cmp(&key)) {
            Ok(i) => {
                debug_assert!(self.writes[i].live, "a cancelled timer cancelled again");
                self.writes[i].live = false;
                self.cancelled += 1;
                self.tidy();
            }
            Err(_) => {
                self.armed.remove(&key);
            }
        }
    }

    /// Drops cancelled entries from the front of `writes` (so its front is the earliest live
    /// one), and compacts it once they are over half of it.
    fn tidy(&mut self) {
        while self.writes.front().is_some_and(|q| !q.live) {
            self.writes.pop_front();
            self.cancelled -= 1;
        }
        if self.cancelled * 2 > self.writes.len() {
            self.writes.retain(|q| q.live);
            self.cancelled = 0;
        }
    }

    /// The earliest armed timer's key: the front of the table or of the write queue.
    fn first(&self) -> Option<(TimerKey, &Timer)> {
        let table = self.armed.first_key_value().map(|(k, t)| (*k, t));
        let queue = self.writes.front().map(|q| (q.key, &q.timer));
        match (table, queue) {
            (Some(t), Some(q)) => Some(std::cmp::min_by_key(t, q, |(k, _)| *k)),
            (t, q) => t.or(q),
        }
    }

    pub(crate) fn next(&self) -> Option<(Instant, &Timer)> {
        self.first().map(|(k, t)| (k.at, t))
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let (key, _) = self.first()?;
        if key.at > now {
            return None;
        }
        if self.writes.front().is_some_and(|q| q.key == key) {
            let timer = self.writes.pop_front().map(|q| q.timer);
            self.tidy();
            timer
        } else {
            self.armed.pop_first().map(|(_, t)| t)
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.armed.len() + self.writes.len() - self.cancelled
    }

    /// Entries the write queue holds, cancelled ones included.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.writes.len()
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

    fn write(n: u64) -> Timer {
        Timer::WriteDeadline(ConnKey(n))
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a test clock origin
    fn write_deadlines_queue_and_merge_in_the_same_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut table = TimerTable::default();
        table.set(t0 + s(2), write(1));
        table.set(t0 + s(1), Timer::Ping(ConnKey(9)));
        table.set(t0 + s(2), write(2));
        table.set(t0 + s(2), Timer::Ping(ConnKey(8)));
        // Earlier than the queue's last: into the ordered table.
        table.set(t0 + s(1), write(3));
        table.set(t0 + s(3), write(4));
        assert_eq!(table.queued(), 3, "in-order write deadlines only");
        assert_eq!(table.len(), 6);
        assert_eq!(table.next().map(|(at, _)| at), Some(t0 + s(1)));
        assert_eq!(table.pop_due(t0), None);
        let mut fired = Vec::new();
        while let Some(t) = table.pop_due(t0 + s(2)) {
            fired.push(t);
        }
        // Deadline, then arming order, across both.
        let expected = [
            Timer::Ping(ConnKey(9)),
            write(3),
            write(1),
            write(2),
            Timer::Ping(ConnKey(8)),
        ];
        assert_eq!(fired, expected);
        assert_eq!(
            table.pop_due(t0 + s(3)),
            Some(write(4)),
            "due at its instant"
        );
        assert_eq!(table.len(), 0);
        assert_eq!(table.next(), None);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a test clock origin
    fn cancelled_write_deadlines_leave_the_front_and_the_queue_compacts() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        let mut keys: Vec<Option<TimerKey>> = (1..=4)
            .map(|n| Some(table.set(t0 + Duration::from_secs(n), write(n))))
            .collect();
        let queued = |table: &TimerTable| (table.queued(), table.len());
        table.cancel(&mut keys[1]);
        assert_eq!(queued(&table), (4, 3), "marked, not removed");
        table.cancel(&mut keys[2]);
        assert_eq!(queued(&table), (4, 2), "half marked: kept");
        table.cancel(&mut keys[3]);
        assert_eq!(queued(&table), (1, 1), "over half marked: compacted");
        assert_eq!(table.next(), Some((t0 + Duration::from_secs(1), &write(1))));
        table.cancel(&mut keys[0]);
        assert_eq!(queued(&table), (0, 0), "a cancelled front is dropped");
        assert_eq!(table.next(), None);

        let mut a = Some(table.set(t0, write(5)));
        let mut b = Some(table.set(t0, write(6)));
        table.cancel(&mut b);
        assert_eq!(queued(&table), (2, 1), "one of two marked: kept");
        let mut c = Some(table.set(t0, write(7)));
        table.cancel(&mut a);
        assert_eq!(
            queued(&table),
            (1, 1),
            "the front and the marked one behind it go"
        );
        assert_eq!(table.pop_due(t0), Some(write(7)));
        table.cancel(&mut c);
        assert_eq!(c, None);
        assert_eq!(queued(&table), (0, 0));

        // A cancelled front leaves alone, and the count of marked entries stays exact.
        let mut keys: Vec<Option<TimerKey>> = (10..18)
            .map(|n| Some(table.set(t0 + Duration::from_secs(n), write(n))))
            .collect();
        table.cancel(&mut keys[0]);
        assert_eq!(queued(&table), (7, 7));
        table.cancel(&mut keys[2]);
        assert_eq!(queued(&table), (7, 6));
        table.cancel(&mut keys[1]);
        assert_eq!(
            queued(&table),
            (5, 5),
            "the front and the marked one behind it go"
        );
    }
}
