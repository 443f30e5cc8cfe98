//! The gate's conformance items (PROTOCOL.md §18) and pipeline properties.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::*;
use crate::counters::{Endpoint, RegisterFailure, RejectReason};
use crate::io::Role;

const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const LOAD: Load = Load {
    binaries: 3,
    phones: 7,
};

/// A gate and a virtual clock.
struct Harness {
    gate: Gate,
    start: Instant,
    now: Instant,
}

impl Harness {
    // Any instant will do as the origin; the gate itself never reads a clock.
    #[allow(clippy::disallowed_methods)]
    fn new(config: Config) -> Harness {
        let start = Instant::now();
        Harness {
            gate: Gate::new(config, start),
            start,
            now: start,
        }
    }

    fn default() -> Harness {
        Harness::new(Config {
            version: "0.1.0".into(),
            ..Config::default()
        })
    }

    fn at(&mut self, secs: f64) -> &mut Harness {
        self.now = self.start + Duration::from_secs_f64(secs);
        self
    }

    fn send_from(&mut self, peer: IpAddr, head: &[u8]) -> Verdict {
        self.gate.handle_head(self.now, peer, head, LOAD)
    }

    fn send(&mut self, head: &[u8]) -> Verdict {
        self.send_from(PEER, head)
    }

    /// Sends, checks the status and hands the slot back, as the runtime would once done.
    fn expect(&mut self, peer: IpAddr, head: &[u8], status: u16) -> Vec<u8> {
        let verdict = self.send_from(peer, head);
        assert_eq!(
            status_of(&verdict),
            status,
            "{}",
            String::from_utf8_lossy(head)
        );
        let bytes = bytes_of(&verdict);
        self.finish(verdict);
        bytes
    }

    fn finish(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Drop | Verdict::Respond { slot: None, .. } => {}
            Verdict::Respond {
                slot: Some(slot), ..
            }
            | Verdict::Upgrade { slot, .. } => {
                self.gate.release(slot);
            }
        }
    }

    fn rejected(&self, reason: RejectReason) -> u64 {
        self.gate.counters().rejected(reason)
    }
}

fn status_of(v: &Verdict) -> u16 {
    match v {
        Verdict::Drop => 0,
        Verdict::Respond { response, .. } | Verdict::Upgrade { response, .. } => response.status,
    }
}

fn bytes_of(v: &Verdict) -> Vec<u8> {
    match v {
        Verdict::Drop => Vec::new(),
        Verdict::Respond { response, .. } | Verdict::Upgrade { response, .. } => {
            response.bytes.to_vec()
        }
    }
}

fn body_of(v: &Verdict) -> Vec<u8> {
    let bytes = bytes_of(v);
    let at = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of head");
    bytes[at + 4..].to_vec()
}

fn handshake() -> String {
    format!(
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {KEY}\r\n"
    )
}

fn request(method: &str, path: &str, headers: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\n{headers}\r\n").into_bytes()
}

fn binary_headers() -> String {
    format!(
        "{}X-Pyrycode-Server: abc\r\nX-Pyrycode-Version: 1.0\r\nUser-Agent: ua\r\n",
        handshake()
    )
}

fn phone_headers() -> String {
    format!(
        "{}X-Pyrycode-Server: abc\r\nX-Pyrycode-Token: t\r\nUser-Agent: ua\r\n",
        handshake()
    )
}

fn binary(path: &str) -> Vec<u8> {
    request("GET", path, &binary_headers())
}

fn phone(path: &str) -> Vec<u8> {
    request("GET", path, &phone_headers())
}

fn without(headers: &str, name: &str) -> String {
    headers
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with(name))
        .collect()
}

fn healthz_bytes(status: &str, json: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Cache-Control: no-store\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    )
    .into_bytes()
}

/// A head of exactly `len` bytes: `headers` plus an `X-Pad` header filling the rest.
fn padded(path: &str, headers: &str, len: usize) -> Vec<u8> {
    let bare = request("GET", path, &format!("{headers}X-Pad: \r\n"));
    let mut head = request(
        "GET",
        path,
        &format!("{headers}X-Pad: {}\r\n", "a".repeat(len - bare.len())),
    );
    head.truncate(len);
    assert_eq!(head.len(), len);
    head
}

const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
X-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: 19\r\n\r\n404 page not found\n";

const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\
Content-Length: 35\r\n\r\n431 Request Header Fields Too Large";

#[test]
fn item_01_healthz_any_method_exact_json() {
    let mut h = Harness::default();
    h.at(5012.9);
    let json = r#"{"status":"ok","version":"0.1.0","connected_binaries":3,"connected_phones":7,"uptime_seconds":5012}"#;
    for method in ["GET", "POST", "DELETE"] {
        let v = h.send(&request(method, "/healthz?x", ""));
        assert_eq!(bytes_of(&v), healthz_bytes("200 OK", json));
        assert!(matches!(v, Verdict::Respond { slot: None, .. }));
    }
}

#[test]
fn item_01_healthz_draining_503() {
    let mut h = Harness::default();
    h.gate.start_draining();
    let v = h.send(&request("GET", "/healthz", ""));
    let json = r#"{"status":"draining","version":"0.1.0","connected_binaries":3,"connected_phones":7,"uptime_seconds":0}"#;
    assert_eq!(bytes_of(&v), healthz_bytes("503 Service Unavailable", json));
    // Everything else is unchanged while draining.
    h.expect(PEER, &binary("/v1/server"), 101);
}

#[test]
fn item_01_healthz_head_method_has_no_body() {
    let mut h = Harness::default();
    let get = bytes_of(&h.send(&request("GET", "/healthz", "")));
    let head = bytes_of(&h.send(&request("HEAD", "/healthz", "")));
    assert!(
        head.ends_with(b"Content-Length: 96\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(get[..head.len()], head[..]);
    assert_eq!(get.len() - head.len(), 96);
}

#[test]
fn item_01_healthz_never_limited_or_capped() {
    let mut h = Harness::new(Config {
        rate_burst: 0,
        max_connections: 0,
        ..Config::default()
    });
    for _ in 0..100 {
        h.expect(PEER, &request("GET", "/healthz", ""), 200);
    }
    assert_eq!(h.gate.counters(), &Counters::default());
}

#[test]
fn item_03_unknown_paths_404() {
    let mut h = Harness::default();
    for path in [
        "/v1/server/",
        "/metrics",
        "/",
        "/healthz/",
        "/v3/client",
        "/V1/server",
    ] {
        assert_eq!(h.expect(PEER, &binary(path), 404), NOT_FOUND, "{path}");
    }
    assert_eq!(h.gate.counters(), &Counters::default());
    assert_eq!(h.gate.open_slots(), 0);
}

#[test]
fn item_05_host_check_with_domain() {
    let config = Config {
        domains: vec!["d".into(), "relay.example".into()],
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let misdirected =
        b"HTTP/1.1 421 Misdirected Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    for path in ["/healthz", "/nope", "/v1/server"] {
        let head = request("GET", path, &format!("Host: x\r\n{}", binary_headers()));
        assert_eq!(h.expect(PEER, &head, 421), misdirected, "{path}");
        // Missing, repeated or with a bad port.
        let missing = request("GET", path, &binary_headers());
        h.expect(PEER, &missing, 421);
        let twice = request(
            "GET",
            path,
            &format!("Host: d\r\nHost: d\r\n{}", binary_headers()),
        );
        h.expect(PEER, &twice, 421);
        let port = request("GET", path, &format!("Host: d:x\r\n{}", binary_headers()));
        h.expect(PEER, &port, 421);
    }
    // Only the upgrade route counts (§12), and 421 takes no token and no slot.
    assert_eq!(h.rejected(RejectReason::Host), 4);
    assert_eq!(h.gate.open_slots(), 0);
    for host in ["D:443", "d", "RELAY.example:", " d:8080 "] {
        let health = request("GET", "/healthz", &format!("Host: {host}\r\n"));
        h.expect(PEER, &health, 200);
        let head = request(
            "GET",
            "/v1/server",
            &format!("Host: {host}\r\n{}", binary_headers()),
        );
        h.expect(PEER, &head, 101);
    }
}

#[test]
fn item_05_host_ipv6_literal() {
    let mut h = Harness::new(Config {
        domains: vec!["[::1]".into()],
        ..Config::default()
    });
    h.expect(
        PEER,
        &request("GET", "/healthz", "Host: [::1]:8080\r\n"),
        200,
    );
    h.expect(PEER, &request("GET", "/healthz", "Host: [::1]\r\n"), 200);
    h.expect(PEER, &request("GET", "/healthz", "Host: [::1]x\r\n"), 421);
    h.expect(PEER, &request("GET", "/healthz", "Host: [::1\r\n"), 421);
}

#[test]
fn item_06_21st_attempt_in_6s_is_429() {
    let mut h = Harness::default();
    for i in 0..20 {
        h.at(f64::from(i) * 0.25);
        h.expect(PEER, &binary("/v1/server"), 101);
    }
    h.at(5.9);
    let v = h.send(&phone("/v1/client"));
    assert_eq!(status_of(&v), 429);
    assert_eq!(body_of(&v), b"\n");
    assert!(
        matches!(v, Verdict::Respond { slot: None, .. }),
        "a 429 holds no slot"
    );
    assert_eq!(h.rejected(RejectReason::RateLimit), 1);
    assert_eq!(
        h.gate
            .counters()
            .upgrades(Endpoint::Client, UpgradeOutcome::RejectRateLimit),
        1
    );
    assert_eq!(
        h.gate
            .counters()
            .register_failed(RegisterFailure::Ratelimit),
        1
    );
    h.expect(PEER, &request("GET", "/healthz", ""), 200);
    h.expect(OTHER, &binary("/v2/server"), 101);
    // Every route shares the bucket; denied attempts take nothing.
    for _ in 0..5 {
        h.expect(PEER, &binary("/v2/server"), 429);
    }
}

#[test]
fn item_07_one_more_after_6s() {
    let mut h = Harness::default();
    for _ in 0..20 {
        h.expect(PEER, &binary("/v1/server"), 101);
    }
    h.expect(PEER, &binary("/v1/server"), 429);
    h.at(6.0);
    h.expect(PEER, &binary("/v1/server"), 101);
    h.expect(PEER, &binary("/v1/server"), 429);
    h.at(12.0);
    h.expect(PEER, &binary("/v1/server"), 101);
}

#[test]
fn item_08_forwarded_for_selects_bucket_only_when_trusted() {
    let xff = |i: u32| {
        let headers = format!(
            "X-Forwarded-For: 198.51.100.{i}, {PEER}\r\n{}",
            binary_headers()
        );
        request("GET", "/v1/server", &headers)
    };
    let mut untrusted = Harness::default();
    for i in 0..20 {
        untrusted.expect(PEER, &xff(i), 101);
    }
    untrusted.expect(PEER, &xff(99), 429);

    let mut trusted = Harness::new(Config {
        trust_forwarded_for: true,
        ..Config::default()
    });
    for i in 0..40 {
        trusted.expect(PEER, &xff(i % 2), 101);
    }
    trusted.expect(PEER, &xff(0), 429);
    // The forwarded address keys the slot and is what the shard is told.
    let client: IpAddr = "198.51.100.5".parse().unwrap();
    match trusted.send(&xff(5)) {
        Verdict::Upgrade { slot, open, .. } => {
            assert_eq!(open.client, client);
            assert_eq!(trusted.gate.open_slots_for(client), 1);
            assert_eq!(trusted.gate.open_slots_for(PEER), 0);
            trusted.gate.release(slot);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn item_09_per_ip_cap() {
    let mut h = Harness::new(Config {
        max_connections_per_ip: 2,
        ..Config::default()
    });
    let first = h.send(&binary("/v1/server"));
    let second = h.send(&phone("/v1/client"));
    assert_eq!((status_of(&first), status_of(&second)), (101, 101));
    assert_eq!(h.gate.open_slots_for(PEER), 2);
    let v = h.send(&phone("/v2/client"));
    assert_eq!((status_of(&v), body_of(&v)), (503, b"\n".to_vec()));
    assert!(matches!(v, Verdict::Respond { slot: None, .. }));
    assert_eq!(h.rejected(RejectReason::IpCap), 1);
    // The same address seen as IPv4-mapped IPv6 is the same key.
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
    h.expect(mapped, &phone("/v1/client"), 503);
    h.expect(OTHER, &phone("/v1/client"), 101);
    h.finish(first);
    h.expect(PEER, &phone("/v1/client"), 101);
    h.finish(second);
    assert_eq!(h.gate.open_slots(), 0);
}

#[test]
fn item_10_global_cap() {
    let mut h = Harness::new(Config {
        max_connections: 1,
        ..Config::default()
    });
    let holder = h.send(&binary("/v1/server"));
    assert_eq!(status_of(&holder), 101);
    for head in [
        binary("/v1/server"),
        phone("/v1/client"),
        binary("/v2/server"),
        phone("/v2/client"),
    ] {
        let v = h.send_from(OTHER, &head);
        assert_eq!((status_of(&v), body_of(&v)), (503, b"\n".to_vec()));
        h.finish(v);
    }
    h.expect(OTHER, &request("GET", "/healthz", ""), 200);
    assert_eq!(h.rejected(RejectReason::GlobalCap), 4);
    assert_eq!(h.rejected(RejectReason::IpCap), 0);
    h.finish(holder);
    // A phone's slot (it gets 4404 from its shard) frees the cap for the next dial once closed.
    let phone_conn = h.send(&phone("/v1/client"));
    assert_eq!(status_of(&phone_conn), 101);
    h.expect(OTHER, &binary("/v1/server"), 503);
    h.finish(phone_conn);
    h.expect(OTHER, &binary("/v1/server"), 101);
}

#[test]
fn item_11_head_exactly_16384_accepted() {
    let mut h = Harness::default();
    let head = padded("/v1/server", &binary_headers(), 16384);
    assert!(head.ends_with(b"\r\n\r\n"));
    h.expect(PEER, &head, 101);
    let health = padded("/healthz", "", 16384);
    h.expect(PEER, &health, 200);
}

#[test]
fn item_11_head_of_16385_is_431() {
    let mut h = Harness::default();
    let head = padded("/v1/server", &binary_headers(), 16385);
    let v = h.send(&head);
    assert_eq!(bytes_of(&v), TOO_LARGE);
    // Stages 2 to 4 were passed: the 431 holds a slot until written.
    assert_eq!(h.gate.open_slots(), 1);
    assert!(matches!(v, Verdict::Respond { slot: Some(_), .. }));
    h.finish(v);
    assert_eq!(h.gate.open_slots(), 0);
    assert_eq!(h.rejected(RejectReason::HeadTooLarge), 1);
    // The runtime may hand over just the first 16384 bytes.
    h.expect(PEER, &head[..16384], 431);
    assert_eq!(h.rejected(RejectReason::HeadTooLarge), 2);
    // 431 is not an upgrade attempt outcome (§12).
    assert_eq!(
        h.gate.counters().ws_upgrade_attempts,
        Counters::default().ws_upgrade_attempts
    );
}

#[test]
fn item_11_oversized_healthz_and_unknown_paths() {
    let mut h = Harness::new(Config {
        rate_burst: 0,
        max_connections: 0,
        ..Config::default()
    });
    for path in ["/healthz", "/nope"] {
        let v = h.send(&padded(path, "", 20000)[..16384]);
        assert_eq!(bytes_of(&v), TOO_LARGE, "{path}");
        assert!(matches!(v, Verdict::Respond { slot: None, .. }));
    }
    // Not counted: not an upgrade route.
    assert_eq!(h.gate.counters(), &Counters::default());
}

#[test]
fn item_11_oversized_request_line_is_431_at_once() {
    let mut h = Harness::new(Config {
        rate_burst: 0,
        ..Config::default()
    });
    let mut head = b"GET /v1/server?".to_vec();
    head.resize(16384, b'a');
    let v = h.send(&head);
    assert_eq!(bytes_of(&v), TOO_LARGE);
    assert!(matches!(v, Verdict::Respond { slot: None, .. }));
    assert_eq!(h.gate.counters(), &Counters::default());
}

#[test]
fn item_11_oversized_skips_host_and_forwarded_for() {
    let config = Config {
        domains: vec!["d".into()],
        trust_forwarded_for: true,
        max_connections_per_ip: 1,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let held = h.send(&request(
        "GET",
        "/v1/server",
        &format!("Host: d\r\n{}", binary_headers()),
    ));
    assert_eq!(status_of(&held), 101);
    let headers = format!(
        "Host: x\r\nX-Forwarded-For: 203.0.113.1\r\n{}",
        binary_headers()
    );
    let oversized = padded("/v1/server", &headers, 17000);
    // Keyed on the transport peer, which is at its cap: stage 3 answers before the 431.
    h.expect(PEER, &oversized, 503);
    h.expect(OTHER, &oversized, 431);
    assert_eq!(h.rejected(RejectReason::Host), 0);
    h.finish(held);
}

#[test]
fn item_12_oversized_from_empty_bucket_is_429() {
    let mut h = Harness::default();
    for _ in 0..20 {
        h.expect(PEER, &binary("/v1/server"), 101);
    }
    let oversized = padded("/v1/client", &phone_headers(), 16385);
    let v = h.send(&oversized);
    assert_eq!((status_of(&v), body_of(&v)), (429, b"\n".to_vec()));
    assert!(matches!(v, Verdict::Respond { slot: None, .. }));
    assert_eq!(
        h.gate
            .counters()
            .upgrades(Endpoint::Client, UpgradeOutcome::RejectRateLimit),
        1
    );
    h.expect(OTHER, &oversized, 431);
}

#[test]
fn item_14_binary_required_headers_400() {
    let mut h = Harness::default();
    for name in ["X-Pyrycode-Server", "X-Pyrycode-Version", "User-Agent"] {
        let missing = without(&binary_headers(), name);
        let empty = format!("{missing}{name}:  \t\r\n");
        for headers in [missing, empty] {
            let v = h.send(&request("GET", "/v1/server", &headers));
            assert_eq!(
                (status_of(&v), body_of(&v)),
                (400, b"\n".to_vec()),
                "{headers}"
            );
            assert!(
                matches!(v, Verdict::Respond { slot: Some(_), .. }),
                "rejected after stage 4"
            );
            h.finish(v);
        }
    }
    assert_eq!(
        h.gate
            .counters()
            .upgrades(Endpoint::Server, UpgradeOutcome::RejectHeaders),
        6
    );
    assert_eq!(h.rejected(RejectReason::Headers), 6);
    assert_eq!(
        h.gate.counters().register_failures,
        [0; RegisterFailure::COUNT]
    );
    assert_eq!(h.gate.open_slots(), 0);
}

#[test]
fn item_15_phone_v1_headers() {
    let mut h = Harness::default();
    for name in ["X-Pyrycode-Server", "X-Pyrycode-Token", "User-Agent"] {
        let missing = without(&phone_headers(), name);
        h.expect(PEER, &request("GET", "/v1/client", &missing), 400);
        let empty = format!("{missing}{name}:\r\n");
        h.expect(PEER, &request("GET", "/v1/client", &empty), 400);
    }
    match h.send(&phone("/v1/client")) {
        Verdict::Upgrade { open, slot, .. } => {
            assert_eq!(open.server_id.as_str(), "abc");
            assert_eq!(open.role, Role::Phone { device_name: None });
            assert_eq!(open.client, PEER);
            h.gate.release(slot);
        }
        other => panic!("{other:?}"),
    }
    let named = request(
        "GET",
        "/v1/client",
        &format!("{}X-Pyrycode-Device-Name: Pixel 9\r\n", phone_headers()),
    );
    match h.send(&named) {
        Verdict::Upgrade { open, slot, .. } => {
            assert_eq!(
                open.role,
                Role::Phone {
                    device_name: Some("Pixel 9".into())
                }
            );
            h.gate.release(slot);
        }
        other => panic!("{other:?}"),
    }
    let twice = format!(
        "{}X-Pyrycode-Device-Name: a\r\nX-Pyrycode-Device-Name: b\r\n",
        phone_headers()
    );
    h.expect(PEER, &request("GET", "/v1/client", &twice), 400);
    assert_eq!(
        h.gate
            .counters()
            .upgrades(Endpoint::Client, UpgradeOutcome::RejectHeaders),
        7
    );
}

#[test]
fn item_16_v2_aliases() {
    let mut h = Harness::default();
    let no_token = without(&phone_headers(), "X-Pyrycode-Token");
    h.expect(PEER, &request("GET", "/v2/client", &no_token), 101);
    h.expect(
        PEER,
        &request(
            "GET",
            "/v2/client",
            &format!("{no_token}X-Pyrycode-Token:\r\n"),
        ),
        101,
    );
    let twice = format!("{no_token}X-Pyrycode-Token: a\r\nX-Pyrycode-Token: a\r\n");
    h.expect(PEER, &request("GET", "/v2/client", &twice), 400);
    match h.send(&binary("/v2/server")) {
        Verdict::Upgrade { open, slot, .. } => {
            assert_eq!(
                open.role,
                Role::Binary {
                    version: "1.0".into()
                }
            );
            h.gate.release(slot);
        }
        other => panic!("{other:?}"),
    }
    let no_version = without(&binary_headers(), "X-Pyrycode-Version");
    h.expect(PEER, &request("GET", "/v2/server", &no_version), 400);
    assert_eq!(
        h.gate
            .counters()
            .upgrades(Endpoint::Server, UpgradeOutcome::RejectHeaders),
        1
    );
}

#[test]
fn item_17_repeated_server_id_400() {
    let mut h = Harness::default();
    for (path, headers) in [
        ("/v1/server", binary_headers()),
        ("/v2/client", phone_headers()),
    ] {
        let repeated = format!("{headers}X-Pyrycode-Server: abc\r\n");
        h.expect(PEER, &request("GET", path, &repeated), 400);
    }
}

#[test]
fn item_18_server_id_syntax() {
    let mut h = Harness::default();
    let with_sid = |sid: &[u8]| {
        let mut head = request(
            "GET",
            "/v1/server",
            &without(&binary_headers(), "X-Pyrycode-Server"),
        );
        head.truncate(head.len() - 2);
        head.extend_from_slice(b"X-Pyrycode-Server: ");
        head.extend_from_slice(sid);
        head.extend_from_slice(b"\r\n\r\n");
        head
    };
    match h.send(&with_sid(&[b'~'; 128])) {
        Verdict::Upgrade { open, slot, .. } => {
            assert_eq!(open.server_id.as_str(), "~".repeat(128));
            h.gate.release(slot);
        }
        other => panic!("{other:?}"),
    }
    for bad in [&[b'a'; 129][..], b"a b", b"a\tb", b"a\x80b", "ü".as_bytes()] {
        h.expect(PEER, &with_sid(bad), 400);
    }
    for control in (0u8..0x20).filter(|&b| b != b'\t').chain([0x7F]) {
        let v = h.send(&with_sid(&[b'a', control, b'b']));
        assert_eq!(v, Verdict::Drop, "byte {control:#x}");
    }
    assert_eq!(h.gate.open_slots(), 0);
}

#[test]
fn item_19_lower_case_header_names() {
    let mut h = Harness::default();
    let lower = |headers: String| -> String {
        headers
            .split_inclusive("\r\n")
            .map(|line| match line.split_once(':') {
                Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
                None => line.to_owned(),
            })
            .collect()
    };
    h.expect(
        PEER,
        &request("GET", "/v1/server", &lower(binary_headers())),
        101,
    );
    h.expect(
        PEER,
        &request("GET", "/v1/client", &lower(phone_headers())),
        101,
    );
}

#[test]
fn item_20_post_405_or_400() {
    let mut h = Harness::default();
    let v = h.send(&request("POST", "/v1/server", &binary_headers()));
    assert_eq!(
        bytes_of(&v),
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
          X-Content-Type-Options: nosniff\r\nAllow: GET\r\nConnection: close\r\n\
          Content-Length: 19\r\n\r\nmethod not allowed\n"
    );
    h.finish(v);
    h.expect(PEER, &request("POST", "/v1/server", &handshake()), 400);
    assert_eq!(h.rejected(RejectReason::Handshake), 1);
    assert_eq!(h.rejected(RejectReason::Headers), 1);
}

#[test]
fn item_21_upgrade_required_426() {
    let mut h = Harness::default();
    let expected: &[u8] =
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\n\
X-Content-Type-Options: nosniff\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
Content-Length: 17\r\n\r\nupgrade required\n";
    let no_connection = without(&binary_headers(), "Connection");
    assert_eq!(
        h.expect(PEER, &request("GET", "/v1/server", &no_connection), 426),
        expected
    );
    let keep_alive = format!("{no_connection}Connection: keep-alive\r\n");
    assert_eq!(
        h.expect(PEER, &request("GET", "/v1/server", &keep_alive), 426),
        expected
    );
    let no_upgrade = without(&binary_headers(), "Upgrade");
    assert_eq!(
        h.expect(PEER, &request("GET", "/v1/server", &no_upgrade), 426),
        expected
    );
    let http10 = format!("GET /v1/client HTTP/1.0\r\n{}\r\n", phone_headers());
    assert_eq!(h.expect(PEER, http10.as_bytes(), 426), expected);
    assert_eq!(h.rejected(RejectReason::Handshake), 4);
    assert_eq!(
        h.gate.counters().ws_upgrade_attempts,
        Counters::default().ws_upgrade_attempts
    );
}

#[test]
fn item_22_version_and_key() {
    let mut h = Harness::default();
    let v8 = binary_headers().replace("Version: 13", "Version: 8");
    assert_eq!(
        h.expect(PEER, &request("GET", "/v1/server", &v8), 400),
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
          X-Content-Type-Options: nosniff\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\
          Content-Length: 30\r\n\r\nunsupported websocket version\n"
    );
    let key15 = binary_headers().replace(KEY, "AAECAwQFBgcICQoLDA0O");
    let v = h.send(&request("GET", "/v1/server", &key15));
    assert_eq!(
        (status_of(&v), body_of(&v)),
        (400, b"invalid websocket key\n".to_vec())
    );
    assert!(
        !bytes_of(&v)
            .windows(21)
            .any(|w| w == b"Sec-WebSocket-Version")
    );
    h.finish(v);
    assert_eq!(h.rejected(RejectReason::Handshake), 2);
}

#[test]
fn item_23_no_extension_no_subprotocol_any_origin() {
    let mut h = Harness::default();
    let headers = format!(
        "{}Origin: https://evil.example\r\nSec-WebSocket-Extensions: permessage-deflate; \
         client_max_window_bits\r\nSec-WebSocket-Protocol: chat, superchat\r\n",
        binary_headers()
    );
    match h.send(&request("GET", "/v1/server", &headers)) {
        Verdict::Upgrade {
            response,
            slot,
            open,
        } => {
            assert_eq!(response.status, 101);
            assert_eq!(
                &response.bytes[..],
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            );
            assert_eq!(
                open.role,
                Role::Binary {
                    version: "1.0".into()
                }
            );
            assert_eq!(h.gate.open_slots(), 1);
            h.gate.release(slot);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn item_70_each_rejection_moves_its_reason() {
    let config = Config {
        domains: vec!["d".into()],
        max_connections_per_ip: 1,
        max_connections: 2,
        rate_burst: 3,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    let with_host = |headers: String| format!("Host: d\r\n{headers}");
    let a: IpAddr = "198.51.100.1".parse().unwrap();
    let b: IpAddr = "198.51.100.2".parse().unwrap();
    let c: IpAddr = "198.51.100.3".parse().unwrap();
    let e: IpAddr = "198.51.100.5".parse().unwrap();
    let hold_a = h.send_from(
        a,
        &request("GET", "/v1/server", &with_host(binary_headers())),
    );
    let hold_b = h.send_from(
        b,
        &request("GET", "/v1/server", &with_host(binary_headers())),
    );
    let cases: [(IpAddr, Vec<u8>, u16, RejectReason); 8] = [
        (
            c,
            request("GET", "/v1/server", &binary_headers()),
            421,
            RejectReason::Host,
        ),
        (
            a,
            request("GET", "/v1/server", &with_host(binary_headers())),
            503,
            RejectReason::IpCap,
        ),
        (
            c,
            request("GET", "/v1/server", &with_host(binary_headers())),
            503,
            RejectReason::GlobalCap,
        ),
        (
            a,
            request("GET", "/v1/server", &with_host(binary_headers())),
            503,
            RejectReason::IpCap,
        ),
        (
            a,
            request("GET", "/v1/server", &with_host(binary_headers())),
            429,
            RejectReason::RateLimit,
        ),
        (
            c,
            padded("/v1/client", "", 16385),
            503,
            RejectReason::GlobalCap,
        ),
        (
            e,
            request("GET", "/v1/server", &with_host(handshake())),
            503,
            RejectReason::GlobalCap,
        ),
        (
            e,
            request("GET", "/v1/server", "Host: d:1\r\n"),
            503,
            RejectReason::GlobalCap,
        ),
    ];
    let mut expected = [0u64; RejectReason::COUNT];
    for (peer, head, status, reason) in cases {
        h.expect(peer, &head, status);
        expected[reason as usize] += 1;
        assert_eq!(
            h.gate.counters().connections_rejected,
            expected,
            "{status} {reason:?}"
        );
    }
    h.finish(hold_a);
    h.finish(hold_b);
    let rest: [(Vec<u8>, u16, RejectReason); 5] = [
        (
            padded("/v1/client", "", 16385),
            431,
            RejectReason::HeadTooLarge,
        ),
        (
            request("GET", "/v1/server", &with_host(handshake())),
            400,
            RejectReason::Headers,
        ),
        (
            request(
                "GET",
                "/v1/server",
                &with_host(without(&binary_headers(), "Upgrade")),
            ),
            426,
            RejectReason::Handshake,
        ),
        (
            request("PUT", "/v1/server", &with_host(binary_headers())),
            405,
            RejectReason::Handshake,
        ),
        (
            request(
                "GET",
                "/v1/server",
                &with_host(binary_headers().replace(KEY, "x")),
            ),
            400,
            RejectReason::Handshake,
        ),
    ];
    for (i, (head, status, reason)) in rest.into_iter().enumerate() {
        // A fresh address each time, so the bucket of 3 never decides.
        let peer = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, i as u8));
        h.expect(peer, &head, status);
        expected[reason as usize] += 1;
        assert_eq!(
            h.gate.counters().connections_rejected,
            expected,
            "{status} {reason:?}"
        );
    }
    // Neither /healthz nor an unknown path counts, whatever the answer.
    h.expect(c, &request("GET", "/healthz", ""), 421);
    h.expect(c, &request("GET", "/x", "Host: d\r\n"), 404);
    h.expect(c, &padded("/healthz", "", 16385), 431);
    assert_eq!(h.gate.counters().connections_rejected, expected);
    assert_eq!(h.gate.open_slots(), 0);
}

#[test]
fn slots_are_released_exactly() {
    let mut h = Harness::default();
    let verdicts: Vec<Verdict> = (0..5)
        .map(|i| {
            let peer = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i % 2));
            h.send_from(peer, &binary("/v1/server"))
        })
        .collect();
    assert_eq!(h.gate.open_slots(), 5);
    assert_eq!(h.gate.open_slots_for("10.0.0.0".parse().unwrap()), 3);
    assert_eq!(h.gate.open_slots_for("::ffff:10.0.0.1".parse().unwrap()), 2);
    for v in verdicts {
        h.finish(v);
    }
    assert_eq!(h.gate.open_slots(), 0);
    assert_eq!(h.gate.caps.addresses(), 0);
}

#[test]
fn idle_buckets_are_forgotten_through_the_gate() {
    let mut h = Harness::default();
    for i in 0..500u32 {
        h.expect(IpAddr::V4(i.into()), &request("GET", "/v1/server", ""), 400);
    }
    assert_eq!(h.gate.buckets.len(), 500);
    // A bucket untouched for burst × refill (120 s) is full; any traffic sweeps it away.
    h.at(6.0);
    for _ in 0..50 {
        h.expect(PEER, &request("GET", "/healthz", ""), 200);
    }
    assert_eq!(h.gate.buckets.len(), 0);
}

#[test]
fn garbage_is_dropped_without_a_word() {
    let mut h = Harness::default();
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /v1/server HTTP/1.1\r\nHost: a\r\n",
        b"GET /v1/server HTTP/1.1\rHost: a\r\n\r\n",
        b"GET  /v1/server HTTP/1.1\r\n\r\n",
        b"GET /v1/server HTTP/1.1 \r\n\r\n",
        b"GET /v1/ser ver HTTP/1.1\r\n\r\n",
        b"GET /v1/server HTTP/1.1\r\n Host: a\r\n\r\n",
        b"GET /v1/server HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET /v1/server HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"",
    ] {
        assert_eq!(
            h.send(garbage),
            Verdict::Drop,
            "{:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    assert_eq!(h.gate.counters(), &Counters::default());
    assert_eq!(h.gate.buckets.len(), 0);
}

#[test]
fn request_bytes_are_never_echoed() {
    let mut h = Harness::new(Config {
        domains: vec!["d".into()],
        ..Config::default()
    });
    let marker = "QZXJ";
    let heads = [
        request("GET", &format!("/{marker}"), "Host: d\r\n"),
        request("GET", "/v1/server", &format!("Host: {marker}\r\n")),
        request(
            "GET",
            "/v1/server",
            &format!("Host: d\r\nX-Pyrycode-Server: a {marker}\r\n"),
        ),
        request(
            marker,
            "/v1/server",
            &format!("Host: d\r\n{}", binary_headers()),
        ),
        request(
            "GET",
            "/v1/server",
            &format!("Host: d\r\n{}", binary_headers()).replace("13", marker),
        ),
        request(
            "GET",
            "/v1/server",
            &format!("Host: d\r\n{}", binary_headers()).replace(KEY, marker),
        ),
        padded("/v1/server", &format!("X-{marker}: {marker}\r\n"), 17000),
    ];
    for head in heads {
        let v = h.send(&head);
        assert!(status_of(&v) >= 400, "{v:?}");
        assert!(
            !bytes_of(&v)
                .windows(marker.len())
                .any(|w| w == marker.as_bytes()),
            "{v:?}"
        );
        h.finish(v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proptest-regressions/gate.txt"
        )))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut h = Harness::new(Config { max_head_size: 128, ..Config::default() });
        let v = h.send(&bytes);
        h.finish(v);
        prop_assert_eq!(h.gate.open_slots(), 0);
    }

    #[test]
    fn mutated_heads_never_panic_or_leak(
        route in prop::sample::select(vec!["/v1/server", "/v2/client", "/healthz", "/x"]),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6),
        limit in prop::sample::select(vec![64usize, 256, 16384]),
        trust in any::<bool>(),
    ) {
        let config = Config {
            max_head_size: limit,
            trust_forwarded_for: trust,
            domains: vec!["d".into()],
            ..Config::default()
        };
        let mut h = Harness::new(config);
        let headers = format!("Host: d\r\nX-Forwarded-For: ::1\r\n{}", phone_headers());
        let mut head = request("GET", route, &headers.replace("abc", "QZXJ"));
        for (at, byte, op) in edits {
            let i = at.index(head.len());
            match op {
                0 => head[i] = byte,
                1 => head.insert(i, byte),
                _ => {
                    head.remove(i);
                }
            }
        }
        let v = h.send(&head);
        if let Verdict::Respond { response, .. } = &v {
            prop_assert!(!response.bytes.windows(4).any(|w| w == b"QZXJ"));
        }
        h.finish(v);
        prop_assert_eq!(h.gate.open_slots(), 0);
    }
}

#[test]
fn load_adds_per_field_and_config_is_the_given_one() {
    let mut load = Load {
        binaries: 2,
        phones: 5,
    };
    load += Load {
        binaries: 3,
        phones: 7,
    };
    assert_eq!(
        load,
        Load {
            binaries: 5,
            phones: 12
        }
    );
    let config = Config {
        max_head_size: 1234,
        ..Config::default()
    };
    #[allow(clippy::disallowed_methods)] // a test clock origin
    let gate = Gate::new(config.clone(), Instant::now());
    assert_eq!(gate.config(), &config);
}
