//! What each shard publishes after every step, read by any thread for `/healthz` and `/metrics`.

use switchyard_core::{Counters, Load};

use crate::sync::{AtomicU64, Mutex, Ordering};

/// One shard's figures as of its latest step: the two gauges `/healthz` sums on every request,
/// without a lock, and the whole [`Counters`] `/metrics` copies under one.
#[derive(Debug, Default)]
pub(crate) struct Published {
    binaries: AtomicU64,
    phones: AtomicU64,
    counters: Mutex<Counters>,
}

impl Published {
    /// Replaces the figures; called by the shard's task only.
    pub(crate) fn publish(&self, counters: &Counters) {
        self.binaries
            .store(counters.connected_binaries, Ordering::Relaxed);
        self.phones
            .store(counters.connected_phones, Ordering::Relaxed);
        self.counters
            .lock()
            .expect("counters lock")
            .clone_from(counters);
    }

    /// The gauges. Each is a value some step published, never older than one this thread read
    /// before; the two are read apart, so they may come from neighbouring steps.
    pub(crate) fn load(&self) -> Load {
        Load {
            binaries: self.binaries.load(Ordering::Relaxed),
            phones: self.phones.load(Ordering::Relaxed),
        }
    }

    /// Adds the counters of one published step, whole, to `sum`.
    pub(crate) fn add_to(&self, sum: &mut Counters) {
        sum.add(&self.counters.lock().expect("counters lock"));
    }
}
