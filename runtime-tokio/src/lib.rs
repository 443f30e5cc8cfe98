//! The tokio runtime of Switchyard: listeners, tasks, sockets and timers around the sans-IO core.
//!
//! Nothing here decides protocol behaviour. The runtime accepts TCP, reads a request head
//! (applying the core's `header_timeout` and `max_head_size`), asks the [`Gate`] for a
//! [`Verdict`] and carries it out, then pumps WebSocket frames between each socket and its shard.
//!
//! # Architecture
//!
//! - A multi-thread tokio runtime with `workers` threads.
//! - One actor task per shard (as many shards as workers). It owns its [`Relay`], one timer re-armed
//!   from [`Relay::poll_timeout`] and a routing table from [`ConnKey`] to each connection's
//!   command queue. Connections reach their shard (`server_id.shard(workers)`) through one
//!   bounded channel of inputs; the shard never waits on a connection.
//! - One task per connection: it reads frames and reports them, and writes what the shard queued
//!   for it, feeding a batch to the codec and flushing once, then reporting `Written` per message.
//! - The [`Gate`] sits behind a mutex held only for `handle_head` and `release`.
//!
//! [`Gate`]: switchyard_core::Gate
//! [`Verdict`]: switchyard_core::Verdict
//! [`Relay`]: switchyard_core::Relay
//! [`Relay::poll_timeout`]: switchyard_core::Relay::poll_timeout
//! [`ConnKey`]: switchyard_core::ConnKey

pub mod agnostic;
mod node;
mod shard;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Config, Counters};

pub use node::Handle;

/// Renders the `/metrics` body from the node's summed counters.
pub type RenderMetrics = Arc<dyn Fn(&Counters) -> String + Send + Sync>;

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
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("workers", &self.workers)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Binds both listeners (a bind error is returned at once) and starts the node on its own
/// threads.
pub fn start(options: Options) -> std::io::Result<Handle> {
    node::start(options)
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

/// How long a rejected request's input is read and discarded after the response, so closing
/// does not reset the connection before the client read the response (PROTOCOL.md §2.1).
pub const RESPONSE_LINGER: Duration = Duration::from_secs(1);

mod clock {
    /// The runtime's clock, in the core's `Instant`. Through tokio so a paused test clock applies.
    pub(crate) fn now() -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

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
