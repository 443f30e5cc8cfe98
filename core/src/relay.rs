//! The shard state machine: claim, probe, register, forward, notices, heartbeat, grace, outbox
//! budgets and shutdown for every server-id that hashes to this shard.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use rand_chacha::ChaCha12Rng;
use rand_core::{Rng, SeedableRng};

use crate::bucket::Rate;
use crate::close::{CloseCode, Ended, NOTICE_NO_CODE, Violation};
use crate::config::Config;
use crate::counters::{Counters, Direction, DropReason, Endpoint, UpgradeOutcome};
use crate::envelope::{self, BinaryMessage};
use crate::gate::Load;
use crate::id::{ConnId, ConnKey, ServerId, Side};
use crate::io::{Input, Open, Output, Role};
use crate::loggable::{BINARY_VERSION_MAX, DEVICE_NAME_MAX, loggable};
use crate::outbox::{ITEM_OVERHEAD, Item, Outbox};
use crate::registry::{Entry, State};
use crate::timer::{Timer, TimerKey, TimerTable};

const REASON_NO_SERVER: &str = "no server with that id";
const REASON_CLAIMED: &str = "server-id already claimed";
const REASON_TOO_MANY_PHONES: &str = "too many phones for server-id";
const REASON_RECLAIMED: &str = "binary reclaimed server-id";
const REASON_HEARTBEAT: &str = "heartbeat timeout";
const REASON_NOT_JSON: &str = "frame is not JSON";
const REASON_INVALID_UTF8: &str = "invalid utf-8";
const REASON_TOO_BIG: &str = "message too big";
const REASON_READ_TIMEOUT: &str = "read timeout";
const REASON_PROTOCOL: &str = "Protocol violation";
const REASON_BACKLOG_FULL: &str = "phone backlog full";
const REASON_REBALANCE: &str = "rebalance";
const REASON_SHUTDOWN: &str = "shutting down";

/// One shard of a node: the deterministic state machine for the server-ids it owns.
///
/// See the [crate documentation](crate) for the run loop.
#[derive(Debug)]
pub struct Relay {
    config: Config,
    rng: ChaCha12Rng,
    /// The `now` the shard was created with: token buckets count from it.
    epoch: Instant,
    now: Instant,
    push_rate: Rate,
    conns: BTreeMap<ConnKey, Conn>,
    ids: BTreeMap<ServerId, Entry>,
    /// Public ids of every connection alive on this shard, so a drawn id is never reused (§5).
    live_ids: BTreeSet<ConnId>,
    timers: TimerTable,
    out: VecDeque<Output>,
    counters: Counters,
    shutting_down: bool,
    drain: Option<TimerKey>,
    /// When each drop reason was last logged, to log at most one line per second per reason.
    drop_logged: [Option<Instant>; DropReason::COUNT],
}

#[derive(Debug)]
struct Conn {
    server_id: ServerId,
    id: ConnId,
    kind: Kind,
    /// The relay has decided to close it: nothing more is read or queued, the queue drains.
    ending: bool,
    /// Reading is paused by binary backpressure; heartbeat and read deadline are suspended.
    paused: bool,
    /// A data message has begun and not finished.
    reading: bool,
    /// TCP drop was ordered; only `Closed` is awaited.
    aborted: bool,
    ping: Option<TimerKey>,
    pong: Option<TimerKey>,
    read: Option<TimerKey>,
    write: Option<TimerKey>,
    close: Option<TimerKey>,
    outbox: Outbox,
}

#[derive(Debug)]
enum Kind {
    /// A binary: the holder, a claimant, or one being turned away.
    Binary,
    Phone {
        /// `{"conn_id":"<id>","frame":`, built once.
        prefix: Bytes,
        registered: bool,
        /// The holder when the phone registered: the only binary that may get its notice (§8).
        notify: Option<ConnKey>,
    },
}

impl Conn {
    fn side(&self) -> Side {
        match self.kind {
            Kind::Binary => Side::Binary,
            Kind::Phone { .. } => Side::Phone,
        }
    }

    fn is_registered_phone(&self) -> bool {
        matches!(
            self.kind,
            Kind::Phone {
                registered: true,
                ..
            }
        )
    }
}

impl Relay {
    /// Creates a shard. `seed` keys the generator conn ids are drawn from: from the OS in
    /// production, fixed in a test so the run replays.
    pub fn new(config: Config, seed: [u8; 32], now: Instant) -> Relay {
        let push_rate = Rate::new(config.push_burst, config.push_refill);
        Relay {
            config,
            rng: ChaCha12Rng::from_seed(seed),
            epoch: now,
            now,
            push_rate,
            conns: BTreeMap::new(),
            ids: BTreeMap::new(),
            live_ids: BTreeSet::new(),
            timers: TimerTable::default(),
            out: VecDeque::new(),
            counters: Counters::default(),
            shutting_down: false,
            drain: None,
            drop_logged: [None; DropReason::COUNT],
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Feeds one event that happened at `now`.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.advance(now);
        match input {
            Input::Open { conn, open } => self.open(conn, open),
            Input::Message { conn, data } => self.message(conn, data),
            Input::MessageStarted { conn } => self.message_started(conn),
            Input::Ping { conn } => self.control_frame(conn, false),
            Input::Pong { conn } => self.control_frame(conn, true),
            Input::Written { conn } => self.written(conn),
            Input::Violation { conn, violation } => self.violation(conn, violation),
            Input::Closed { conn, ended } => self.closed(conn, ended),
            Input::Rebalance => self.rebalance(),
            Input::Shutdown => self.shutdown(),
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        while let Some(timer) = self.timers.pop_due(now) {
            self.fire(timer);
        }
    }

    /// The next command to carry out. Filled by every `handle_*` call; drain it until `None`.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next: the earliest heartbeat,
    /// pong, read, write or close deadline, probe, grace expiry or drain deadline.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next().map(|(at, _)| at)
    }

    /// The next deadline with its reason, for traces.
    #[must_use]
    pub fn next_timer(&self) -> Option<(Instant, &Timer)> {
        self.timers.next()
    }

    /// This shard's share of what `/healthz` reports; sum it over the shards.
    pub fn load(&self) -> Load {
        Load {
            binaries: self.counters.connected_binaries,
            phones: self.counters.connected_phones,
        }
    }

    /// This shard's counters and gauges.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Connections the shard still tracks (accepted and not yet [`Input::Closed`]).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// After [`Input::Shutdown`]: every connection has been reported closed.
    pub fn is_drained(&self) -> bool {
        self.shutting_down && self.conns.is_empty()
    }

    /// The public id the shard gave `conn`, for logs and tests.
    pub fn conn_id(&self, conn: ConnKey) -> Option<&ConnId> {
        self.conns.get(&conn).map(|c| &c.id)
    }

    /// The connection holding `server_id` (LIVE or PROBING), if any.
    pub fn holder(&self, server_id: &ServerId) -> Option<ConnKey> {
        self.ids.get(server_id).and_then(Entry::holder)
    }

    /// Server-ids the shard keeps state for (held, probed, in grace, or with phones still open).
    pub fn server_ids(&self) -> usize {
        self.ids.len()
    }

    fn advance(&mut self, now: Instant) {
        debug_assert!(now >= self.now, "time went backwards");
        self.now = self.now.max(now);
    }

    // ---- connections arriving -------------------------------------------------------------

    fn open(&mut self, conn: ConnKey, open: Open) {
        if self.conns.contains_key(&conn) {
            debug_assert!(false, "{conn} opened twice");
            return;
        }
        let side = match open.role {
            Role::Binary { .. } => Side::Binary,
            Role::Phone { .. } => Side::Phone,
        };
        let id = self.draw_id(side, &open.server_id);
        let kind = match side {
            Side::Binary => Kind::Binary,
            Side::Phone => Kind::Phone {
                prefix: envelope::frame_prefix(&id),
                registered: false,
                notify: None,
            },
        };
        self.live_ids.insert(id.clone());
        self.conns.insert(
            conn,
            Conn {
                server_id: open.server_id.clone(),
                id,
                kind,
                ending: false,
                paused: false,
                reading: false,
                aborted: false,
                ping: None,
                pong: None,
                read: None,
                write: None,
                close: None,
                outbox: Outbox::default(),
            },
        );
        if self.shutting_down {
            self.end(conn, CloseCode::GOING_AWAY, REASON_SHUTDOWN, None);
            return;
        }
        match open.role {
            Role::Binary { version } => self.claim(conn, open.server_id, &version),
            Role::Phone { device_name } => self.register(conn, open.server_id, device_name),
        }
    }

    fn draw_id(&mut self, side: Side, server_id: &ServerId) -> ConnId {
        loop {
            let id = ConnId::new(side, server_id, self.rng.next_u64());
            if !self.live_ids.contains(&id) {
                return id;
            }
        }
    }

    fn claim(&mut self, conn: ConnKey, sid: ServerId, version: &str) {
        let entry = self.ids.entry(sid.clone()).or_insert_with(Entry::new);
        match &mut entry.state {
            State::Free => {
                tracing::info!(server_id = %sid, conn_id = %self.conns[&conn].id, binary_version = %loggable(version, BINARY_VERSION_MAX), "server_claimed");
                self.hold(conn, &sid);
            }
            State::Live { holder } => {
                let holder = *holder;
                let probe = self.timers.set(
                    self.now + self.config.probe_timeout,
                    Timer::Probe(sid.clone()),
                );
                entry.state = State::Probing {
                    holder,
                    claimants: VecDeque::from([conn]),
                    probe: Some(probe),
                };
                tracing::info!(server_id = %sid, conn_id = %self.conns[&conn].id, "server_id_conflict");
                self.out.push_back(Output::Ping { conn: holder });
            }
            State::Probing { claimants, .. } => {
                claimants.push_back(conn);
                tracing::info!(server_id = %sid, conn_id = %self.conns[&conn].id, "server_id_conflict");
            }
            State::Grace { timer } => {
                let mut timer = timer.take();
                self.timers.cancel(&mut timer);
                entry.state = State::Free;
                tracing::info!(server_id = %sid, conn_id = %self.conns[&conn].id, binary_version = %loggable(version, BINARY_VERSION_MAX), "server_claimed");
                self.evict_phones(&sid);
                self.hold(conn, &sid);
            }
        }
    }

    /// Makes `conn` the holder of `sid` (from FREE, GRACE or a probe's end) and starts its
    /// heartbeat.
    fn hold(&mut self, conn: ConnKey, sid: &ServerId) {
        let entry = self.ids.get_mut(sid).expect("claimed id has an entry");
        if entry.holder().is_none() {
            self.counters.connected_binaries += 1;
        }
        entry.state = State::Live { holder: conn };
        self.counters
            .upgrade(Endpoint::Server, UpgradeOutcome::Accept);
        self.start_heartbeat(conn);
    }

    fn register(&mut self, conn: ConnKey, sid: ServerId, device_name: Option<String>) {
        let max = self.config.max_phones_per_server;
        let entry = self
            .ids
            .get_mut(&sid)
            .filter(|e| !matches!(e.state, State::Free));
        let Some(entry) = entry else {
            tracing::info!(server_id = %sid, "phone_register_no_server");
            self.counters
                .upgrade(Endpoint::Client, UpgradeOutcome::Reject404);
            self.end(conn, CloseCode::NO_SERVER, REASON_NO_SERVER, None);
            return;
        };
        if entry.phones.len() >= max {
            tracing::info!(server_id = %sid, "phone_register_at_cap");
            self.counters
                .upgrade(Endpoint::Client, UpgradeOutcome::Reject429);
            self.end(
                conn,
                CloseCode::TOO_MANY_PHONES,
                REASON_TOO_MANY_PHONES,
                None,
            );
            return;
        }
        let holder = entry.holder();
        let paused = entry.paused;
        let c = self.conns.get_mut(&conn).expect("opened above");
        entry.phones.insert(c.id.clone(), conn);
        if let Kind::Phone {
            registered, notify, ..
        } = &mut c.kind
        {
            *registered = true;
            *notify = holder;
        }
        tracing::info!(
            server_id = %sid,
            conn_id = %c.id,
            device_name = %loggable(device_name.as_deref().unwrap_or(""), DEVICE_NAME_MAX),
            "phone_registered"
        );
        self.counters.connected_phones += 1;
        self.counters
            .upgrade(Endpoint::Client, UpgradeOutcome::Accept);
        if paused {
            self.pause(conn);
        } else {
            self.start_heartbeat(conn);
        }
    }

    // ---- inbound frames -------------------------------------------------------------------

    fn message_started(&mut self, conn: ConnKey) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.ending {
            return;
        }
        c.reading = true;
        if !c.paused {
            self.timers.ensure(
                &mut c.read,
                self.now + self.config.read_timeout,
                Timer::ReadDeadline(conn),
            );
        }
        self.holder_seen(conn);
    }

    fn control_frame(&mut self, conn: ConnKey, pong: bool) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.ending {
            return;
        }
        if pong {
            self.timers.cancel(&mut c.pong);
        }
        self.holder_seen(conn);
    }

    fn message(&mut self, conn: ConnKey, data: Bytes) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.ending {
            return;
        }
        c.reading = false;
        self.timers.cancel(&mut c.read);
        if data.len() > self.config.max_message_size {
            self.violation(conn, Violation::TooBig);
            return;
        }
        match c.kind {
            Kind::Binary => {
                let sid = c.server_id.clone();
                self.holder_seen(conn);
                if self.ids.get(&sid).and_then(Entry::holder) == Some(conn) {
                    self.binary_message(conn, &sid, data);
                } else {
                    // A claimant waiting on the probe.
                    self.dropped(DropReason::NoBinary);
                }
            }
            Kind::Phone { .. } => self.phone_message(conn, data),
        }
    }

    /// Any frame from a holder under probe proves it alive: the claimants are turned away.
    fn holder_seen(&mut self, conn: ConnKey) {
        let Some(sid) = self.conns.get(&conn).map(|c| c.server_id.clone()) else {
            return;
        };
        let Some(entry) = self.ids.get_mut(&sid) else {
            return;
        };
        let State::Probing {
            holder,
            claimants,
            probe,
        } = &mut entry.state
        else {
            return;
        };
        if *holder != conn {
            return;
        }
        let claimants = std::mem::take(claimants);
        let mut probe = probe.take();
        self.timers.cancel(&mut probe);
        entry.state = State::Live { holder: conn };
        for claimant in claimants {
            self.counters
                .upgrade(Endpoint::Server, UpgradeOutcome::Reject409);
            self.end(claimant, CloseCode::CLAIMED, REASON_CLAIMED, None);
        }
    }

    fn phone_message(&mut self, phone: ConnKey, data: Bytes) {
        let c = &self.conns[&phone];
        let Kind::Phone { prefix, .. } = &c.kind else {
            return;
        };
        let prefix = prefix.clone();
        let holder = self.ids.get(&c.server_id).and_then(Entry::holder);
        let Some(holder) = holder else {
            // GRACE: nobody to deliver to; the phone is told to come back later.
            self.dropped(DropReason::NoBinary);
            self.end(phone, CloseCode::NORMAL, "", None);
            return;
        };
        match envelope::wrap_phone_frame(&prefix, &data) {
            Ok(env) => {
                let item = Item::Frame {
                    direction: Direction::PhoneToBinary,
                    read_at: self.now,
                };
                self.enqueue_to_binary(holder, env, item);
            }
            Err(envelope::NotJson) => {
                self.dropped(DropReason::NotJson);
                self.end(phone, CloseCode::INVALID_DATA, REASON_NOT_JSON, Some(1007));
            }
        }
    }

    fn binary_message(&mut self, holder: ConnKey, sid: &ServerId, data: Bytes) {
        let parsed = BinaryMessage::parse(&data);
        match parsed {
            Err(_) => self.dropped(DropReason::Malformed),
            Ok(BinaryMessage::PushInvalid) => {
                tracing::debug!(server_id = %sid, reason = "invalid", "push_wake_dropped");
            }
            Ok(BinaryMessage::PushWake { token }) => self.push_wake(sid, token),
            Ok(BinaryMessage::Deliver {
                conn_id,
                frame,
                close,
            }) => {
                let entry = &self.ids[sid];
                let Some(&phone) = entry.phones.get(&*conn_id) else {
                    self.dropped(DropReason::UnknownConnId);
                    return;
                };
                debug_assert_ne!(phone, holder);
                self.deliver(phone, frame, close);
            }
        }
    }

    fn push_wake(&mut self, sid: &ServerId, token: String) {
        if !self.config.push_enabled {
            tracing::debug!(server_id = %sid, reason = "push_off", "push_wake_dropped");
            return;
        }
        let entry = self.ids.get_mut(sid).expect("holder's id has an entry");
        if self.push_rate.take(&mut entry.push, self.now - self.epoch) {
            self.out.push_back(Output::PushWake {
                server_id: sid.clone(),
                token,
            });
        } else {
            self.counters.push_wakes[crate::counters::PushOutcome::Dropped as usize] += 1;
            tracing::info!(server_id = %sid, outcome = "dropped", "push_wake_dropped");
        }
    }

    /// Queues a binary's frame and/or close directive for one of its phones (§7.3 row 7, §7.4).
    fn deliver(&mut self, phone: ConnKey, frame: Option<Bytes>, close: Option<CloseCode>) {
        let budget = self.config.phone_outbox_bytes;
        let c = self
            .conns
            .get_mut(&phone)
            .expect("registered phones are tracked");
        if c.ending {
            self.dropped(DropReason::PhoneGone);
            return;
        }
        let payload = frame.as_ref().map_or(0, Bytes::len);
        if c.outbox.charged() + payload + ITEM_OVERHEAD > budget {
            // Everything pending and the overflowing item are dropped (§10.1).
            self.discard_queue(phone, DropReason::PhoneBacklogFull, 1);
            match close {
                Some(code) => self.end_discarding(phone, code, "", None),
                None => {
                    self.end_discarding(phone, CloseCode::INTERNAL, REASON_BACKLOG_FULL, Some(1011))
                }
            }
            return;
        }
        if let Some(frame) = frame {
            let item = Item::Frame {
                direction: Direction::BinaryToPhone,
                read_at: self.now,
            };
            self.enqueue(phone, frame, item);
        }
        if let Some(code) = close {
            // The binary asked for it: no notice (§7.4).
            self.end(phone, code, "", None);
        }
    }

    fn enqueue_to_binary(&mut self, holder: ConnKey, data: Bytes, item: Item) {
        self.enqueue(holder, data, item);
        let c = &self.conns[&holder];
        if c.outbox.charged() > self.config.binary_outbox_bytes {
            let sid = c.server_id.clone();
            let entry = self.ids.get_mut(&sid).expect("holder's id has an entry");
            if !entry.paused {
                entry.paused = true;
                let phones: Vec<ConnKey> = entry.phones.values().copied().collect();
                for p in phones {
                    self.pause(p);
                }
            }
        }
    }

    /// Charges `data` to `conn`'s outbox and hands it to the runtime.
    fn enqueue(&mut self, conn: ConnKey, data: Bytes, item: Item) {
        let c = self
            .conns
            .get_mut(&conn)
            .expect("enqueue to a tracked connection");
        let charge = c.outbox.push(data.len(), item);
        match c.kind {
            Kind::Binary => self.counters.binary_outbox_bytes += charge as u64,
            Kind::Phone { .. } => self.counters.phone_outbox_bytes += charge as u64,
        }
        self.timers.ensure(
            &mut c.write,
            self.now + self.config.write_timeout,
            Timer::WriteDeadline(conn),
        );
        self.out.push_back(Output::Send { conn, data });
    }

    fn written(&mut self, conn: ConnKey) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some((item, charge)) = c.outbox.written() else {
            return;
        };
        match c.kind {
            Kind::Binary => self.counters.binary_outbox_bytes -= charge as u64,
            Kind::Phone { .. } => self.counters.phone_outbox_bytes -= charge as u64,
        }
        if let Item::Frame { direction, read_at } = item {
            self.counters.frames_forwarded[direction as usize] += 1;
            self.counters.forward_latency[direction as usize].observe(self.now - read_at);
        }
        if c.outbox.is_empty() {
            self.timers.cancel(&mut c.write);
            if c.ending {
                self.timers.ensure(
                    &mut c.close,
                    self.now + self.config.close_timeout,
                    Timer::CloseDeadline(conn),
                );
            }
        } else {
            self.timers.reset(
                &mut c.write,
                self.now + self.config.write_timeout,
                Timer::WriteDeadline(conn),
            );
        }
        let resume = matches!(c.kind, Kind::Binary)
            && c.outbox.charged() <= self.config.binary_outbox_bytes / 2;
        if resume {
            let sid = c.server_id.clone();
            self.resume_phones_if_paused(&sid, conn);
        }
    }

    fn violation(&mut self, conn: ConnKey, violation: Violation) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.ending {
            return;
        }
        let side = c.side();
        let (code, reason) = match (violation, side) {
            (Violation::TooBig, _) => (CloseCode::TOO_BIG, REASON_TOO_BIG),
            (Violation::InvalidUtf8, Side::Phone) => (CloseCode::INVALID_DATA, REASON_NOT_JSON),
            (Violation::InvalidUtf8, Side::Binary) => {
                (CloseCode::INVALID_DATA, REASON_INVALID_UTF8)
            }
            (Violation::Protocol, _) => (CloseCode::PROTOCOL, REASON_PROTOCOL),
        };
        if violation == Violation::InvalidUtf8 && side == Side::Phone {
            self.dropped(DropReason::NotJson);
        }
        self.end(conn, code, reason, Some(code.get()));
    }

    // ---- connections leaving --------------------------------------------------------------

    /// Decides to close `conn` with `code`: queued messages still go out first. `notice` is the
    /// code a phone's binary is told (§8), `None` where no notice is due.
    fn end(&mut self, conn: ConnKey, code: CloseCode, reason: &'static str, notice: Option<u16>) {
        self.end_with(conn, code, reason, notice, false);
    }

    /// As [`end`](Self::end), but queued messages are thrown away (their drops already counted).
    fn end_discarding(
        &mut self,
        conn: ConnKey,
        code: CloseCode,
        reason: &'static str,
        notice: Option<u16>,
    ) {
        self.end_with(conn, code, reason, notice, true);
    }

    fn end_with(
        &mut self,
        conn: ConnKey,
        code: CloseCode,
        reason: &'static str,
        notice: Option<u16>,
        discard: bool,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.ending {
            return;
        }
        c.ending = true;
        self.timers.cancel(&mut c.ping);
        self.timers.cancel(&mut c.pong);
        self.timers.cancel(&mut c.read);
        if c.paused {
            // The peer's close reply must still be read.
            c.paused = false;
            self.out.push_back(Output::PauseReading {
                conn,
                paused: false,
            });
        }
        // A gone holder's queue is dropped (§6), so its close need not wait behind it.
        let holder = self.ids.get(&c.server_id).and_then(Entry::holder) == Some(conn);
        let discard = discard || (holder && !self.shutting_down);
        self.out.push_back(Output::Close {
            conn,
            code,
            reason,
            discard_queued: discard,
        });
        self.departed(conn, notice);
        let c = self.conns.get_mut(&conn).expect("present");
        if c.outbox.is_empty() {
            self.timers.ensure(
                &mut c.close,
                self.now + self.config.close_timeout,
                Timer::CloseDeadline(conn),
            );
        }
    }

    /// Drops TCP at once: a write stalled past its deadline, or the close handshake timed out.
    fn abort(&mut self, conn: ConnKey, notice: Option<u16>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if std::mem::replace(&mut c.aborted, true) {
            return;
        }
        let was_ending = std::mem::replace(&mut c.ending, true);
        // The socket is gone: a later resume must not address it or restart its heartbeat.
        c.paused = false;
        self.timers.cancel(&mut c.ping);
        self.timers.cancel(&mut c.pong);
        self.timers.cancel(&mut c.read);
        self.timers.cancel(&mut c.write);
        self.timers.cancel(&mut c.close);
        self.out.push_back(Output::Abort { conn });
        if !was_ending {
            self.departed(conn, notice);
        }
    }

    /// What a connection's end means for its server-id, once per connection: a holder is gone, a
    /// claimant leaves the wait list, a phone's binary gets its notice.
    fn departed(&mut self, conn: ConnKey, notice: Option<u16>) {
        let c = &self.conns[&conn];
        let sid = c.server_id.clone();
        match c.kind {
            Kind::Binary => {
                let Some(entry) = self.ids.get_mut(&sid) else {
                    return;
                };
                match &mut entry.state {
                    State::Live { holder } | State::Probing { holder, .. } if *holder == conn => {
                        self.binary_gone(conn, &sid);
                    }
                    State::Probing {
                        claimants,
                        probe,
                        holder,
                    } => {
                        claimants.retain(|&k| k != conn);
                        if claimants.is_empty() {
                            let holder = *holder;
                            let mut probe = probe.take();
                            self.timers.cancel(&mut probe);
                            entry.state = State::Live { holder };
                        }
                    }
                    _ => {}
                }
            }
            Kind::Phone {
                registered: true,
                notify,
                ..
            } => {
                tracing::info!(server_id = %sid, conn_id = %c.id, "phone_unregistered");
                let holder = self.ids.get(&sid).and_then(Entry::holder);
                if let (Some(code), Some(notify)) = (notice, notify) {
                    // Every end after a shutdown carries no notice, and a holder is never an
                    // ending connection: its end hands the id on at once.
                    debug_assert!(!self.shutting_down);
                    if holder == Some(notify) {
                        debug_assert!(self.conns.get(&notify).is_some_and(|b| !b.ending));
                        let data = envelope::close_notice(&self.conns[&conn].id, code);
                        self.enqueue_to_binary(notify, data, Item::Notice);
                    }
                }
            }
            Kind::Phone {
                registered: false, ..
            } => {}
        }
    }

    /// The holder of `sid` is gone (§6 "B gone"): its queue is dropped, its phones resume
    /// reading, and the id moves to GRACE, or to the first claimant under a probe.
    fn binary_gone(&mut self, binary: ConnKey, sid: &ServerId) {
        // At shutdown the queue is flushed before the 1001 close instead (decision C11).
        if !self.shutting_down {
            self.discard_queue(binary, DropReason::BinaryGone, 0);
        }
        self.resume_phones_if_paused(sid, binary);
        let entry = self.ids.get_mut(sid).expect("holder's id has an entry");
        self.counters.connected_binaries -= 1;
        let previous = std::mem::replace(&mut entry.state, State::Free);
        if self.shutting_down {
            return;
        }
        match previous {
            State::Probing {
                mut claimants,
                mut probe,
                ..
            } => {
                self.timers.cancel(&mut probe);
                self.takeover(sid, &mut claimants);
            }
            _ => {
                tracing::info!(server_id = %sid, "server_released");
                if self.config.grace.is_zero() {
                    self.expire_grace(sid);
                } else {
                    let timer = self
                        .timers
                        .set(self.now + self.config.grace, Timer::Grace(sid.clone()));
                    self.ids.get_mut(sid).expect("present").state =
                        State::Grace { timer: Some(timer) };
                }
            }
        }
    }

    /// The first claimant takes the id; the others are turned away; the old phones are evicted.
    fn takeover(&mut self, sid: &ServerId, claimants: &mut VecDeque<ConnKey>) {
        let Some(first) = claimants.pop_front() else {
            return;
        };
        tracing::info!(server_id = %sid, conn_id = %self.conns[&first].id, "server_id_takeover");
        self.evict_phones(sid);
        self.hold(first, sid);
        for other in claimants.drain(..) {
            self.counters
                .upgrade(Endpoint::Server, UpgradeOutcome::Reject409);
            self.end(other, CloseCode::CLAIMED, REASON_CLAIMED, None);
        }
    }

    /// §6 "evict P": the phones leave the registry at once, so they no longer count against the
    /// cap while their close handshake runs and a re-dialled phone gets in (decision C21).
    fn evict_phones(&mut self, sid: &ServerId) {
        let phones: Vec<ConnKey> = self.ids[sid].phones.values().copied().collect();
        for p in phones {
            self.evict(p, CloseCode::NO_SERVER, REASON_RECLAIMED);
        }
    }

    /// Closes a phone and takes it out of the registry. A phone already closing for a reason of
    /// its own stays registered until its connection ends (§7.4).
    fn evict(&mut self, phone: ConnKey, code: CloseCode, reason: &'static str) {
        if self.conns.get(&phone).is_some_and(|c| !c.ending) {
            self.end(phone, code, reason, None);
            self.unregister(phone);
        }
    }

    fn unregister(&mut self, phone: ConnKey) {
        let Some(c) = self.conns.get_mut(&phone) else {
            return;
        };
        let Kind::Phone { registered, .. } = &mut c.kind else {
            return;
        };
        if std::mem::replace(registered, false) {
            self.counters.connected_phones -= 1;
            if let Some(entry) = self.ids.get_mut(&c.server_id) {
                entry.phones.remove(&c.id);
            }
        }
    }

    fn expire_grace(&mut self, sid: &ServerId) {
        let Some(entry) = self.ids.get_mut(sid) else {
            return;
        };
        entry.state = State::Free;
        let phones: Vec<ConnKey> = entry.phones.values().copied().collect();
        self.counters.grace_expiries += 1;
        tracing::info!(server_id = %sid, "grace_expired");
        for p in phones {
            self.evict(p, CloseCode::NORMAL, "");
        }
        self.forget_if_idle(sid);
    }

    fn closed(&mut self, conn: ConnKey, ended: Ended) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if !c.ending {
            let notice = match ended {
                Ended::PeerClose(Some(code)) => {
                    CloseCode::new(code).map_or(CloseCode::PROTOCOL.get(), CloseCode::get)
                }
                Ended::PeerClose(None) => NOTICE_NO_CODE,
                Ended::Dropped | Ended::Local => CloseCode::GOING_AWAY.get(),
            };
            self.conns.get_mut(&conn).expect("present").ending = true;
            self.departed(conn, Some(notice));
        }
        let reason = match self.conns[&conn].kind {
            Kind::Binary => DropReason::BinaryGone,
            Kind::Phone { .. } => DropReason::PhoneGone,
        };
        self.discard_queue(conn, reason, 0);
        let mut c = self.conns.remove(&conn).expect("present");
        for slot in [&mut c.ping, &mut c.pong, &mut c.read, &mut c.close] {
            self.timers.cancel(slot);
        }
        if c.is_registered_phone() {
            self.counters.connected_phones -= 1;
            if let Some(entry) = self.ids.get_mut(&c.server_id) {
                entry.phones.remove(&c.id);
            }
        }
        self.live_ids.remove(&c.id);
        self.forget_if_idle(&c.server_id);
    }

    /// Forgets the messages queued on `conn` and releases their charge. The frames among them,
    /// plus `unqueued` ones that never made it into the queue, count as dropped for `reason`.
    fn discard_queue(&mut self, conn: ConnKey, reason: DropReason, unqueued: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let (items, released) = c.outbox.clear();
        self.timers.cancel(&mut c.write);
        match c.kind {
            Kind::Binary => self.counters.binary_outbox_bytes -= released as u64,
            Kind::Phone { .. } => self.counters.phone_outbox_bytes -= released as u64,
        }
        let frames = items.iter().filter(|i| matches!(i, Item::Frame { .. }));
        let lost = frames.count() as u64 + unqueued;
        if lost > 0 {
            self.counters.frames_dropped[reason as usize] += lost;
            self.log_drop(reason);
        }
    }

    fn forget_if_idle(&mut self, sid: &ServerId) {
        if self.ids.get(sid).is_some_and(Entry::is_idle) {
            self.ids.remove(sid);
        }
    }

    // ---- backpressure ---------------------------------------------------------------------

    fn pause(&mut self, phone: ConnKey) {
        let c = self.conns.get_mut(&phone).expect("paused phone is tracked");
        if c.paused || c.ending {
            return;
        }
        c.paused = true;
        self.timers.cancel(&mut c.ping);
        self.timers.cancel(&mut c.pong);
        self.timers.cancel(&mut c.read);
        self.out.push_back(Output::PauseReading {
            conn: phone,
            paused: true,
        });
    }

    fn resume_phones_if_paused(&mut self, sid: &ServerId, holder: ConnKey) {
        let Some(entry) = self.ids.get_mut(sid) else {
            return;
        };
        if !entry.paused {
            return;
        }
        // Only the holder's queue pauses the phones, and only a holder has a queue to drain:
        // a holder's end throws its queue away, or at shutdown first resumes its phones.
        debug_assert_eq!(entry.holder(), Some(holder));
        entry.paused = false;
        let phones: Vec<ConnKey> = entry.phones.values().copied().collect();
        for p in phones {
            let c = self.conns.get_mut(&p).expect("registered phone is tracked");
            if !c.paused {
                continue;
            }
            c.paused = false;
            self.out.push_back(Output::PauseReading {
                conn: p,
                paused: false,
            });
            if c.reading {
                self.timers.ensure(
                    &mut c.read,
                    self.now + self.config.read_timeout,
                    Timer::ReadDeadline(p),
                );
            }
            self.start_heartbeat(p);
        }
    }

    // ---- timers ---------------------------------------------------------------------------

    fn start_heartbeat(&mut self, conn: ConnKey) {
        let c = self
            .conns
            .get_mut(&conn)
            .expect("heartbeat for a tracked connection");
        self.timers.reset(
            &mut c.ping,
            self.now + self.config.ping_interval,
            Timer::Ping(conn),
        );
    }

    fn fire(&mut self, timer: Timer) {
        match timer {
            Timer::Ping(conn) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                c.ping = None;
                self.timers.ensure(
                    &mut c.pong,
                    self.now + self.config.pong_timeout,
                    Timer::PongDeadline(conn),
                );
                c.ping = Some(
                    self.timers
                        .set(self.now + self.config.ping_interval, Timer::Ping(conn)),
                );
                self.out.push_back(Output::Ping { conn });
            }
            Timer::PongDeadline(conn) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                c.pong = None;
                self.end(conn, CloseCode::INTERNAL, REASON_HEARTBEAT, Some(1011));
            }
            Timer::ReadDeadline(conn) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                c.read = None;
                self.end(conn, CloseCode::POLICY, REASON_READ_TIMEOUT, Some(1008));
            }
            Timer::WriteDeadline(conn) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                c.write = None;
                self.abort(conn, Some(1011));
            }
            Timer::CloseDeadline(conn) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                c.close = None;
                self.abort(conn, None);
            }
            Timer::Probe(sid) => {
                let Some(entry) = self.ids.get_mut(&sid) else {
                    return;
                };
                let State::Probing { holder, probe, .. } = &mut entry.state else {
                    return;
                };
                *probe = None;
                let holder = *holder;
                // Takeover: the silent incumbent goes without a grace window (§6).
                self.end(holder, CloseCode::INTERNAL, REASON_HEARTBEAT, None);
            }
            Timer::Grace(sid) => {
                let Some(entry) = self.ids.get_mut(&sid) else {
                    return;
                };
                let State::Grace { timer } = &mut entry.state else {
                    return;
                };
                *timer = None;
                self.expire_grace(&sid);
            }
            Timer::Drain => {
                self.drain = None;
                let left: Vec<ConnKey> = self.conns.keys().copied().collect();
                for conn in left {
                    self.abort(conn, None);
                }
            }
        }
    }

    // ---- node-wide events -----------------------------------------------------------------

    fn rebalance(&mut self) {
        if self.shutting_down {
            return;
        }
        let sids: Vec<ServerId> = self.ids.keys().cloned().collect();
        for sid in sids {
            let Some(entry) = self.ids.get_mut(&sid) else {
                continue;
            };
            let (holder, claimants) = match &mut entry.state {
                State::Live { holder } => (*holder, VecDeque::new()),
                State::Probing {
                    holder,
                    claimants,
                    probe,
                } => {
                    let mut probe = probe.take();
                    self.timers.cancel(&mut probe);
                    let claimants = std::mem::take(claimants);
                    let holder = *holder;
                    entry.state = State::Live { holder };
                    (holder, claimants)
                }
                State::Free | State::Grace { .. } => continue,
            };
            for claimant in claimants {
                self.end(claimant, CloseCode::RESTART, REASON_REBALANCE, None);
            }
            tracing::info!(server_id = %sid, "rebalance");
            self.end(holder, CloseCode::RESTART, REASON_REBALANCE, None);
        }
    }

    fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        for entry in self.ids.values_mut() {
            match &mut entry.state {
                State::Probing { probe, .. } => self.timers.cancel(probe),
                State::Grace { timer } => self.timers.cancel(timer),
                State::Free | State::Live { .. } => {}
            }
        }
        let conns: Vec<ConnKey> = self.conns.keys().copied().collect();
        for conn in conns {
            self.end(conn, CloseCode::GOING_AWAY, REASON_SHUTDOWN, None);
        }
        self.drain = Some(
            self.timers
                .set(self.now + self.config.drain_timeout, Timer::Drain),
        );
    }

    // ---- counting -------------------------------------------------------------------------

    fn dropped(&mut self, reason: DropReason) {
        self.counters.drop_frame(reason);
        self.log_drop(reason);
    }

    fn log_drop(&mut self, reason: DropReason) {
        let last = &mut self.drop_logged[reason as usize];
        if last.is_none_or(|t| self.now.saturating_duration_since(t).as_secs() >= 1) {
            *last = Some(self.now);
            tracing::info!(reason = reason.as_str(), "frame_dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;

    /// Counts `frame_dropped` log lines.
    struct DropLines(Arc<AtomicUsize>);

    impl Subscriber for DropLines {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            struct Message(bool);
            impl Visit for Message {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" && format!("{value:?}") == "frame_dropped" {
                        self.0 = true;
                    }
                }
            }
            let mut m = Message(false);
            event.record(&mut m);
            if m.0 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a test clock origin
    fn frame_dropped_is_logged_at_most_once_a_second_per_reason() {
        let lines = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut relay = Relay::new(Config::default(), [7; 32], t0);
        tracing::subscriber::with_default(DropLines(lines.clone()), || {
            let at = |relay: &mut Relay, ms: u64, reason: DropReason| {
                relay.advance(t0 + Duration::from_millis(ms));
                relay.dropped(reason);
            };
            at(&mut relay, 0, DropReason::Malformed);
            at(&mut relay, 10, DropReason::Malformed);
            at(&mut relay, 999, DropReason::Malformed);
            assert_eq!(lines.load(Ordering::SeqCst), 1, "once within the second");
            at(&mut relay, 999, DropReason::NotJson);
            assert_eq!(
                lines.load(Ordering::SeqCst),
                2,
                "each reason has its own second"
            );
            at(&mut relay, 1000, DropReason::Malformed);
            assert_eq!(lines.load(Ordering::SeqCst), 3, "again a second later");
        });
        assert_eq!(relay.counters().dropped(DropReason::Malformed), 4);
    }

    fn open(relay: &mut Relay, at: Instant, conn: u64, role: Role) {
        let open = Open {
            server_id: ServerId::parse(b"abc").unwrap(),
            role,
            client: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let conn = ConnKey(conn);
        relay.handle_input(at, Input::Open { conn, open });
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a test clock origin
    fn an_empty_queue_thrown_away_logs_no_drop() {
        let lines = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut relay = Relay::new(Config::default(), [7; 32], t0);
        tracing::subscriber::with_default(DropLines(lines.clone()), || {
            let binary = Role::Binary {
                version: "1".into(),
            };
            open(&mut relay, t0, 1, binary.clone());
            let ended = Ended::PeerClose(Some(1000));
            relay.handle_input(
                t0,
                Input::Closed {
                    conn: ConnKey(1),
                    ended,
                },
            );
            assert_eq!(lines.load(Ordering::SeqCst), 0, "nothing was queued");

            // A phone's frame still queued for the binary when it goes is a drop, and logged.
            open(&mut relay, t0, 2, binary);
            open(&mut relay, t0, 3, Role::Phone { device_name: None });
            let data = Bytes::from_static(b"{}");
            relay.handle_input(
                t0,
                Input::Message {
                    conn: ConnKey(3),
                    data,
                },
            );
            let ended = Ended::Dropped;
            relay.handle_input(
                t0,
                Input::Closed {
                    conn: ConnKey(2),
                    ended,
                },
            );
            assert_eq!(lines.load(Ordering::SeqCst), 1);
        });
        assert_eq!(relay.counters().dropped(DropReason::BinaryGone), 1);
    }
}
