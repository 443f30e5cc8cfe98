//! The simulator: shards, a FIFO network with seeded latency, scripted peers, and a reference
//! model that checks the relay after every step.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::value::RawValue;
use switchyard_core::{
    BinaryMessage, CloseCode, Config, ConnKey, Counters, Direction, DropReason, Ended, Endpoint,
    Input, Open, Output, Relay, Role, ServerId, UpgradeOutcome, Violation,
};

use crate::trace::Trace;

mod check;
mod model;

/// The per-item overhead PROTOCOL.md §10 charges on top of a message's bytes.
const ITEM_OVERHEAD: usize = 64;

/// One simulated WebSocket connection, named from the peer's side.
///
/// Every `connect_*` call dials a new connection and returns a new id; a client that re-dials gets
/// a new `PeerId`. The number is also the [`ConnKey`] the relay knows the connection by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(u64);

impl PeerId {
    /// The runtime handle the shards see for this connection.
    pub fn conn_key(self) -> ConnKey {
        ConnKey(self.0)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a simulated peer's WebSocket library reports to its application, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// One TEXT message from the relay.
    Text(String),
    /// A ping from the relay (answered automatically unless the peer is unresponsive).
    Ping,
    /// The answer to a ping the peer sent ([`Sim::ping`]).
    Pong,
    /// The relay's close frame; the peer's library has answered it (unless the peer is
    /// unresponsive) and the connection is over.
    Closed {
        /// The close code the relay sent.
        code: u16,
        /// The close reason the relay sent.
        reason: String,
    },
    /// TCP ended without a close frame (the relay aborted the connection).
    Dropped,
}

/// How to build a [`Sim`].
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Decides everything random: latencies and the shards' conn-id generators.
    pub seed: u64,
    /// Number of [`Relay`] shards; a connection goes to `server_id.shard(shards)`.
    pub shards: usize,
    /// The configuration every shard runs with.
    pub relay: Config,
    /// One-way network latency, drawn uniformly from `[min, max]` for every message.
    pub latency: (Duration, Duration),
    /// Messages the runtime hands to one connection's socket before the peer reads them (a
    /// stand-in for socket buffers); further messages wait in the runtime's queue, where a close
    /// with `discard_queued` can still drop them.
    pub window: usize,
    /// Keep every trace line (see [`Sim::trace`]); otherwise only a tail for failure reports.
    pub record_trace: bool,
    /// The command printed with an invariant failure; by default one that replays `seed` through
    /// the seeds test.
    pub replay_command: Option<String>,
    /// Upper bound on steps in one [`Sim::advance`] or [`Sim::jump`], against livelock.
    pub max_steps: u64,
}

impl SimConfig {
    /// One shard with PROTOCOL.md's defaults, 1–20 ms latency, a window of 4 messages.
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            shards: 1,
            relay: Config::default(),
            latency: (Duration::from_millis(1), Duration::from_millis(20)),
            window: 4,
            record_trace: false,
            replay_command: None,
            max_steps: 1_000_000,
        }
    }
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig::new(0)
    }
}

/// The two sides a connection can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Binary,
    Phone,
}

/// Relay → peer on the wire.
#[derive(Debug, Clone)]
enum Down {
    Text {
        seq: u64,
        data: Bytes,
    },
    Ping,
    /// The runtime's codec answering the peer's ping.
    Pong,
    Close {
        code: u16,
        reason: &'static str,
    },
    /// TCP reset after an abort.
    Reset,
}

/// Peer → relay on the wire.
#[derive(Debug, Clone)]
enum Up {
    Text(Bytes),
    /// The first fragment of a message whose rest follows as `Text`.
    Started,
    Ping,
    Pong,
    /// Something the runtime's codec rejects.
    Violation(Violation),
    /// The peer starts the close handshake with this raw code.
    Close(Option<u16>),
    /// The peer answers the relay's close frame.
    CloseReply,
    /// TCP ends without a close frame.
    Fin,
}

#[derive(Debug)]
enum Event {
    Down {
        conn: u64,
        epoch: u64,
        msg: Down,
    },
    Up {
        conn: u64,
        msg: Up,
    },
    /// The relay resumed reading: feed what arrived meanwhile.
    Unhold {
        conn: u64,
    },
}

/// One message the core has charged to a connection's outbox and not yet seen written.
#[derive(Debug, Clone, Copy)]
struct Charged {
    seq: u64,
    charge: usize,
    frame: bool,
}

/// One connection: the peer, the wire, the runtime's view, and what the model expects.
#[derive(Debug)]
struct Link {
    side: Side,
    sid: ServerId,
    sid_ix: usize,
    shard: usize,
    conn_id: String,
    opened_at: Duration,

    // The peer.
    inbox: Vec<PeerEvent>,
    reading: bool,
    responsive: bool,
    /// The peer reads at most one message per this interval (a slow but steady reader).
    read_delay: Duration,
    parked: VecDeque<Down>,
    /// The peer has closed, dropped, or seen the end: it sends and reads nothing more.
    gone: bool,
    closes_seen: u32,

    // The wire.
    to_peer_last: Duration,
    to_relay_last: Duration,
    epoch: u64,

    // The runtime.
    queue: VecDeque<Down>,
    started: usize,
    paused: bool,
    held: VecDeque<Up>,
    close_sent: bool,
    aborted: bool,
    relay_closed: bool,

    // The model of the core's view.
    /// The core has decided to end it (Close, Abort) or been told it ended (Closed).
    ending: bool,
    close_decided: bool,
    registered: bool,
    notify: Option<u64>,
    mirror: VecDeque<Charged>,
    next_seq: u64,
    head_since: Duration,
    close_since: Option<Duration>,
    /// When heartbeat obligations (re)started: registration, becoming holder, resume.
    active_since: Duration,
    last_pong: Option<Duration>,
    /// The first heartbeat ping not answered by a pong yet: the pong deadline runs from it.
    ping_unanswered: Option<Duration>,
    /// When the core last read anything from it (a message, part of one, a ping or a pong).
    last_heard: Option<Duration>,
    /// A message has begun and not finished.
    reading_msg: bool,
    /// When the core's read deadline for the unfinished message started, unless suspended.
    read_since: Option<Duration>,
    /// The close the last input must cause in the same call: `(code, discard_queued)`.
    expected_close: Option<(u16, &'static str, bool)>,

    // Frames in flight through the relay, for phones: envelopes to the binary, frames to the phone.
    p2b: Vec<Bytes>,
    p2b_emitted: usize,
    p2b_received: usize,
    b2p: Vec<Bytes>,
    b2p_emitted: usize,
    b2p_received: usize,
    notice_emitted: bool,
    notice_received: bool,
}

impl Link {
    fn mirror_charge(&self) -> usize {
        self.mirror.iter().map(|m| m.charge).sum()
    }

    fn mirror_frames(&self) -> u64 {
        self.mirror.iter().filter(|m| m.frame).count() as u64
    }
}

#[derive(Debug)]
struct SidState {
    id: ServerId,
    shard: usize,
    /// The holder in LIVE or PROBING (§6), as the model follows it.
    holder: Option<u64>,
    /// When the id lost its holder (GRACE began), unless it was claimed since.
    holderless_since: Option<Duration>,
    /// Claimants waiting on a probe, in arrival order.
    claimants: VecDeque<u64>,
    /// When the running probe started (the first claimant of this wait arrived).
    probe_since: Option<Duration>,
}

/// What the counters must read, derived from what the simulated runtime saw.
#[derive(Debug, Default, Clone)]
struct Expect {
    forwarded: [u64; Direction::COUNT],
    dropped: [u64; DropReason::COUNT],
    phone_accepts: u64,
    phone_404: u64,
    phone_429: u64,
    server_accepts: u64,
    server_409: u64,
    grace_entries: u64,
}

#[derive(Deserialize)]
struct ToBinary<'a> {
    #[serde(borrow)]
    conn_id: Cow<'a, str>,
    #[serde(borrow)]
    frame: Option<&'a RawValue>,
    close_code: Option<u16>,
}

/// A deterministic simulation of one relay node: shards, network, peers and a virtual clock.
///
/// Every step (one network delivery, one round of shard timeouts, or one peer action) appends
/// to the trace and is followed by a check of the invariants listed in the
/// [crate documentation](crate); a violation panics with the seed and a replay command.
pub struct Sim {
    cfg: SimConfig,
    origin: Instant,
    now: Duration,
    shards: Vec<Relay>,
    rng: ChaCha8Rng,
    events: BTreeMap<(Duration, u64), Event>,
    event_seq: u64,
    links: BTreeMap<u64, Link>,
    /// Connections the relay still tracks (opened, not yet reported closed).
    open: BTreeSet<u64>,
    next_conn: u64,
    sids: Vec<SidState>,
    sid_index: BTreeMap<ServerId, usize>,
    by_conn_id: BTreeMap<String, u64>,
    expect: Expect,
    pending: VecDeque<(u64, Input, Option<u64>)>,
    opening: Option<u64>,
    expected_notices: Vec<(u64, u64, u16)>,
    emitted_notices: Vec<(u64, u64, u16)>,
    /// Connections whose close one call must explain once it returns: expected closes,
    /// evictions (4404 reclaim) and turned-away claimants (4409).
    expecting: Vec<u64>,
    rejected_with: Option<u16>,
    trace: Trace,
    steps: u64,
    /// When the clock last jumped: a ping due during the jump goes out at its end.
    last_jump: Duration,
    /// A node-wide `Rebalance` is being handled, which explains its closes.
    rebalancing: bool,
    /// A binary's claim is being handled: a ping it causes is the probe's, with no deadline.
    claiming: bool,
    /// When the node began to shut down.
    shutdown_at: Option<Duration>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.cfg.seed)
            .field("now", &self.now)
            .field("steps", &self.steps)
            .field("connections", &self.open.len())
            .finish_non_exhaustive()
    }
}

fn json_trim(data: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = data.iter().position(|b| !ws(b)).unwrap_or(data.len());
    let end = data.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &data[start..end]
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The notice code §8 gives a relay-decided close, by its reason; `None` where no notice is due.
fn notice_for_reason(reason: &str) -> Option<u16> {
    match reason {
        "heartbeat timeout" | "phone backlog full" | "phone write failed" => Some(1011),
        "frame is not JSON" => Some(1007),
        "message too big" => Some(1009),
        "read timeout" => Some(1008),
        "Protocol violation" => Some(1002),
        _ => None,
    }
}

impl Sim {
    /// Builds the shards (each seeded from `config.seed`) and an empty network at time zero.
    pub fn new(config: SimConfig) -> Sim {
        assert!(config.shards > 0, "a node has at least one shard");
        assert!(
            config.window > 0,
            "the socket window holds at least one message"
        );
        assert!(
            config.latency.0 <= config.latency.1,
            "latency range is (min, max)"
        );
        // The only clock read: the origin of virtual time. Every later instant is origin + offset.
        #[allow(clippy::disallowed_methods)]
        let origin = Instant::now();
        let mut seeder = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5348_4152_4453_4545);
        let shards = (0..config.shards)
            .map(|_| {
                let mut seed = [0u8; 32];
                seeder.fill_bytes(&mut seed);
                Relay::new(config.relay.clone(), seed, origin)
            })
            .collect();
        let record = config.record_trace;
        Sim {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            cfg: config,
            origin,
            now: Duration::ZERO,
            shards,
            events: BTreeMap::new(),
            event_seq: 0,
            links: BTreeMap::new(),
            open: BTreeSet::new(),
            next_conn: 0,
            sids: Vec::new(),
            sid_index: BTreeMap::new(),
            by_conn_id: BTreeMap::new(),
            expect: Expect::default(),
            pending: VecDeque::new(),
            opening: None,
            expected_notices: Vec::new(),
            emitted_notices: Vec::new(),
            expecting: Vec::new(),
            rejected_with: None,
            trace: Trace::new(record),
            steps: 0,
            last_jump: Duration::ZERO,
            rebalancing: false,
            claiming: false,
            shutdown_at: None,
        }
    }

    // ---- public API -----------------------------------------------------------------------

    /// The seed this run replays from.
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// Virtual time since the simulation started.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The relay configuration every shard runs with.
    pub fn relay_config(&self) -> &Config {
        &self.cfg.relay
    }

    /// Dials `/v1/server` for `server_id` and claims it (the 101 happens at once).
    ///
    /// # Panics
    /// If `server_id` is not valid server-id syntax (PROTOCOL.md §4.3).
    pub fn connect_binary(&mut self, server_id: &str) -> PeerId {
        self.connect(server_id, Side::Binary)
    }

    /// Dials `/v1/client` for `server_id` and registers (the 101 happens at once).
    ///
    /// # Panics
    /// If `server_id` is not valid server-id syntax (PROTOCOL.md §4.3).
    pub fn connect_phone(&mut self, server_id: &str) -> PeerId {
        self.connect(server_id, Side::Phone)
    }

    /// Sends one TEXT message from `peer`; it reaches the relay after a latency. Ignored once the
    /// peer's connection is over.
    pub fn send(&mut self, peer: PeerId, text: &str) {
        let Some(link) = self.links.get(&peer.0) else {
            return;
        };
        if link.gone {
            return;
        }
        self.trace_peer(peer.0, format_args!("send {}", self::text(text.as_bytes())));
        self.peer_up(peer.0, Up::Text(Bytes::copy_from_slice(text.as_bytes())));
        self.end_step();
    }

    /// Sends one TEXT message from `peer` in two fragments `gap` apart: the relay sees the message
    /// begin (its read deadline starts, PROTOCOL.md §9) and completes it when the rest arrives.
    pub fn send_fragmented(&mut self, peer: PeerId, text: &str, gap: Duration) {
        let Some(link) = self.links.get(&peer.0) else {
            return;
        };
        if link.gone {
            return;
        }
        self.trace_peer(
            peer.0,
            format_args!("send over {gap:?} {}", self::text(text.as_bytes())),
        );
        self.peer_up(peer.0, Up::Started);
        let rest_at = self.now + gap;
        let link = self.links.get_mut(&peer.0).expect("known");
        link.to_relay_last = link.to_relay_last.max(rest_at);
        self.peer_up(peer.0, Up::Text(Bytes::copy_from_slice(text.as_bytes())));
        self.end_step();
    }

    /// Makes `peer` break the framing rules in a way its relay-side codec reports as `violation`.
    pub fn violate(&mut self, peer: PeerId, violation: Violation) {
        let Some(link) = self.links.get(&peer.0) else {
            return;
        };
        if link.gone {
            return;
        }
        self.trace_peer(peer.0, format_args!("violates {violation:?}"));
        self.peer_up(peer.0, Up::Violation(violation));
        self.end_step();
    }

    /// Sends a ping from `peer`; the relay's codec answers with [`PeerEvent::Pong`].
    pub fn ping(&mut self, peer: PeerId) {
        let Some(link) = self.links.get(&peer.0) else {
            return;
        };
        if link.gone {
            return;
        }
        self.trace_peer(peer.0, format_args!("ping"));
        self.peer_up(peer.0, Up::Ping);
        self.end_step();
    }

    /// SIGHUP (PROTOCOL.md §16.3): every shard closes its claimants and holders 1012 "rebalance".
    pub fn rebalance(&mut self) {
        self.rebalancing = true;
        self.node_input(|| Input::Rebalance);
        self.rebalancing = false;
        self.end_step();
    }

    /// SIGTERM after the drain delay (PROTOCOL.md §13): every shard closes every connection 1001
    /// "shutting down", flushing queues first, and drops what is left after the drain timeout.
    pub fn shutdown(&mut self) {
        if self.shutdown_at.is_none() {
            self.shutdown_at = Some(self.now);
        }
        self.node_input(|| Input::Shutdown);
        self.end_step();
    }

    /// Whether every shard has shut down and seen every connection closed.
    pub fn is_drained(&self) -> bool {
        self.shards.iter().all(Relay::is_drained)
    }

    /// Takes everything `peer` has received since the last call, oldest first.
    pub fn recv(&mut self, peer: PeerId) -> Vec<PeerEvent> {
        self.links
            .get_mut(&peer.0)
            .map(|l| std::mem::take(&mut l.inbox))
            .unwrap_or_default()
    }

    /// Drops `peer`'s TCP connection without a close frame; the relay sees `Closed(Dropped)`.
    pub fn disconnect(&mut self, peer: PeerId) {
        if !self.peer_leaves(peer.0) {
            return;
        }
        self.trace_peer(peer.0, format_args!("disconnect"));
        self.peer_up(peer.0, Up::Fin);
        self.end_step();
    }

    /// Starts the close handshake from `peer` with the raw `code` (which may be one not allowed
    /// on the wire, to test the relay's answer).
    pub fn close(&mut self, peer: PeerId, code: u16) {
        if !self.peer_leaves(peer.0) {
            return;
        }
        self.trace_peer(peer.0, format_args!("close {code}"));
        self.peer_up(peer.0, Up::Close(Some(code)));
        self.end_step();
    }

    /// Makes `peer` a slow reader (`false`): it stops reading, so nothing more reaches it and the
    /// relay's writes stop being acknowledged. `true` reads what waited, then continues.
    pub fn set_reading(&mut self, peer: PeerId, reading: bool) {
        let Some(link) = self.links.get_mut(&peer.0) else {
            return;
        };
        if link.gone || link.reading == reading {
            return;
        }
        link.reading = reading;
        self.trace_peer(peer.0, format_args!("reading {reading}"));
        if reading {
            while let Some(msg) = self
                .links
                .get_mut(&peer.0)
                .and_then(|l| l.parked.pop_front())
            {
                self.peer_process(peer.0, msg);
            }
            self.pump(peer.0);
            self.run_pending();
        }
        self.end_step();
    }

    /// Makes `peer` a slow but steady reader: it reads at most one message per `delay`
    /// (`Duration::ZERO`, the default, reads as fast as the network delivers).
    pub fn set_read_delay(&mut self, peer: PeerId, delay: Duration) {
        let Some(link) = self.links.get_mut(&peer.0) else {
            return;
        };
        if link.gone || link.read_delay == delay {
            return;
        }
        link.read_delay = delay;
        self.trace_peer(peer.0, format_args!("read delay {delay:?}"));
        self.end_step();
    }

    /// Whether `peer`'s WebSocket library answers control frames (the default). An unresponsive
    /// peer (a hung process) answers neither pings nor the relay's close frame; it still reads
    /// data and its application can still send.
    pub fn set_responsive(&mut self, peer: PeerId, responsive: bool) {
        let Some(link) = self.links.get_mut(&peer.0) else {
            return;
        };
        if link.responsive == responsive {
            return;
        }
        link.responsive = responsive;
        self.trace_peer(peer.0, format_args!("responsive {responsive}"));
        self.end_step();
    }

    /// Whether `peer`'s connection is still open from the peer's side.
    pub fn is_open(&self, peer: PeerId) -> bool {
        self.links.get(&peer.0).is_some_and(|l| !l.gone)
    }

    /// The public conn id the relay gave `peer` (what a binary sees in envelopes for a phone).
    pub fn conn_id(&self, peer: PeerId) -> Option<&str> {
        self.links.get(&peer.0).map(|l| l.conn_id.as_str())
    }

    /// Runs the network and the shards' timers up to `now + d`, in time order, one step at a time.
    pub fn advance(&mut self, d: Duration) {
        let deadline = self.now + d;
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > self.cfg.max_steps {
                self.fail(format!(
                    "no progress: over {} steps before {deadline:?}",
                    self.cfg.max_steps
                ));
            }
            let event_at = self.events.keys().next().map(|k| k.0);
            let timer_at = self.next_timer();
            let timer_first = match (timer_at, event_at) {
                (Some(t), Some(e)) => t <= e,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let at = if timer_first { timer_at } else { event_at }.expect("one is set");
            if at > deadline {
                break;
            }
            self.now = self.now.max(at);
            if timer_first {
                self.fire_timers();
            } else {
                let (_, event) = self.events.pop_first().expect("an event is due");
                self.handle_event(event);
            }
            self.end_step();
        }
        self.now = deadline;
    }

    /// Jumps the clock forward by `d` at once: every shard fires all its due deadlines at the new
    /// time before anything that arrived meanwhile is read; then the network catches up.
    pub fn jump(&mut self, d: Duration) {
        self.now += d;
        self.last_jump = self.now;
        self.trace
            .push(self.now, format_args!("clock"), format_args!("jump +{d:?}"));
        self.fire_timers();
        self.end_step();
        self.advance(Duration::ZERO);
    }

    /// The counters of every shard, summed.
    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        for s in &self.shards {
            total.add(s.counters());
        }
        total
    }

    /// The shards, for inspection.
    pub fn shards(&self) -> &[Relay] {
        &self.shards
    }

    /// The FNV-1a hash of every trace line so far: equal seeds give equal hashes.
    pub fn trace_hash(&self) -> u64 {
        self.trace.hash()
    }

    /// The number of trace lines so far.
    pub fn trace_len(&self) -> u64 {
        self.trace.len()
    }

    /// Every trace line, when [`SimConfig::record_trace`] is set.
    pub fn trace(&self) -> Option<&[String]> {
        self.trace.lines()
    }

    /// Steps taken so far (each followed by an invariant check).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Checks that nothing is left in flight: every frame the relay accepted for a connection that
    /// is still open has reached its peer, and every outbox is empty. Call it after letting the
    /// network settle (every peer reading, a few latencies of [`advance`](Self::advance)).
    pub fn check_delivered(&self) {
        for (&conn, l) in &self.links {
            if l.relay_closed {
                continue;
            }
            if !l.mirror.is_empty() && l.reading {
                self.fail(format!(
                    "{} still has {} unwritten message(s)",
                    PeerId(conn),
                    l.mirror.len()
                ));
            }
            if l.side != Side::Phone || l.ending || !l.registered {
                continue;
            }
            let binary_alive = l
                .notify
                .and_then(|b| self.links.get(&b))
                .is_some_and(|b| !b.ending && b.reading);
            if binary_alive && l.p2b_received != l.p2b.len() {
                self.fail(format!(
                    "{}: {} of {} phone frames reached the binary",
                    PeerId(conn),
                    l.p2b_received,
                    l.p2b.len()
                ));
            }
            if l.reading && l.b2p_received != l.b2p.len() {
                self.fail(format!(
                    "{}: {} of {} binary frames reached the phone",
                    PeerId(conn),
                    l.b2p_received,
                    l.b2p.len()
                ));
            }
        }
        let c = self.counters();
        if self.links.values().all(|l| l.relay_closed || l.reading)
            && (c.phone_outbox_bytes != 0 || c.binary_outbox_bytes != 0)
        {
            self.fail(format!(
                "outbox gauges not drained: phone {} binary {}",
                c.phone_outbox_bytes, c.binary_outbox_bytes
            ));
        }
    }

    /// Messages the relay has handed to open connections and not yet seen written.
    pub fn in_flight(&self) -> usize {
        self.open.iter().map(|c| self.links[c].mirror.len()).sum()
    }

    /// Peers whose connection is still open from the peer's side, in id order.
    pub fn open_peers(&self) -> Vec<PeerId> {
        self.links
            .iter()
            .filter(|(_, l)| !l.gone)
            .map(|(&k, _)| PeerId(k))
            .collect()
    }

    // ---- peers ----------------------------------------------------------------------------

    fn connect(&mut self, server_id: &str, side: Side) -> PeerId {
        let sid = ServerId::parse(server_id.as_bytes())
            .unwrap_or_else(|e| panic!("invalid server-id {server_id:?}: {e:?}"));
        let shard = sid.shard(self.cfg.shards);
        self.next_conn += 1;
        let conn = self.next_conn;
        let sid_ix = match self.sid_index.get(&sid) {
            Some(&ix) => ix,
            None => {
                self.sids.push(SidState {
                    id: sid.clone(),
                    shard,
                    holder: None,
                    holderless_since: None,
                    claimants: VecDeque::new(),
                    probe_since: None,
                });
                self.sid_index.insert(sid.clone(), self.sids.len() - 1);
                self.sids.len() - 1
            }
        };
        self.links.insert(
            conn,
            Link {
                side,
                sid: sid.clone(),
                sid_ix,
                shard,
                conn_id: String::new(),
                opened_at: self.now,
                inbox: Vec::new(),
                reading: true,
                responsive: true,
                read_delay: Duration::ZERO,
                parked: VecDeque::new(),
                gone: false,
                closes_seen: 0,
                to_peer_last: self.now,
                to_relay_last: self.now,
                epoch: 0,
                queue: VecDeque::new(),
                started: 0,
                paused: false,
                held: VecDeque::new(),
                close_sent: false,
                aborted: false,
                relay_closed: false,
                ending: false,
                close_decided: false,
                registered: false,
                notify: None,
                mirror: VecDeque::new(),
                next_seq: 0,
                head_since: self.now,
                close_since: None,
                active_since: self.now,
                last_pong: None,
                ping_unanswered: None,
                last_heard: None,
                reading_msg: false,
                read_since: None,
                expected_close: None,
                p2b: Vec::new(),
                p2b_emitted: 0,
                p2b_received: 0,
                b2p: Vec::new(),
                b2p_emitted: 0,
                b2p_received: 0,
                notice_emitted: false,
                notice_received: false,
            },
        );
        self.open.insert(conn);
        let role = match side {
            Side::Binary => Role::Binary {
                version: "sim".into(),
            },
            Side::Phone => Role::Phone {
                device_name: Some("sim".into()),
            },
        };
        let open = Open {
            server_id: sid,
            role,
            client: [127, 0, 0, 1].into(),
        };
        self.pending.push_back((
            conn,
            Input::Open {
                conn: ConnKey(conn),
                open,
            },
            None,
        ));
        self.run_pending();
        self.end_step();
        PeerId(conn)
    }

    /// Marks the peer as leaving by its own action; `false` if it already left.
    fn peer_leaves(&mut self, conn: u64) -> bool {
        let Some(link) = self.links.get_mut(&conn) else {
            return false;
        };
        if link.gone {
            return false;
        }
        link.gone = true;
        link.parked.clear();
        true
    }

    /// Puts a message from the peer on the wire, behind everything it sent before.
    fn peer_up(&mut self, conn: u64, msg: Up) {
        let lat = self.latency();
        let link = self.links.get_mut(&conn).expect("known peer");
        let at = link.to_relay_last.max(self.now + lat);
        link.to_relay_last = at;
        self.schedule(at, Event::Up { conn, msg });
    }

    /// The peer's library handles one message from the relay.
    fn peer_process(&mut self, conn: u64, msg: Down) {
        let link = self.links.get_mut(&conn).expect("known peer");
        link.started = link.started.saturating_sub(1);
        match msg {
            Down::Text { seq, data } => {
                let text = String::from_utf8_lossy(&data).into_owned();
                self.trace_peer(conn, format_args!("recv {}", self::text(&data)));
                self.check_receipt(conn, &data);
                let link = self.links.get_mut(&conn).expect("known peer");
                link.inbox.push(PeerEvent::Text(text));
                if !link.relay_closed {
                    self.pending.push_back((
                        conn,
                        Input::Written {
                            conn: ConnKey(conn),
                        },
                        Some(seq),
                    ));
                }
            }
            Down::Pong => {
                link.inbox.push(PeerEvent::Pong);
                self.trace_peer(conn, format_args!("recv pong"));
            }
            Down::Ping => {
                link.inbox.push(PeerEvent::Ping);
                let responsive = link.responsive;
                self.trace_peer(conn, format_args!("recv ping"));
                if responsive {
                    self.peer_up(conn, Up::Pong);
                }
            }
            Down::Close { code, reason } => {
                link.inbox.push(PeerEvent::Closed {
                    code,
                    reason: reason.to_owned(),
                });
                link.gone = true;
                link.closes_seen += 1;
                link.parked.clear();
                let responsive = link.responsive;
                self.trace_peer(conn, format_args!("recv close {code} {reason:?}"));
                self.check_one_close(conn);
                if responsive {
                    self.peer_up(conn, Up::CloseReply);
                }
            }
            Down::Reset => unreachable!("resets are handled on arrival"),
        }
        self.pump(conn);
    }

    /// Checks a message the peer read against what the relay was given to deliver.
    fn check_receipt(&mut self, conn: u64, data: &Bytes) {
        let link = &self.links[&conn];
        match link.side {
            Side::Phone => {
                let i = link.b2p_received;
                if link.b2p.get(i) != Some(data) {
                    self.fail(format!(
                        "{} received {:?}, expected frame {i} {:?}",
                        PeerId(conn),
                        String::from_utf8_lossy(data),
                        link.b2p.get(i).map(|b| String::from_utf8_lossy(b))
                    ));
                }
                self.links.get_mut(&conn).expect("known").b2p_received += 1;
            }
            Side::Binary => {
                let Some((phone, is_frame)) = self.phone_of_binary_message(data) else {
                    self.fail(format!(
                        "binary {} received a message for no known phone: {:?}",
                        PeerId(conn),
                        String::from_utf8_lossy(data)
                    ));
                };
                let p = &self.links[&phone];
                if p.notify != Some(conn) {
                    self.fail(format!(
                        "binary {} received a message about {}, which registered with {:?}",
                        PeerId(conn),
                        PeerId(phone),
                        p.notify.map(PeerId)
                    ));
                }
                if is_frame {
                    let i = p.p2b_received;
                    if p.notice_received || p.p2b.get(i) != Some(data) {
                        self.fail(format!(
                            "binary {} received {:?}, expected envelope {i} of {} {:?}",
                            PeerId(conn),
                            String::from_utf8_lossy(data),
                            PeerId(phone),
                            p.p2b.get(i).map(|b| String::from_utf8_lossy(b))
                        ));
                    }
                    self.links.get_mut(&phone).expect("known").p2b_received += 1;
                } else {
                    if p.notice_received || p.p2b_received != p.p2b_emitted {
                        self.fail(format!(
                            "binary {} received a second or early notice for {}",
                            PeerId(conn),
                            PeerId(phone)
                        ));
                    }
                    self.links.get_mut(&phone).expect("known").notice_received = true;
                }
            }
        }
    }

    /// The phone a message to a binary is about, and whether it is an envelope (else a notice).
    fn phone_of_binary_message(&self, data: &[u8]) -> Option<(u64, bool)> {
        let msg: ToBinary<'_> = serde_json::from_slice(data).ok()?;
        let phone = *self.by_conn_id.get(&*msg.conn_id)?;
        match (msg.frame, msg.close_code) {
            (Some(_), None) => Some((phone, true)),
            (None, Some(_)) => Some((phone, false)),
            _ => None,
        }
    }

    // ---- the network and the runtime -----------------------------------------------------

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.cfg.latency;
        let span = (hi - lo).as_nanos() as u64;
        lo + Duration::from_nanos(if span == 0 {
            0
        } else {
            self.rng.next_u64() % (span + 1)
        })
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.event_seq += 1;
        self.events.insert((at, self.event_seq), event);
    }

    /// Starts queued messages on the wire while the socket window has room.
    fn pump(&mut self, conn: u64) {
        loop {
            let window = self.cfg.window;
            let link = self.links.get_mut(&conn).expect("known");
            if link.started >= window {
                return;
            }
            let Some(msg) = link.queue.pop_front() else {
                return;
            };
            if matches!(msg, Down::Close { .. }) {
                link.close_sent = true;
            }
            link.started += 1;
            let epoch = link.epoch;
            let lat = self.latency();
            let link = self.links.get_mut(&conn).expect("known");
            let at = (link.to_peer_last + link.read_delay).max(self.now + lat);
            link.to_peer_last = at;
            self.schedule(at, Event::Down { conn, epoch, msg });
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Down { conn, epoch, msg } => {
                let link = self.links.get_mut(&conn).expect("known");
                if epoch != link.epoch || link.gone {
                    return;
                }
                match msg {
                    Down::Reset => {
                        link.gone = true;
                        link.closes_seen += 1;
                        link.parked.clear();
                        link.inbox.push(PeerEvent::Dropped);
                        self.trace_peer(conn, format_args!("recv reset"));
                        self.check_one_close(conn);
                    }
                    msg if !link.reading => link.parked.push_back(msg),
                    msg => self.peer_process(conn, msg),
                }
            }
            Event::Up { conn, msg } => {
                let link = self.links.get_mut(&conn).expect("known");
                if link.relay_closed {
                    return;
                }
                if link.paused || !link.held.is_empty() {
                    link.held.push_back(msg);
                    return;
                }
                self.relay_receive(conn, msg);
            }
            Event::Unhold { conn } => loop {
                let link = self.links.get_mut(&conn).expect("known");
                if link.relay_closed || link.paused {
                    break;
                }
                let Some(msg) = link.held.pop_front() else {
                    break;
                };
                self.relay_receive(conn, msg);
                self.run_pending();
            },
        }
        self.run_pending();
    }

    /// The runtime reads one message from the socket and tells the shard.
    fn relay_receive(&mut self, conn: u64, msg: Up) {
        let key = ConnKey(conn);
        let close_sent = self.links[&conn].close_sent;
        let input = match msg {
            Up::Text(data) => Input::Message { conn: key, data },
            Up::Started => Input::MessageStarted { conn: key },
            Up::Violation(violation) => Input::Violation {
                conn: key,
                violation,
            },
            Up::Ping => {
                let link = self.links.get_mut(&conn).expect("known");
                if !close_sent && !link.aborted {
                    link.queue.push_back(Down::Pong);
                    self.pump(conn);
                }
                Input::Ping { conn: key }
            }
            Up::Pong => Input::Pong { conn: key },
            Up::Close(code) if !close_sent => Input::Closed {
                conn: key,
                ended: Ended::PeerClose(code),
            },
            Up::Close(_) | Up::CloseReply => Input::Closed {
                conn: key,
                ended: Ended::Local,
            },
            Up::Fin => Input::Closed {
                conn: key,
                ended: Ended::Dropped,
            },
        };
        self.pending.push_back((conn, input, None));
    }

    fn next_timer(&self) -> Option<Duration> {
        self.shards
            .iter()
            .filter_map(Relay::poll_timeout)
            .min()
            .map(|at| at.saturating_duration_since(self.origin))
    }

    fn fire_timers(&mut self) {
        let now = self.origin + self.now;
        for s in 0..self.shards.len() {
            let due = self.shards[s].next_timer().filter(|(at, _)| *at <= now);
            let Some((_, timer)) = due else {
                continue;
            };
            let timer = format!("{timer:?}");
            self.trace.push(
                self.now,
                format_args!("shard{s}"),
                format_args!("timeout {timer}"),
            );
            self.shards[s].handle_timeout(now);
            self.after_call(s);
        }
        self.run_pending();
    }

    fn node_input(&mut self, input: impl Fn() -> Input) {
        for s in 0..self.shards.len() {
            let input = input();
            self.trace.push(
                self.now,
                format_args!("node -> shard{s}"),
                format_args!("{}", describe_input(&input)),
            );
            self.shards[s].handle_input(self.origin + self.now, input);
            self.after_call(s);
        }
        self.run_pending();
    }

    /// Feeds every queued input to its shard, with what each one's outputs cause.
    fn run_pending(&mut self) {
        while let Some((conn, input, seq)) = self.pending.pop_front() {
            let Some(link) = self.links.get(&conn) else {
                continue;
            };
            if link.relay_closed {
                continue;
            }
            let shard = link.shard;
            let side = link.side;
            self.account(conn, &input, seq);
            self.trace.push(
                self.now,
                format_args!("{} -> shard{shard}", PeerId(conn)),
                format_args!("{}", describe_input(&input)),
            );
            let opening_phone = matches!(&input, Input::Open { .. }) && side == Side::Phone;
            self.claiming = matches!(&input, Input::Open { .. }) && side == Side::Binary;
            if self.claiming {
                self.model_claim(conn);
            }
            let mut rejection = None;
            if opening_phone {
                let ix = self.links[&conn].sid_ix;
                rejection = if self.shutdown_at.is_some() {
                    Some(1001)
                } else if self.sid_free(ix) {
                    Some(4404)
                } else if self.registered_phones(ix) >= self.cfg.relay.max_phones_per_server {
                    Some(4429)
                } else {
                    None
                };
                let holder = self.sids[ix].holder;
                let l = self.links.get_mut(&conn).expect("known");
                l.registered = true;
                l.notify = holder;
                self.opening = Some(conn);
            }
            let is_open = matches!(&input, Input::Open { .. });
            self.shards[shard].handle_input(self.origin + self.now, input);
            if is_open {
                let id = self.shards[shard]
                    .conn_id(ConnKey(conn))
                    .map(|id| id.to_string())
                    .unwrap_or_else(|| {
                        self.fail(format!("{} has no conn id after Open", PeerId(conn)))
                    });
                self.by_conn_id.insert(id.clone(), conn);
                self.links.get_mut(&conn).expect("known").conn_id = id;
            }
            self.after_call(shard);
            self.claiming = false;
            if opening_phone {
                self.opening = None;
                let l = &self.links[&conn];
                let got = (!l.registered).then(|| self.rejected_with.take()).flatten();
                if got != rejection {
                    self.fail(format!(
                        "phone {} for {}: rejection {got:?}, the model expects {rejection:?}",
                        PeerId(conn),
                        l.sid
                    ));
                }
                if l.registered {
                    self.expect.phone_accepts += 1;
                }
            }
        }
    }

    /// Drains a shard's outputs and checks what one call changed.
    fn after_call(&mut self, shard: usize) {
        while let Some(out) = self.shards[shard].poll_output() {
            self.on_output(shard, out);
        }
        self.verify_holders(shard);
        self.explain_call();
        if self.expected_notices != self.emitted_notices {
            self.fail(format!(
                "close notices: expected {:?}, relay sent {:?} (binary, phone, code)",
                self.expected_notices, self.emitted_notices
            ));
        }
        self.expected_notices.clear();
        self.emitted_notices.clear();
    }

    fn trace_peer(&mut self, conn: u64, event: fmt::Arguments<'_>) {
        self.trace
            .push(self.now, format_args!("{}", PeerId(conn)), event);
    }
}

/// The bytes as one trace line: control characters escaped.
fn text(data: &[u8]) -> Cow<'_, str> {
    let s = String::from_utf8_lossy(data);
    if !s.chars().any(char::is_control) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn describe_input(input: &Input) -> String {
    match input {
        Input::Open { open, .. } => match &open.role {
            Role::Binary { .. } => format!("open binary {}", open.server_id),
            Role::Phone { .. } => format!("open phone {}", open.server_id),
        },
        Input::Message { data, .. } => format!("message {}", text(data)),
        Input::MessageStarted { .. } => "message started".into(),
        Input::Ping { .. } => "ping".into(),
        Input::Pong { .. } => "pong".into(),
        Input::Written { .. } => "written".into(),
        Input::Violation { violation, .. } => format!("violation {violation:?}"),
        Input::Closed { ended, .. } => format!("closed {ended:?}"),
        Input::Rebalance => "rebalance".into(),
        Input::Shutdown => "shutdown".into(),
    }
}

fn describe_output(out: &Output) -> String {
    match out {
        Output::Send { conn, data } => format!("send {} {}", PeerId(conn.0), text(data)),
        Output::Ping { conn } => format!("ping {}", PeerId(conn.0)),
        Output::Close {
            conn,
            code,
            reason,
            discard_queued,
        } => format!(
            "close {} {code} {reason:?}{}",
            PeerId(conn.0),
            if *discard_queued { " discarding" } else { "" }
        ),
        Output::Abort { conn } => format!("abort {}", PeerId(conn.0)),
        Output::PauseReading { conn, paused } => {
            format!(
                "{} {}",
                if *paused { "pause" } else { "resume" },
                PeerId(conn.0)
            )
        }
        Output::PushWake { server_id, .. } => format!("push wake {server_id}"),
    }
}
