//! Byte accounting of one connection's write queue (PROTOCOL.md §10). The runtime holds the
//! bytes; the core holds the charges and decides every budget.

use std::collections::VecDeque;
use std::time::Instant;

use crate::counters::Direction;

/// The fixed per-item overhead charged on top of the payload.
pub(crate) const ITEM_OVERHEAD: usize = 64;

/// What a queued message is, for the counters when it is written or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Item {
    /// A forwarded frame, read completely at `read_at`.
    Frame {
        direction: Direction,
        read_at: Instant,
    },
    /// A close notice: counted neither forwarded nor dropped.
    Notice,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    charge: usize,
    item: Item,
}

/// The charged, not yet written messages of one connection, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Queued>,
    charged: usize,
}

impl Outbox {
    pub(crate) fn charged(&self) -> usize {
        self.charged
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(crate) fn push(&mut self, payload: usize, item: Item) -> usize {
        let charge = payload + ITEM_OVERHEAD;
        self.queue.push_back(Queued { charge, item });
        self.charged += charge;
        charge
    }

    /// The oldest message was written; returns it and its charge.
    pub(crate) fn written(&mut self) -> Option<(Item, usize)> {
        let q = self.queue.pop_front()?;
        self.charged -= q.charge;
        Some((q.item, q.charge))
    }

    /// Forgets every queued message; returns them and the total charge released.
    pub(crate) fn clear(&mut self) -> (Vec<Item>, usize) {
        let items = self.queue.drain(..).map(|q| q.item).collect();
        let released = std::mem::take(&mut self.charged);
        (items, released)
    }
}
