//! `--proxy-protocol` (PROTOCOL.md §3.2, checklist item 24): every connection to the main
//! listener begins with a PROXY v2 header, whose source is the client address for the gate.

use std::io::Write;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use switchyard_core::{Config, Endpoint, RejectReason, UpgradeOutcome};

use crate::client::{
    Dialed, Http, Tcp, Ws, binary_headers, dial_raw, eventually, get, phone_headers, raw,
    upgrade_request,
};
use crate::{RelayUnderTest, Running, test_config};

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY v2 header with these two bytes (version and command, family and protocol) and body.
pub fn v2(version_command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.extend([version_command, family_protocol]);
    h.extend(u16::try_from(body.len()).expect("short body").to_be_bytes());
    h.extend(body);
    h
}

/// The address block of a TCP header from `source` to the relay's port 8080 (same family).
pub fn addresses(source: SocketAddr) -> Vec<u8> {
    let mut a = Vec::new();
    match source.ip() {
        IpAddr::V4(ip) => {
            a.extend(ip.octets());
            a.extend([10, 0, 0, 1]);
        }
        IpAddr::V6(ip) => {
            a.extend(ip.octets());
            a.extend(
                "2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        }
    }
    a.extend(source.port().to_be_bytes());
    a.extend(8080u16.to_be_bytes());
    a
}

/// The header a balancer sends for a client at `source`: command PROXY, TCP over its family.
pub fn header(source: &str) -> Vec<u8> {
    let source: SocketAddr = source.parse().expect("source address");
    let family = if source.is_ipv4() { 0x11 } else { 0x21 };
    v2(0x21, family, &addresses(source))
}

fn then(mut first: Vec<u8>, rest: &[u8]) -> Vec<u8> {
    first.extend_from_slice(rest);
    first
}

/// An upgrade dial behind a PROXY header from `source`, header and request in one write.
fn dial_from(
    relay: &Running,
    source: &str,
    path: &str,
    sid_headers: &[(String, String)],
) -> Dialed {
    let request = then(header(source), &upgrade_request("GET", path, sid_headers));
    dial_raw(Tcp::default(), relay.addr, &request)
}

/// An upgrade attempt without the route's headers: it takes a token and gets 400, or 429.
fn attempt_from(relay: &Running, source: &str, extra: &[(String, String)]) -> u16 {
    let request = then(header(source), &upgrade_request("GET", "/v1/server", extra));
    let bytes = raw(relay.addr, &request);
    Http::parse(&bytes)
        .unwrap_or_else(|| panic!("not an HTTP response: {bytes:?}"))
        .status
}

fn healthz() -> &'static [u8] {
    b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Valid v4 and v6 headers: the upgrade works, and the per-address token bucket and cap count by
/// the PROXY source, not by the TCP peer (every connection here comes from 127.0.0.1).
pub fn item_24_source_keys_bucket_and_ip_cap<R: RelayUnderTest>() {
    let relay = R::start_proxied(Config {
        rate_burst: 2,
        max_connections_per_ip: 1,
        ..test_config()
    });
    let mut binary = dial_from(
        &relay,
        "203.0.113.1:40000",
        "/v1/server",
        &binary_headers("p24"),
    )
    .ws();
    // The phone's header arrives one byte per segment, the request head right behind it.
    let mut s = Tcp::default().connect(relay.addr).expect("connect");
    for b in header("[2001:db8::7]:40000") {
        s.write_all(&[b]).expect("write");
        thread::sleep(ms(1));
    }
    s.write_all(&upgrade_request("GET", "/v1/client", &phone_headers("p24")))
        .expect("write");
    let mut phone = read_upgrade(s);
    phone.send(r#"{"via":"proxy"}"#);
    let envelope = binary.text();
    assert!(
        envelope.ends_with(r#","frame":{"via":"proxy"}}"#),
        "{envelope}"
    );

    // 203.0.113.1 holds its one WebSocket: a second one from it, on another TCP connection, is
    // at the per-address cap (and takes its second token).
    let second = dial_from(
        &relay,
        "203.0.113.1:40001",
        "/v1/server",
        &binary_headers("p24b"),
    );
    assert_eq!(second.rejected().status, 503);
    // Its bucket is empty now, also under its IPv4-mapped IPv6 form (§3.1).
    assert_eq!(attempt_from(&relay, "203.0.113.1:40002", &[]), 429);
    assert_eq!(attempt_from(&relay, "[::ffff:203.0.113.1]:40003", &[]), 429);
    // Another source over the same TCP peer has its own bucket and its own slot.
    let other = dial_from(
        &relay,
        "198.51.100.7:40000",
        "/v1/server",
        &binary_headers("p24c"),
    );
    assert_eq!(other.status(), Some(101));

    let c = relay.counters();
    assert_eq!(c.rejected(RejectReason::RateLimit), 2);
    assert_eq!(c.rejected(RejectReason::IpCap), 1);
    // The shards count an accept after the registry step (§12): poll.
    eventually("two binaries and one phone accepted", || {
        let c = relay.counters();
        c.upgrades(Endpoint::Server, UpgradeOutcome::Accept) == 2
            && c.upgrades(Endpoint::Client, UpgradeOutcome::Accept) == 1
    });
}

fn read_upgrade(s: std::net::TcpStream) -> Ws {
    use std::io::Read;
    let mut s = s;
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no 101: {other:?} after {head:?}"),
        }
    }
    let resp = Http::parse(&head).expect("response head");
    assert_eq!(resp.status, 101, "{resp:?}");
    Ws::client(s)
}

/// Sends `bytes`, optionally ends its sending side, and reads until the relay closes.
fn silent_close(relay: &Running, what: &str, bytes: &[u8], end_input: bool) {
    let mut s = Tcp::default().connect(relay.addr).expect("connect");
    // The relay may close before reading it all; that is fine.
    let _ = s.write_all(bytes);
    if end_input {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut out = Vec::new();
    let read = std::io::Read::read_to_end(&mut s, &mut out);
    if let Err(e) = &read {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{what}: still open"
        );
    }
    assert!(out.is_empty(), "{what}: wrote {out:?}");
}

/// No header, a v1 header, LOCAL, UNSPEC, UNIX, UDP and malformed headers: the TCP connection
/// is closed with zero bytes written, and nothing is counted.
pub fn item_24_refused_headers_close_silently<R: RelayUnderTest>() {
    let relay = R::start_proxied(test_config());
    let before = relay.counters();
    let v4 = addresses("203.0.113.1:40000".parse().unwrap());
    let v6 = addresses("[2001:db8::7]:40000".parse().unwrap());
    let mut bad_signature = header("203.0.113.1:40000");
    bad_signature[7] = b'q';
    let mut too_long = header("203.0.113.1:40000");
    too_long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut too_short = header("203.0.113.1:40000");
    too_short[14..16].copy_from_slice(&11u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no header", vec![]),
        (
            "v1",
            b"PROXY TCP4 203.0.113.1 10.0.0.1 40000 8080\r\n".to_vec(),
        ),
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec()),
        ("LOCAL", v2(0x20, 0x11, &v4)),
        ("LOCAL UNSPEC", v2(0x20, 0x00, &[])),
        ("UNSPEC", v2(0x21, 0x00, &[])),
        ("UNIX", v2(0x21, 0x31, &[0; 216])),
        ("UDP over IPv4", v2(0x21, 0x12, &v4)),
        ("UDP over IPv6", v2(0x21, 0x22, &v6)),
        ("version 1 in binary form", v2(0x11, 0x11, &v4)),
        ("bad signature", bad_signature),
        ("length overflow", too_long),
        ("length below the addresses", too_short),
        (
            "TLV past the end",
            v2(0x21, 0x11, &then(v4.clone(), &[0x04, 0, 9, 1])),
        ),
        (
            "TLS in place of a header",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        ),
    ];
    for (what, prefix) in &cases {
        silent_close(&relay, what, &then(prefix.clone(), healthz()), false);
    }
    // A header cut short by the end of the input.
    let valid = header("203.0.113.1:40000");
    for cut in [1, 12, 16, valid.len() - 1] {
        silent_close(&relay, &format!("truncated at {cut}"), &valid[..cut], true);
    }
    assert_eq!(relay.counters(), before, "stage-0 refusals count nothing");
    // The relay is unharmed, and the same request behind a valid header is answered.
    let ok = Http::parse(&raw(relay.addr, &then(valid, healthz()))).expect("response");
    assert_eq!(ok.status, 200);
}

/// The PROXY header and the request head share one header timeout counted from the accept
/// (stage 0): a header that never comes, or a head that comes too late after a slow header, is
/// closed with zero bytes written.
pub fn item_24_header_and_head_share_one_deadline<R: RelayUnderTest>() {
    let timeout = ms(1000);
    let relay = R::start_proxied(Config {
        header_timeout: timeout,
        ..test_config()
    });
    let t = Instant::now();
    silent_close(&relay, "nothing sent", b"", false);
    assert!(
        t.elapsed() >= timeout - ms(50),
        "closed early: {:?}",
        t.elapsed()
    );
    silent_close(
        &relay,
        "half a header",
        &header("203.0.113.1:1")[..10],
        false,
    );

    let slow = |header_after: Duration, head_after: Duration| {
        let mut s = Tcp::default().connect(relay.addr).expect("connect");
        thread::sleep(header_after);
        let _ = s.write_all(&header("203.0.113.1:1"));
        thread::sleep(head_after);
        let _ = s.write_all(healthz());
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut out);
        out
    };
    // Header at 300 ms, head at once: in time.
    let answered = slow(ms(300), Duration::ZERO);
    assert_eq!(Http::parse(&answered).map(|h| h.status), Some(200));
    // Header at 600 ms, head at 1200 ms: past the deadline from the accept, though within a
    // fresh timeout from the end of the header.
    assert!(
        slow(ms(600), ms(600)).is_empty(),
        "the head got its own timeout"
    );
}

/// With `--trust-forwarded-for`, a valid `X-Forwarded-For` wins over the PROXY source; an
/// invalid one falls back to the PROXY source, never to the TCP peer.
pub fn item_24_forwarded_for_over_proxy_source<R: RelayUnderTest>() {
    let relay = R::start_proxied(Config {
        rate_burst: 1,
        trust_forwarded_for: true,
        ..test_config()
    });
    let xff = |v: &str| vec![("X-Forwarded-For".to_owned(), v.to_owned())];
    assert_eq!(
        attempt_from(&relay, "203.0.113.1:1", &xff("192.0.2.1")),
        400
    );
    // Same forwarded address behind another PROXY source: the forwarded bucket, now empty.
    assert_eq!(
        attempt_from(&relay, "203.0.113.2:1", &xff("192.0.2.1")),
        429
    );
    // Not an address: the PROXY source's bucket, full, then empty.
    assert_eq!(attempt_from(&relay, "203.0.113.1:2", &xff("unknown")), 400);
    assert_eq!(attempt_from(&relay, "203.0.113.1:3", &xff("unknown")), 429);
    // Another PROXY source over the same TCP peer: a bucket of its own.
    assert_eq!(attempt_from(&relay, "203.0.113.3:1", &xff("unknown")), 400);
    assert_eq!(relay.counters().rejected(RejectReason::RateLimit), 2);
}

/// `/healthz` answers through PROXY; the metrics listener takes plain HTTP and does not strip a
/// PROXY header (a headered request there is not HTTP: closed, zero bytes).
pub fn item_24_healthz_through_proxy_metrics_without<R: RelayUnderTest>() {
    let relay = R::start_proxied(test_config());
    let h = Http::parse(&raw(
        relay.addr,
        &then(header("[2001:db8::9]:5"), healthz()),
    ))
    .expect("response");
    assert_eq!(h.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&h.body).expect("JSON");
    assert_eq!(json["status"], "ok");
    silent_close(&relay, "plain /healthz", healthz(), false);

    assert_eq!(get(relay.metrics_addr, "/metrics").status, 200);
    let headered = then(
        header("203.0.113.1:1"),
        b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n",
    );
    let bytes = raw(relay.metrics_addr, &headered);
    assert!(
        bytes.is_empty(),
        "metrics answered a PROXY header: {bytes:?}"
    );
}
