//! The deterministic sans-IO core of Switchyard, a WebSocket rendezvous relay for the pyrycode
//! mobile protocol.
//!
//! Nothing here does I/O, reads a clock, spawns a thread or draws ambient randomness. Two state
//! machines decide everything the relay does:
//!
//! - [`Gate`]: one per node. Parses a request head and answers it (`/healthz`, 404, 421, 429, 503,
//!   431, 400, 426/405, or the 101), keeping the per-address token buckets and the exact per-address
//!   and global connection counts. Its answers are synchronous: a head goes in, a [`Verdict`]
//!   comes out.
//! - [`Relay`]: one per shard. Owns every server-id that hashes to it ([`ServerId::shard`]) with its
//!   binary and phones: claim, probe, register, forward, close notices, heartbeat, grace, outbox
//!   budgets and shutdown.
//!
//! The metrics and http-01 listeners answer with [`answer_metrics`] and [`answer_acme_http`].
//!
//! Before the request head, on a listener that requires it (PROTOCOL.md §3.2),
//! [`judge_proxy_header`] decides a PROXY protocol v2 header from the bytes read so far: how many
//! more to read, the client address it names, or a refusal.
//!
//! # Driving a shard
//!
//! The four verbs: [`Relay::handle_input`] and [`Relay::handle_timeout`] take `now`;
//! [`Relay::poll_output`] hands out commands; [`Relay::poll_timeout`] says when to call
//! `handle_timeout` next. After any `handle_*`, drain `poll_output` until `None`, then read
//! `poll_timeout`.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use switchyard_core::{Config, ConnKey, Input, Open, Output, Relay, Role, ServerId};
//!
//! let start = Instant::now(); // the runtime's clock; the core never reads one
//! let mut relay = Relay::new(Config::default(), [7; 32], start);
//! let sid = ServerId::parse(b"abc").unwrap();
//! let open = |role| Open { server_id: sid.clone(), role, client: [127, 0, 0, 1].into() };
//!
//! relay.handle_input(start, Input::Open {
//!     conn: ConnKey(1),
//!     open: open(Role::Binary { version: "1.0".into() }),
//! });
//! relay.handle_input(start, Input::Open { conn: ConnKey(2), open: open(Role::Phone { device_name: None }) });
//! relay.handle_input(start, Input::Message { conn: ConnKey(2), data: br#" {"t":"hi"} "#[..].into() });
//!
//! // A run loop hands each command to the socket it names.
//! let mut now = start;
//! let mut sent = Vec::new();
//! loop {
//!     while let Some(out) = relay.poll_output() {
//!         if let Output::Send { conn, data } = out {
//!             sent.push((conn, data));
//!         }
//!     }
//!     match relay.poll_timeout() {
//!         Some(at) if at <= start + Duration::from_secs(1) => {
//!             now = at;
//!             relay.handle_timeout(now);
//!         }
//!         _ => break,
//!     }
//! }
//! let (conn, envelope) = &sent[0];
//! assert_eq!(*conn, ConnKey(1));
//! let text = std::str::from_utf8(envelope).unwrap();
//! assert!(text.starts_with(r#"{"conn_id":"client-abc-"#));
//! assert!(text.ends_with(r#"","frame":{"t":"hi"}}"#));
//! ```
//!
//! A complete relay around these machines, driven by a hand-written `mio` event loop with no
//! async runtime, is in the repository's `examples/` crate (`switchyard-example-loop`, about 600
//! lines): the model for embedding the core in a loop of your own. The production runtimes are
//! `runtime-tokio/` and `runtime-smol/`.
//!
//! Time is a parameter: every mutating call takes `now`, which must never go backwards.
//! Randomness is a seed: conn ids come from a ChaCha generator seeded by [`Relay::new`] (from the
//! OS in production, from a test's seed in simulation), so a run replays exactly.

#![forbid(unsafe_code)]

mod bucket;
mod close;
mod config;
mod counters;
mod envelope;
mod gate;
mod id;
mod io;
mod listeners;
mod loggable;
mod outbox;
mod proxy;
mod push;
mod registry;
mod relay;
mod timer;

pub use close::{CloseCode, Ended, NOTICE_NO_CODE, Violation};
pub use config::Config;
pub use counters::{
    Counters, Direction, DropReason, Endpoint, Histogram, LATENCY_BUCKETS, PushOutcome,
    RegisterFailure, RejectReason, UpgradeOutcome,
};
pub use envelope::{BinaryMessage, EnvelopeError, wrap_phone_frame};
pub use gate::{Gate, Load, RESPONSE_LINGER, Response, Slot, Verdict};
pub use id::{ConnId, ConnKey, ServerId, ServerIdError, Side};
pub use io::{Input, Open, Output, Role};
pub use listeners::{
    ACME_CHALLENGE_PREFIX, Answer, METRICS_CONTENT_TYPE, answer_acme_http, answer_metrics,
};
pub use loggable::{BINARY_VERSION_MAX, DEVICE_NAME_MAX, loggable};
pub use proxy::{PROXY_FIXED_LEN, PROXY_HEADER_MAX, ProxyHeader, ProxyReject, judge_proxy_header};
pub use push::PushDispatcher;
pub use relay::Relay;
pub use timer::Timer;
