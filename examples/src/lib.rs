//! A complete Switchyard relay on a hand-written, single-threaded event loop: `mio` for readiness,
//! non-blocking sockets, `tungstenite` for WebSocket framing, and no async runtime. It is the
//! model for embedding `switchyard-core` in a loop of your own; every protocol decision is the
//! core's, the loop only moves bytes and reports what happened.
//!
//! The contract, in the order a connection meets it:
//!
//! 1. Read the request head: bytes up to CRLFCRLF, at most `max_head_size`, within
//!    `header_timeout`. The [`Gate`] parses it; the loop never does.
//! 2. Write the [`Verdict`]'s bytes. An answer is followed by a shut sending side and a second
//!    of discarded input; a 101 by WebSocket framing and [`Input::Open`].
//! 3. Feed the [`Relay`] one [`Input`] per event. After every `handle_*`, carry out every
//!    [`Output`] until `poll_output` is empty, and never sleep past `poll_timeout`.
//! 4. Report [`Input::Written`] only once a `Send`'s bytes are in the kernel. That one rule turns a
//!    slow reader into backpressure, a full outbox or a write timeout, all decided by the core.
//! 5. Hand the gate's [`Slot`] back when the TCP connection closes.
//!
//! `src/main.rs` is the command line around [`run`].
//!
//! Left out on purpose: TLS, PROXY protocol, `/metrics`, signals and drain, push wake, more than
//! one shard, and [`Input::MessageStarted`] (tungstenite does not say when a message is half
//! read, so the per-message read deadline never starts; heartbeats still catch silent peers).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use switchyard_core::{
    Config, ConnKey, Ended, Gate, Input, Load, Open, Output, Relay, Slot, Verdict, Violation,
};
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

const LISTENER: Token = Token(0);
/// How long input is discarded after an HTTP answer, so the peer reads it instead of a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Serves `listener` with one gate and one shard until an I/O error stops the loop. `seed` keys
/// the conn-id generator.
pub fn run(listener: std::net::TcpListener, config: Config, seed: [u8; 32]) -> io::Result<()> {
    Loop::new(listener, config, seed)?.run()
}

/// A connection before (or instead of) the WebSocket: head, answer, linger.
struct Http {
    stream: TcpStream,
    peer: IpAddr,
    /// The header timeout while the head is read, then the linger limit.
    deadline: Instant,
    phase: Phase,
}

enum Phase {
    Head(Vec<u8>),
    /// Writing the gate's answer; `out` is what is left of it.
    Answer {
        out: Bytes,
        then: Then,
    },
    /// Answer written and sending side shut: input is discarded until EOF or the deadline.
    Linger,
}

enum Then {
    Linger(Option<Slot>),
    /// `rest` holds bytes read past the head: the first WebSocket frames, if the client hurried.
    Upgrade {
        slot: Slot,
        open: Open,
        rest: Vec<u8>,
    },
}

/// An upgraded connection; its token number is its `ConnKey`.
struct Ws {
    ws: WebSocket<TcpStream>,
    slot: Slot,
    paused: bool,
    /// `Send`s handed to tungstenite since the last flush that succeeded.
    unflushed: usize,
    /// The peer's close frame arrived, with its raw code.
    peer_close: Option<Option<u16>>,
    /// After a framing violation tungstenite's reader is out of step: raw input is discarded.
    broken: bool,
}

/// What one read from an upgraded connection came to.
enum Step {
    Input(Input),
    Again,
    /// Nothing more to read until the next readiness event.
    Dry,
    End(Ended),
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    gate: Gate,
    relay: Relay,
    ws_config: WebSocketConfig,
    http: HashMap<usize, Http>,
    ws: HashMap<usize, Ws>,
    /// Head and linger deadlines. An entry whose connection has moved on is stale and skipped.
    deadlines: BTreeSet<(Instant, usize)>,
    /// Connections to read from and flush before the next wait.
    ready: BTreeSet<usize>,
    /// Inputs raised while carrying out outputs (`Written`, `Closed`), fed before the next wait.
    inputs: VecDeque<Input>,
    last_token: usize,
}

impl Loop {
    fn new(listener: std::net::TcpListener, config: Config, seed: [u8; 32]) -> io::Result<Loop> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        // The core's message limit on whole messages and on single frames; a small read buffer,
        // because tungstenite allocates it eagerly for every connection.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size));
        let now = Instant::now(); // the example is the runtime: the clock is ours to read
        Ok(Loop {
            poll,
            listener,
            gate: Gate::new(config.clone(), now),
            relay: Relay::new(config, seed, now),
            ws_config,
            http: HashMap::new(),
            ws: HashMap::new(),
            deadlines: BTreeSet::new(),
            ready: BTreeSet::new(),
            inputs: VecDeque::new(),
            last_token: 0,
        })
    }

    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            // Sleep until the core's next deadline or ours, whichever is first.
            let deadline = self.deadlines.first().map(|&(at, _)| at);
            let wake = self.relay.poll_timeout().into_iter().chain(deadline).min();
            let timeout = wake.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let now = Instant::now();
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(now),
                    Token(t) => {
                        self.ready.insert(t);
                    }
                }
            }
            if self.relay.poll_timeout().is_some_and(|at| at <= now) {
                self.relay.handle_timeout(now);
                self.pump(now);
            }
            self.expire(now);
            while let Some(t) = self.ready.pop_first() {
                if let Some(http) = self.http.remove(&t) {
                    self.drive_http(t, http, now);
                } else if self.ws.contains_key(&t) {
                    self.drive_ws(t, now);
                }
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // Out of descriptors and the like: a production loop backs off and retries; this
                // one tries again on the next connection's readiness event.
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    return;
                }
            };
            self.last_token += 1;
            let t = self.last_token;
            let _ = stream.set_nodelay(true);
            // Edge-triggered and both directions at once: no re-registration as the connection
            // changes phase, but every handler must go on until `WouldBlock`.
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, Token(t), interest)
            {
                eprintln!("register failed: {e}");
                continue;
            }
            let deadline = now + self.relay.config().header_timeout;
            self.deadlines.insert((deadline, t));
            let peer = addr.ip().to_canonical();
            let phase = Phase::Head(Vec::new());
            let http = Http {
                stream,
                peer,
                deadline,
                phase,
            };
            self.http.insert(t, http);
        }
    }

    /// Closes connections whose head or linger time is up; a head timeout writes nothing.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, t)) = self.deadlines.first() {
            if at > now {
                return;
            }
            self.deadlines.pop_first();
            if self.http.get(&t).is_some_and(|h| h.deadline == at) {
                let http = self.http.remove(&t).expect("present");
                self.close_http(http);
            }
        }
    }

    /// Moves an HTTP connection on as far as its socket allows; it goes back in the map unless it
    /// is closed or upgraded.
    fn drive_http(&mut self, t: usize, mut h: Http, now: Instant) {
        loop {
            match &mut h.phase {
                Phase::Head(buf) => {
                    let max = self.relay.config().max_head_size;
                    let len = match read_head(&mut h.stream, buf, max) {
                        Ok(Some(len)) => len,
                        Ok(None) => break,
                        Err(_) => return self.close_http(h),
                    };
                    // `/healthz` reports what the shard counts.
                    let counters = self.relay.counters();
                    let load = Load {
                        binaries: counters.connected_binaries,
                        phones: counters.connected_phones,
                    };
                    let (out, then) = match self.gate.handle_head(now, h.peer, &buf[..len], load) {
                        Verdict::Drop => return self.close_http(h),
                        Verdict::Respond { response, slot } => (response.bytes, Then::Linger(slot)),
                        Verdict::Upgrade {
                            response,
                            slot,
                            open,
                        } => {
                            let rest = buf[len..].to_vec();
                            (response.bytes, Then::Upgrade { slot, open, rest })
                        }
                    };
                    h.phase = Phase::Answer { out, then };
                    h.deadline = now + LINGER;
                    self.deadlines.insert((h.deadline, t));
                }
                Phase::Answer { out, then } => {
                    match write_some(&mut h.stream, out) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(_) => return self.close_http(h),
                    }
                    let then = std::mem::replace(then, Then::Linger(None));
                    h.phase = Phase::Linger;
                    match then {
                        Then::Linger(slot) => {
                            // A rejected request's slot is released once its answer is written.
                            if let Some(slot) = slot {
                                self.gate.release(slot);
                            }
                            let _ = h.stream.shutdown(Shutdown::Write);
                            h.deadline = now + LINGER;
                            self.deadlines.insert((h.deadline, t));
                        }
                        Then::Upgrade { slot, open, rest } => {
                            return self.upgrade(t, h.stream, slot, open, rest, now);
                        }
                    }
                }
                Phase::Linger => match discard_input(&mut h.stream) {
                    Ok(false) => break,
                    Ok(true) | Err(_) => return self.close_http(h),
                },
            }
        }
        self.http.insert(t, h);
    }

    fn close_http(&mut self, mut h: Http) {
        let _ = self.poll.registry().deregister(&mut h.stream);
        if let Phase::Answer { then, .. } = h.phase {
            match then {
                Then::Linger(Some(slot)) | Then::Upgrade { slot, .. } => self.gate.release(slot),
                Then::Linger(None) => {}
            }
        }
    }

    /// The 101 is out: framing starts, and the shard hears of the connection.
    fn upgrade(
        &mut self,
        t: usize,
        stream: TcpStream,
        slot: Slot,
        open: Open,
        rest: Vec<u8>,
        now: Instant,
    ) {
        let ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(self.ws_config));
        let conn = Ws {
            ws,
            slot,
            paused: false,
            unflushed: 0,
            peer_close: None,
            broken: false,
        };
        self.ws.insert(t, conn);
        self.relay
            .handle_input(now, Input::Open { conn: key(t), open });
        self.pump(now);
        // Frames may already sit in `rest` or the socket, and no new readiness event will say so.
        self.ready.insert(t);
    }

    /// Reads until the socket runs dry (or the core pauses it), feeding each event to the core,
    /// then flushes everything the core queued and reports it written.
    fn drive_ws(&mut self, t: usize, now: Instant) {
        loop {
            let Some(c) = self.ws.get_mut(&t) else { return };
            if c.paused {
                break;
            }
            match c.read(key(t)) {
                Step::Input(input) => {
                    self.relay.handle_input(now, input);
                    self.pump(now);
                }
                Step::Again => {}
                Step::Dry => break,
                Step::End(ended) => {
                    self.end(t, ended);
                    return self.pump(now);
                }
            }
        }
        let Some(c) = self.ws.get_mut(&t) else { return };
        match c.ws.flush() {
            // Every `Send` handed over since the last flush is now in the kernel, in order.
            Ok(()) => {
                let written = std::mem::take(&mut c.unflushed);
                for _ in 0..written {
                    self.inputs.push_back(Input::Written { conn: key(t) });
                }
            }
            // The rest stays in tungstenite's buffer; writable readiness brings us back here.
            // Meanwhile no `Written` is reported, so the core's write timeout runs.
            Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
            // The close handshake is complete (tungstenite's server side ends it after writing).
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                let ended = c.ended(Ended::Local);
                self.end(t, ended);
            }
            Err(_) => {
                let ended = c.ended(Ended::Dropped);
                self.end(t, ended);
            }
        }
        self.pump(now);
    }

    /// Drops the socket and hands back the slot; the `Closed` input, the last for `t`, is queued
    /// for the caller's `pump`.
    fn end(&mut self, t: usize, ended: Ended) {
        let Some(mut c) = self.ws.remove(&t) else {
            return;
        };
        let _ = self.poll.registry().deregister(c.ws.get_mut());
        self.gate.release(c.slot);
        self.inputs.push_back(Input::Closed {
            conn: key(t),
            ended,
        });
    }

    /// Carries out the core's outputs, feeding back the inputs that raises, until it is quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            while let Some(output) = self.relay.poll_output() {
                self.carry_out(output);
            }
            match self.inputs.pop_front() {
                Some(input) => self.relay.handle_input(now, input),
                None => return,
            }
        }
    }

    /// Writes go into tungstenite's buffer; the connection is marked ready so the flush at the
    /// end of `drive_ws` sends them, one batch per connection per loop turn.
    fn carry_out(&mut self, output: Output) {
        match output {
            Output::Send { conn, data } => self.write(conn, text(data), true),
            Output::Ping { conn } => self.write(conn, Message::Ping(Bytes::new()), false),
            // `discard_queued` asks to drop messages not yet started. Everything the core sent
            // is already in tungstenite's buffer (started, as far as this loop can tell), so the
            // close goes out behind it; the core's close deadline bounds the wait.
            Output::Close {
                conn,
                code,
                reason,
                discard_queued: _,
            } => {
                let code = code.get().into();
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                self.write(conn, Message::Close(Some(frame)), false);
            }
            Output::Abort { conn } => self.end(index(conn), Ended::Local),
            Output::PauseReading { conn, paused } => {
                if let Some(c) = self.ws.get_mut(&index(conn)) {
                    c.paused = paused;
                    // Readiness is edge-triggered: bytes that arrived while paused raise no new
                    // event, so a resumed connection is read at once.
                    if !paused {
                        self.ready.insert(index(conn));
                    }
                }
            }
            // Push wake needs an FCM client (§11); the default config has push off, so the core
            // never asks for one.
            Output::PushWake { .. } => {}
        }
    }

    fn write(&mut self, conn: ConnKey, message: Message, is_send: bool) {
        let t = index(conn);
        // A connection already reported closed: its `Closed` is queued, the output is moot.
        let Some(c) = self.ws.get_mut(&t) else { return };
        match c.ws.write(message) {
            Ok(()) => c.unflushed += usize::from(is_send),
            // The frame is in tungstenite's buffer; the flush finishes it.
            Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                c.unflushed += usize::from(is_send);
            }
            // The peer closed first, the handshake is over or the socket failed: nothing more
            // goes out, and the read or flush in `drive_ws` reports the end.
            Err(_) => {}
        }
        self.ready.insert(t);
    }
}

impl Ws {
    fn read(&mut self, conn: ConnKey) -> Step {
        if self.broken {
            return match discard_input(self.ws.get_mut()) {
                Ok(false) => Step::Dry,
                Ok(true) | Err(_) => Step::End(self.ended(Ended::Local)),
            };
        }
        let violation = match self.ws.read() {
            Ok(Message::Text(text)) => {
                return Step::Input(Input::Message {
                    conn,
                    data: text.into(),
                });
            }
            Ok(Message::Binary(data)) => return Step::Input(Input::Message { conn, data }),
            // tungstenite queues the pong itself; the flush in `drive_ws` sends it.
            Ok(Message::Ping(_)) => return Step::Input(Input::Ping { conn }),
            Ok(Message::Pong(_)) => return Step::Input(Input::Pong { conn }),
            // tungstenite queues the reply; the next read flushes it and ends the connection, and
            // the core hears of the close then, with this code. (tungstenite reports a code it
            // deems not allowed, 1014 among them, as 1002, so such a phone's notice says 1002.)
            Ok(Message::Close(frame)) => {
                self.peer_close.get_or_insert(frame.map(|f| f.code.into()));
                return Step::Again;
            }
            Ok(Message::Frame(_)) => return Step::Again,
            Err(WsError::Io(e)) if e.kind() == ErrorKind::WouldBlock => return Step::Dry,
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return Step::End(self.ended(Ended::Local));
            }
            Err(WsError::Capacity(_)) => Violation::TooBig,
            Err(WsError::Utf8(_)) => Violation::InvalidUtf8,
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return Step::End(self.ended(Ended::Dropped));
            }
            Err(WsError::Protocol(_)) => Violation::Protocol,
            Err(_) => return Step::End(self.ended(Ended::Dropped)),
        };
        // The core answers with the close; the socket stays open until the peer goes.
        self.broken = true;
        Step::Input(Input::Violation { conn, violation })
    }

    /// How the connection ended: by the peer's close frame if one came, else `otherwise`.
    fn ended(&self, otherwise: Ended) -> Ended {
        self.peer_close.map_or(otherwise, Ended::PeerClose)
    }
}

/// Reads toward the end of a request head. `Some(len)`: `buf[..len]` goes to the gate, a
/// complete head or the first `max` bytes of one too large. `None`: wait for more.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
    let mut chunk = [0; 4096];
    while buf.len() < max {
        let want = chunk.len().min(max - buf.len());
        let n = match stream.read(&mut chunk[..want]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(from + i + 4));
        }
    }
    Ok(Some(max))
}

/// Writes as much of `out` as the socket takes; `true` once all of it is written.
fn write_some(stream: &mut TcpStream, out: &mut Bytes) -> io::Result<bool> {
    while out.has_remaining() {
        match stream.write(out) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and throws away what the socket holds; `true` at EOF.
fn discard_input(stream: &mut TcpStream) -> io::Result<bool> {
    let mut chunk = [0; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// The core only sends JSON it read as UTF-8 or built itself, so the check cannot fail; it is
/// what makes the bytes a TEXT payload without a copy.
fn text(data: Bytes) -> Message {
    Message::Text(Utf8Bytes::try_from(data).expect("the core sends UTF-8"))
}

fn key(t: usize) -> ConnKey {
    ConnKey(t as u64)
}

fn index(conn: ConnKey) -> usize {
    conn.0 as usize
}
