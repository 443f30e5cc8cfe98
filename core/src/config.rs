//! Every limit and timeout the core applies, with PROTOCOL.md's defaults.

use std::time::Duration;

/// The relay's limits and timers. `Config::default()` is PROTOCOL.md's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The version string `/healthz` reports.
    pub version: String,
    /// `--domain`: when non-empty, the Host check (stage 1) is on. Stored lower-case.
    pub domains: Vec<String>,
    /// `--trust-forwarded-for` (§3.1).
    pub trust_forwarded_for: bool,
    /// Global concurrent WebSocket connections (stage 4).
    pub max_connections: u32,
    /// Concurrent WebSocket connections per client address (stage 3).
    pub max_connections_per_ip: u32,
    /// Phones per server-id (§6).
    pub max_phones_per_server: usize,
    /// Inbound message limit in bytes (§7.5).
    pub max_message_size: usize,
    /// Request head limit in bytes (stage 5).
    pub max_head_size: usize,
    /// Phone outbox budget in charged bytes (§10.1).
    pub phone_outbox_bytes: usize,
    /// Binary outbox budget in charged bytes (§10.2).
    pub binary_outbox_bytes: usize,
    /// Token bucket capacity per client address (§3.1).
    pub rate_burst: u32,
    /// Time to add one token to a client's bucket.
    pub rate_refill: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub read_timeout: Duration,
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    pub probe_timeout: Duration,
    /// `Duration::ZERO` means a gone binary's phones are closed at once (§6 rule 4).
    pub grace: Duration,
    pub close_timeout: Duration,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    /// Push wake is on only with credentials (§11); when off every wake is ignored.
    pub push_enabled: bool,
    pub push_burst: u32,
    pub push_refill: Duration,
    pub push_max_in_flight: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            domains: Vec::new(),
            trust_forwarded_for: false,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_phones_per_server: 16,
            max_message_size: 256 * 1024,
            max_head_size: 16 * 1024,
            phone_outbox_bytes: 4 * 1024 * 1024,
            binary_outbox_bytes: 16 * 1024 * 1024,
            rate_burst: 20,
            rate_refill: Duration::from_secs(6),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
            push_enabled: false,
            push_burst: 6,
            push_refill: Duration::from_secs(10),
            push_max_in_flight: 32,
        }
    }
}
