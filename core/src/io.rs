//! What goes into a shard ([`Input`]) and what comes out ([`Output`]).

use std::net::IpAddr;

use bytes::Bytes;

use crate::close::{CloseCode, Ended, Violation};
use crate::id::{ConnKey, ServerId};

/// What an admitted connection asks for: the route decided by the [`Gate`](crate::Gate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `/v1/server`, `/v2/server`: claim the server-id.
    Binary {
        /// `X-Pyrycode-Version`, kept for logs (truncated when logged, §15).
        version: String,
    },
    /// `/v1/client`, `/v2/client`: register with the server-id's binary.
    Phone {
        /// `X-Pyrycode-Device-Name`, kept for logs.
        device_name: Option<String>,
    },
}

/// An upgraded connection handed from the gate to the shard that owns `server_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub server_id: ServerId,
    pub role: Role,
    /// The client address that keyed admission (§3.1), for logs.
    pub client: IpAddr,
}

/// An event a runtime feeds a shard with [`Relay::handle_input`](crate::Relay::handle_input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The 101 was written on `conn`: the binary claims, or the phone registers, now.
    Open { conn: ConnKey, open: Open },
    /// One complete inbound data message (TEXT or BINARY; the opcode is ignored, §7.1).
    Message { conn: ConnKey, data: Bytes },
    /// Bytes of a data message arrived that did not complete it: starts the read deadline (§9).
    MessageStarted { conn: ConnKey },
    /// A ping arrived (the runtime's codec answers it with the same payload).
    Ping { conn: ConnKey },
    /// A pong arrived.
    Pong { conn: ConnKey },
    /// The oldest [`Output::Send`] still outstanding on `conn` was fully accepted by the socket.
    Written { conn: ConnKey },
    /// The peer broke the framing rules; the core decides the close.
    Violation { conn: ConnKey, violation: Violation },
    /// The transport is gone; the runtime has dropped the socket. The last input for `conn`.
    Closed { conn: ConnKey, ended: Ended },
    /// SIGHUP (§16.3): close claimants and holders 1012 "rebalance"; phones stay.
    Rebalance,
    /// SIGTERM/SIGINT after the drain delay (§13): close everything 1001 "shutting down".
    Shutdown,
}

/// A command a shard hands out from [`Relay::poll_output`](crate::Relay::poll_output). Carry them
/// out in order: the commands for one connection form its write queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Queue one TEXT message; report [`Input::Written`] once the socket accepted all of it.
    Send { conn: ConnKey, data: Bytes },
    /// Queue a ping with an empty payload.
    Ping { conn: ConnKey },
    /// Send a close frame with `code` and `reason`, then keep reading until the peer's close or
    /// TCP end. With `discard_queued`, queued messages not yet started are thrown away first;
    /// otherwise the close goes out behind them.
    Close {
        conn: ConnKey,
        code: CloseCode,
        reason: &'static str,
        discard_queued: bool,
    },
    /// Close TCP now without further writes (close handshake or write timed out), then report
    /// [`Input::Closed`] with [`Ended::Local`].
    Abort { conn: ConnKey },
    /// Stop (`true`) or resume (`false`) reading from `conn` (binary backpressure, §10.2).
    PauseReading { conn: ConnKey, paused: bool },
    /// Send an FCM wake for `token` on behalf of `server_id` (§11); the per-server-id bucket has
    /// admitted it. The node-wide in-flight cap is the push dispatcher's.
    PushWake { server_id: ServerId, token: String },
}
