//! The runtime-neutral half of Switchyard's runtimes: everything between the sockets and the
//! sans-IO core that needs no particular executor, written once against [`Executor`].
//!
//! Nothing here decides protocol behaviour. A node accepts TCP, reads a PROXY v2 header when the
//! listener requires one (as the core's `judge_proxy_header` directs), reads a request head
//! (applying the core's `header_timeout`, counted from the accept, and `max_head_size`), asks the
//! [`Gate`] for a [`Verdict`] and carries it out, then pumps WebSocket frames between each socket
//! and its shard.
//!
//! # Architecture
//!
//! - `workers` threads, owned by the runtime crate ([`Executor::launch`]).
//! - One actor task per shard (as many shards as workers). It owns its [`Relay`], one timer re-armed
//!   from [`Relay::poll_timeout`] and a routing table from [`ConnKey`] to each connection's
//!   [`ConnQueue`]. Connections reach their shard (`server_id.shard(workers)`) through its
//!   bounded inbox of inputs (`inbox`), which the shard empties a batch at a time; the shard
//!   never waits on a connection.
//! - One task per connection: a [`ConnDriver`] reads frames and reports them, and writes what the
//!   shard queued for it, feeding a batch to the codec and flushing once, then reporting
//!   `Written` per message.
//! - The [`Gate`] sits behind a mutex held only for `handle_head` and `release`.
//! - Every structure shared between threads (shard inboxes, connection queues, published
//!   figures, the gate's lock, the shutdown flag, the task latches) is written on the `sync` module's types, which
//!   `--cfg switchyard_loom` swaps for loom's so the models in `loom_models` run the real code.
//! - Push wakes the shards' buckets admit go to one node-wide [`PushSink`] (`switchyard-push`),
//!   which returns at once and sends off the workers: a slow FCM never delays a frame.
//!
//! I/O is futures-io and the codec is async-tungstenite over it, so
//! the only executor-specific pieces are the ones [`Executor`] names. `switchyard-tokio` and
//! `switchyard-smol` implement it and re-export [`Options`], [`start`] and [`Handle`] with their
//! executor filled in.
//!
//! [`Gate`]: switchyard_core::Gate
//! [`Verdict`]: switchyard_core::Verdict
//! [`Relay`]: switchyard_core::Relay
//! [`Relay::poll_timeout`]: switchyard_core::Relay::poll_timeout
//! [`ConnKey`]: switchyard_core::ConnKey
//! [`ConnQueue`]: queue::ConnQueue
//! [`ConnDriver`]: driver::ConnDriver

pub mod driver;
mod future;
mod gate;
mod gauges;
pub mod head;
mod inbox;
#[cfg(all(test, switchyard_loom))]
mod loom_models;
mod node;
pub mod proxy;
mod published;
pub mod queue;
mod readiness;
pub mod scanner;
mod shard;
mod signal;
mod sync;
pub mod tls;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::io::{AsyncRead, AsyncWrite};
use switchyard_core::{Config, Counters, ServerId};

pub use node::{Handle, start};
/// The rustls this crate speaks, for building [`Options::tls`].
pub use rustls;

/// What a runtime crate supplies: threads, listeners, tasks and a timer. A value is a cheap
/// handle to the running executor, cloned into tasks; it must not keep the threads alive (that is
/// [`Executor::Threads`]'s job), or tasks would own the executor that owns them.
pub trait Executor: Clone + Send + Sync + 'static {
    /// Owns the worker threads.
    type Threads: Threads;
    type Listener: Send + Sync + 'static;
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A one-shot timer that can be re-armed in place.
    type Timer: Future + Send;

    /// Starts `workers` worker threads.
    fn launch(workers: usize) -> io::Result<(Self, Self::Threads)>;
    /// Adopts a bound, non-blocking listener.
    fn listener(&self, listener: std::net::TcpListener) -> io::Result<Self::Listener>;
    /// Accepts one connection, with `TCP_NODELAY` set.
    fn accept(
        listener: &Self::Listener,
    ) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// Runs `task` in the background on the workers.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static);
    /// The clock the timers follow, in the core's `Instant`.
    fn now() -> Instant;
    /// A timer firing at `at`. Called on a worker or inside [`Threads::block_on`].
    fn timer(at: Instant) -> Self::Timer;
    /// Re-arms `timer` to fire at `at`.
    fn reset(timer: Pin<&mut Self::Timer>, at: Instant);
}

/// The worker threads of an [`Executor`]. Dropping them stops every task at once.
pub trait Threads: Send + 'static {
    /// Runs `future` to completion on the calling thread, which is not a worker.
    fn block_on<F: Future>(&self, future: F) -> F::Output;
    /// Stops the workers, giving running tasks a moment to end, and waits for them.
    fn stop(self);
}

/// Renders the `/metrics` body from the node's summed counters.
pub type RenderMetrics = Arc<dyn Fn(&Counters) -> String + Send + Sync>;

/// Where the shards hand the push wakes their per-server-id buckets admitted (PROTOCOL.md §11).
/// One per node, shared by every shard; `switchyard-push` implements it with the FCM client.
pub trait PushSink: Send + Sync + 'static {
    /// Takes one admitted wake. Called on a shard's task, so it returns at once: the in-flight
    /// cap is checked here and the HTTP calls happen elsewhere.
    fn wake(&self, server_id: ServerId, token: String);
    /// The outcome counts so far (only `push_wakes` is filled); the node adds them to the
    /// shards' counts, which hold the bucket's drops.
    fn counters(&self) -> Counters;
    /// Shutdown began (§13): sends in flight are cancelled and later wakes are not sent.
    fn cancel(&self);
}

/// Answers http-01 challenges (RFC 8555 §8.3) from the ACME client's state.
pub trait Http01Answers: Send + Sync + 'static {
    /// The key authorization for `token`, if an authorization is waiting for it.
    fn key_authorization(&self, token: &str) -> Option<String>;
}

/// The ACME http-01 listener (`--acme-http-listen`, PROTOCOL.md §2.1).
#[derive(Clone)]
pub struct AcmeHttp {
    pub listen: SocketAddr,
    /// `--acme-http-proxy-protocol`: every connection must begin with a PROXY v2 header (§3.2).
    pub proxy_protocol: bool,
    pub answers: Arc<dyn Http01Answers>,
}

/// How to run a node.
#[derive(Clone)]
pub struct Options {
    /// The main listener (`--listen`).
    pub listen: SocketAddr,
    /// The metrics listener (`--metrics-listen`); `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Worker threads, and shards (≥ 1).
    pub workers: usize,
    pub config: Config,
    /// Seeds the shards' conn-id generators: `None` draws one from the OS; shard `i` gets a seed
    /// derived from it.
    pub seed: Option<[u8; 32]>,
    pub render_metrics: RenderMetrics,
    /// Performs push wakes; `None` when push is off. `config.push_enabled` should be set
    /// exactly when this is `Some` (a wake the core admits without a sink is ignored).
    pub push: Option<Arc<dyn PushSink>>,
    /// `--proxy-protocol`: every main-listener connection must begin with a PROXY v2 header,
    /// whose source address is then the client's (PROTOCOL.md §3.2). The metrics listener never
    /// takes one.
    pub proxy_protocol: bool,
    /// TLS on the main listener (built with [`tls::server_config`], or by the ACME client);
    /// `None`: plain HTTP/1.1. The metrics listener is always plain. A config whose ALPN list
    /// offers [`tls::ALPN_ACME_TLS`] gets TLS-ALPN-01 validations closed after their handshake.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The http-01 listener; `None` when off.
    pub acme_http: Option<AcmeHttp>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("workers", &self.workers)
            .field("config", &self.config)
            .field("push", &self.push.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .field("tls", &self.tls.is_some())
            .field("acme_http", &self.acme_http.as_ref().map(|a| a.listen))
            .finish_non_exhaustive()
    }
}

/// The seed of shard `index`: the node's seed with the index mixed into its last eight bytes.
/// Distinct keys give independent ChaCha streams.
pub fn shard_seed(node_seed: &[u8; 32], index: usize) -> [u8; 32] {
    let mut seed = *node_seed;
    let tail: [u8; 8] = seed[24..].try_into().expect("8 bytes");
    let mixed = u64::from_le_bytes(tail) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    seed[24..].copy_from_slice(&mixed.to_le_bytes());
    seed
}

/// The core's §2.1 linger after a non-101 response.
pub use switchyard_core::RESPONSE_LINGER;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_seeds_differ() {
        let s = [7; 32];
        assert_eq!(shard_seed(&s, 0), s);
        assert_ne!(shard_seed(&s, 1), s);
        assert_ne!(shard_seed(&s, 1), shard_seed(&s, 2));
    }
}
