//! Token-bucket arithmetic shared by admission (§3.1) and push wake (§11).
//!
//! A bucket is kept as one number, the time at which it is full again (the generic cell rate
//! algorithm): taking a token moves that time one refill interval later, and the bucket gives a
//! token while it is at most `burst - 1` intervals short of full. Fractional progress is exact to
//! the nanosecond, and a bucket whose time has passed is the same as a new one, so it may be
//! forgotten. Times are offsets from the owning machine's epoch.

use std::time::Duration;

/// `burst` tokens, one more every `refill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    burst: u32,
    refill: Duration,
    /// How far short of full a bucket may be and still give a token: `(burst - 1) × refill`.
    slack: Duration,
}

impl Rate {
    pub(crate) fn new(burst: u32, refill: Duration) -> Rate {
        let slack = refill
            .checked_mul(burst.saturating_sub(1))
            .unwrap_or(Duration::MAX);
        Rate {
            burst,
            refill,
            slack,
        }
    }

    /// Takes one token from the bucket that is full again at `full_at` (`Duration::ZERO` for a
    /// new bucket). An empty bucket gives `false` and is left as it is.
    pub(crate) fn take(&self, full_at: &mut Duration, now: Duration) -> bool {
        if self.burst == 0 {
            return false;
        }
        let base = (*full_at).max(now);
        if base - now > self.slack {
            return false;
        }
        *full_at = base.saturating_add(self.refill);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_with_fractional_progress() {
        let rate = Rate::new(20, Duration::from_secs(6));
        let mut b = Duration::ZERO;
        for _ in 0..20 {
            assert!(rate.take(&mut b, Duration::ZERO));
        }
        assert!(!rate.take(&mut b, Duration::ZERO));
        // 3 s is half a token: still empty, and the denied attempt took nothing.
        assert!(!rate.take(&mut b, Duration::from_secs(3)));
        assert!(rate.take(&mut b, Duration::from_secs(6)));
        assert!(!rate.take(&mut b, Duration::from_secs(6)));
        assert_eq!(b, Duration::from_secs(126));
    }

    #[test]
    fn zero_burst_never_gives_and_huge_refill_saturates() {
        let mut b = Duration::ZERO;
        assert!(!Rate::new(0, Duration::from_secs(1)).take(&mut b, Duration::ZERO));
        let rate = Rate::new(2, Duration::MAX);
        assert!(rate.take(&mut b, Duration::from_secs(1)));
        assert_eq!(b, Duration::MAX);
    }
}
