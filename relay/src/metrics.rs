//! The `/metrics` body (PROTOCOL.md §12): a [`Counters`] snapshot, already summed over the
//! machines by the runtime, written as OpenMetrics text by prometheus-client.
//!
//! Nothing here keeps state: each scrape registers one [`Collector`] holding the snapshot and
//! encodes it, so every labelled cell is written, zero or not, and no process or runtime
//! collector can slip in.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use switchyard_core::{
    Counters, Direction, DropReason, Endpoint, LATENCY_BUCKETS, PushOutcome, RegisterFailure,
    RejectReason, UpgradeOutcome,
};

use crate::cli::Settings;

/// The `Content-Type` of a `/metrics` response.
pub use switchyard_core::METRICS_CONTENT_TYPE as CONTENT_TYPE;

/// What the exposition shows besides the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Writes the `pyrycode_relay_push_wakes_total` family (push on, §11).
    pub push_enabled: bool,
    /// Writes `pyrycode_relay_node_info{node="N"} 1` (§16.4).
    pub node_id: Option<String>,
}

impl MetricsOptions {
    pub fn from_settings(settings: &Settings) -> MetricsOptions {
        MetricsOptions {
            push_enabled: settings.config.push_enabled,
            node_id: settings.node_id.clone(),
        }
    }
}

/// Renders `counters` as a complete OpenMetrics text exposition ending in `# EOF`.
pub fn render(counters: &Counters, opts: &MetricsOptions) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot {
        counters: counters.clone(),
        opts: opts.clone(),
    }));
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

#[derive(Debug)]
struct Snapshot {
    counters: Counters,
    opts: MetricsOptions,
}

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Writes one family of const metrics, one per label set.
fn family<const N: usize, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    cells: impl IntoIterator<Item = (Labels<N>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut cells = cells.into_iter().peekable();
    let Some((_, first)) = cells.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, value) in cells {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        let e = &mut enc;

        gauge(
            e,
            "pyrycode_relay_connected_binaries",
            "Server-ids whose binary is live or being probed (as /healthz).",
            None,
            c.connected_binaries,
        )?;
        gauge(
            e,
            "pyrycode_relay_connected_phones",
            "Registered phones, including phones of a server-id in grace (as /healthz).",
            None,
            c.connected_phones,
        )?;
        family(
            e,
            "pyrycode_relay_frames_forwarded",
            "Messages fully written to the receiving socket, close notices excluded.",
            None,
            Direction::ALL.iter().map(|d| {
                (
                    [("direction", d.as_str())],
                    ConstCounter::new(c.forwarded(*d)),
                )
            }),
        )?;
        let grace = ConstCounter::new(c.grace_expiries);
        grace.encode(e.encode_descriptor(
            "pyrycode_relay_grace_expiries",
            "Grace windows that expired and evicted.",
            None,
            grace.metric_type(),
        )?)?;
        family(
            e,
            "pyrycode_relay_ws_upgrade_attempts",
            "Terminal outcomes of upgrade attempts, by endpoint.",
            None,
            Endpoint::ALL.iter().flat_map(|ep| {
                UpgradeOutcome::ALL.iter().map(move |o| {
                    (
                        [("endpoint", ep.as_str()), ("outcome", o.as_str())],
                        ConstCounter::new(c.upgrades(*ep, *o)),
                    )
                })
            }),
        )?;
        family(
            e,
            "pyrycode_relay_register_failures",
            "Failed registrations, paired with the reject outcomes of upgrade attempts.",
            None,
            RegisterFailure::ALL.iter().map(|k| {
                (
                    [("kind", k.as_str())],
                    ConstCounter::new(c.register_failed(*k)),
                )
            }),
        )?;
        if self.opts.push_enabled {
            family(
                e,
                "pyrycode_relay_push_wakes",
                "Push wakes by outcome.",
                None,
                PushOutcome::ALL
                    .iter()
                    .map(|o| ([("outcome", o.as_str())], ConstCounter::new(c.push(*o)))),
            )?;
        }
        family(
            e,
            "pyrycode_relay_frames_dropped",
            "Frames the relay accepted and did not deliver, by reason.",
            None,
            DropReason::ALL
                .iter()
                .map(|r| ([("reason", r.as_str())], ConstCounter::new(c.dropped(*r)))),
        )?;
        family(
            e,
            "pyrycode_relay_connections_rejected",
            "Non-101 answers on an upgrade route, by admission stage.",
            None,
            RejectReason::ALL
                .iter()
                .map(|r| ([("reason", r.as_str())], ConstCounter::new(c.rejected(*r)))),
        )?;
        gauge(
            e,
            "pyrycode_relay_phone_outbox",
            "Charged bytes over all phone outboxes.",
            Some(&Unit::Bytes),
            c.phone_outbox_bytes,
        )?;
        gauge(
            e,
            "pyrycode_relay_binary_outbox",
            "Charged bytes over all binary outboxes.",
            Some(&Unit::Bytes),
            c.binary_outbox_bytes,
        )?;
        gauge(
            e,
            "pyrycode_relay_open_connections",
            "TCP connections of the main listener not yet closed (decision A1).",
            None,
            c.open_connections,
        )?;
        gauge(
            e,
            "pyrycode_relay_pending_heads",
            "Connections whose request head is still being read (decision A1).",
            None,
            c.pending_heads,
        )?;

        let mut latency = e.encode_descriptor(
            "pyrycode_relay_forward_latency",
            "From holding a complete inbound message to its outbound write completing.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for d in Direction::ALL {
            let h = &c.forward_latency[*d as usize];
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(h.buckets.iter().copied())
                .collect();
            let labels = [("direction", d.as_str())];
            latency
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)?;
        }

        if let Some(node) = &self.opts.node_id {
            let mut info = e.encode_descriptor(
                "pyrycode_relay_node",
                "The node this process is (--node-id).",
                None,
                MetricType::Info,
            )?;
            info.encode_info(&[("node", node.as_str())])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn has(text: &str, line: &str) {
        assert!(
            lines(text).contains(&line),
            "missing line {line:?} in:\n{text}"
        );
    }

    fn samples(text: &str) -> Vec<&str> {
        lines(text)
            .into_iter()
            .filter(|l| !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn every_family_and_cell_is_present_at_zero_item_67() {
        let text = render(&Counters::default(), &MetricsOptions::default());
        assert!(text.ends_with("# EOF\n"));
        has(&text, "pyrycode_relay_connected_binaries 0");
        has(&text, "pyrycode_relay_connected_phones 0");
        has(&text, "pyrycode_relay_grace_expiries_total 0");
        has(&text, "pyrycode_relay_phone_outbox_bytes 0");
        has(&text, "pyrycode_relay_binary_outbox_bytes 0");
        has(&text, "pyrycode_relay_open_connections 0");
        has(&text, "pyrycode_relay_pending_heads 0");
        for d in ["phone_to_binary", "binary_to_phone"] {
            has(
                &text,
                &format!("pyrycode_relay_frames_forwarded_total{{direction=\"{d}\"}} 0"),
            );
            has(
                &text,
                &format!("pyrycode_relay_forward_latency_seconds_count{{direction=\"{d}\"}} 0"),
            );
            has(
                &text,
                &format!("pyrycode_relay_forward_latency_seconds_sum{{direction=\"{d}\"}} 0.0"),
            );
        }
        for ep in ["server", "client"] {
            for o in [
                "accept",
                "reject_headers",
                "reject_409",
                "reject_404",
                "reject_429",
                "reject_rate_limit",
            ] {
                has(
                    &text,
                    &format!(
                        "pyrycode_relay_ws_upgrade_attempts_total{{endpoint=\"{ep}\",outcome=\"{o}\"}} 0"
                    ),
                );
            }
        }
        for k in ["no_server", "server_in_use", "phones_at_cap", "ratelimit"] {
            has(
                &text,
                &format!("pyrycode_relay_register_failures_total{{kind=\"{k}\"}} 0"),
            );
        }
        for r in [
            "malformed",
            "unknown_conn_id",
            "not_json",
            "no_binary",
            "binary_gone",
            "phone_backlog_full",
            "phone_gone",
        ] {
            has(
                &text,
                &format!("pyrycode_relay_frames_dropped_total{{reason=\"{r}\"}} 0"),
            );
        }
        for r in [
            "host",
            "rate_limit",
            "ip_cap",
            "global_cap",
            "head_too_large",
            "headers",
            "handshake",
        ] {
            has(
                &text,
                &format!("pyrycode_relay_connections_rejected_total{{reason=\"{r}\"}} 0"),
            );
        }
        // 2 + 2 + 1 + 12 + 4 + 7 + 7 + 2 + 2 gauges and counters, 2 × (16 + 1 + 2) histogram
        // lines.
        assert_eq!(samples(&text).len(), 39 + 38);
        assert!(
            !text.contains("push_wakes"),
            "push family only when push is on"
        );
        assert!(!text.contains("node_info"));
    }

    #[test]
    fn families_are_typed() {
        let text = render(&Counters::default(), &MetricsOptions::default());
        has(&text, "# TYPE pyrycode_relay_connected_binaries gauge");
        has(&text, "# TYPE pyrycode_relay_frames_forwarded counter");
        has(&text, "# TYPE pyrycode_relay_ws_upgrade_attempts counter");
        has(
            &text,
            "# TYPE pyrycode_relay_forward_latency_seconds histogram",
        );
        has(
            &text,
            "# UNIT pyrycode_relay_forward_latency_seconds seconds",
        );
        has(&text, "# TYPE pyrycode_relay_phone_outbox_bytes gauge");
        // Only the §12 families and A1's two gauges: no process or runtime collectors.
        let families: Vec<&str> = lines(&text)
            .into_iter()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            families,
            [
                "pyrycode_relay_connected_binaries",
                "pyrycode_relay_connected_phones",
                "pyrycode_relay_frames_forwarded",
                "pyrycode_relay_grace_expiries",
                "pyrycode_relay_ws_upgrade_attempts",
                "pyrycode_relay_register_failures",
                "pyrycode_relay_frames_dropped",
                "pyrycode_relay_connections_rejected",
                "pyrycode_relay_phone_outbox_bytes",
                "pyrycode_relay_binary_outbox_bytes",
                "pyrycode_relay_open_connections",
                "pyrycode_relay_pending_heads",
                "pyrycode_relay_forward_latency_seconds",
            ]
        );
    }

    #[test]
    fn values_land_in_their_cells() {
        let mut c = Counters {
            connected_binaries: 3,
            connected_phones: 7,
            phone_outbox_bytes: 4096,
            open_connections: 11,
            pending_heads: 6,
            grace_expiries: 2,
            ..Counters::default()
        };
        c.frames_forwarded[Direction::BinaryToPhone as usize] = 5;
        c.ws_upgrade_attempts[Endpoint::Client as usize][UpgradeOutcome::Reject404 as usize] = 4;
        c.register_failures[RegisterFailure::NoServer as usize] = 4;
        c.frames_dropped[DropReason::UnknownConnId as usize] = 1;
        c.connections_rejected[RejectReason::GlobalCap as usize] = 9;
        let text = render(&c, &MetricsOptions::default());
        has(&text, "pyrycode_relay_connected_binaries 3");
        has(&text, "pyrycode_relay_connected_phones 7");
        has(&text, "pyrycode_relay_phone_outbox_bytes 4096");
        has(&text, "pyrycode_relay_open_connections 11");
        has(&text, "pyrycode_relay_pending_heads 6");
        has(&text, "pyrycode_relay_grace_expiries_total 2");
        has(
            &text,
            "pyrycode_relay_frames_forwarded_total{direction=\"binary_to_phone\"} 5",
        );
        has(
            &text,
            "pyrycode_relay_frames_forwarded_total{direction=\"phone_to_binary\"} 0",
        );
        has(
            &text,
            "pyrycode_relay_ws_upgrade_attempts_total{endpoint=\"client\",outcome=\"reject_404\"} 4",
        );
        has(
            &text,
            "pyrycode_relay_ws_upgrade_attempts_total{endpoint=\"server\",outcome=\"reject_404\"} 0",
        );
        has(
            &text,
            "pyrycode_relay_register_failures_total{kind=\"no_server\"} 4",
        );
        has(
            &text,
            "pyrycode_relay_frames_dropped_total{reason=\"unknown_conn_id\"} 1",
        );
        has(
            &text,
            "pyrycode_relay_connections_rejected_total{reason=\"global_cap\"} 9",
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_the_section_12_bounds() {
        let mut c = Counters::default();
        let h = &mut c.forward_latency[Direction::PhoneToBinary as usize];
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(11));
        let text = render(&c, &MetricsOptions::default());
        let name = "pyrycode_relay_forward_latency_seconds_bucket";
        // prometheus-client writes `le` before the family's labels.
        let p2b =
            |le: &str, n: u64| format!("{name}{{le=\"{le}\",direction=\"phone_to_binary\"}} {n}");
        for (le, n) in [
            ("0.0001", 1),
            ("0.00025", 1),
            ("0.0005", 2),
            ("0.001", 2),
            ("0.0025", 3),
            ("0.005", 3),
            ("0.01", 3),
            ("0.025", 3),
            ("0.05", 3),
            ("0.1", 3),
            ("0.25", 3),
            ("0.5", 3),
            ("1.0", 3),
            ("2.5", 3),
            ("5.0", 3),
            ("10.0", 3),
            ("+Inf", 4),
        ] {
            has(&text, &p2b(le, n));
        }
        has(
            &text,
            "pyrycode_relay_forward_latency_seconds_count{direction=\"phone_to_binary\"} 4",
        );
        has(
            &text,
            &format!("{name}{{le=\"+Inf\",direction=\"binary_to_phone\"}} 0"),
        );
        let sum = lines(&text)
            .into_iter()
            .find_map(|l| {
                l.strip_prefix(
                    "pyrycode_relay_forward_latency_seconds_sum{direction=\"phone_to_binary\"} ",
                )
            })
            .unwrap();
        assert!(
            (sum.parse::<f64>().unwrap() - 11.0024).abs() < 1e-9,
            "{sum}"
        );
    }

    #[test]
    fn push_family_only_when_push_is_on_item_65() {
        let mut c = Counters::default();
        c.push_wakes[PushOutcome::Dropped as usize] = 1;
        let opts = MetricsOptions {
            push_enabled: true,
            node_id: None,
        };
        let text = render(&c, &opts);
        has(&text, "# TYPE pyrycode_relay_push_wakes counter");
        for o in ["sent", "unregistered", "token_fetch_failed", "send_failed"] {
            has(
                &text,
                &format!("pyrycode_relay_push_wakes_total{{outcome=\"{o}\"}} 0"),
            );
        }
        has(
            &text,
            "pyrycode_relay_push_wakes_total{outcome=\"dropped\"} 1",
        );
    }

    #[test]
    fn node_info_only_with_a_node_id() {
        let opts = MetricsOptions {
            push_enabled: false,
            node_id: Some("node-1".into()),
        };
        let text = render(&Counters::default(), &opts);
        has(&text, "# TYPE pyrycode_relay_node info");
        has(&text, "pyrycode_relay_node_info{node=\"node-1\"} 1");
        assert!(text.ends_with("pyrycode_relay_node_info{node=\"node-1\"} 1\n# EOF\n"));
    }
}
