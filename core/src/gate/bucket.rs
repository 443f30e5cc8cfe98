//! Per-address token buckets (stage 2, PROTOCOL.md §3.1).
//!
//! Each bucket is kept as the time at which it is full again (the generic cell rate algorithm):
//! taking a token moves that time one refill interval later, and a bucket may give a token while
//! it is at most `burst - 1` intervals short of full. This keeps fractional progress exactly, to
//! the nanosecond, and a bucket whose time has passed is indistinguishable from a new one, so it
//! is forgotten.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use crate::bucket::Rate;

/// Full buckets forgotten per call at most, so no single call pays for a large sweep.
const SWEEP_PER_CALL: usize = 16;

/// Token buckets keyed by client address. Times are offsets from the gate's start.
#[derive(Debug)]
pub(super) struct Buckets {
    rate: Rate,
    /// When each remembered bucket is full again.
    full_at: BTreeMap<IpAddr, Duration>,
    /// The same, ordered by that time, for the sweep.
    by_full_at: BTreeSet<(Duration, IpAddr)>,
}

impl Buckets {
    pub(super) fn new(burst: u32, refill: Duration) -> Buckets {
        Buckets {
            rate: Rate::new(burst, refill),
            full_at: BTreeMap::new(),
            by_full_at: BTreeSet::new(),
        }
    }

    /// Takes one token from `addr`'s bucket; an empty bucket gives `false` and is left as it is.
    pub(super) fn take(&mut self, now: Duration, addr: IpAddr) -> bool {
        let mut next = self.full_at.get(&addr).copied().unwrap_or(Duration::ZERO);
        if !self.rate.take(&mut next, now) {
            return false;
        }
        if let Some(old) = self.full_at.insert(addr, next) {
            self.by_full_at.remove(&(old, addr));
        }
        self.by_full_at.insert((next, addr));
        true
    }

    /// Forgets up to [`SWEEP_PER_CALL`] buckets that are full at `now`, earliest first.
    ///
    /// Each call adds at most one bucket, so a backlog of full buckets shrinks by at least
    /// `SWEEP_PER_CALL - 1` a call and memory stays within the addresses seen in the last
    /// `burst × refill`, plus what is still being swept.
    pub(super) fn sweep(&mut self, now: Duration) {
        for _ in 0..SWEEP_PER_CALL {
            match self.by_full_at.first() {
                Some(&(at, addr)) if at <= now => {
                    self.by_full_at.pop_first();
                    self.full_at.remove(&addr);
                }
                Some(_) | None => break,
            }
        }
    }

    /// Buckets remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        debug_assert_eq!(self.full_at.len(), self.by_full_at.len());
        self.full_at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn new_address_starts_full() {
        let mut b = Buckets::new(20, Duration::from_secs(6));
        for i in 0..20 {
            assert!(b.take(Duration::ZERO, A), "attempt {}", i + 1);
        }
        assert!(!b.take(Duration::ZERO, A));
        assert!(b.take(Duration::ZERO, B));
    }

    #[test]
    fn one_token_per_refill_interval() {
        let mut b = Buckets::new(20, Duration::from_secs(6));
        for _ in 0..20 {
            assert!(b.take(Duration::ZERO, A));
        }
        assert!(!b.take(secs(5.999), A));
        assert!(b.take(secs(6.0), A));
        assert!(!b.take(secs(6.0), A));
        assert!(!b.take(secs(11.9), A));
        assert!(b.take(secs(12.0), A));
    }

    #[test]
    fn fractional_progress_is_kept() {
        let mut b = Buckets::new(2, Duration::from_secs(6));
        assert!(b.take(secs(0.0), A));
        assert!(b.take(secs(0.0), A));
        // Half a token by 3 s, and denied attempts neither take nor reset progress.
        assert!(!b.take(secs(3.0), A));
        assert!(!b.take(secs(5.0), A));
        assert!(b.take(secs(6.0), A));
        // 1.5 tokens of progress at 15 s: one taken, the half kept.
        assert!(b.take(secs(15.0), A));
        assert!(!b.take(secs(15.0), A));
        assert!(!b.take(secs(17.9), A));
        assert!(b.take(secs(18.0), A));
    }

    #[test]
    fn refill_caps_at_burst() {
        let mut b = Buckets::new(3, Duration::from_secs(1));
        assert!(b.take(secs(0.0), A));
        // A long idle period refills to 3, never more.
        for _ in 0..3 {
            assert!(b.take(secs(100.0), A));
        }
        assert!(!b.take(secs(100.0), A));
    }

    #[test]
    fn zero_burst_denies_and_zero_refill_allows() {
        let mut none = Buckets::new(0, Duration::from_secs(6));
        assert!(!none.take(Duration::ZERO, A));
        assert_eq!(none.len(), 0);
        let mut all = Buckets::new(1, Duration::ZERO);
        for _ in 0..1000 {
            assert!(all.take(Duration::ZERO, A));
        }
    }

    #[test]
    fn extreme_settings_do_not_overflow() {
        let mut b = Buckets::new(u32::MAX, Duration::MAX);
        assert!(b.take(Duration::MAX, A));
        assert!(b.take(Duration::MAX, A));
        b.sweep(Duration::MAX);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let mut b = Buckets::new(20, Duration::from_secs(6));
        for i in 0..1000u32 {
            let addr = IpAddr::V4(i.into());
            assert!(b.take(Duration::ZERO, addr));
        }
        assert_eq!(b.len(), 1000);
        // Still short of full at 5.9 s: nothing to forget.
        b.sweep(secs(5.9));
        assert_eq!(b.len(), 1000);
        let later = secs(6.0);
        let mut calls = 0;
        while b.len() > 1 {
            // A busy address keeps asking; denied or not, each call sweeps.
            let _ = b.take(later, A);
            b.sweep(later);
            calls += 1;
        }
        assert!(calls <= 1000 / (SWEEP_PER_CALL - 1) + 1, "{calls}");
        // The one left is the busy address, and a forgotten one starts full again.
        assert!(b.full_at.contains_key(&A));
        for _ in 0..20 {
            assert!(b.take(later, IpAddr::V4(7.into())));
        }
    }

    #[test]
    fn sweep_is_bounded_per_call() {
        let mut b = Buckets::new(1, Duration::from_secs(1));
        for i in 0..100u32 {
            b.take(Duration::ZERO, IpAddr::V4(i.into()));
        }
        b.sweep(secs(2.0));
        assert_eq!(b.len(), 100 - SWEEP_PER_CALL);
    }
}
