//! Admission (PROTOCOL.md §2–§4): one gate per node answers every request head, in stage order.

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::config::Config;
use crate::counters::Counters;
use crate::io::Open;

/// Node-wide figures `/healthz` reports, summed over the shards by the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub binaries: u64,
    pub phones: u64,
}

/// A complete HTTP/1.1 response, rendered byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub bytes: Bytes,
}

/// One WebSocket connection's hold on the per-address and global caps (stages 3 and 4). Hand it
/// back with [`Gate::release`] when the TCP connection is closed (or, for a rejected request, once
/// the response is written).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a slot must be released, or the caps leak"]
pub struct Slot {
    pub(crate) client: IpAddr,
}

/// The gate's answer to one request head.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Stage 0 failed: close TCP writing nothing.
    Drop,
    /// Write `response`, shut down the sending side, discard input for up to 1 s, close (§2.1).
    /// Release `slot`, if any, once the response is written.
    Respond {
        response: Response,
        slot: Option<Slot>,
    },
    /// Write the 101 in `response`, start framing, and hand `open` to the shard that owns
    /// `open.server_id`. Keep `slot` until the TCP connection is closed.
    Upgrade {
        response: Response,
        slot: Slot,
        open: Open,
    },
}
pub struct Gate;
