//! Concurrent WebSocket connections per address and per node (stages 3 and 4, PROTOCOL.md §3).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::Slot;

/// Which cap a new connection would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// Stage 3.
    Address,
    /// Stage 4.
    Global,
}

/// Exact counts of slots held; addresses holding none are not kept.
#[derive(Debug)]
pub(super) struct Caps {
    per_address: BTreeMap<IpAddr, u32>,
    global: u32,
    max_per_address: u32,
    max_global: u32,
}

impl Caps {
    pub(super) fn new(max_per_address: u32, max_global: u32) -> Caps {
        Caps {
            per_address: BTreeMap::new(),
            global: 0,
            max_per_address,
            max_global,
        }
    }

    /// Takes a slot for `client` if both caps allow one more.
    pub(super) fn take(&mut self, client: IpAddr) -> Result<Slot, Full> {
        let held = self.held_by(client);
        if held >= self.max_per_address {
            return Err(Full::Address);
        }
        if self.global >= self.max_global {
            return Err(Full::Global);
        }
        self.per_address.insert(client, held.saturating_add(1));
        self.global = self.global.saturating_add(1);
        Ok(Slot { client })
    }

    pub(super) fn release(&mut self, slot: Slot) {
        let held = self.held_by(slot.client);
        debug_assert!(held > 0 && self.global > 0, "released a slot never taken");
        if held <= 1 {
            self.per_address.remove(&slot.client);
        } else {
            self.per_address.insert(slot.client, held - 1);
        }
        self.global = self.global.saturating_sub(1);
    }

    pub(super) fn held(&self) -> u32 {
        self.global
    }

    pub(super) fn held_by(&self, client: IpAddr) -> u32 {
        self.per_address.get(&client).copied().unwrap_or(0)
    }

    /// Addresses holding at least one slot.
    #[cfg(test)]
    pub(super) fn addresses(&self) -> usize {
        self.per_address.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn per_address_then_global() {
        let mut caps = Caps::new(2, 3);
        let a1 = caps.take(A).unwrap();
        let a2 = caps.take(A).unwrap();
        assert_eq!(caps.take(A), Err(Full::Address));
        let b1 = caps.take(B).unwrap();
        assert_eq!(caps.take(B), Err(Full::Global));
        assert_eq!((caps.held(), caps.held_by(A), caps.held_by(B)), (3, 2, 1));
        caps.release(a1);
        let a3 = caps.take(A).unwrap();
        for slot in [a2, a3, b1] {
            caps.release(slot);
        }
        assert_eq!((caps.held(), caps.addresses()), (0, 0));
    }

    #[test]
    fn zero_caps_refuse() {
        assert_eq!(Caps::new(0, 10).take(A), Err(Full::Address));
        assert_eq!(Caps::new(10, 0).take(A), Err(Full::Global));
    }
}
