//! Admission (PROTOCOL.md §2–§4): one gate per node answers every request head, in stage order.

mod bucket;
mod caps;
mod client;
mod handshake;
mod head;
mod response;
mod route;
mod rules;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::bucket::Buckets;
use self::caps::{Caps, Full};
use self::head::{Head, Parsed, RequestLine};
use self::response::Reject;
use self::route::{Route, Upgrade};
use crate::config::Config;
use crate::counters::{Counters, UpgradeOutcome};
use crate::io::Open;

/// Node-wide figures `/healthz` reports, summed over the shards by the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub binaries: u64,
    pub phones: u64,
}

impl std::ops::AddAssign for Load {
    fn add_assign(&mut self, other: Load) {
        self.binaries += other.binaries;
        self.phones += other.phones;
    }
}

impl Response {
    /// The 404 every listener gives for a path it does not serve (§2.3), for listeners the gate
    /// does not answer itself (metrics, ACME http-01).
    pub fn not_found() -> Response {
        response::Reject::NotFound.render(false)
    }
}

/// How long a runtime keeps reading (and discarding) input after writing a non-101 response and
/// shutting down its sending side, so the peer is not reset before it reads the answer (§2.1).
pub const RESPONSE_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

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

/// The admission gate of one node (PROTOCOL.md §3): answers each request head in stage order and
/// keeps the per-address token buckets and the exact per-address and global connection counts.
#[derive(Debug)]
pub struct Gate {
    config: Config,
    started: Instant,
    /// The latest `now` seen, as an offset from `started`.
    last: Duration,
    buckets: Buckets,
    caps: Caps,
    draining: bool,
    counters: Counters,
}

impl Gate {
    pub fn new(config: Config, now: Instant) -> Gate {
        Gate {
            buckets: Buckets::new(config.rate_burst, config.rate_refill),
            caps: Caps::new(config.max_connections_per_ip, config.max_connections),
            config,
            started: now,
            last: Duration::ZERO,
            draining: false,
            counters: Counters::default(),
        }
    }

    /// Answers one request head. `head` is what the runtime read: either a complete head (ending
    /// with CRLFCRLF, at most `config.max_head_size` bytes) or exactly the first
    /// `max_head_size` bytes of a head that had not ended by then (oversized). `peer` is the
    /// transport peer address; `load` is what `/healthz` reports.
    pub fn handle_head(&mut self, now: Instant, peer: IpAddr, head: &[u8], load: Load) -> Verdict {
        let now = self.advance(now);
        self.buckets.sweep(now);
        match head::parse(head, self.config.max_head_size) {
            Parsed::Invalid => Verdict::Drop,
            Parsed::Complete(head) => self.complete(now, peer, &head, load),
            Parsed::Oversized(None) => respond(Reject::HeadTooLarge.render(false), None),
            Parsed::Oversized(Some(line)) => self.oversized(now, peer, line),
        }
    }

    /// Hands back a WebSocket connection's hold on the caps.
    pub fn release(&mut self, slot: Slot) {
        self.caps.release(slot);
    }

    /// Starts the drain delay (§13): `/healthz` answers 503 with `"status":"draining"`.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// The cells this gate decides: `connections_rejected_total`, and the `reject_headers` and
    /// `reject_rate_limit` cells of `ws_upgrade_attempts_total` with their paired register
    /// failures.
    /// The limits the gate applies; a runtime reads `header_timeout` and `max_head_size` here.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// WebSocket slots currently held, node-wide.
    pub fn open_slots(&self) -> u32 {
        self.caps.held()
    }

    /// WebSocket slots currently held by one client address (keyed canonically).
    pub fn open_slots_for(&self, addr: IpAddr) -> u32 {
        self.caps.held_by(addr.to_canonical())
    }

    /// Records `now` as an offset from the start; time never goes back.
    fn advance(&mut self, now: Instant) -> Duration {
        let offset = now.saturating_duration_since(self.started);
        debug_assert!(offset >= self.last, "time went backwards");
        self.last = self.last.max(offset);
        self.last
    }

    /// Stages 1 to 8 for a head within the size limit.
    fn complete(&mut self, now: Duration, peer: IpAddr, head: &Head<'_>, load: Load) -> Verdict {
        let route = Route::of(head.target);
        let head_method = head.head_method();
        if !self.host_allowed(head) {
            return self.reject(route.upgrade(), Reject::Misdirected, None, head_method);
        }
        let upgrade = match route {
            Route::Healthz => {
                let uptime = now.as_secs();
                let response = response::healthz(
                    self.draining,
                    &self.config.version,
                    load,
                    uptime,
                    head_method,
                );
                return respond(response, None);
            }
            Route::NotFound => return respond(Reject::NotFound.render(head_method), None),
            Route::Upgrade(upgrade) => upgrade,
        };
        let client = client::address(peer, head, self.config.trust_forwarded_for);
        let slot = match self.admit(now, client, upgrade) {
            Ok(slot) => slot,
            Err(reject) => return self.reject(Some(upgrade), reject, None, head_method),
        };
        let (server_id, role) = match rules::check(head, upgrade) {
            Ok(found) => found,
            Err(_) => {
                self.counters
                    .upgrade(upgrade.endpoint(), UpgradeOutcome::RejectHeaders);
                return self.reject(Some(upgrade), Reject::Headers, Some(slot), head_method);
            }
        };
        match handshake::check(head) {
            Ok(accept) => Verdict::Upgrade {
                response: response::switching_protocols(&accept),
                slot,
                open: Open {
                    server_id,
                    role,
                    client,
                },
            },
            Err(reject) => self.reject(Some(upgrade), reject, Some(slot), head_method),
        }
    }

    /// A head over the size limit whose request line was read whole: stage 1 is skipped, and
    /// upgrade routes pass stages 2 to 4, keyed on the transport peer, before the 431.
    fn oversized(&mut self, now: Duration, peer: IpAddr, line: RequestLine) -> Verdict {
        let Route::Upgrade(upgrade) = line.route else {
            return respond(Reject::HeadTooLarge.render(line.head_method), None);
        };
        let (reject, slot) = match self.admit(now, peer.to_canonical(), upgrade) {
            Ok(slot) => (Reject::HeadTooLarge, Some(slot)),
            Err(reject) => (reject, None),
        };
        self.reject(Some(upgrade), reject, slot, line.head_method)
    }

    /// Stage 1: with `--domain` set, `Host` without its port must name one of the domains.
    fn host_allowed(&self, head: &Head<'_>) -> bool {
        if self.config.domains.is_empty() {
            return true;
        }
        let head::Presence::Once(host) = head.presence("host") else {
            return false;
        };
        let Some(name) = host_name(host) else {
            return false;
        };
        self.config
            .domains
            .iter()
            .any(|d| d.as_bytes().eq_ignore_ascii_case(name))
    }

    /// Stages 2 to 4: a token from the client's bucket, then a slot under both caps.
    fn admit(&mut self, now: Duration, client: IpAddr, upgrade: Upgrade) -> Result<Slot, Reject> {
        if !self.buckets.take(now, client) {
            self.counters
                .upgrade(upgrade.endpoint(), UpgradeOutcome::RejectRateLimit);
            return Err(Reject::RateLimited);
        }
        self.caps.take(client).map_err(|full| match full {
            Full::Address => Reject::AddressCap,
            Full::Global => Reject::GlobalCap,
        })
    }

    /// Answers with `reject`, counting it when the request was for an upgrade route (§12).
    fn reject(
        &mut self,
        upgrade: Option<Upgrade>,
        reject: Reject,
        slot: Option<Slot>,
        head_method: bool,
    ) -> Verdict {
        if let (Some(_), Some(reason)) = (upgrade, reject.reason()) {
            self.counters.reject(reason);
        }
        respond(reject.render(head_method), slot)
    }
}

fn respond(response: Response, slot: Option<Slot>) -> Verdict {
    Verdict::Respond { response, slot }
}

/// `Host` without its `:port` (digits only); a bracketed IPv6 literal keeps its brackets.
fn host_name(host: &[u8]) -> Option<&[u8]> {
    let end = if host.first() == Some(&b'[') {
        host.iter().position(|&b| b == b']')? + 1
    } else {
        host.iter().position(|&b| b == b':').unwrap_or(host.len())
    };
    let (name, rest) = host.split_at_checked(end)?;
    match rest {
        [] => Some(name),
        [b':', port @ ..] if port.iter().all(u8::is_ascii_digit) => Some(name),
        _ => None,
    }
}
