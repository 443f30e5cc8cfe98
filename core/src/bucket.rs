//! A token bucket kept as one instant (GCRA): exact integer time arithmetic, no floats, and a
//! bucket that is full is recognisable without a sweep.

use std::time::{Duration, Instant};

/// `capacity` tokens, one more every `refill`. A new bucket starts full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenBucket {
    /// When the bucket will be full again; at or before `now` it is full.
    full_at: Option<Instant>,
}

impl TokenBucket {
    pub(crate) const FULL: TokenBucket = TokenBucket { full_at: None };

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant, capacity: u32, refill: Duration) -> bool {
        let base = match self.full_at {
            Some(at) if at > now => at,
            _ => now,
        };
        let full_at = base + refill;
        // Taking is allowed while the debt after it stays within the capacity.
        if full_at.saturating_duration_since(now) > refill.saturating_mul(capacity) {
            return false;
        }
        self.full_at = Some(full_at);
        true
    }

    /// Whether the bucket has refilled completely (and so may be forgotten).
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        self.full_at.is_none_or(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_with_fractional_progress() {
        let t0 = Instant::now();
        let refill = Duration::from_secs(6);
        let mut b = TokenBucket::FULL;
        for _ in 0..20 {
            assert!(b.try_take(t0, 20, refill));
        }
        assert!(!b.try_take(t0, 20, refill));
        // 3 s is half a token: still empty, and the denied attempt took nothing.
        assert!(!b.try_take(t0 + Duration::from_secs(3), 20, refill));
        assert!(b.try_take(t0 + Duration::from_secs(6), 20, refill));
        assert!(!b.try_take(t0 + Duration::from_secs(6), 20, refill));
        assert!(!b.is_full(t0 + Duration::from_secs(125)));
        assert!(b.is_full(t0 + Duration::from_secs(126)));
    }
}
