//! The node's one admission gate, shared by every connection task.

use std::net::IpAddr;
use std::time::Instant;

use switchyard_core::{Counters, Gate, Load, Slot, Verdict};

use crate::sync::Mutex;

/// The [`Gate`] behind a lock held only for one call: the per-address and global slot counts
/// are exact however connection tasks on different workers race.
#[derive(Debug)]
pub(crate) struct SharedGate(Mutex<Gate>);

impl SharedGate {
    pub(crate) fn new(gate: Gate) -> SharedGate {
        SharedGate(Mutex::new(gate))
    }

    /// Answers one request head. The clock is read under the lock, so the gate sees time move
    /// forward however tasks race for it.
    pub(crate) fn handle_head(
        &self,
        now: impl FnOnce() -> Instant,
        peer: IpAddr,
        head: &[u8],
        load: Load,
    ) -> Verdict {
        let mut gate = self.0.lock().expect("gate lock");
        gate.handle_head(now(), peer, head, load)
    }

    /// Hands back a connection's slot.
    pub(crate) fn release(&self, slot: Slot) {
        self.0.lock().expect("gate lock").release(slot);
    }

    pub(crate) fn start_draining(&self) {
        self.0.lock().expect("gate lock").start_draining();
    }

    /// A copy of the gate's counters.
    pub(crate) fn counters(&self) -> Counters {
        self.0.lock().expect("gate lock").counters().clone()
    }

    /// Slots held node-wide, and by `addr`.
    #[cfg(all(test, switchyard_loom))]
    pub(crate) fn open_slots(&self, addr: IpAddr) -> (u32, u32) {
        let gate = self.0.lock().expect("gate lock");
        (gate.open_slots(), gate.open_slots_for(addr))
    }
}
