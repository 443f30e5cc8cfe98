//! Node-wide connection gauges kept by the connection tasks (decision A1 in docs/decisions.md):
//! the figures that show a limit's memory is bounded where no core machine can see it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// TCP connections of the main listener, and of those the ones still reading a request head.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    open: Arc<AtomicU64>,
    pending_heads: Arc<AtomicU64>,
}

/// Counts one in a gauge while held. Owned, so an upgraded connection's task can keep it.
#[must_use = "the gauge counts only while the guard is held"]
pub(crate) struct Held(Arc<AtomicU64>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn hold(gauge: &Arc<AtomicU64>) -> Held {
    gauge.fetch_add(1, Ordering::Relaxed);
    Held(gauge.clone())
}

impl Gauges {
    /// One accepted connection, until its socket is dropped.
    pub(crate) fn open(&self) -> Held {
        hold(&self.open)
    }

    /// One connection whose request head is being read.
    pub(crate) fn pending_head(&self) -> Held {
        hold(&self.pending_heads)
    }

    /// Writes both gauges into `counters`.
    pub(crate) fn read_into(&self, counters: &mut switchyard_core::Counters) {
        counters.open_connections = self.open.load(Ordering::Relaxed);
        counters.pending_heads = self.pending_heads.load(Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_while_held() {
        let g = Gauges::default();
        let open = g.open();
        let head = g.pending_head();
        let mut c = switchyard_core::Counters::default();
        g.read_into(&mut c);
        assert_eq!((c.open_connections, c.pending_heads), (1, 1));
        drop(head);
        g.read_into(&mut c);
        assert_eq!((c.open_connections, c.pending_heads), (1, 0));
        drop(open);
        g.read_into(&mut c);
        assert_eq!((c.open_connections, c.pending_heads), (0, 0));
    }
}
