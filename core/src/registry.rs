//! Per-server-id state (PROTOCOL.md §6): who holds the id, who waits for it, its phones.

use std::collections::{BTreeMap, VecDeque};

use std::time::Duration;

use crate::id::{ConnId, ConnKey};
use crate::timer::TimerKey;

/// The four states of §6's table.
#[derive(Debug)]
pub(crate) enum State {
    Free,
    Live {
        holder: ConnKey,
    },
    /// A claim arrived while `holder` was live: it was pinged and has until the probe deadline to
    /// show it is alive. `claimants` wait in arrival order.
    Probing {
        holder: ConnKey,
        claimants: VecDeque<ConnKey>,
        probe: Option<TimerKey>,
    },
    /// The holder went away; its phones stay for the grace window.
    Grace {
        timer: Option<TimerKey>,
    },
}

/// Everything a shard keeps for one server-id.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) state: State,
    /// Registered phones by public id, until their connection ends (also while closing).
    pub(crate) phones: BTreeMap<ConnId, ConnKey>,
    /// The holder's outbox went over budget: reading from every phone is paused (§10.2).
    pub(crate) paused: bool,
    /// Push-wake admission for this id (§11): when its bucket is full again (see `bucket`).
    pub(crate) push: Duration,
}

impl Entry {
    pub(crate) fn new() -> Entry {
        Entry {
            state: State::Free,
            phones: BTreeMap::new(),
            paused: false,
            push: Duration::ZERO,
        }
    }

    /// The connection currently holding the id, in LIVE or PROBING.
    pub(crate) fn holder(&self) -> Option<ConnKey> {
        match self.state {
            State::Live { holder } | State::Probing { holder, .. } => Some(holder),
            State::Free | State::Grace { .. } => None,
        }
    }

    /// An entry that holds nothing may be forgotten.
    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.state, State::Free) && self.phones.is_empty()
    }
}
