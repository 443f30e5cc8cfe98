//! Model-based property test of the shard state machine (DESIGN.md §4).
//!
//! Random sequences of runtime events drive a [`Relay`] and a reference [`Model`] side by side.
//! The model is PROTOCOL.md §6–§10 written as directly as possible: per server-id its state
//! (FREE, LIVE, PROBING, GRACE), its phones and its push bucket; per connection the sends handed
//! out and not yet written, and its deadlines. From these it predicts, for every step, each
//! connection's outputs in order and every counter. The harness plays a faithful runtime: it
//! writes only what was queued, stops reading paused or aborted connections, feeds nothing for a
//! connection after its `Closed`, and calls `handle_timeout` exactly at `poll_timeout`.
//!
//! Checked after every step: each connection's outputs equal the model's, in order (so every
//! frame reaches exactly the connection it names, byte for byte, and close notices come exactly
//! in §8's cases, after the phone's last frame); every counter and gauge equals the model's; the
//! holder of each id; `poll_timeout`; the number of connections and server-ids kept; at most one
//! Close and one Abort per connection, nothing after them, with a code and reason PROTOCOL.md
//! allows; every phone-side message read is forwarded, queued or counted dropped. At the end,
//! with no input but `Closed` after each Abort, every connection must end by its own deadlines
//! and no state may remain.
//!
//! Clock: input step `k` happens at `t0 + whole milliseconds + k ns`, and every timer lasts whole
//! milliseconds, so two deadlines can only coincide if they stem from the same step. Within a step
//! both sides fire equal deadlines in arming order.
//!
//! `MODEL_STATS=1` prints what each case exercised (and `MODEL_TRACE=1` its whole trace); a
//! failure prints the last steps with their outputs.
#![allow(clippy::disallowed_methods)] // the test's own clock origin

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use switchyard_core::{
    CloseCode, Config, ConnKey, Counters, Direction, DropReason, Ended, Endpoint, Input, Open,
    Output, Relay, Role, ServerId, UpgradeOutcome, Violation,
};

/// Few server-ids so that claims collide; two need escaping inside JSON (§4.3).
const SIDS: [&str; 3] = ["s1", "q\"2", "b\\3"];

/// A small shard; `--grace 0` in some cases (§6 rule 4).
fn config(no_grace: bool) -> Config {
    Config {
        max_phones_per_server: 3,
        max_message_size: 160,
        // Two or three small frames per phone, two or three envelopes per binary. Both budgets
        // are hit exactly by some items: three frames `7` fill a phone outbox (3 × 65), two
        // envelopes of `42` from a phone of "s1" fill a binary outbox (2 × 115).
        phone_outbox_bytes: 195,
        binary_outbox_bytes: 230,
        ping_interval: Duration::from_millis(5000),
        pong_timeout: Duration::from_millis(3000),
        read_timeout: Duration::from_millis(3500),
        write_timeout: Duration::from_millis(4000),
        probe_timeout: Duration::from_millis(2000),
        grace: Duration::from_millis(if no_grace { 0 } else { 6000 }),
        close_timeout: Duration::from_millis(1000),
        drain_timeout: Duration::from_millis(7000),
        push_enabled: true,
        push_burst: 2,
        push_refill: Duration::from_millis(10_000),
        ..Config::default()
    }
}

const OVERHEAD: usize = 64;

const NO_SERVER: &str = "no server with that id";
const CLAIMED: &str = "server-id already claimed";
const TOO_MANY: &str = "too many phones for server-id";
const RECLAIMED: &str = "binary reclaimed server-id";
const HEARTBEAT: &str = "heartbeat timeout";
const NOT_JSON: &str = "frame is not JSON";
const INVALID_UTF8: &str = "invalid utf-8";
const TOO_BIG: &str = "message too big";
const READ_TIMEOUT: &str = "read timeout";
const PROTOCOL: &str = "Protocol violation";
const BACKLOG: &str = "phone backlog full";
const REBALANCE: &str = "rebalance";
const SHUTDOWN: &str = "shutting down";

// ---- inputs ---------------------------------------------------------------------------------

/// JSON values a phone sends (padded with outer whitespace), and non-JSON ones (§7.2).
const PHONE_JSON: [&str; 10] = [
    r#"{"t":"hi"}"#,
    "42",
    r#""x""#,
    "true",
    "null",
    r#"{ "b" : "<&>" ,"a":1 }"#,
    r#"[1,{"k":[]}]"#,
    r#""\u00e9\n""#,
    "-1.5e3",
    "{}",
];
const PAD: [&str; 4] = ["", " ", "\t\r\n ", "\n"];
const NOT_JSON_TEXT: [&str; 10] = [
    "",
    "   ",
    "{",
    "1 2",
    "tru",
    "'x'",
    "{} {}",
    r#"{"a":1,}"#,
    "01",
    r#""\q""#,
];
const NON_UTF8: [&[u8]; 4] = [
    b"\"\xff\"",
    b"\xc3\x28",
    b"{\"a\":\"\xed\xa0\x80\"}",
    b"\x80",
];

/// Frames a binary sends; delivered byte for byte (§7.3).
const BINARY_FRAMES: [&str; 8] = [
    r#"{"t":"hello"}"#,
    r#"{ "a" : [1, 2] }"#,
    r#""s""#,
    "7",
    "true",
    "[]",
    r#"{"n":"<&>\u00e9"}"#,
    "false",
];
/// `close_code` values: 0 is "no close" (§7.3).
const DELIVER_CODES: [u16; 6] = [0, 1000, 3000, 4000, 4999, 1011];
const DIRECTIVE_CODES: [u16; 4] = [1000, 4401, 1003, 4999];
/// (`close_code`, `frame`) pairs that make an envelope malformed (§7.3 rows 1, 2, 5).
const BAD_CODES: [(&str, &str); 9] = [
    ("999", "1"),
    ("1005", "1"),
    ("1015", "1"),
    ("5000", "1"),
    ("4000.5", "1"),
    (r#""4000""#, "1"),
    ("-1", "1"),
    ("0", "null"),
    ("1004", "null"),
];
/// Envelopes malformed whatever the registry holds (§7.3 rows 1, 4, 5).
const MALFORMED: [&[u8]; 13] = [
    b"nope",
    b"[1]",
    br#"{"frame":1}"#,
    br#"{"conn_id":null,"frame":1}"#,
    br#"{"conn_id":"","frame":1}"#,
    br#"{"conn_id":"c"}"#,
    br#"{"conn_id":"c","frame":null}"#,
    br#"{"conn_id":"c","frame":1,"frame":2}"#,
    br#"{"CONN_ID":"c","frame":1}"#,
    br#"{"conn_id":5,"frame":1}"#,
    b"\xff{}",
    br#"{"push_wake":null}"#,
    b"",
];

#[derive(Debug, Clone)]
enum PhoneMsg {
    /// A JSON value with outer whitespace.
    Json(usize, usize, usize),
    NotJson(usize),
    NonUtf8(usize),
    /// Valid JSON of `max_message_size + n` bytes: accepted for `n == 0`, too big otherwise.
    Big(usize),
}

/// Picks from a set known only at run time (the live connections, say): element `n % len`.
/// Shrinks towards the first element; a case stays meaningful whatever the set holds.
#[derive(Debug, Clone, Copy)]
struct Pick(usize);

fn pick_any() -> impl Strategy<Value = Pick> {
    (0..64usize).prop_map(Pick)
}

#[derive(Debug, Clone)]
enum Target {
    /// A registered phone of the sender's server-id (by index), if there is one.
    Own(Pick),
    /// Any phone id ever issued: another server-id's, or one already gone.
    Any(Pick),
    /// An id the relay never issued.
    Made,
}

#[derive(Debug, Clone)]
enum BinaryMsg {
    /// `style`: bit 0 spaces, bit 1 `frame` key first, bit 2 `\u` escape in the id, bit 3 an
    /// extra `push_wake` key (ignored with a conn_id), bit 4 an explicit `"close_code":0`.
    Deliver {
        to: Target,
        frame: usize,
        code: usize,
        style: u8,
    },
    Directive {
        to: Target,
        code: usize,
        null_frame: bool,
    },
    BadCode {
        to: Target,
        which: usize,
    },
    Malformed(usize),
    Push {
        valid: bool,
        empty_id: bool,
    },
    /// Over `max_message_size`.
    Big,
}

#[derive(Debug, Clone)]
enum Action {
    OpenBinary(usize),
    /// With `true`, the server-id is picked among those with a binary or in grace, if any.
    OpenPhone(usize, bool),
    /// With `true`, from any readable phone (also closing or rejected ones), else from a
    /// registered phone still open.
    PhoneSends(Pick, bool, PhoneMsg),
    /// With `true`, from any readable binary (claimants, closing ones), else from a holder.
    BinarySends(Pick, bool, BinaryMsg),
    /// One phone sends `n` small JSON frames in a row.
    PhoneBurst(Pick, u8),
    /// A holder sends `n` copies of one frame in a row to one of its phones (§18 item 58).
    BinaryBurst(Pick, Pick, usize, u8),
    /// A holder asks for `n` push wakes in a row (the per-id bucket holds `push_burst`, §11).
    PushBurst(Pick, u8),
    /// The first bytes of a message that is not complete yet (starts the read deadline, §9).
    Started(Pick),
    Ping(Pick),
    Pong(Pick),
    /// Every open, readable connection answers its ping: the peers are alive.
    PongAll,
    /// The runtime reports `Closed` for every aborted connection.
    Reap,
    /// The runtime finishes writing `n` queued sends (0: all) of one connection.
    Write(Pick, u8),
    Violation(Pick, Violation),
    /// The transport ends; `how` picks the [`Ended`].
    Closed(Pick, u8),
    Advance(u64),
    Rebalance,
    Shutdown,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        6 => pick_any().prop_map(Target::Own),
        2 => pick_any().prop_map(Target::Any),
        1 => Just(Target::Made),
    ]
}

fn phone_msg() -> impl Strategy<Value = PhoneMsg> {
    prop_oneof![
        30 => (0..PHONE_JSON.len(), 0..PAD.len(), 0..PAD.len())
            .prop_map(|(v, l, r)| PhoneMsg::Json(v, l, r)),
        2 => (0..NOT_JSON_TEXT.len()).prop_map(PhoneMsg::NotJson),
        1 => (0..NON_UTF8.len()).prop_map(PhoneMsg::NonUtf8),
        2 => (0..3usize).prop_map(PhoneMsg::Big),
    ]
}

fn binary_msg() -> impl Strategy<Value = BinaryMsg> {
    prop_oneof![
        12 => (target(), 0..BINARY_FRAMES.len(), prop_oneof![8 => Just(0), 1 => 1..DELIVER_CODES.len()], any::<u8>())
            .prop_map(|(to, frame, code, style)| BinaryMsg::Deliver { to, frame, code, style }),
        3 => (target(), 0..DIRECTIVE_CODES.len(), any::<bool>())
            .prop_map(|(to, code, null_frame)| BinaryMsg::Directive { to, code, null_frame }),
        1 => (target(), 0..BAD_CODES.len()).prop_map(|(to, which)| BinaryMsg::BadCode { to, which }),
        1 => (0..MALFORMED.len()).prop_map(BinaryMsg::Malformed),
        2 => (prop::bool::weighted(0.8), any::<bool>())
            .prop_map(|(valid, empty_id)| BinaryMsg::Push { valid, empty_id }),
        1 => Just(BinaryMsg::Big),
    ]
}

fn violation() -> impl Strategy<Value = Violation> {
    prop_oneof![
        Just(Violation::TooBig),
        Just(Violation::InvalidUtf8),
        Just(Violation::Protocol)
    ]
}

/// The first server-id is the busiest, so that claims collide.
fn sid() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => sid().prop_map(Action::OpenBinary),
        12 => (sid(), prop::bool::weighted(0.8)).prop_map(|(s, l)| Action::OpenPhone(s, l)),
        20 => (pick_any(), prop::bool::weighted(0.15), phone_msg())
            .prop_map(|(i, a, m)| Action::PhoneSends(i, a, m)),
        20 => (pick_any(), prop::bool::weighted(0.15), binary_msg())
            .prop_map(|(i, a, m)| Action::BinarySends(i, a, m)),
        3 => (pick_any(), 2..6u8).prop_map(|(i, n)| Action::PhoneBurst(i, n)),
        3 => (pick_any(), pick_any(), 0..BINARY_FRAMES.len(), 2..5u8)
            .prop_map(|(i, t, f, n)| Action::BinaryBurst(i, t, f, n)),
        1 => (pick_any(), 2..5u8).prop_map(|(i, n)| Action::PushBurst(i, n)),
        2 => pick_any().prop_map(Action::Started),
        2 => pick_any().prop_map(Action::Ping),
        3 => pick_any().prop_map(Action::Pong),
        8 => Just(Action::PongAll),
        5 => Just(Action::Reap),
        15 => (pick_any(), 0..4u8).prop_map(|(i, n)| Action::Write(i, n)),
        2 => (pick_any(), violation()).prop_map(|(i, v)| Action::Violation(i, v)),
        5 => (pick_any(), any::<u8>()).prop_map(|(i, h)| Action::Closed(i, h)),
        9 => (0..1500u64).prop_map(Action::Advance),
        3 => (1500..8000u64).prop_map(Action::Advance),
        1 => Just(Action::Rebalance),
        1 => Just(Action::Shutdown),
    ]
}

// ---- the reference model --------------------------------------------------------------------

/// A deadline, identified by what it is for; each is armed at most once at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum T {
    Ping(u64),
    Pong(u64),
    Read(u64),
    Write(u64),
    Close(u64),
    Probe(usize),
    Grace(usize),
    Drain,
}

/// Deadlines in firing order: time, then arming order.
#[derive(Default)]
struct Timers {
    by_time: BTreeMap<(Instant, u64), T>,
    by_timer: BTreeMap<T, (Instant, u64)>,
    seq: u64,
}

impl Timers {
    fn set(&mut self, t: T, at: Instant) {
        self.cancel(t);
        self.seq += 1;
        self.by_time.insert((at, self.seq), t);
        self.by_timer.insert(t, (at, self.seq));
    }

    fn ensure(&mut self, t: T, at: Instant) {
        if !self.by_timer.contains_key(&t) {
            self.set(t, at);
        }
    }

    fn cancel(&mut self, t: T) {
        if let Some(k) = self.by_timer.remove(&t) {
            self.by_time.remove(&k);
        }
    }

    fn next(&self) -> Option<Instant> {
        self.by_time.keys().next().map(|k| k.0)
    }

    fn pop_due(&mut self, now: Instant) -> Option<T> {
        let (&k, _) = self.by_time.iter().next().filter(|(k, _)| k.0 <= now)?;
        let t = self.by_time.remove(&k).expect("present");
        self.by_timer.remove(&t);
        Some(t)
    }
}

/// A send handed to the runtime and not yet written: a forwarded frame or a close notice.
struct Sent {
    data: Bytes,
    frame: Option<Direction>,
}

struct Conn {
    sid: usize,
    phone: bool,
    id: String,
    registered: bool,
    /// The holder when the phone registered: the only binary that may get its notice (§8).
    notify: Option<u64>,
    /// A Close or Abort was handed out.
    ending: bool,
    aborted: bool,
    paused: bool,
    /// A message has begun and not finished.
    reading: bool,
    queue: VecDeque<Sent>,
}

#[derive(Debug, Clone, PartialEq)]
enum St {
    Free,
    Live(u64),
    Probing(u64, VecDeque<u64>),
    Grace,
}

struct Sid {
    st: St,
    /// Registered phones by conn id, until their `Closed` (also while closing).
    phones: BTreeMap<String, u64>,
    paused: bool,
    /// The push bucket (§11) as the instant it is full again.
    push_full_at: Option<Instant>,
    /// The relay keeps an entry for the id (created by a claim, forgotten when idle).
    exists: bool,
}

impl Sid {
    fn new() -> Sid {
        Sid {
            st: St::Free,
            phones: BTreeMap::new(),
            paused: false,
            push_full_at: None,
            exists: false,
        }
    }

    fn holder(&self) -> Option<u64> {
        match self.st {
            St::Live(h) | St::Probing(h, _) => Some(h),
            St::Free | St::Grace => None,
        }
    }
}

struct Model {
    cfg: Config,
    now: Instant,
    conns: BTreeMap<u64, Conn>,
    sids: Vec<Sid>,
    timers: Timers,
    counters: Counters,
    shutting_down: bool,
    /// Outputs predicted for the current call, in order.
    out: Vec<Output>,
}

fn escape(id: &str) -> String {
    id.replace('\\', "\\\\").replace('"', "\\\"")
}

fn sid_of(i: usize) -> ServerId {
    ServerId::parse(SIDS[i].as_bytes()).unwrap()
}

/// Trims JSON whitespace (§7.2) from an already valid JSON text.
fn trim_json(data: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = data.iter().position(|b| !ws(b)).unwrap_or(data.len());
    let end = data.iter().rposition(|b| !ws(b)).map_or(start, |e| e + 1);
    &data[start..end]
}

/// What the harness built a binary message to mean; the model decides what it does.
#[derive(Debug, Clone)]
enum Meaning {
    Deliver {
        conn_id: String,
        frame: Option<Bytes>,
        close: Option<u16>,
    },
    Push(Option<String>),
    Malformed,
}

impl Model {
    fn new(cfg: Config, now: Instant) -> Model {
        Model {
            cfg,
            now,
            conns: BTreeMap::new(),
            sids: (0..SIDS.len()).map(|_| Sid::new()).collect(),
            timers: Timers::default(),
            counters: Counters::default(),
            shutting_down: false,
            out: Vec::new(),
        }
    }

    fn after(&self, d: Duration) -> Instant {
        self.now + d
    }

    fn drop_frame(&mut self, r: DropReason, n: u64) {
        self.counters.frames_dropped[r as usize] += n;
    }

    fn upgrade(&mut self, e: Endpoint, o: UpgradeOutcome) {
        self.counters.ws_upgrade_attempts[e as usize][o as usize] += 1;
        let paired = match o {
            UpgradeOutcome::Reject404 => Some(0),
            UpgradeOutcome::Reject409 => Some(1),
            UpgradeOutcome::Reject429 => Some(2),
            _ => None,
        };
        if let Some(k) = paired {
            self.counters.register_failures[k] += 1;
        }
    }

    // -- arrivals (§6 rows "claims" and "phone registers") --

    fn open(&mut self, key: u64, sid: usize, phone: bool, id: String) {
        self.conns.insert(
            key,
            Conn {
                sid,
                phone,
                id,
                registered: false,
                notify: None,
                ending: false,
                aborted: false,
                paused: false,
                reading: false,
                queue: VecDeque::new(),
            },
        );
        if self.shutting_down {
            self.end(key, 1001, SHUTDOWN, None, false);
        } else if phone {
            self.register(key, sid);
        } else {
            self.claim(key, sid);
        }
    }

    fn claim(&mut self, key: u64, sid: usize) {
        self.sids[sid].exists = true;
        match self.sids[sid].st.clone() {
            St::Free => self.hold(key, sid),
            St::Live(h) => {
                self.sids[sid].st = St::Probing(h, VecDeque::from([key]));
                self.timers
                    .set(T::Probe(sid), self.after(self.cfg.probe_timeout));
                self.out.push(Output::Ping { conn: ConnKey(h) });
            }
            St::Probing(h, mut waiting) => {
                waiting.push_back(key);
                self.sids[sid].st = St::Probing(h, waiting);
            }
            St::Grace => {
                self.timers.cancel(T::Grace(sid));
                self.sids[sid].st = St::Free;
                self.evict(sid);
                self.hold(key, sid);
            }
        }
    }

    fn hold(&mut self, key: u64, sid: usize) {
        if self.sids[sid].holder().is_none() {
            self.counters.connected_binaries += 1;
        }
        self.sids[sid].st = St::Live(key);
        self.upgrade(Endpoint::Server, UpgradeOutcome::Accept);
        self.timers
            .set(T::Ping(key), self.after(self.cfg.ping_interval));
    }

    fn register(&mut self, key: u64, sid: usize) {
        let s = &self.sids[sid];
        if s.st == St::Free {
            self.upgrade(Endpoint::Client, UpgradeOutcome::Reject404);
            self.end(key, 4404, NO_SERVER, None, false);
            return;
        }
        if s.phones.len() >= self.cfg.max_phones_per_server {
            self.upgrade(Endpoint::Client, UpgradeOutcome::Reject429);
            self.end(key, 4429, TOO_MANY, None, false);
            return;
        }
        let (holder, paused) = (s.holder(), s.paused);
        let c = self.conns.get_mut(&key).unwrap();
        c.registered = true;
        c.notify = holder;
        let id = c.id.clone();
        self.sids[sid].phones.insert(id, key);
        self.counters.connected_phones += 1;
        self.upgrade(Endpoint::Client, UpgradeOutcome::Accept);
        if paused {
            self.pause(key);
        } else {
            self.timers
                .set(T::Ping(key), self.after(self.cfg.ping_interval));
        }
    }

    // -- inbound --

    fn message(&mut self, key: u64, data: &Bytes, meaning: Option<&Meaning>) {
        let c = self.conns.get_mut(&key).unwrap();
        if c.ending {
            return; // a connection already ending is only read for its close
        }
        c.reading = false;
        self.timers.cancel(T::Read(key));
        if data.len() > self.cfg.max_message_size {
            self.violation(key, Violation::TooBig);
            return;
        }
        if self.conns[&key].phone {
            self.phone_message(key, data);
        } else {
            self.holder_seen(key);
            let sid = self.conns[&key].sid;
            if self.sids[sid].holder() == Some(key) {
                self.binary_message(key, sid, meaning.expect("binary messages have a meaning"));
            } else {
                self.drop_frame(DropReason::NoBinary, 1); // a claimant waiting on the probe
            }
        }
    }

    fn phone_message(&mut self, key: u64, data: &Bytes) {
        let c = &self.conns[&key];
        let Some(holder) = self.sids[c.sid].holder() else {
            // GRACE (§6): dropped, the phone is closed 1000 without notice.
            self.drop_frame(DropReason::NoBinary, 1);
            self.end(key, 1000, "", None, false);
            return;
        };
        let valid = std::str::from_utf8(data)
            .ok()
            .is_some_and(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok());
        if !valid {
            self.drop_frame(DropReason::NotJson, 1);
            self.end(key, 1007, NOT_JSON, Some(1007), false);
            return;
        }
        let mut env = format!(r#"{{"conn_id":"{}","frame":"#, escape(&c.id)).into_bytes();
        env.extend_from_slice(trim_json(data));
        env.push(b'}');
        self.enqueue_to_binary(holder, env.into(), Some(Direction::PhoneToBinary));
    }

    fn binary_message(&mut self, key: u64, sid: usize, meaning: &Meaning) {
        match meaning {
            Meaning::Malformed => self.drop_frame(DropReason::Malformed, 1),
            Meaning::Push(None) => {} // invalid wake: logged only (§11)
            Meaning::Push(Some(token)) => {
                // The per-server-id bucket (§11), GCRA as in PROTOCOL.md's "fractional progress".
                let (cap, refill) = (self.cfg.push_burst, self.cfg.push_refill);
                let s = &mut self.sids[sid];
                let base = s
                    .push_full_at
                    .filter(|at| *at > self.now)
                    .unwrap_or(self.now);
                let full_at = base + refill;
                if full_at - self.now > refill * cap {
                    self.counters.push_wakes[switchyard_core::PushOutcome::Dropped as usize] += 1;
                } else {
                    s.push_full_at = Some(full_at);
                    self.out.push(Output::PushWake {
                        server_id: sid_of(sid),
                        token: token.clone(),
                    });
                }
            }
            Meaning::Deliver {
                conn_id,
                frame,
                close,
            } => match self.sids[sid].phones.get(conn_id) {
                None => self.drop_frame(DropReason::UnknownConnId, 1),
                Some(&phone) => {
                    assert_ne!(phone, key);
                    self.deliver(phone, frame.clone(), *close);
                }
            },
        }
    }

    /// Any frame from a holder under probe answers it: the claimants are turned away (§6).
    fn holder_seen(&mut self, key: u64) {
        let sid = self.conns[&key].sid;
        let St::Probing(h, waiting) = self.sids[sid].st.clone() else {
            return;
        };
        if h != key {
            return;
        }
        self.timers.cancel(T::Probe(sid));
        self.sids[sid].st = St::Live(h);
        for c in waiting {
            self.upgrade(Endpoint::Server, UpgradeOutcome::Reject409);
            self.end(c, 4409, CLAIMED, None, false);
        }
    }

    fn message_started(&mut self, key: u64) {
        let c = self.conns.get_mut(&key).unwrap();
        if c.ending {
            return;
        }
        c.reading = true;
        if !c.paused {
            self.timers
                .ensure(T::Read(key), self.after(self.cfg.read_timeout));
        }
        self.holder_seen(key);
    }

    fn control(&mut self, key: u64, pong: bool) {
        if self.conns[&key].ending {
            return;
        }
        if pong {
            self.timers.cancel(T::Pong(key));
        }
        self.holder_seen(key);
    }

    fn violation(&mut self, key: u64, v: Violation) {
        let c = &self.conns[&key];
        if c.ending {
            return;
        }
        let (code, reason) = match (v, c.phone) {
            (Violation::TooBig, _) => (1009, TOO_BIG),
            (Violation::InvalidUtf8, true) => (1007, NOT_JSON),
            (Violation::InvalidUtf8, false) => (1007, INVALID_UTF8),
            (Violation::Protocol, _) => (1002, PROTOCOL),
        };
        if v == Violation::InvalidUtf8 && c.phone {
            self.drop_frame(DropReason::NotJson, 1);
        }
        self.end(key, code, reason, Some(code), false);
    }

    // -- outboxes (§10) --

    fn charged(&self, key: u64) -> usize {
        self.conns[&key]
            .queue
            .iter()
            .map(|s| s.data.len() + OVERHEAD)
            .sum()
    }

    fn gauge(&mut self, phone: bool) -> &mut u64 {
        if phone {
            &mut self.counters.phone_outbox_bytes
        } else {
            &mut self.counters.binary_outbox_bytes
        }
    }

    fn enqueue(&mut self, key: u64, data: Bytes, frame: Option<Direction>) {
        let c = self.conns.get_mut(&key).unwrap();
        let phone = c.phone;
        c.queue.push_back(Sent {
            data: data.clone(),
            frame,
        });
        *self.gauge(phone) += (data.len() + OVERHEAD) as u64;
        self.timers
            .ensure(T::Write(key), self.after(self.cfg.write_timeout));
        self.out.push(Output::Send {
            conn: ConnKey(key),
            data,
        });
    }

    /// Forgets a connection's unwritten sends: frames count as dropped for `reason`.
    fn clear(&mut self, key: u64, reason: DropReason, extra: u64) {
        let c = self.conns.get_mut(&key).unwrap();
        let phone = c.phone;
        let items: Vec<Sent> = c.queue.drain(..).collect();
        let released: usize = items.iter().map(|s| s.data.len() + OVERHEAD).sum();
        let frames = items.iter().filter(|s| s.frame.is_some()).count() as u64;
        *self.gauge(phone) -= released as u64;
        self.drop_frame(reason, frames + extra);
    }

    fn enqueue_to_binary(&mut self, holder: u64, data: Bytes, frame: Option<Direction>) {
        self.enqueue(holder, data, frame);
        let sid = self.conns[&holder].sid;
        if self.charged(holder) > self.cfg.binary_outbox_bytes && !self.sids[sid].paused {
            self.sids[sid].paused = true;
            let phones: Vec<u64> = self.sids[sid].phones.values().copied().collect();
            for p in phones {
                self.pause(p);
            }
        }
    }

    fn pause(&mut self, key: u64) {
        let c = self.conns.get_mut(&key).unwrap();
        if c.paused || c.ending {
            return;
        }
        c.paused = true;
        self.timers.cancel(T::Ping(key));
        self.timers.cancel(T::Pong(key));
        self.timers.cancel(T::Read(key));
        self.out.push(Output::PauseReading {
            conn: ConnKey(key),
            paused: true,
        });
    }

    fn resume_phones(&mut self, sid: usize, holder: u64) {
        if !self.sids[sid].paused || self.sids[sid].holder() != Some(holder) {
            return;
        }
        self.sids[sid].paused = false;
        let phones: Vec<u64> = self.sids[sid].phones.values().copied().collect();
        for p in phones {
            let c = self.conns.get_mut(&p).unwrap();
            if !c.paused || c.ending {
                continue;
            }
            c.paused = false;
            let reading = c.reading;
            self.out.push(Output::PauseReading {
                conn: ConnKey(p),
                paused: false,
            });
            if reading {
                // Suspended while paused, a full read timeout again on resume (decision C13).
                self.timers
                    .ensure(T::Read(p), self.after(self.cfg.read_timeout));
            }
            self.timers
                .set(T::Ping(p), self.after(self.cfg.ping_interval));
        }
    }

    /// §7.3 row 7 and §7.4: queue a frame and/or a close directive for a phone.
    fn deliver(&mut self, phone: u64, frame: Option<Bytes>, close: Option<u16>) {
        if self.conns[&phone].ending {
            self.drop_frame(DropReason::PhoneGone, 1);
            return;
        }
        let payload = frame.as_ref().map_or(0, Bytes::len);
        if self.charged(phone) + payload + OVERHEAD > self.cfg.phone_outbox_bytes {
            // §10.1: everything pending and the overflowing item count phone_backlog_full.
            self.clear(phone, DropReason::PhoneBacklogFull, 1);
            self.timers.cancel(T::Write(phone));
            match close {
                Some(code) => self.end(phone, code, "", None, true),
                None => self.end(phone, 1011, BACKLOG, Some(1011), true),
            }
            return;
        }
        if let Some(frame) = frame {
            self.enqueue(phone, frame, Some(Direction::BinaryToPhone));
        }
        if let Some(code) = close {
            self.end(phone, code, "", None, false); // asked by the binary: no notice (§7.4)
        }
    }

    fn written(&mut self, key: u64) {
        let c = self.conns.get_mut(&key).unwrap();
        let sent = c
            .queue
            .pop_front()
            .expect("the harness writes only queued sends");
        let (phone, empty, ending, sid) = (c.phone, c.queue.is_empty(), c.ending, c.sid);
        *self.gauge(phone) -= (sent.data.len() + OVERHEAD) as u64;
        if let Some(d) = sent.frame {
            self.counters.frames_forwarded[d as usize] += 1;
        }
        if empty {
            self.timers.cancel(T::Write(key));
            if ending {
                self.timers
                    .ensure(T::Close(key), self.after(self.cfg.close_timeout));
            }
        } else {
            self.timers
                .set(T::Write(key), self.after(self.cfg.write_timeout));
        }
        if !phone && self.charged(key) <= self.cfg.binary_outbox_bytes / 2 {
            self.resume_phones(sid, key);
        }
    }

    // -- endings --

    /// The relay decides to close `key`: Close goes out (behind its queue unless `discard`),
    /// and what its end means for the server-id happens now.
    fn end(
        &mut self,
        key: u64,
        code: u16,
        reason: &'static str,
        notice: Option<u16>,
        discard: bool,
    ) {
        let c = self.conns.get_mut(&key).unwrap();
        if c.ending {
            return;
        }
        c.ending = true;
        let was_paused = std::mem::replace(&mut c.paused, false);
        let sid = c.sid;
        self.timers.cancel(T::Ping(key));
        self.timers.cancel(T::Pong(key));
        self.timers.cancel(T::Read(key));
        if was_paused {
            self.out.push(Output::PauseReading {
                conn: ConnKey(key),
                paused: false,
            });
        }
        // A gone holder's queue is dropped (§6 rule 5), so its close does not wait behind it.
        let holder = self.sids[sid].holder() == Some(key) && !self.shutting_down;
        self.out.push(Output::Close {
            conn: ConnKey(key),
            code: CloseCode::new(code).unwrap(),
            reason,
            discard_queued: discard || holder,
        });
        self.departed(key, notice);
        if self.conns[&key].queue.is_empty() {
            self.timers
                .ensure(T::Close(key), self.after(self.cfg.close_timeout));
        }
    }

    /// TCP is dropped now (write or close handshake timed out, drain deadline).
    fn abort(&mut self, key: u64, notice: Option<u16>) {
        let c = self.conns.get_mut(&key).unwrap();
        if c.aborted {
            return;
        }
        c.aborted = true;
        c.paused = false;
        let was_ending = std::mem::replace(&mut c.ending, true);
        for t in [
            T::Ping(key),
            T::Pong(key),
            T::Read(key),
            T::Write(key),
            T::Close(key),
        ] {
            self.timers.cancel(t);
        }
        self.out.push(Output::Abort { conn: ConnKey(key) });
        if !was_ending {
            self.departed(key, notice);
        }
    }

    /// Once per connection: what its end means for its server-id.
    fn departed(&mut self, key: u64, notice: Option<u16>) {
        let c = &self.conns[&key];
        let sid = c.sid;
        if !c.phone {
            match self.sids[sid].st.clone() {
                St::Live(h) | St::Probing(h, _) if h == key => self.binary_gone(key, sid),
                St::Probing(h, mut waiting) => {
                    // A waiting claimant leaves; no upgrade outcome is counted.
                    waiting.retain(|&k| k != key);
                    if waiting.is_empty() {
                        self.timers.cancel(T::Probe(sid));
                        self.sids[sid].st = St::Live(h);
                    } else {
                        self.sids[sid].st = St::Probing(h, waiting);
                    }
                }
                _ => {}
            }
        } else if c.registered {
            // §8: a notice only to the binary that held the id at registration, if it still does.
            if let (Some(code), Some(n)) = (notice, c.notify) {
                let alive = self.conns.get(&n).is_some_and(|b| !b.ending);
                if self.sids[sid].holder() == Some(n) && !self.shutting_down && alive {
                    let data = format!(r#"{{"conn_id":"{}","close_code":{code}}}"#, escape(&c.id));
                    self.enqueue_to_binary(n, data.into(), None);
                }
            }
        }
    }

    /// §6 "B gone": its queue is dropped, the id moves to GRACE or to the first claimant.
    fn binary_gone(&mut self, key: u64, sid: usize) {
        if !self.shutting_down {
            self.clear(key, DropReason::BinaryGone, 0);
            self.timers.cancel(T::Write(key));
        }
        self.resume_phones(sid, key);
        self.counters.connected_binaries -= 1;
        let previous = std::mem::replace(&mut self.sids[sid].st, St::Free);
        if self.shutting_down {
            return;
        }
        match previous {
            St::Probing(_, mut waiting) => {
                self.timers.cancel(T::Probe(sid));
                let first = waiting.pop_front().expect("a probe has a claimant");
                self.evict(sid);
                self.hold(first, sid);
                for other in waiting {
                    self.upgrade(Endpoint::Server, UpgradeOutcome::Reject409);
                    self.end(other, 4409, CLAIMED, None, false);
                }
            }
            _ if self.cfg.grace.is_zero() => self.expire_grace(sid),
            _ => {
                self.timers.set(T::Grace(sid), self.after(self.cfg.grace));
                self.sids[sid].st = St::Grace;
            }
        }
    }

    /// Evicted phones leave the registry at once; one already closing stays until it ends (C21).
    fn evict(&mut self, sid: usize) {
        let phones: Vec<u64> = self.sids[sid].phones.values().copied().collect();
        for p in phones {
            if !self.conns[&p].ending {
                self.end(p, 4404, RECLAIMED, None, false);
                self.unregister(p);
            }
        }
    }

    fn unregister(&mut self, p: u64) {
        let c = self.conns.get_mut(&p).unwrap();
        if std::mem::replace(&mut c.registered, false) {
            let (sid, id) = (c.sid, c.id.clone());
            self.sids[sid].phones.remove(&id);
            self.counters.connected_phones -= 1;
        }
    }

    fn expire_grace(&mut self, sid: usize) {
        self.sids[sid].st = St::Free;
        self.counters.grace_expiries += 1;
        let phones: Vec<u64> = self.sids[sid].phones.values().copied().collect();
        for p in phones {
            if !self.conns[&p].ending {
                self.end(p, 1000, "", None, false);
                self.unregister(p);
            }
        }
        self.forget_if_idle(sid);
    }

    fn forget_if_idle(&mut self, sid: usize) {
        let s = &self.sids[sid];
        if s.exists && s.st == St::Free && s.phones.is_empty() {
            self.sids[sid] = Sid::new();
        }
    }

    fn closed(&mut self, key: u64, ended: Ended) {
        if !self.conns[&key].ending {
            let notice = match ended {
                Ended::PeerClose(Some(code)) => CloseCode::new(code).map_or(1002, CloseCode::get),
                Ended::PeerClose(None) => 1005,
                Ended::Dropped | Ended::Local => 1001,
            };
            self.conns.get_mut(&key).unwrap().ending = true;
            self.departed(key, Some(notice));
        }
        for t in [
            T::Ping(key),
            T::Pong(key),
            T::Read(key),
            T::Write(key),
            T::Close(key),
        ] {
            self.timers.cancel(t);
        }
        let phone = self.conns[&key].phone;
        let reason = if phone {
            DropReason::PhoneGone
        } else {
            DropReason::BinaryGone
        };
        self.clear(key, reason, 0);
        let c = self.conns.remove(&key).unwrap();
        if c.registered {
            self.counters.connected_phones -= 1;
            self.sids[c.sid].phones.remove(&c.id);
        }
        self.forget_if_idle(c.sid);
    }

    // -- time and node-wide events --

    fn timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                T::Ping(k) => {
                    self.timers
                        .ensure(T::Pong(k), self.after(self.cfg.pong_timeout));
                    self.timers
                        .set(T::Ping(k), self.after(self.cfg.ping_interval));
                    self.out.push(Output::Ping { conn: ConnKey(k) });
                }
                T::Pong(k) => self.end(k, 1011, HEARTBEAT, Some(1011), false),
                T::Read(k) => self.end(k, 1008, READ_TIMEOUT, Some(1008), false),
                T::Write(k) => self.abort(k, Some(1011)),
                T::Close(k) => self.abort(k, None),
                T::Probe(sid) => {
                    // Takeover: the silent incumbent goes, without a grace window (§6).
                    let h = self.sids[sid].holder().expect("probing");
                    self.end(h, 1011, HEARTBEAT, None, false);
                }
                T::Grace(sid) => self.expire_grace(sid),
                T::Drain => {
                    let left: Vec<u64> = self.conns.keys().copied().collect();
                    for k in left {
                        self.abort(k, None);
                    }
                }
            }
        }
    }

    fn rebalance(&mut self) {
        if self.shutting_down {
            return;
        }
        let mut order: Vec<usize> = (0..SIDS.len()).collect();
        order.sort_by_key(|&i| sid_of(i));
        for sid in order {
            let (h, waiting) = match self.sids[sid].st.clone() {
                St::Live(h) => (h, VecDeque::new()),
                St::Probing(h, waiting) => {
                    self.timers.cancel(T::Probe(sid));
                    self.sids[sid].st = St::Live(h);
                    (h, waiting)
                }
                St::Free | St::Grace => continue,
            };
            for c in waiting {
                self.end(c, 1012, REBALANCE, None, false);
            }
            self.end(h, 1012, REBALANCE, None, false);
        }
    }

    fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        for sid in 0..SIDS.len() {
            self.timers.cancel(T::Probe(sid));
            self.timers.cancel(T::Grace(sid));
        }
        let all: Vec<u64> = self.conns.keys().copied().collect();
        for k in all {
            self.end(k, 1001, SHUTDOWN, None, false);
        }
        self.timers
            .set(T::Drain, self.after(self.cfg.drain_timeout));
    }
}

// ---- the harness: a faithful runtime --------------------------------------------------------

/// What the runtime has seen of one connection.
#[derive(Default, Clone, Copy)]
struct Seen {
    closes: u32,
    aborts: u32,
}

struct Harness {
    relay: Relay,
    model: Model,
    t0: Instant,
    clock_ms: u64,
    step: u64,
    now: Instant,
    next_key: u64,
    seen: BTreeMap<u64, Seen>,
    /// Every phone id ever issued, for envelopes naming another id's or a gone phone.
    phone_ids: Vec<String>,
    /// Phone-side messages the relay read and must forward or count (§12 frames_dropped):
    /// phone frames, invalid-UTF-8 phone messages, claimants' frames.
    p2b_accepted: u64,
    push_tokens: u64,
    trace: Vec<String>,
    /// What happened, by kind, for `MODEL_STATS=1` coverage reports.
    stats: BTreeMap<String, u64>,
}

fn allowed_close(phone: bool, code: u16, reason: &str) -> bool {
    let common = [
        (1011, HEARTBEAT),
        (1008, READ_TIMEOUT),
        (1009, TOO_BIG),
        (1002, PROTOCOL),
        (1001, SHUTDOWN),
    ];
    if common.contains(&(code, reason)) {
        return true;
    }
    if phone {
        [
            (4404, NO_SERVER),
            (4404, RECLAIMED),
            (4429, TOO_MANY),
            (1000, ""),
            (1011, BACKLOG),
            (1007, NOT_JSON),
        ]
        .contains(&(code, reason))
            || (reason.is_empty()
                && (DIRECTIVE_CODES.contains(&code) || DELIVER_CODES.contains(&code)))
    } else {
        [(4409, CLAIMED), (1007, INVALID_UTF8), (1012, REBALANCE)].contains(&(code, reason))
    }
}

fn output_conn(o: &Output) -> Option<u64> {
    match o {
        Output::Send { conn, .. }
        | Output::Ping { conn }
        | Output::Close { conn, .. }
        | Output::Abort { conn }
        | Output::PauseReading { conn, .. } => Some(conn.0),
        Output::PushWake { .. } => None,
    }
}

fn by_conn(outs: &[Output]) -> BTreeMap<Option<u64>, Vec<Output>> {
    let mut m: BTreeMap<Option<u64>, Vec<Output>> = BTreeMap::new();
    for o in outs {
        m.entry(output_conn(o)).or_default().push(o.clone());
    }
    m
}

impl Harness {
    fn new(seed: u8, no_grace: bool) -> Harness {
        let t0 = Instant::now();
        Harness {
            relay: Relay::new(config(no_grace), [seed; 32], t0),
            model: Model::new(config(no_grace), t0),
            t0,
            clock_ms: 0,
            step: 0,
            now: t0,
            next_key: 0,
            seen: BTreeMap::new(),
            phone_ids: Vec::new(),
            p2b_accepted: 0,
            push_tokens: 0,
            trace: Vec::new(),
            stats: BTreeMap::new(),
        }
    }

    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.trace.iter().rev().take(40).rev().collect();
        panic!(
            "{what}\n-- trace (last 40) --\n{}",
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Drains the relay, compares with the model's prediction, then checks the invariants.
    fn settle(&mut self) {
        let mut actual = Vec::new();
        while let Some(o) = self.relay.poll_output() {
            actual.push(o);
        }
        let expected = std::mem::take(&mut self.model.out);
        for o in &actual {
            self.trace.push(format!("    -> {o:?}"));
        }
        let (a, e) = (by_conn(&actual), by_conn(&expected));
        if a != e {
            self.fail(format!(
                "outputs differ from the model\n actual:   {actual:?}\n expected: {expected:?}"
            ));
        }
        for o in &actual {
            let Some(k) = output_conn(o) else {
                *self.stats.entry("push".to_owned()).or_default() += 1;
                continue;
            };
            let Some(phone) = self.model.conns.get(&k).map(|c| c.phone) else {
                self.fail(format!("output for a closed connection: {o:?}"));
            };
            let seen = self.seen.get(&k).copied().unwrap_or_default();
            // After Close only an Abort may follow; after Abort nothing.
            let ok = match o {
                Output::Abort { .. } => seen.aborts == 0,
                _ => seen.closes == 0 && seen.aborts == 0,
            };
            if !ok {
                self.fail(format!("output after the connection's Close/Abort: {o:?}"));
            }
            if let Output::Close { code, reason, .. } = o
                && !allowed_close(phone, code.get(), reason)
            {
                self.fail(format!("close code not allowed here: {o:?}"));
            }
            let kind = match o {
                Output::Send { data, .. }
                    if !phone && !data.windows(7).any(|w| w == b"\"frame\"") =>
                {
                    "notice".to_owned()
                }
                Output::Send { .. } => format!("send-{}", if phone { "phone" } else { "binary" }),
                Output::Close { code, reason, .. } => format!("close-{code}-{reason}"),
                Output::PauseReading { paused, .. } => format!("pause-{paused}"),
                Output::Ping { .. } => "ping".to_owned(),
                Output::Abort { .. } => "abort".to_owned(),
                Output::PushWake { .. } => unreachable!("counted above"),
            };
            *self.stats.entry(kind).or_default() += 1;
            let s = self.seen.entry(k).or_default();
            match o {
                Output::Close { .. } => s.closes += 1,
                Output::Abort { .. } => s.aborts += 1,
                _ => {}
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        let m = &self.model;
        for (i, s) in m.sids.iter().enumerate() {
            let h = self.relay.holder(&sid_of(i)).map(|k| k.0);
            if h != s.holder() {
                self.fail(format!(
                    "holder of {} is {h:?}, model {:?}",
                    SIDS[i],
                    s.holder()
                ));
            }
        }
        let c = self.relay.counters();
        let mut want = m.counters.clone();
        want.forward_latency = c.forward_latency.clone();
        if *c != want {
            self.fail(format!(
                "counters differ\n actual:   {c:?}\n expected: {want:?}"
            ));
        }
        for d in [Direction::PhoneToBinary, Direction::BinaryToPhone] {
            assert_eq!(c.forward_latency[d as usize].count, c.forwarded(d));
        }
        let charged = |phone: bool| -> u64 {
            m.conns
                .values()
                .filter(|c| c.phone == phone)
                .flat_map(|c| c.queue.iter())
                .map(|s| (s.data.len() + OVERHEAD) as u64)
                .sum()
        };
        assert_eq!(c.phone_outbox_bytes, charged(true), "phone outbox gauge");
        assert_eq!(c.binary_outbox_bytes, charged(false), "binary outbox gauge");
        if self.relay.connections() != m.conns.len() {
            self.fail(format!(
                "relay tracks {} connections, model {}",
                self.relay.connections(),
                m.conns.len()
            ));
        }
        let ids = m.sids.iter().filter(|s| s.exists).count();
        if self.relay.server_ids() != ids {
            self.fail(format!(
                "relay keeps {} server-ids, model {ids}",
                self.relay.server_ids()
            ));
        }
        if self.relay.poll_timeout() != m.timers.next() {
            self.fail(format!(
                "next deadline {:?} (reason {:?}), model {:?} ({:?})",
                self.relay.poll_timeout().map(|t| t - self.t0),
                self.relay.next_timer().map(|(_, t)| t.clone()),
                m.timers.next().map(|t| t - self.t0),
                m.timers.by_time.values().next(),
            ));
        }
        // Exactly once or counted: every phone-side message the relay read is forwarded, still
        // queued for the binary, or counted dropped.
        let inflight = m
            .conns
            .values()
            .flat_map(|c| c.queue.iter())
            .filter(|s| s.frame == Some(Direction::PhoneToBinary))
            .count() as u64;
        let accounted = c.forwarded(Direction::PhoneToBinary)
            + inflight
            + c.dropped(DropReason::BinaryGone)
            + c.dropped(DropReason::NotJson)
            + c.dropped(DropReason::NoBinary);
        if accounted != self.p2b_accepted {
            self.fail(format!(
                "{} phone-side messages read, {accounted} accounted for",
                self.p2b_accepted
            ));
        }
    }

    /// Fires every deadline up to `t`, each at its own instant.
    fn fire_until(&mut self, t: Instant) {
        while let Some(at) = self.relay.poll_timeout().filter(|at| *at <= t) {
            self.trace.push(format!(
                "{:?} timeout {:?}",
                at - self.t0,
                self.relay.next_timer().map(|(_, t)| t.clone())
            ));
            self.relay.handle_timeout(at);
            self.model.timeout(at);
            self.now = at;
            self.settle();
        }
    }

    fn input(&mut self, input: Input, meaning: Option<&Meaning>) {
        self.trace
            .push(format!("{:?} {input:?}", self.now - self.t0));
        self.relay.handle_input(self.now, input.clone());
        self.model.now = self.now;
        let closed = match &input {
            Input::Closed { conn, .. } => Some(conn.0),
            _ => None,
        };
        match input {
            Input::Open { conn, open } => {
                let id = self
                    .relay
                    .conn_id(conn)
                    .expect("opened")
                    .as_str()
                    .to_owned();
                let sid = SIDS
                    .iter()
                    .position(|s| *s == open.server_id.as_str())
                    .unwrap();
                let phone = matches!(open.role, Role::Phone { .. });
                // §5: `server-<sid>-<8 hex>` or `client-<sid>-<16 hex>`, unlike any live id.
                let (side, digits) = if phone { ("client", 16) } else { ("server", 8) };
                let hex = id.strip_prefix(&format!("{side}-{}-", SIDS[sid]));
                let well_formed = hex.is_some_and(|h| {
                    h.len() == digits && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                });
                if !well_formed || self.model.conns.values().any(|c| c.id == id) {
                    self.fail(format!("conn id {id:?} malformed or in use"));
                }
                if phone {
                    self.phone_ids.push(id.clone());
                }
                self.model.open(conn.0, sid, phone, id);
            }
            Input::Message { conn, data } => self.model.message(conn.0, &data, meaning),
            Input::MessageStarted { conn } => self.model.message_started(conn.0),
            Input::Ping { conn } => self.model.control(conn.0, false),
            Input::Pong { conn } => self.model.control(conn.0, true),
            Input::Written { conn } => self.model.written(conn.0),
            Input::Violation { conn, violation } => self.model.violation(conn.0, violation),
            Input::Closed { conn, ended } => self.model.closed(conn.0, ended),
            Input::Rebalance => self.model.rebalance(),
            Input::Shutdown => self.model.shutdown(),
        }
        self.settle();
        if let Some(k) = closed {
            self.seen.remove(&k);
        }
    }

    fn begin_step(&mut self) {
        self.step += 1;
        let t = self.t0 + Duration::from_millis(self.clock_ms) + Duration::from_nanos(self.step);
        self.fire_until(t);
        self.now = t;
    }

    fn live(&self, f: impl Fn(&Conn) -> bool) -> Vec<u64> {
        self.model
            .conns
            .iter()
            .filter(|(_, c)| f(c))
            .map(|(&k, _)| k)
            .collect()
    }

    /// The runtime reads only connections neither paused nor aborted.
    fn readable(&self) -> impl Fn(&Conn) -> bool {
        |c: &Conn| !c.paused && !c.aborted
    }

    fn open(&mut self, sid: usize, role: Role) {
        self.next_key += 1;
        let open = Open {
            server_id: sid_of(sid),
            role,
            client: [127, 0, 0, 1].into(),
        };
        self.input(
            Input::Open {
                conn: ConnKey(self.next_key),
                open,
            },
            None,
        );
    }

    fn apply(&mut self, action: &Action) {
        if let Action::Advance(ms) = action {
            self.clock_ms += ms;
        }
        self.begin_step();
        self.trace.push(format!("step {}: {action:?}", self.step));
        match action {
            Action::OpenBinary(sid) => self.open(
                *sid,
                Role::Binary {
                    version: "1.0".into(),
                },
            ),
            Action::OpenPhone(sid, live) => {
                let taken: Vec<usize> = (0..SIDS.len())
                    .filter(|&i| self.model.sids[i].st != St::Free)
                    .collect();
                let sid = if *live && !taken.is_empty() {
                    taken[sid % taken.len()]
                } else {
                    *sid
                };
                self.open(sid, Role::Phone { device_name: None });
            }
            Action::PhoneSends(i, any, msg) => self.phone_sends(i, *any, msg),
            Action::BinarySends(i, any, msg) => self.binary_sends(i, *any, msg),
            Action::PhoneBurst(i, n) => {
                for j in 0..*n as usize {
                    self.phone_sends(i, false, &PhoneMsg::Json(j % PHONE_JSON.len(), 0, 1));
                }
            }
            Action::PushBurst(i, n) => {
                for _ in 0..*n {
                    self.binary_sends(
                        i,
                        false,
                        &BinaryMsg::Push {
                            valid: true,
                            empty_id: false,
                        },
                    );
                }
            }
            Action::BinaryBurst(i, to, frame, n) => {
                for _ in 0..*n {
                    let msg = BinaryMsg::Deliver {
                        to: Target::Own(*to),
                        frame: *frame,
                        code: 0,
                        style: 0,
                    };
                    self.binary_sends(i, false, &msg);
                }
            }
            Action::Started(i) => {
                let conns = self.live(self.readable());
                let Some(&k) = pick(&conns, i) else { return };
                self.input(Input::MessageStarted { conn: ConnKey(k) }, None);
            }
            Action::Ping(i) | Action::Pong(i) => {
                let conns = self.live(self.readable());
                let Some(&k) = pick(&conns, i) else { return };
                let conn = ConnKey(k);
                let input = if matches!(action, Action::Ping(_)) {
                    Input::Ping { conn }
                } else {
                    Input::Pong { conn }
                };
                self.input(input, None);
            }
            Action::PongAll => {
                for k in self.live(|c| !c.ending && !c.paused) {
                    self.input(Input::Pong { conn: ConnKey(k) }, None);
                }
            }
            Action::Reap => self.reap(),
            Action::Write(i, n) => {
                let conns = self.live(|c| !c.queue.is_empty() && !c.aborted);
                let Some(&k) = pick(&conns, i) else { return };
                let queued = self.model.conns[&k].queue.len();
                let n = if *n == 0 {
                    queued
                } else {
                    (*n as usize).min(queued)
                };
                for _ in 0..n {
                    self.input(Input::Written { conn: ConnKey(k) }, None);
                }
            }
            Action::Violation(i, v) => {
                let conns = self.live(self.readable());
                let Some(&k) = pick(&conns, i) else { return };
                let c = &self.model.conns[&k];
                if *v == Violation::InvalidUtf8 && c.phone && !c.ending {
                    self.p2b_accepted += 1;
                }
                self.input(
                    Input::Violation {
                        conn: ConnKey(k),
                        violation: *v,
                    },
                    None,
                );
            }
            Action::Closed(i, how) => {
                let conns = self.live(|_| true);
                let Some(&k) = pick(&conns, i) else { return };
                let c = &self.model.conns[&k];
                let ended = if c.aborted {
                    Ended::Local
                } else if c.ending {
                    [Ended::Local, Ended::Dropped, Ended::PeerClose(Some(1000))][*how as usize % 3]
                } else {
                    [
                        Ended::PeerClose(Some(1000)),
                        Ended::PeerClose(Some(4000)),
                        Ended::PeerClose(None),
                        Ended::PeerClose(Some(1005)),
                        Ended::PeerClose(Some(999)),
                        Ended::Dropped,
                    ][*how as usize % 6]
                };
                self.input(
                    Input::Closed {
                        conn: ConnKey(k),
                        ended,
                    },
                    None,
                );
            }
            Action::Advance(_) => {}
            Action::Rebalance => self.input(Input::Rebalance, None),
            Action::Shutdown => self.input(Input::Shutdown, None),
        }
    }

    fn phone_sends(&mut self, i: &Pick, any: bool, msg: &PhoneMsg) {
        let max = self.model.cfg.max_message_size;
        let mut phones = self.live(|c| c.phone && c.registered && !c.ending && !c.paused);
        if any || phones.is_empty() {
            phones = self.live(|c| c.phone && !c.paused && !c.aborted);
        }
        let Some(&k) = pick(&phones, i) else { return };
        let data: Vec<u8> = match msg {
            PhoneMsg::Json(v, l, r) => {
                format!("{}{}{}", PAD[*l], PHONE_JSON[*v], PAD[*r]).into_bytes()
            }
            PhoneMsg::NotJson(i) => NOT_JSON_TEXT[*i].as_bytes().to_vec(),
            PhoneMsg::NonUtf8(i) => NON_UTF8[*i].to_vec(),
            PhoneMsg::Big(n) => {
                let fill = max + n - r#"{"p":""}"#.len();
                format!(r#"{{"p":"{}"}}"#, "x".repeat(fill)).into_bytes()
            }
        };
        if !self.model.conns[&k].ending && data.len() <= max {
            self.p2b_accepted += 1;
        }
        self.input(
            Input::Message {
                conn: ConnKey(k),
                data: data.into(),
            },
            None,
        );
    }

    fn binary_sends(&mut self, i: &Pick, any: bool, msg: &BinaryMsg) {
        let max = self.model.cfg.max_message_size;
        let mut binaries: Vec<u64> = self.model.sids.iter().filter_map(Sid::holder).collect();
        binaries.retain(|k| !self.model.conns[k].ending);
        if any || binaries.is_empty() {
            binaries = self.live(|c| !c.phone && !c.aborted);
        }
        let Some(&k) = pick(&binaries, i) else { return };
        let (data, meaning) = self.binary_message(k, msg);
        let c = &self.model.conns[&k];
        if !c.ending && data.len() <= max && self.relay.holder(&sid_of(c.sid)) != Some(ConnKey(k)) {
            self.p2b_accepted += 1; // a waiting claimant's frame: no_binary
        }
        self.input(
            Input::Message {
                conn: ConnKey(k),
                data,
            },
            Some(&meaning),
        );
    }

    /// Builds a binary message and says what it means (the model decides what it does).
    fn binary_message(&mut self, sender: u64, msg: &BinaryMsg) -> (Bytes, Meaning) {
        let sid = self.model.conns[&sender].sid;
        let resolve = |h: &Harness, to: &Target| -> String {
            match to {
                Target::Own(i) => {
                    let phones = &h.model.sids[sid].phones;
                    let mut own: Vec<&String> = phones
                        .iter()
                        .filter(|(_, k)| !h.model.conns[k].ending)
                        .map(|(id, _)| id)
                        .collect();
                    if own.is_empty() {
                        own = phones.keys().collect();
                    }
                    pick(&own, i)
                        .map_or_else(|| "client-s1-0000000000000000".to_owned(), |s| (*s).clone())
                }
                Target::Any(i) => pick(&h.phone_ids, i)
                    .cloned()
                    .unwrap_or_else(|| "client-s1-0000000000000000".to_owned()),
                Target::Made => format!("client-{}-00000000deadbeef", SIDS[sid]),
            }
        };
        let json_id = |id: &str, u_escape: bool| -> String {
            let s = serde_json::to_string(id).unwrap();
            if u_escape {
                s.replacen('c', "\\u0063", 1)
            } else {
                s
            }
        };
        match msg {
            BinaryMsg::Deliver {
                to,
                frame,
                code,
                style,
            } => {
                let id = resolve(self, to);
                let f = BINARY_FRAMES[*frame];
                let code = DELIVER_CODES[*code];
                let jid = json_id(&id, style & 4 != 0);
                let sp = if style & 1 != 0 { " " } else { "" };
                let mut fields = vec![
                    format!("\"conn_id\"{sp}:{sp}{jid}"),
                    format!("\"frame\"{sp}:{sp}{f}"),
                ];
                if style & 2 != 0 {
                    fields.swap(0, 1);
                }
                if code != 0 || style & 16 != 0 {
                    fields.push(format!("\"close_code\":{code}"));
                }
                if style & 8 != 0 {
                    fields.push(r#""push_wake":{"platform":"fcm","token":"t"}"#.to_owned());
                }
                let text = format!("{{{sp}{}{sp}}}", fields.join(&format!("{sp},{sp}")));
                let meaning = Meaning::Deliver {
                    conn_id: id,
                    frame: Some(Bytes::from_static(f.as_bytes())),
                    close: (code != 0).then_some(code),
                };
                (text.into(), meaning)
            }
            BinaryMsg::Directive {
                to,
                code,
                null_frame,
            } => {
                let id = resolve(self, to);
                let code = DIRECTIVE_CODES[*code];
                let frame = if *null_frame { r#","frame":null"# } else { "" };
                let text = format!(
                    r#"{{"conn_id":{}{frame},"close_code":{code}}}"#,
                    json_id(&id, false)
                );
                (
                    text.into(),
                    Meaning::Deliver {
                        conn_id: id,
                        frame: None,
                        close: Some(code),
                    },
                )
            }
            BinaryMsg::BadCode { to, which } => {
                let id = resolve(self, to);
                let (code, frame) = BAD_CODES[*which];
                let text = format!(
                    r#"{{"conn_id":{},"frame":{frame},"close_code":{code}}}"#,
                    json_id(&id, false)
                );
                (text.into(), Meaning::Malformed)
            }
            BinaryMsg::Malformed(i) => (Bytes::from_static(MALFORMED[*i]), Meaning::Malformed),
            BinaryMsg::Push { valid, empty_id } => {
                self.push_tokens += 1;
                let token = format!("tok-{}", self.push_tokens);
                let platform = if *valid { "fcm" } else { "apns" };
                let id = if *empty_id { r#""conn_id":"","# } else { "" };
                let text =
                    format!(r#"{{{id}"push_wake":{{"platform":"{platform}","token":"{token}"}}}}"#);
                (text.into(), Meaning::Push(valid.then_some(token)))
            }
            BinaryMsg::Big => {
                let text = format!(
                    r#"{{"conn_id":"x","frame":"{}"}}"#,
                    "y".repeat(self.model.cfg.max_message_size)
                );
                (text.into(), Meaning::Malformed)
            }
        }
    }

    fn reap(&mut self) {
        for k in self.live(|c| c.aborted) {
            let closed = Input::Closed {
                conn: ConnKey(k),
                ended: Ended::Local,
            };
            self.input(closed, None);
        }
    }

    /// With no more input except `Closed` after each Abort, every connection must end by its own
    /// deadlines, and then no state may remain (DESIGN.md §4).
    fn finish(&mut self) {
        for _ in 0..5000 {
            self.begin_step();
            self.reap();
            match self.relay.poll_timeout() {
                Some(at) => {
                    self.clock_ms = (at - self.t0).as_nanos().div_ceil(1_000_000) as u64;
                }
                None => break,
            }
        }
        if self.relay.connections() != 0 || self.relay.poll_timeout().is_some() {
            self.fail(format!(
                "not quiescent: {} connections, next deadline {:?}",
                self.relay.connections(),
                self.relay.next_timer()
            ));
        }
        let c = self.relay.counters();
        assert_eq!(
            (
                c.connected_binaries,
                c.connected_phones,
                c.phone_outbox_bytes,
                c.binary_outbox_bytes
            ),
            (0, 0, 0, 0),
            "gauges after everything closed"
        );
        if !self.model.shutting_down && self.relay.server_ids() != 0 {
            self.fail(format!(
                "{} server-ids outlive their connections",
                self.relay.server_ids()
            ));
        }
    }
}

fn pick<'a, T>(v: &'a [T], i: &Pick) -> Option<&'a T> {
    (!v.is_empty()).then(|| &v[i.0 % v.len()])
}

/// A few binaries and phones first, so that most cases have traffic, then random actions.
fn actions() -> impl Strategy<Value = Vec<Action>> {
    let setup = (
        prop::collection::vec(sid().prop_map(Action::OpenBinary), 0..=3),
        prop::collection::vec(sid().prop_map(|s| Action::OpenPhone(s, true)), 0..=5),
    );
    (setup, prop::collection::vec(action(), 1..=STEPS)).prop_map(|((mut all, phones), rest)| {
        all.extend(phones);
        all.extend(rest);
        all
    })
}

/// Longest random action sequence, after the opening ones.
const STEPS: usize = 100;

/// Cases per run unless `PROPTEST_CASES` says otherwise: a few seconds in a debug build.
const CASES: u32 = 512;

fn run(seed: u8, no_grace: bool, actions: &[Action]) {
    let mut h = Harness::new(seed, no_grace);
    for a in actions {
        h.apply(a);
    }
    h.finish();
    if std::env::var_os("MODEL_STATS").is_some() {
        let c = h.relay.counters();
        let mut line = format!(
            "STATS steps={} conns={} fwd={:?} drop={:?} up={:?} grace={} push={:?}",
            actions.len(),
            h.next_key,
            c.frames_forwarded,
            c.frames_dropped,
            c.ws_upgrade_attempts,
            c.grace_expiries,
            c.push_wakes
        );
        for (k, v) in &h.stats {
            line += &format!(" [{k}]={v}");
        }
        eprintln!("{line}");
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!("{}", h.trace.join("\n"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proptest-regressions/model.txt"
        )))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn relay_matches_model(
        seed in any::<u8>(),
        no_grace in prop::bool::weighted(0.1),
        actions in actions(),
    ) {
        run(seed, no_grace, &actions);
    }
}

/// Found by this test: at shutdown the holder's queue was both dropped (`binary_gone`) and
/// still written, because its 1001 close keeps the queue (decision C11).
#[test]
fn shutdown_flushes_the_holders_queue() {
    run(
        0,
        false,
        &[
            Action::OpenBinary(0),
            Action::OpenPhone(0, true),
            Action::PhoneSends(Pick(0), false, PhoneMsg::Json(0, 0, 0)),
            Action::Shutdown,
            Action::Write(Pick(0), 0),
        ],
    );
}

/// Found by this test: a paused phone aborted by its write deadline was later "resumed" when its
/// binary went: `PauseReading` and pings for a connection whose socket was already dropped.
#[test]
fn an_aborted_phone_is_not_resumed() {
    run(
        0,
        false,
        &[
            Action::OpenBinary(0),
            Action::OpenPhone(0, true),
            // The phone's write deadline starts first, then the binary's; the phone is paused.
            Action::BinarySends(
                Pick(0),
                false,
                BinaryMsg::Deliver {
                    to: Target::Own(Pick(0)),
                    frame: 3,
                    code: 0,
                    style: 0,
                },
            ),
            Action::PhoneBurst(Pick(0), 3),
            Action::Advance(4500),
        ],
    );
}
