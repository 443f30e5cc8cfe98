//! End-to-end scenarios of PROTOCOL.md §18 over real sockets, written once against
//! [`RelayUnderTest`] and instantiated for every runtime with [`suite!`].
//!
//! Each scenario starts its own relay on ephemeral loopback ports with short timers, drives it
//! with blocking clients ([`client`]) and checks what is observable on the wire and in the
//! counters. Scenario names carry the checklist item they cover.

pub mod client;
pub mod doubles;
pub mod pki;
pub mod proxy;
pub mod push;
pub mod scenarios;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{Config, Counters};
use switchyard_runtime::PushSink;
use switchyard_runtime::rustls::ServerConfig;

/// A runtime the suite can run against.
pub trait RelayUnderTest {
    /// Starts a node on `127.0.0.1:0` (both listeners) with `config`, push off.
    fn start(config: Config) -> Running {
        Self::start_with_push(config, None)
    }

    /// As [`start`](RelayUnderTest::start), with `push` performing the wakes (push is on when
    /// `config.push_enabled`).
    fn start_with_push(config: Config, push: Option<Arc<dyn PushSink>>) -> Running;

    /// As [`start`](RelayUnderTest::start), with `--proxy-protocol`: every connection to the main
    /// listener must begin with a PROXY v2 header (§3.2).
    fn start_proxied(config: Config) -> Running;

    /// As [`start`](RelayUnderTest::start), with TLS on the main listener.
    fn start_tls(config: Config, tls: Arc<ServerConfig>) -> Running;

    /// With both: a PROXY v2 header, then the TLS handshake.
    fn start_proxied_tls(config: Config, tls: Arc<ServerConfig>) -> Running;
}

/// What a scenario needs from a running node.
pub trait Control: Send {
    fn counters(&self) -> Counters;
    /// Upgraded connections whose codec is asleep.
    fn quiet_connections(&self) -> usize;
    fn rebalance(&self);
    fn start_draining(&self);
    fn shutdown(&self);
    /// Blocks until the node has drained after [`shutdown`](Control::shutdown).
    fn wait(self: Box<Self>);
}

/// A node under test.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    control: Option<Box<dyn Control>>,
}

impl Running {
    pub fn new(addr: SocketAddr, metrics_addr: SocketAddr, control: Box<dyn Control>) -> Running {
        Running {
            addr,
            metrics_addr,
            control: Some(control),
        }
    }

    fn control(&self) -> &dyn Control {
        self.control.as_deref().expect("running")
    }

    pub fn counters(&self) -> Counters {
        self.control().counters()
    }

    pub fn quiet_connections(&self) -> usize {
        self.control().quiet_connections()
    }

    pub fn rebalance(&self) {
        self.control().rebalance();
    }

    pub fn start_draining(&self) {
        self.control().start_draining();
    }

    /// Begins shutdown and returns at once.
    pub fn shutdown(&self) {
        self.control().shutdown();
    }

    /// Shuts down and waits for the drain to finish.
    pub fn stop(mut self) {
        if let Some(c) = self.control.take() {
            c.shutdown();
            c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.control.take() {
            c.shutdown();
            drop(c);
        }
    }
}

/// The settings every scenario starts from: PROTOCOL.md's defaults with timers short enough for
/// a fast suite and long enough not to fire by accident, and a token bucket large enough for the
/// many connections one test address opens. A scenario overrides what it exercises.
pub fn test_config() -> Config {
    Config {
        rate_burst: 10_000,
        ping_interval: Duration::from_secs(10),
        pong_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(2),
        probe_timeout: Duration::from_secs(2),
        grace: Duration::from_secs(10),
        close_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

/// The runtimes this crate knows: one driver, generic over the executor, filled in twice.
pub mod runtimes {
    use super::*;
    use switchyard_runtime::{Executor, Handle, Options};

    /// `switchyard-tokio`.
    pub struct Tokio;

    /// `switchyard-smol`.
    pub struct Smol;

    impl RelayUnderTest for Tokio {
        fn start_with_push(config: Config, push: Option<Arc<dyn PushSink>>) -> Running {
            start(config, push, false, None, switchyard_tokio::start)
        }

        fn start_proxied(config: Config) -> Running {
            start(config, None, true, None, switchyard_tokio::start)
        }

        fn start_tls(config: Config, tls: Arc<ServerConfig>) -> Running {
            start(config, None, false, Some(tls), switchyard_tokio::start)
        }

        fn start_proxied_tls(config: Config, tls: Arc<ServerConfig>) -> Running {
            start(config, None, true, Some(tls), switchyard_tokio::start)
        }
    }

    impl RelayUnderTest for Smol {
        fn start_with_push(config: Config, push: Option<Arc<dyn PushSink>>) -> Running {
            start(config, push, false, None, switchyard_smol::start)
        }

        fn start_proxied(config: Config) -> Running {
            start(config, None, true, None, switchyard_smol::start)
        }

        fn start_tls(config: Config, tls: Arc<ServerConfig>) -> Running {
            start(config, None, false, Some(tls), switchyard_smol::start)
        }

        fn start_proxied_tls(config: Config, tls: Arc<ServerConfig>) -> Running {
            start(config, None, true, Some(tls), switchyard_smol::start)
        }
    }

    impl<E: Executor> Control for Handle<E> {
        fn counters(&self) -> Counters {
            Handle::counters(self)
        }
        fn quiet_connections(&self) -> usize {
            Handle::quiet_connections(self)
        }
        fn rebalance(&self) {
            Handle::rebalance(self);
        }
        fn start_draining(&self) {
            Handle::start_draining(self);
        }
        fn shutdown(&self) {
            Handle::shutdown(self);
        }
        fn wait(self: Box<Self>) {
            Handle::wait(*self);
        }
    }

    fn start<E: Executor>(
        config: Config,
        push: Option<Arc<dyn PushSink>>,
        proxy_protocol: bool,
        tls: Option<Arc<ServerConfig>>,
        start: fn(Options) -> std::io::Result<Handle<E>>,
    ) -> Running {
        let opts = switchyard::MetricsOptions {
            push_enabled: config.push_enabled,
            node_id: None,
        };
        let handle = start(Options {
            listen: "127.0.0.1:0".parse().expect("address"),
            metrics_listen: Some("127.0.0.1:0".parse().expect("address")),
            workers: 2,
            config,
            seed: Some([42; 32]),
            render_metrics: Arc::new(move |c| switchyard::render(c, &opts)),
            push,
            proxy_protocol,
            tls,
            acme_http: None,
        })
        .expect("start the runtime");
        let addr = handle.local_addr();
        let metrics = handle.metrics_addr().expect("metrics listener");
        Running::new(addr, metrics, Box::new(handle))
    }
}

/// Instantiates every scenario as a `#[test]` for the runtime type `$rt`.
#[macro_export]
macro_rules! suite {
    ($rt:ty) => {
        $crate::suite!(@each $rt; push;
            item_61_wake_sent_with_jwt_and_exact_body,
            item_62_seventh_wake_dropped_by_bucket,
            item_63_outcomes_unregistered_redirect_token_down,
            item_64_invalid_wakes_send_nothing,
            item_65_push_off_sends_nothing,
            item_66_stalled_fcm_does_not_slow_frames,
            push_token_reused_until_expiry,
            push_errors_and_timeouts_are_send_failed,
            push_in_flight_cap_drops_excess,
            push_logs_fingerprint_never_token,
        );
        $crate::suite!(@each $rt; proxy;
            item_24_source_keys_bucket_and_ip_cap,
            item_24_refused_headers_close_silently,
            item_24_header_and_head_share_one_deadline,
            item_24_forwarded_for_over_proxy_source,
            item_24_healthz_through_proxy_metrics_without,
        );
        $crate::suite!(@each $rt; tls;
            tls_healthz_and_404,
            tls_binary_and_phone_exchange,
            tls_plain_http_is_not_answered,
            tls_stalled_handshake_closed_by_header_timeout,
            tls_handshake_and_head_share_the_deadline,
            tls_versions_below_1_2_refused,
            tls_alpn_http_1_1_or_none_never_h2,
            tls_acme_alpn_closes_after_handshake,
            tls_untrusted_client_fails_others_served,
            tls_rotation_serves_new_pair_keeps_connections,
            tls_shutdown_drops_pending_handshakes,
            tls_behind_proxy_header,
        );
        $crate::suite!(@each $rt; scenarios;
            item_1_healthz_get_and_post,
            item_2_healthz_counts_binaries_and_phones,
            item_3_unknown_paths_404,
            item_5_host_check,
            item_6_rate_limit_21st_attempt,
            item_7_refill_admits_again,
            item_8_forwarded_for_only_when_trusted,
            item_9_per_ip_cap,
            item_10_global_cap,
            item_11_head_size_limit,
            item_12_oversized_head_with_empty_bucket,
            item_13_head_timeout_closes_silently,
            item_13_slowloris_does_not_stop_new_clients,
            item_14_binary_required_headers,
            item_15_phone_required_headers,
            item_16_v2_aliases,
            item_17_repeated_server_header,
            item_18_server_id_syntax,
            item_19_lower_case_header_names,
            item_20_post_upgrade,
            item_21_upgrade_required,
            item_22_websocket_version_and_key,
            item_23_no_extensions_any_origin,
            item_25_conn_id_form_and_binary_silence,
            item_26_phone_for_unclaimed_id,
            item_27_phone_cap,
            item_28_conflict_with_live_incumbent,
            item_29_takeover_of_silent_incumbent,
            item_30_grace_keeps_phones,
            item_31_phone_frame_during_grace,
            item_32_reclaim_during_grace,
            item_33_grace_expiry,
            item_34_envelope_byte_for_byte,
            item_35_frame_bytes_unchanged,
            item_36_trimmed_and_scalars,
            item_37_not_json,
            item_38_binary_opcode_and_text_out,
            item_39_delivery_to_one_phone,
            item_40_unknown_conn_id,
            item_41_malformed_envelopes,
            item_42_invalid_close_codes,
            item_43_close_code_zero,
            item_44_no_cross_server_id,
            item_45_close_directive,
            item_46_directive_with_frame_in_order,
            item_47_phone_message_limit,
            item_48_binary_message_too_big,
            item_49_phone_close_notice,
            item_50_notice_codes,
            item_51_notice_after_last_frame,
            item_52_replaced_binary_gets_no_notice,
            item_53_heartbeat_timeout,
            item_54_pongs_keep_alive,
            item_55_read_timeout,
            item_56_ping_answered,
            item_57_phone_stops_reading,
            item_57_phone_write_timeout,
            item_58_burst_to_one_phone,
            item_59_binary_stalls_briefly,
            item_60_binary_never_resumes,
            item_67_metrics_before_traffic,
            item_68_upgrade_outcomes,
            item_69_frames_forwarded_and_dropped,
            item_70_rejections_by_reason,
            item_72_shutdown,
            item_73_rebalance,
            item_79_bad_peer_close_codes,
            fragmented_message_is_reassembled,
            quiet_connections_sleep_and_wake,
            close_code_1014_notice,
        );
    };
    (@each $rt:ty; $module:ident; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::$module::$name::<$rt>();
            }
        )*
    };
}
