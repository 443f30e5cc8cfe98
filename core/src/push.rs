//! Push-wake admission (PROTOCOL.md §11): a per-server-id bucket in the shard, and the node-wide
//! in-flight cap in the dispatcher that performs the HTTP calls.

use crate::config::Config;
use crate::counters::{Counters, PushOutcome};

/// The node-wide side of push wake: owned by whatever performs the FCM calls. It admits a wake
/// the shard has passed ([`Output::PushWake`](crate::Output::PushWake)) against the in-flight
/// cap, and counts every outcome.
#[derive(Debug)]
pub struct PushDispatcher {
    max_in_flight: u32,
    in_flight: u32,
    counters: Counters,
}

impl PushDispatcher {
    pub fn new(config: &Config) -> PushDispatcher {
        PushDispatcher {
            max_in_flight: config.push_max_in_flight,
            in_flight: 0,
            counters: Counters::default(),
        }
    }

    /// Starts a send if fewer than the cap are in flight; otherwise counts it `dropped`.
    #[must_use]
    pub fn try_begin(&mut self) -> bool {
        if self.in_flight >= self.max_in_flight {
            self.counters.push_wakes[PushOutcome::Dropped as usize] += 1;
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// A send started by [`try_begin`](Self::try_begin) ended with `outcome`.
    pub fn finish(&mut self, outcome: PushOutcome) {
        debug_assert!(self.in_flight > 0);
        self.in_flight = self.in_flight.saturating_sub(1);
        self.counters.push_wakes[outcome as usize] += 1;
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_cap_drops_excess() {
        let mut d = PushDispatcher::new(&Config {
            push_max_in_flight: 2,
            ..Config::default()
        });
        assert!(d.try_begin());
        assert!(d.try_begin());
        assert!(!d.try_begin());
        d.finish(PushOutcome::Sent);
        assert!(d.try_begin());
        assert_eq!(d.counters().push(PushOutcome::Dropped), 1);
        assert_eq!(d.counters().push(PushOutcome::Sent), 1);
        assert_eq!(d.in_flight(), 2);
    }
}
