//! Drives one upgraded connection: frames in, the shard's commands out, over async-tungstenite.
//!
//! [`ConnDriver::next_event`] needs no timers and no channels, only futures-io streams: the
//! connection task loops on it and forwards what it reports to the shard.
//!
//! A quiet connection keeps no buffers. Once a heartbeat period has passed without a data
//! message either way, the driver puts its codec to sleep whenever it has returned every frame
//! it read and written everything it was given: it keeps only the socket and waits for one byte.
//! The byte (or a command from the shard) wakes a fresh codec, which starts from that byte. The
//! frame scanner, which sees every byte, says when the codec holds nothing (PERFORMANCE.md).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use futures_util::io::{AsyncRead, AsyncWrite};
use futures_util::{Sink, Stream};
use switchyard_core::{ConnKey, Ended, Input, Violation};
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::{CloseFrame, coding::CloseCode as WsCloseCode};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

use crate::queue::{Cmd, ConnQueue};
use crate::readiness::Readiness;
use crate::scanner::Watched;

/// Commands fed to the codec before a flush is forced, so `Written` keeps flowing under load.
const MAX_BATCH: usize = 64;
/// Read size while discarding input after a framing violation.
const DISCARD_CHUNK: usize = 2048;

/// The codec settings for an accepted connection: the core's message limit on whole messages
/// and on single frames, small buffers, masking required.
pub fn websocket_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
        .accept_unmasked_frames(false)
}

/// A codec over `socket` that starts with `read`, bytes already taken from it (and observed).
async fn codec<S>(
    socket: Watched<S>,
    read: Vec<u8>,
    max_message_size: usize,
) -> Box<WebSocketStream<Watched<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = Some(websocket_config(max_message_size));
    Box::new(WebSocketStream::from_partially_read(socket, read, Role::Server, config).await)
}

/// What happened on a connection, for its shard.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Forward this input.
    Input(Input),
    /// This many [`Input::Written`], one per `Send`, in order: a flush completed.
    Written(usize),
    /// The connection is over: drop the socket, then report [`Input::Closed`] with this.
    End(Ended),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Through the codec.
    Frames,
    /// After a framing violation the codec is done; raw bytes are discarded until the peer's
    /// close frame (found by the scanner) or EOF.
    Discarding,
}

/// The codec, boxed so that a sleeping connection does not carry its size.
type Ws<S> = Box<WebSocketStream<Watched<S>>>;

/// A connection's codec, or while the connection is quiet only its socket.
enum Codec<S> {
    Awake(Ws<S>, Readiness),
    /// No buffer is held; one byte read (or a command to write) wakes a new codec.
    Asleep(Watched<S>),
    /// A new codec is being built (async-tungstenite builds one in a future, ready at once).
    Waking(Pin<Box<dyn Future<Output = Ws<S>> + Send>>),
    /// Only while moving between the states above.
    Moving,
}

/// What one poll of a sleeping codec found.
enum Asleep {
    Event(Event),
    /// Wake the codec, starting with these bytes already read.
    Wake(Vec<u8>),
}

/// One accepted connection's reader and writer.
pub struct ConnDriver<S> {
    codec: Codec<S>,
    max_message_size: usize,
    /// The node's count of connections whose codec is asleep.
    asleep: Arc<AtomicUsize>,
    state: State,
}

impl<S> Drop for ConnDriver<S> {
    fn drop(&mut self) {
        if matches!(self.codec, Codec::Asleep(_)) {
            self.asleep.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Everything the driver tracks besides the codec.
struct State {
    conn: ConnKey,
    queue: Arc<ConnQueue>,
    reading: Reading,
    /// A `MessageStarted` was reported for the message now in progress.
    started_reported: bool,
    /// The peer's close frame arrived: its raw code.
    peer_close: Option<Option<u16>>,
    /// `Send`s handed to the codec since the last completed flush.
    unflushed: usize,
    /// Something was handed to the codec since the last completed flush.
    dirty: bool,
    /// The close frame was handed to the codec.
    close_queued: bool,
    /// Nothing more will be written: the close frame is out, or the codec refuses writes.
    write_done: bool,
    /// Alternates which side is polled first, so neither starves the other.
    write_first: bool,
    /// The codec's read side returned `Pending` and the socket has not woken it since (see
    /// [`ConnDriver::begin_poll`]): reading now would only find nothing.
    read_blocked: bool,
    discard: Vec<u8>,
    /// A data message went either way since the last heartbeat ping.
    active: bool,
    /// No data message went either way since the connection opened, or during a whole
    /// heartbeat period: sleep whenever possible.
    quiet: bool,
}

impl<S> ConnDriver<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Takes over an upgraded socket (the 101 already written); `rest` holds bytes read after
    /// the request head. A connection that has sent nothing more starts with its codec asleep:
    /// one that connects and waits costs no buffer at all.
    pub fn new(
        conn: ConnKey,
        socket: S,
        rest: Vec<u8>,
        queue: Arc<ConnQueue>,
        max_message_size: usize,
        asleep: Arc<AtomicUsize>,
    ) -> Self {
        let mut socket = Watched::new(socket);
        socket.observe(&rest);
        let codec = if rest.is_empty() {
            asleep.fetch_add(1, Ordering::Relaxed);
            Codec::Asleep(socket)
        } else {
            Codec::Waking(Box::pin(codec(socket, rest, max_message_size)))
        };
        ConnDriver {
            codec,
            max_message_size,
            asleep,
            state: State {
                conn,
                queue,
                reading: Reading::Frames,
                started_reported: false,
                peer_close: None,
                unflushed: 0,
                dirty: false,
                close_queued: false,
                write_done: false,
                write_first: false,
                read_blocked: false,
                discard: Vec::new(),
                active: false,
                quiet: true,
            },
        }
    }

    /// Waits for the next thing the shard must hear about.
    pub async fn next_event(&mut self) -> Event {
        poll_fn(|cx| {
            self.begin_poll(cx);
            self.poll_event(cx)
        })
        .await
    }

    /// A new poll of the connection's task begins. The socket is read again only if it woke
    /// the task since reading last found nothing: a wake-up for anything else (a command from
    /// the shard, returned read credit) leaves a socket known to be empty alone. Within one poll
    /// of the task, [`poll_event`](Self::poll_event) may be called again and again (once per
    /// event); it reads the socket until reading finds nothing.
    pub fn begin_poll(&mut self, cx: &Context<'_>) {
        if let Codec::Awake(_, readiness) = &self.codec {
            if readiness.begin(cx) {
                self.state.read_blocked = false;
            }
        }
    }

    /// Ends the transport without waiting: over TLS a close_notify goes out if the socket
    /// takes it at once, then TCP's sending side is shut down. Nothing waits on a stalled peer
    /// (write timeout, abort): the caller drops the socket right after.
    pub fn close_transport_now(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = match &mut self.codec {
            Codec::Awake(ws, _) => Pin::new(ws.get_mut()).poll_close(&mut cx),
            Codec::Asleep(socket) => Pin::new(socket).poll_close(&mut cx),
            Codec::Waking(_) | Codec::Moving => return,
        };
    }

    /// The codec is asleep: no buffer is held.
    pub fn is_asleep(&self) -> bool {
        matches!(self.codec, Codec::Asleep(_))
    }

    /// Polls for the next thing the shard must hear about.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let controls = self.state.queue.poll_controls(cx);
        if controls.aborted {
            return Poll::Ready(Event::End(Ended::Local));
        }
        // Paused by the shard (§10), or a phone's message read and not yet taken (A3).
        let may_read = !controls.paused && !controls.credit_exhausted;
        loop {
            match &mut self.codec {
                Codec::Awake(ws, readiness) => {
                    let mut read_cx = readiness.context();
                    if let Poll::Ready(event) =
                        self.state.poll_awake(ws, may_read, cx, &mut read_cx)
                    {
                        return Poll::Ready(event);
                    }
                    if !self.state.may_sleep(ws, may_read, cx) {
                        return Poll::Pending;
                    }
                    if let Codec::Awake(ws, _) = std::mem::replace(&mut self.codec, Codec::Moving) {
                        self.codec = Codec::Asleep(ws.into_inner());
                        self.asleep.fetch_add(1, Ordering::Relaxed);
                        self.state.queue.release_buffer();
                    }
                }
                Codec::Asleep(socket) => {
                    match ready!(self.state.poll_asleep(socket, may_read, cx)) {
                        Asleep::Event(event) => return Poll::Ready(event),
                        Asleep::Wake(read) => {
                            let max = self.max_message_size;
                            if let Codec::Asleep(socket) =
                                std::mem::replace(&mut self.codec, Codec::Moving)
                            {
                                self.asleep.fetch_sub(1, Ordering::Relaxed);
                                self.codec = Codec::Waking(Box::pin(codec(socket, read, max)));
                            }
                        }
                    }
                }
                Codec::Waking(waking) => {
                    let ws = ready!(waking.as_mut().poll(cx));
                    let readiness = Readiness::new();
                    readiness.begin(cx);
                    self.codec = Codec::Awake(ws, readiness);
                    // A new codec has read nothing yet (the byte that woke it may be followed by
                    // more, with no new readiness to announce them).
                    self.state.read_blocked = false;
                }
                // Cannot be seen between calls; ending is the safe answer if it ever were.
                Codec::Moving => return Poll::Ready(Event::End(Ended::Local)),
            }
        }
    }
}

impl State {
    /// `read_cx` carries the waker that records read readiness ([`Readiness`]): every read
    /// goes through it, everything else through the task's `cx`.
    fn poll_awake<S>(
        &mut self,
        ws: &mut Ws<S>,
        may_read: bool,
        cx: &mut Context<'_>,
        read_cx: &mut Context<'_>,
    ) -> Poll<Event>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.write_first = !self.write_first;
        if self.write_first {
            if let Poll::Ready(e) = self.poll_write(ws, cx) {
                return Poll::Ready(e);
            }
        }
        if (may_read || self.reading == Reading::Discarding) && !self.read_blocked {
            match self.poll_read(ws, read_cx) {
                Poll::Ready(e) => return Poll::Ready(e),
                Poll::Pending => self.read_blocked = true,
            }
        }
        if !self.write_first {
            if let Poll::Ready(e) = self.poll_write(ws, cx) {
                return Poll::Ready(e);
            }
        }
        Poll::Pending
    }

    /// Whether the codec can go: the connection is quiet, the codec has returned every frame it
    /// read, holds no partial message and has flushed everything, and nothing waits to be sent.
    /// Both sides returned `Pending`, so wake-ups are registered.
    fn may_sleep<S>(&mut self, ws: &mut Ws<S>, may_read: bool, cx: &mut Context<'_>) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.quiet
            && may_read
            && self.reading == Reading::Frames
            && self.peer_close.is_none()
            && !self.close_queued
            && !self.write_done
            && !self.dirty
            && ws.get_ref().scanner().at_boundary()
            && !self.queue.has_cmd()
            // Also writes a pong the codec owes the peer.
            && matches!(Pin::new(&mut **ws).poll_flush(cx), Poll::Ready(Ok(())))
    }

    /// With the codec asleep: wake it for a command to write, or for a byte read.
    fn poll_asleep<S>(
        &mut self,
        socket: &mut Watched<S>,
        may_read: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Asleep>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.queue.has_cmd() {
            return Poll::Ready(Asleep::Wake(Vec::new()));
        }
        if !may_read {
            return Poll::Pending;
        }
        let mut byte = [0; 1];
        match ready!(Pin::new(socket).poll_read(cx, &mut byte)) {
            Ok(1) => Poll::Ready(Asleep::Wake(byte.to_vec())),
            // EOF or a reset with no close frame, as the codec would have reported them.
            Ok(_) | Err(_) => Poll::Ready(Asleep::Event(Event::End(self.ended_abruptly()))),
        }
    }

    // ---- reading ------------------------------------------------------------------------

    fn poll_read<S>(&mut self, ws: &mut Ws<S>, cx: &mut Context<'_>) -> Poll<Event>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.reading == Reading::Discarding {
            return self.poll_discard(ws, cx);
        }
        loop {
            let item = match Pin::new(&mut **ws).poll_next(cx) {
                Poll::Pending => {
                    let in_message = ws.get_ref().scanner().in_message();
                    if in_message && !self.started_reported {
                        self.started_reported = true;
                        return Poll::Ready(self.input(|conn| Input::MessageStarted { conn }));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => return Poll::Ready(Event::End(self.ended_cleanly())),
                Poll::Ready(Some(item)) => item,
            };
            let data = match item {
                Ok(Message::Text(text)) => Bytes::from(text),
                Ok(Message::Binary(data)) => data,
                Ok(Message::Ping(_)) => {
                    return Poll::Ready(self.input(|conn| Input::Ping { conn }));
                }
                Ok(Message::Pong(_)) => {
                    return Poll::Ready(self.input(|conn| Input::Pong { conn }));
                }
                Ok(Message::Close(frame)) => {
                    // The codec replies (echoing an allowed code, else 1002); keep polling so the
                    // reply is flushed and the stream ends.
                    let raw = ws.get_ref().scanner().close();
                    let code = raw.unwrap_or_else(|| frame.map(|f| u16::from(f.code)));
                    self.peer_close.get_or_insert(code);
                    continue;
                }
                Ok(Message::Frame(_)) => continue,
                Err(e) => return Poll::Ready(self.read_error(e)),
            };
            self.started_reported = false;
            self.active = true;
            self.quiet = false;
            self.queue.message_read();
            return Poll::Ready(self.input(|conn| Input::Message { conn, data }));
        }
    }

    fn read_error(&mut self, e: WsError) -> Event {
        let violation = match e {
            WsError::Capacity(_) => Violation::TooBig,
            WsError::Utf8(_) => Violation::InvalidUtf8,
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => {
                return Event::End(self.ended_abruptly());
            }
            WsError::Protocol(_) => Violation::Protocol,
            WsError::ConnectionClosed | WsError::AlreadyClosed => {
                return Event::End(self.ended_cleanly());
            }
            // `Tls`, `WriteBufferFull`, `AttackAttempt`, `Url`, and `Http`/`HttpFormat`, which
            // exist only with tungstenite's `handshake` feature: none is a peer's framing fault.
            _ => return Event::End(self.ended_abruptly()),
        };
        self.reading = Reading::Discarding;
        self.input(|conn| Input::Violation { conn, violation })
    }

    /// After a violation: reads and throws away raw bytes until EOF, or until the peer's close
    /// frame has arrived and the relay's own close frame is out.
    fn poll_discard<S>(&mut self, ws: &mut Ws<S>, cx: &mut Context<'_>) -> Poll<Event>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.discard.is_empty() {
            self.discard = vec![0; DISCARD_CHUNK];
        }
        loop {
            if ws.get_ref().scanner().close().is_some() && self.write_done {
                return Poll::Ready(Event::End(Ended::Local));
            }
            let socket = Pin::new(ws.get_mut());
            match ready!(socket.poll_read(cx, &mut self.discard)) {
                Ok(0) => return Poll::Ready(Event::End(Ended::Local)),
                Ok(_) => {}
                Err(_) => return Poll::Ready(Event::End(Ended::Local)),
            }
        }
    }

    fn ended_cleanly(&self) -> Ended {
        match self.peer_close {
            Some(code) => Ended::PeerClose(code),
            None => Ended::Local,
        }
    }

    fn ended_abruptly(&self) -> Ended {
        match self.peer_close {
            Some(code) => Ended::PeerClose(code),
            None => Ended::Dropped,
        }
    }

    fn input(&self, f: impl FnOnce(ConnKey) -> Input) -> Event {
        Event::Input(f(self.conn))
    }

    // ---- writing ------------------------------------------------------------------------

    /// Hands queued commands to the codec, then flushes once for the batch.
    fn poll_write<S>(&mut self, ws: &mut Ws<S>, cx: &mut Context<'_>) -> Poll<Event>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.write_done {
            // Commands after the end of writing (the peer closed first) have nowhere to go.
            while self.queue.pop().is_some() {}
            return Poll::Pending;
        }
        loop {
            let mut fed = 0;
            while fed < MAX_BATCH && !self.close_queued && self.queue.has_cmd() {
                match Pin::new(&mut **ws).poll_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return self.write_error(e),
                }
                let Some(cmd) = self.queue.pop() else { break };
                let (message, is_send) = match cmd {
                    Cmd::Send(data) => {
                        self.active = true;
                        self.quiet = false;
                        (text(data), true)
                    }
                    Cmd::Ping => {
                        // The heartbeat marks the periods that decide whether a connection is
                        // quiet.
                        self.quiet = !self.active;
                        self.active = false;
                        (Message::Ping(Bytes::new()), false)
                    }
                    Cmd::Close { code, reason } => {
                        self.close_queued = true;
                        let frame = CloseFrame {
                            code: WsCloseCode::from(code.get()),
                            reason: Utf8Bytes::from_static(reason),
                        };
                        (Message::Close(Some(frame)), false)
                    }
                };
                fed += 1;
                self.dirty = true;
                if let Err(e) = Pin::new(&mut **ws).start_send(message) {
                    return self.write_error(e);
                }
                if is_send {
                    self.unflushed += 1;
                }
            }
            if !self.dirty {
                return Poll::Pending;
            }
            match Pin::new(&mut **ws).poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return self.write_error(e),
                Poll::Ready(Ok(())) => {}
            }
            self.dirty = false;
            if self.close_queued {
                self.write_done = true;
            }
            let written = std::mem::take(&mut self.unflushed);
            if written > 0 {
                return Poll::Ready(Event::Written(written));
            }
            if self.write_done {
                return Poll::Pending;
            }
        }
    }

    fn write_error(&mut self, e: WsError) -> Poll<Event> {
        match e {
            // The close handshake is under way or over: writing is finished, reading decides
            // the end.
            WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Protocol(ProtocolError::SendAfterClosing) => {
                self.write_done = true;
                self.dirty = false;
                self.unflushed = 0;
                Poll::Pending
            }
            WsError::Io(ref err) if err.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            _ => Poll::Ready(Event::End(self.ended_abruptly())),
        }
    }
}

/// The core only sends JSON that it read as UTF-8, so the check cannot fail; it is what makes
/// the bytes a TEXT payload without copying.
fn text(data: Bytes) -> Message {
    match Utf8Bytes::try_from(data) {
        Ok(text) => Message::Text(text),
        Err(_) => {
            debug_assert!(false, "the core sent a non-UTF-8 message");
            Message::Text(Utf8Bytes::from_static(""))
        }
    }
}
