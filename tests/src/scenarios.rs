//! The scenarios, one function per checklist item of PROTOCOL.md §18 (named `item_N_…`), each
//! generic over the runtime under test.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use switchyard_core::{
    Config, Counters, Direction, DropReason, Endpoint, RegisterFailure, RejectReason,
    UpgradeOutcome,
};

use crate::client::{
    Dialed, Http, Msg, Tcp, WAIT, Ws, binary, binary_headers, dial, dial_raw, eventually, get,
    headers, http, phone, phone_headers, raw, raw_with, upgrade_request,
};
use crate::{RelayUnderTest, Running, test_config};

// ---- helpers ------------------------------------------------------------------------------

fn start<R: RelayUnderTest>(tweak: impl FnOnce(&mut Config)) -> Running {
    let mut config = test_config();
    tweak(&mut config);
    R::start(config)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `/healthz` as JSON.
fn health(addr: SocketAddr) -> serde_json::Value {
    let h = get(addr, "/healthz");
    serde_json::from_slice(&h.body).expect("healthz JSON")
}

fn conn_id(envelope: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(envelope).expect("envelope JSON");
    v["conn_id"].as_str().expect("conn_id").to_owned()
}

fn envelope(id: &str, frame: &str) -> String {
    format!(r#"{{"conn_id":"{id}","frame":{frame}}}"#)
}

fn notice(id: &str, code: u16) -> String {
    format!(r#"{{"conn_id":"{id}","close_code":{code}}}"#)
}

/// A phone of `sid` that has made itself known to `binary`: returns it with its conn id.
fn known_phone(addr: SocketAddr, sid: &str, binary: &mut Ws) -> (Ws, String) {
    let mut p = phone(addr, sid);
    p.send(r#"{"hello":true}"#);
    let env = binary.text();
    let id = conn_id(&env);
    assert_eq!(env, envelope(&id, r#"{"hello":true}"#));
    (p, id)
}

/// A binary of `sid` and one phone it knows.
fn pair(addr: SocketAddr, sid: &str) -> (Ws, Ws, String) {
    let mut b = binary(addr, sid);
    let (p, id) = known_phone(addr, sid, &mut b);
    (b, p, id)
}

fn counted(relay: &Running, what: &str, check: impl Fn(&Counters) -> bool) {
    eventually(what, || check(&relay.counters()));
}

/// Memory of a limit is bounded: once the rejected or closed connections are gone, the relay
/// holds exactly `open` TCP connections and no half-read head.
fn settles_at(relay: &Running, open: u64) {
    eventually(&format!("{open} open connections, no pending head"), || {
        let c = relay.counters();
        c.open_connections == open && c.pending_heads == 0
    });
}

/// A request with exactly these header lines.
fn request(method: &str, path: &str, version: &str, lines: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("{method} {path} {version}\r\n");
    for (n, v) in lines {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// The WebSocket handshake header lines.
fn handshake() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Host", "relay"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", crate::client::KEY),
    ]
}

fn with(
    base: Vec<(&'static str, &'static str)>,
    more: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut v = base;
    v.extend_from_slice(more);
    v
}

const BINARY: [(&str, &str); 3] = [
    ("X-Pyrycode-Server", "sid"),
    ("X-Pyrycode-Version", "1.0"),
    ("User-Agent", "ua"),
];

const PHONE: [(&str, &str); 3] = [
    ("x-pyrycode-server", "sid"),
    ("x-pyrycode-token", "t"),
    ("user-agent", "ua"),
];

/// A rejection's status and body.
fn status_body(h: &Http) -> (u16, &str) {
    (h.status, h.body_text())
}

/// The close a phone of an unclaimed or reclaimed id gets.
const NO_SERVER: (u16, &str) = (4404, "no server with that id");
const RECLAIMED: (u16, &str) = (4404, "binary reclaimed server-id");

fn owned(c: (u16, &str)) -> (u16, String) {
    (c.0, c.1.to_owned())
}

// ---- routes and admission -----------------------------------------------------------------

pub fn item_1_healthz_get_and_post<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    for method in ["GET", "POST"] {
        let h = http(
            relay.addr,
            format!("{method} /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(h.status, 200, "{method}");
        assert_eq!(
            h.header("Content-Type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(h.header("Cache-Control"), Some("no-store"));
        assert_eq!(h.header("Connection"), Some("close"));
        let body = h.body_text();
        let prefix = format!(
            r#"{{"status":"ok","version":"{}","connected_binaries":0,"connected_phones":0,"uptime_seconds":"#,
            Config::default().version
        );
        let rest = body
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("body {body}"));
        let uptime = rest.strip_suffix('}').expect("ends with }");
        assert!(uptime.parse::<u64>().is_ok(), "uptime {uptime}");
        assert_eq!(
            h.header("Content-Length"),
            Some(body.len().to_string().as_str())
        );
    }
}

pub fn item_2_healthz_counts_binaries_and_phones<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i2");
    eventually("1 binary, 1 phone", || {
        let h = health(relay.addr);
        h["connected_binaries"] == 1 && h["connected_phones"] == 1
    });
    b.close(Some(1000));
    eventually("binary in grace not counted, phone still counted", || {
        let h = health(relay.addr);
        h["connected_binaries"] == 0 && h["connected_phones"] == 1
    });
    p.silent(ms(100));
}

pub fn item_3_unknown_paths_404<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    for path in ["/nope", "/v1/server/", "/metrics", "/", "/healthz/"] {
        let h = get(relay.addr, path);
        assert_eq!(status_body(&h), (404, "404 page not found\n"), "{path}");
        assert_eq!(h.header("Content-Type"), Some("text/plain; charset=utf-8"));
        assert_eq!(h.header("X-Content-Type-Options"), Some("nosniff"));
    }
    // The metrics listener: only /metrics.
    for path in ["/nope", "/healthz", "/metrics/"] {
        let h = get(relay.metrics_addr, path);
        assert_eq!(
            status_body(&h),
            (404, "404 page not found\n"),
            "metrics {path}"
        );
        assert_eq!(h.header("X-Content-Type-Options"), Some("nosniff"));
    }
    let m = get(relay.metrics_addr, "/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(
        m.header("Content-Type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(m.body_text().ends_with("# EOF\n"));
}

pub fn item_5_host_check<R: RelayUnderTest>() {
    let relay = start::<R>(|c| c.domains = vec!["d.example".to_owned()]);
    let host = |h: &'static str| -> Vec<(&'static str, &'static str)> {
        handshake()
            .into_iter()
            .map(|(n, v)| if n == "Host" { (n, h) } else { (n, v) })
            .chain(BINARY)
            .collect()
    };
    for path in ["/healthz", "/nope", "/v1/server", "/v1/client"] {
        let h = http(relay.addr, &request("GET", path, "HTTP/1.1", &host("x")));
        assert_eq!(status_body(&h), (421, ""), "{path}");
        assert_eq!(h.header("Content-Length"), Some("0"));
    }
    let no_host: Vec<_> = host("x")
        .into_iter()
        .filter(|(n, _)| *n != "Host")
        .collect();
    let h = http(
        relay.addr,
        &request("GET", "/healthz", "HTTP/1.1", &no_host),
    );
    assert_eq!(h.status, 421);
    let ok = http(
        relay.addr,
        &request("GET", "/healthz", "HTTP/1.1", &host("D.EXAMPLE:443")),
    );
    assert_eq!(ok.status, 200);
    let ws = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &host("d.example")),
    );
    assert_eq!(ws.status(), Some(101));
}

pub fn item_8_forwarded_for_only_when_trusted<R: RelayUnderTest>() {
    let attempt = |relay: &Running, xff: &'static str| {
        let lines = with(handshake(), &[("X-Forwarded-For", xff)]);
        let bytes = raw(
            relay.addr,
            &request("GET", "/v1/server", "HTTP/1.1", &lines),
        );
        Http::parse(&bytes).expect("response").status
    };
    let trusting = start::<R>(|c| {
        c.rate_burst = 1;
        c.trust_forwarded_for = true;
    });
    assert_eq!(attempt(&trusting, "192.0.2.1, 198.51.100.7"), 400);
    assert_eq!(attempt(&trusting, "192.0.2.1"), 429);
    assert_eq!(attempt(&trusting, " 192.0.2.2 "), 400);
    let plain = start::<R>(|c| c.rate_burst = 1);
    assert_eq!(attempt(&plain, "192.0.2.1"), 400);
    assert_eq!(attempt(&plain, "192.0.2.2"), 429);
}

/// An upgrade attempt that reaches stage 2 (and takes a token) and fails at stage 6.
fn headerless_attempt(tcp: Tcp, addr: SocketAddr) -> u16 {
    let bytes = raw_with(tcp, addr, &upgrade_request("GET", "/v1/server", &[]));
    Http::parse(&bytes).expect("response").status
}

pub fn item_6_rate_limit_21st_attempt<R: RelayUnderTest>() {
    let relay = start::<R>(|c| {
        c.rate_burst = 20;
        c.rate_refill = Duration::from_secs(6);
    });
    for i in 0..20 {
        assert_eq!(
            headerless_attempt(Tcp::default(), relay.addr),
            400,
            "attempt {i}"
        );
    }
    let h = dial(relay.addr, "/v1/client", &phone_headers("i6")).rejected();
    assert_eq!(status_body(&h), (429, "\n"));
    assert_eq!(get(relay.addr, "/healthz").status, 200);
    // Another address has its own bucket.
    let other = dial_raw(
        Tcp::from([127, 0, 0, 2]),
        relay.addr,
        &upgrade_request("GET", "/v1/server", &binary_headers("i6")),
    );
    assert_eq!(other.status(), Some(101));
    let c = relay.counters();
    assert_eq!(c.rejected(RejectReason::RateLimit), 1);
    assert_eq!(
        c.upgrades(Endpoint::Client, UpgradeOutcome::RejectRateLimit),
        1
    );
    // Rejected attempts hold nothing once answered: only the other address's binary is left.
    settles_at(&relay, 1);
    drop(other);
    settles_at(&relay, 0);
}

pub fn item_7_refill_admits_again<R: RelayUnderTest>() {
    let refill = ms(300);
    let relay = start::<R>(|c| {
        c.rate_burst = 2;
        c.rate_refill = refill;
    });
    assert_eq!(headerless_attempt(Tcp::default(), relay.addr), 400);
    assert_eq!(headerless_attempt(Tcp::default(), relay.addr), 400);
    assert_eq!(headerless_attempt(Tcp::default(), relay.addr), 429);
    thread::sleep(refill + ms(50));
    let b = dial(relay.addr, "/v1/server", &binary_headers("i7"));
    assert_eq!(b.status(), Some(101));
    assert_eq!(headerless_attempt(Tcp::default(), relay.addr), 429);
}

pub fn item_9_per_ip_cap<R: RelayUnderTest>() {
    let relay = start::<R>(|c| c.max_connections_per_ip = 2);
    let mut first = binary(relay.addr, "i9a");
    let _second = binary(relay.addr, "i9b");
    let h = dial(relay.addr, "/v1/server", &binary_headers("i9c")).rejected();
    assert_eq!(status_body(&h), (503, "\n"));
    let p = dial(relay.addr, "/v1/client", &phone_headers("i9a")).rejected();
    assert_eq!(p.status, 503);
    // Another address is not affected.
    let other = dial_raw(
        Tcp::from([127, 0, 0, 2]),
        relay.addr,
        &upgrade_request("GET", "/v1/server", &binary_headers("i9c")),
    );
    assert_eq!(other.status(), Some(101));
    assert_eq!(relay.counters().rejected(RejectReason::IpCap), 2);
    // The rejected dials hold nothing: three WebSockets, nothing else.
    settles_at(&relay, 3);
    // A closed connection frees its slot.
    first.close(Some(1000));
    first.wait_gone();
    eventually("slot released", || {
        dial(relay.addr, "/v1/server", &binary_headers("i9d")).status() == Some(101)
    });
}

pub fn item_10_global_cap<R: RelayUnderTest>() {
    let relay = start::<R>(|c| {
        c.max_connections = 1;
        c.grace = Duration::ZERO;
    });
    let mut b = binary(relay.addr, "i10");
    let s = dial(relay.addr, "/v1/server", &binary_headers("i10x")).rejected();
    assert_eq!(status_body(&s), (503, "\n"));
    let p = dial(relay.addr, "/v1/client", &phone_headers("i10")).rejected();
    assert_eq!(status_body(&p), (503, "\n"));
    assert_eq!(get(relay.addr, "/healthz").status, 200);
    assert_eq!(relay.counters().rejected(RejectReason::GlobalCap), 2);
    settles_at(&relay, 1);
    b.close(Some(1000));
    b.wait_gone();
    // No binary: a phone gets 4404, and its end frees the slot for the next dial.
    for _ in 0..2 {
        let mut p = loop {
            match dial(relay.addr, "/v1/client", &phone_headers("i10")) {
                Dialed::Upgraded(ws, _) => break *ws,
                Dialed::Rejected(h) if h.status == 503 => thread::sleep(ms(10)),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(p.expect_close(), owned(NO_SERVER));
        p.wait_gone();
    }
}

/// A `/healthz` request of exactly `len` bytes.
fn padded_head(len: usize) -> Vec<u8> {
    let start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    let end = b"\r\n\r\n";
    let mut v = start.to_vec();
    v.resize(len - end.len(), b'a');
    v.extend_from_slice(end);
    assert_eq!(v.len(), len);
    v
}

pub fn item_11_head_size_limit<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let ok = http(relay.addr, &padded_head(16384));
    assert_eq!(ok.status, 200);
    let big = http(relay.addr, &padded_head(16385));
    assert_eq!(
        status_body(&big),
        (431, "431 Request Header Fields Too Large")
    );
    settles_at(&relay, 0);
}

pub fn item_12_oversized_head_with_empty_bucket<R: RelayUnderTest>() {
    let relay = start::<R>(|c| c.rate_burst = 1);
    assert_eq!(headerless_attempt(Tcp::default(), relay.addr), 400);
    let mut big = upgrade_request("GET", "/v1/server", &binary_headers("i12"));
    big.truncate(big.len() - 2);
    big.extend_from_slice(format!("X-Pad: {}\r\n\r\n", "p".repeat(17_000)).as_bytes());
    let h = http(relay.addr, &big);
    assert_eq!(status_body(&h), (429, "\n"));
    // /healthz is never rate-limited.
    assert_eq!(get(relay.addr, "/healthz").status, 200);
}

pub fn item_13_head_timeout_closes_silently<R: RelayUnderTest>() {
    let timeout = ms(300);
    let relay = start::<R>(|c| c.header_timeout = timeout);
    let t = Instant::now();
    let bytes = raw(relay.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    assert!(bytes.is_empty(), "wrote {bytes:?}");
    assert!(
        t.elapsed() >= timeout - ms(50),
        "closed early: {:?}",
        t.elapsed()
    );
    let bytes = raw(relay.addr, b"");
    assert!(bytes.is_empty());
    settles_at(&relay, 0);
}

/// Soft limit on open files of this process (`/proc/self/limits`); `None` if unknown.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(3)? {
        "unlimited" => Some(usize::MAX),
        n => n.parse().ok(),
    }
}

/// Slowloris: thousands of connections each send part of a head and stall. A new binary and
/// phone are admitted and exchange frames while every one of them is still held; at the header
/// timeout each is closed with zero bytes written, and the relay holds nothing of them.
pub fn item_13_slowloris_does_not_stop_new_clients<R: RelayUnderTest>() {
    // Both ends of each connection live in this process: two descriptors apiece, and a margin
    // for the scenario running in parallel. 2,000 where the limit allows (CI's does).
    let stalled_count = open_files_limit()
        .map_or(2000, |n| n.saturating_sub(600) / 2)
        .min(2000);
    assert!(
        stalled_count >= 500,
        "raise the open-files limit (ulimit -n) to at least 1600 for this scenario"
    );
    let timeout = Duration::from_secs(3);
    let relay = start::<R>(|c| c.header_timeout = timeout);
    let partial = b"GET /v1/client HTTP/1.1\r\nHost: relay\r\nx-pyrycode-server: i13\r\nX-Pad: aa";
    let t = Instant::now();
    let mut stalled = Vec::with_capacity(stalled_count);
    for i in 0..stalled_count {
        // Eight source addresses: per-address caps do not count connections that have not
        // sent a head, so spreading them changes nothing for the relay, only the port space.
        let mut s = Tcp::from([127, 0, 0, 10 + (i % 8) as u8])
            .connect(relay.addr)
            .expect("connect a stalled client");
        // Some send nothing at all, the rest part of a head.
        if i % 4 != 0 {
            s.write_all(&partial[..partial.len() * (i % 4) / 4])
                .expect("partial head");
        }
        stalled.push(s);
        // Keep within the listen backlog: a full one drops SYNs, which are retried a second
        // later, and opening would outlast the header timeout.
        if i % 64 == 63 {
            counted(&relay, "stalled heads accepted", |c| {
                c.pending_heads + 64 > i as u64
            });
        }
    }
    let opened = t.elapsed();
    assert!(
        opened < timeout / 2,
        "opening {stalled_count} connections took {opened:?}; the relay or the machine is too slow"
    );
    counted(&relay, "every stalled head pending", |c| {
        c.pending_heads == stalled_count as u64
    });
    // A new pair is served while all of them are held.
    let (mut b, mut p, id) = pair(relay.addr, "i13");
    b.send(&envelope(&id, "[13]"));
    assert_eq!(p.text(), "[13]");
    let c = relay.counters();
    assert_eq!(
        (c.pending_heads, c.open_connections),
        (stalled_count as u64, stalled_count as u64 + 2),
        "the pair was served while every stalled head was still held"
    );
    assert!(
        t.elapsed() < timeout,
        "the pair was not served within the header timeout"
    );
    // At the header timeout, each is closed having been written nothing.
    for (i, s) in stalled.iter_mut().enumerate() {
        s.set_read_timeout(Some(timeout + WAIT))
            .expect("read timeout");
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("stalled connection {i} was written {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("stalled connection {i} not closed: {e}"),
        }
        if i == 0 {
            assert!(
                t.elapsed() >= timeout - ms(50),
                "closed early: {:?}",
                t.elapsed()
            );
        }
    }
    drop(stalled);
    settles_at(&relay, 2);
    assert_eq!(c.connections_rejected.iter().sum::<u64>(), 0);
    // The pair is still served.
    p.send("[14]");
    assert_eq!(b.text(), envelope(&id, "[14]"));
}

pub fn item_14_binary_required_headers<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    for skip in 0..3 {
        for empty in [false, true] {
            let lines: Vec<(&str, &str)> = BINARY
                .iter()
                .enumerate()
                .filter_map(|(i, &(n, v))| match (i == skip, empty) {
                    (false, _) => Some((n, v)),
                    (true, true) => Some((n, "")),
                    (true, false) => None,
                })
                .collect();
            let req = request("GET", "/v1/server", "HTTP/1.1", &with(handshake(), &lines));
            let h = dial_raw(Tcp::default(), relay.addr, &req).rejected();
            assert_eq!(status_body(&h), (400, "\n"), "header {skip} empty {empty}");
        }
    }
    let c = relay.counters();
    assert_eq!(c.connected_binaries, 0);
    assert_eq!(
        c.upgrades(Endpoint::Server, UpgradeOutcome::RejectHeaders),
        6
    );
    assert_eq!(c.upgrades(Endpoint::Server, UpgradeOutcome::Accept), 0);
}

pub fn item_15_phone_required_headers<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    for skip in 0..3 {
        let lines: Vec<(&str, &str)> = PHONE
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, &l)| l)
            .collect();
        let req = request("GET", "/v1/client", "HTTP/1.1", &with(handshake(), &lines));
        let h = dial_raw(Tcp::default(), relay.addr, &req).rejected();
        assert_eq!(status_body(&h), (400, "\n"), "without header {skip}");
    }
    // No device name is fine.
    let req = request("GET", "/v1/client", "HTTP/1.1", &with(handshake(), &PHONE));
    assert_eq!(
        dial_raw(Tcp::default(), relay.addr, &req).status(),
        Some(101)
    );
}

pub fn item_16_v2_aliases<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let no_token = [("x-pyrycode-server", "i16"), ("user-agent", "ua")];
    let req = request(
        "GET",
        "/v2/client",
        "HTTP/1.1",
        &with(handshake(), &no_token),
    );
    let mut early = dial_raw(Tcp::default(), relay.addr, &req).ws();
    assert_eq!(early.expect_close(), owned(NO_SERVER));
    // /v2/server claims like /v1/server; phones on either path reach it.
    let mut b = dial(relay.addr, "/v2/server", &binary_headers("i16")).ws();
    let (_p1, _) = known_phone(relay.addr, "i16", &mut b);
    let mut p2 = dial_raw(Tcp::default(), relay.addr, &req).ws();
    p2.send("[2]");
    let env = b.text();
    assert_eq!(env, envelope(&conn_id(&env), "[2]"));
    let c = relay.counters();
    assert_eq!(c.upgrades(Endpoint::Server, UpgradeOutcome::Accept), 1);
    assert_eq!(c.upgrades(Endpoint::Client, UpgradeOutcome::Accept), 2);
}

pub fn item_17_repeated_server_header<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let lines = with(
        handshake(),
        &with(BINARY.to_vec(), &[("X-Pyrycode-Server", "sid")]),
    );
    let h = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &lines),
    );
    assert_eq!(status_body(&h.rejected()), (400, "\n"));
    let lines = with(
        handshake(),
        &with(PHONE.to_vec(), &[("X-Pyrycode-Server", "sid")]),
    );
    let h = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/client", "HTTP/1.1", &lines),
    );
    assert_eq!(h.rejected().status, 400);
}

/// A binary's upgrade request with a raw server-id value.
fn binary_request_with_sid(sid: &[u8]) -> Vec<u8> {
    let template = request(
        "GET",
        "/v1/server",
        "HTTP/1.1",
        &with(
            handshake(),
            &[
                ("X-Pyrycode-Server", "@SID@"),
                ("X-Pyrycode-Version", "1"),
                ("User-Agent", "ua"),
            ],
        ),
    );
    let at = template
        .windows(5)
        .position(|w| w == b"@SID@")
        .expect("placeholder");
    let mut out = template[..at].to_vec();
    out.extend_from_slice(sid);
    out.extend_from_slice(&template[at + 5..]);
    out
}

pub fn item_18_server_id_syntax<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let dial_sid = |sid: &[u8]| dial_raw(Tcp::default(), relay.addr, &binary_request_with_sid(sid));
    let longest = vec![b'x'; 128];
    assert_eq!(dial_sid(&longest).status(), Some(101));
    let longest_text = String::from_utf8(longest).expect("ascii");
    let _p = phone(relay.addr, &longest_text);
    for bad in [&[b'y'; 129][..], b"a b", b"a\tb", b"a\x80b", b"\xc3\xa9"] {
        let h = dial_sid(bad).rejected();
        assert_eq!(status_body(&h), (400, "\n"), "{bad:?}");
    }
    // Any other control byte makes the head invalid HTTP: closed, zero bytes.
    for ctl in [b"a\x01b", b"a\x7fb"] {
        assert!(matches!(dial_sid(ctl), Dialed::Nothing), "{ctl:?}");
    }
}

pub fn item_19_lower_case_header_names<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let lower = [
        ("host", "relay"),
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", crate::client::KEY),
        ("x-pyrycode-server", "i19"),
        ("x-pyrycode-version", "1"),
        ("user-agent", "ua"),
    ];
    let mut b = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &lower),
    )
    .ws();
    let upper = [
        ("X-PYRYCODE-SERVER", "i19"),
        ("X-PYRYCODE-TOKEN", "t"),
        ("USER-AGENT", "ua"),
    ];
    let mut p = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/client", "HTTP/1.1", &with(handshake(), &upper)),
    )
    .ws();
    p.send("1");
    let env = b.text();
    assert_eq!(env, envelope(&conn_id(&env), "1"));
}

pub fn item_20_post_upgrade<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let all = request(
        "POST",
        "/v1/server",
        "HTTP/1.1",
        &with(handshake(), &BINARY),
    );
    let h = dial_raw(Tcp::default(), relay.addr, &all).rejected();
    assert_eq!(status_body(&h), (405, "method not allowed\n"));
    let none = request("POST", "/v1/server", "HTTP/1.1", &handshake());
    let h = dial_raw(Tcp::default(), relay.addr, &none).rejected();
    assert_eq!(status_body(&h), (400, "\n"));
}

pub fn item_21_upgrade_required<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let no_connection: Vec<_> = handshake()
        .into_iter()
        .filter(|(n, _)| *n != "Connection")
        .chain(BINARY)
        .collect();
    let h = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &no_connection),
    )
    .rejected();
    assert_eq!(status_body(&h), (426, "upgrade required\n"));
    assert_eq!(h.header("Upgrade"), Some("websocket"));
    let old = request("GET", "/v1/server", "HTTP/1.0", &with(handshake(), &BINARY));
    let h = dial_raw(Tcp::default(), relay.addr, &old).rejected();
    assert_eq!(h.status, 426);
    assert_eq!(h.header("Upgrade"), Some("websocket"));
}

pub fn item_22_websocket_version_and_key<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let v8: Vec<_> = handshake()
        .into_iter()
        .map(|(n, v)| {
            if n == "Sec-WebSocket-Version" {
                (n, "8")
            } else {
                (n, v)
            }
        })
        .chain(BINARY)
        .collect();
    let h = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &v8),
    )
    .rejected();
    assert_eq!(status_body(&h), (400, "unsupported websocket version\n"));
    assert_eq!(h.header("Sec-WebSocket-Version"), Some("13"));
    let short_key: Vec<_> = handshake()
        .into_iter()
        .map(|(n, v)| {
            if n == "Sec-WebSocket-Key" {
                (n, "AAAAAAAAAAAAAAAAAAAA") // 15 bytes
            } else {
                (n, v)
            }
        })
        .chain(BINARY)
        .collect();
    let h = dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &short_key),
    )
    .rejected();
    assert_eq!(status_body(&h), (400, "invalid websocket key\n"));
}

pub fn item_23_no_extensions_any_origin<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let extra = [
        (
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        ),
        ("Origin", "https://elsewhere.example"),
    ];
    let lines = with(with(handshake(), &BINARY), &extra);
    match dial_raw(
        Tcp::default(),
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &lines),
    ) {
        Dialed::Upgraded(_, h) => {
            assert_eq!(h.header("Sec-WebSocket-Extensions"), None);
            assert_eq!(h.header("Sec-WebSocket-Protocol"), None);
            assert_eq!(h.header("Upgrade"), Some("websocket"));
            assert!(h.header("Sec-WebSocket-Accept").is_some());
        }
        other => panic!("expected 101, got {other:?}"),
    }
}

// ---- registry -----------------------------------------------------------------------------

pub fn item_25_conn_id_form_and_binary_silence<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let mut b = binary(relay.addr, "i25");
    b.silent(ms(150));
    let mut p = phone(relay.addr, "i25");
    b.silent(ms(100));
    p.send("{}");
    let id = conn_id(&b.text());
    let hex = id
        .strip_prefix("client-i25-")
        .unwrap_or_else(|| panic!("{id}"));
    assert_eq!(hex.len(), 16, "{id}");
    assert!(
        hex.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{id}"
    );
}

pub fn item_26_phone_for_unclaimed_id<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let mut p = phone(relay.addr, "i26");
    assert_eq!(p.expect_close(), owned(NO_SERVER));
    p.wait_gone();
    let c = relay.counters();
    assert_eq!(c.upgrades(Endpoint::Client, UpgradeOutcome::Reject404), 1);
    assert_eq!(c.register_failed(RegisterFailure::NoServer), 1);
}

pub fn item_27_phone_cap<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let _b = binary(relay.addr, "i27");
    let mut phones: Vec<Ws> = (0..16).map(|_| phone(relay.addr, "i27")).collect();
    counted(&relay, "16 phones", |c| c.connected_phones == 16);
    let mut extra = phone(relay.addr, "i27");
    assert_eq!(
        extra.expect_close(),
        (4429, "too many phones for server-id".to_owned())
    );
    let mut leaving = phones.pop().expect("a phone");
    leaving.close(Some(1000));
    counted(&relay, "one left", |c| c.connected_phones == 15);
    let mut again = phone(relay.addr, "i27");
    counted(&relay, "16 again", |c| c.connected_phones == 16);
    again.silent(ms(100));
    let c = relay.counters();
    assert_eq!(c.upgrades(Endpoint::Client, UpgradeOutcome::Reject429), 1);
    assert_eq!(c.register_failed(RegisterFailure::PhonesAtCap), 1);
}

pub fn item_28_conflict_with_live_incumbent<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i28");
    let mut claimant = binary(relay.addr, "i28");
    // The incumbent answers the probe ping (the client pongs while reading).
    match b.next(crate::client::WAIT) {
        Some(Msg::Ping(payload)) => assert!(payload.is_empty()),
        other => panic!("expected the probe ping, got {other:?}"),
    }
    let _ = b.next(ms(20));
    assert_eq!(
        claimant.expect_close(),
        (4409, "server-id already claimed".to_owned())
    );
    p.send("[28]");
    assert_eq!(b.text(), envelope(&id, "[28]"));
    b.send(&envelope(&id, r#""back""#));
    assert_eq!(p.text(), r#""back""#);
    let c = relay.counters();
    assert_eq!(c.upgrades(Endpoint::Server, UpgradeOutcome::Reject409), 1);
    assert_eq!(c.register_failed(RegisterFailure::ServerInUse), 1);
}

pub fn item_29_takeover_of_silent_incumbent<R: RelayUnderTest>() {
    let probe = ms(300);
    let relay = start::<R>(|c| c.probe_timeout = probe);
    let (mut b, mut p, _) = pair(relay.addr, "i29");
    let t = Instant::now();
    // The incumbent stops reading: it never answers the probe.
    let mut c = binary(relay.addr, "i29");
    assert_eq!(p.expect_close(), owned(RECLAIMED));
    assert!(
        t.elapsed() >= probe - ms(50),
        "takeover before the probe ended"
    );
    assert_eq!(b.expect_close(), (1011, "heartbeat timeout".to_owned()));
    assert!(t.elapsed() < Duration::from_secs(3));
    let (_p2, _) = known_phone(relay.addr, "i29", &mut c);
    // The takeover counts as accept, and the displaced binary's phones get no notice.
    c.silent(ms(100));
    assert_eq!(
        relay
            .counters()
            .upgrades(Endpoint::Server, UpgradeOutcome::Accept),
        2
    );
}

pub fn item_30_grace_keeps_phones<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i30");
    b.close(Some(1000));
    counted(&relay, "grace", |c| c.connected_binaries == 0);
    p.silent(ms(150));
    let mut late = phone(relay.addr, "i30");
    late.silent(ms(150));
    counted(&relay, "two phones", |c| c.connected_phones == 2);
}

pub fn item_31_phone_frame_during_grace<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i31");
    b.close(Some(1000));
    counted(&relay, "grace", |c| c.connected_binaries == 0);
    p.send("{}");
    assert_eq!(p.expect_close(), (1000, String::new()));
    counted(&relay, "no_binary drop", |c| {
        c.dropped(DropReason::NoBinary) == 1
    });
}

pub fn item_32_reclaim_during_grace<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p1, _) = pair(relay.addr, "i32");
    let (mut p2, _) = known_phone(relay.addr, "i32", &mut b);
    b.close(Some(1000));
    counted(&relay, "grace", |c| c.connected_binaries == 0);
    let mut b2 = binary(relay.addr, "i32");
    assert_eq!(p1.expect_close(), owned(RECLAIMED));
    assert_eq!(p2.expect_close(), owned(RECLAIMED));
    b2.silent(ms(200));
    let (_p3, _) = known_phone(relay.addr, "i32", &mut b2);
}

pub fn item_33_grace_expiry<R: RelayUnderTest>() {
    let grace = ms(300);
    let relay = start::<R>(|c| c.grace = grace);
    let (mut b, mut p, _) = pair(relay.addr, "i33");
    b.close(Some(1000));
    let t = Instant::now();
    assert_eq!(p.expect_close(), (1000, String::new()));
    assert!(t.elapsed() >= grace - ms(100));
    counted(&relay, "grace expiry", |c| c.grace_expiries == 1);
    let mut next = phone(relay.addr, "i33");
    assert_eq!(next.expect_close(), owned(NO_SERVER));
    let mut b2 = binary(relay.addr, "i33");
    let _ = known_phone(relay.addr, "i33", &mut b2);
    assert_eq!(relay.counters().grace_expiries, 1);
}

// ---- envelope and notices -----------------------------------------------------------------

pub fn item_34_envelope_byte_for_byte<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i34");
    p.send(r#"{"t":"hi"}"#);
    assert_eq!(
        b.text(),
        format!(r#"{{"conn_id":"{id}","frame":{{"t":"hi"}}}}"#)
    );
}

pub fn item_35_frame_bytes_unchanged<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i35");
    let frame = r#"{ "b" : "<&>" ,"a":1 }"#;
    p.send(frame);
    assert_eq!(b.text(), envelope(&id, frame));
    // And back: the raw bytes of `frame` reach the phone.
    b.send(&format!(r#"{{"conn_id":"{id}","frame":{frame}}}"#));
    assert_eq!(p.text(), frame);
}

pub fn item_36_trimmed_and_scalars<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i36");
    p.send(" \t\r\n{\"a\":[1, 2]}\n\t ");
    assert_eq!(b.text(), envelope(&id, "{\"a\":[1, 2]}"));
    for scalar in ["42", "\"x\"", "true", "null", "-1.5e3"] {
        p.send(scalar);
        assert_eq!(b.text(), envelope(&id, scalar));
    }
}

pub fn item_37_not_json<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i37");
    p.send(r#"{"ok":1}"#);
    p.send("nope");
    assert_eq!(p.expect_close(), (1007, "frame is not JSON".to_owned()));
    assert_eq!(b.text(), envelope(&id, r#"{"ok":1}"#));
    assert_eq!(b.text(), notice(&id, 1007));
    counted(&relay, "not_json", |c| c.dropped(DropReason::NotJson) == 1);
}

pub fn item_38_binary_opcode_and_text_out<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i38");
    p.send_binary(br#"{"bin":true}"#);
    assert_eq!(b.recv(), Msg::Text(envelope(&id, r#"{"bin":true}"#)));
    b.send_binary(envelope(&id, r#"{"back":1}"#).as_bytes());
    assert_eq!(p.recv(), Msg::Text(r#"{"back":1}"#.to_owned()));
}

pub fn item_39_delivery_to_one_phone<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p1, id1) = pair(relay.addr, "i39");
    let (mut p2, _id2) = known_phone(relay.addr, "i39", &mut b);
    b.send(&envelope(&id1, r#"{"to":1}"#));
    assert_eq!(p1.text(), r#"{"to":1}"#);
    p2.silent(ms(150));
}

pub fn item_40_unknown_conn_id<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i40");
    b.send(&envelope("client-i40-0000000000000000", "1"));
    b.send(&envelope(&id, "2"));
    assert_eq!(p.text(), "2");
    counted(&relay, "unknown_conn_id", |c| {
        c.dropped(DropReason::UnknownConnId) == 1
    });
    b.silent(ms(50));
}

pub fn item_41_malformed_envelopes<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i41");
    let bad = [
        "nope".to_owned(),
        "[1]".to_owned(),
        r#"{"frame":{}}"#.to_owned(),
        format!(r#"{{"conn_id":"{id}"}}"#),
        format!(r#"{{"conn_id":"{id}","frame":null}}"#),
        format!(r#"{{"conn_id":"{id}","conn_id":"{id}","frame":1}}"#),
        format!(r#"{{"CONN_ID":"{id}","frame":1}}"#),
    ];
    for m in &bad {
        b.send(m);
    }
    b.send(&envelope(&id, r#""ok""#));
    assert_eq!(p.text(), r#""ok""#);
    p.silent(ms(50));
    counted(&relay, "malformed", |c| {
        c.dropped(DropReason::Malformed) == bad.len() as u64
    });
}

pub fn item_42_invalid_close_codes<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i42");
    let codes = [
        "999",
        "1004",
        "1005",
        "1006",
        "1015",
        "5000",
        "4000.5",
        r#""4000""#,
    ];
    for code in codes {
        b.send(&format!(
            r#"{{"conn_id":"{id}","frame":{{"x":1}},"close_code":{code}}}"#
        ));
    }
    b.send(&envelope(&id, r#""still open""#));
    assert_eq!(p.text(), r#""still open""#);
    p.silent(ms(50));
    counted(&relay, "malformed", |c| {
        c.dropped(DropReason::Malformed) == codes.len() as u64
    });
}

pub fn item_43_close_code_zero<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i43");
    b.send(&format!(
        r#"{{"conn_id":"{id}","frame":{{"z":0}},"close_code":0}}"#
    ));
    assert_eq!(p.text(), r#"{"z":0}"#);
    p.silent(ms(150));
}

pub fn item_44_no_cross_server_id<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut a, _pa, _) = pair(relay.addr, "i44a");
    let (_b, mut pb, id_b) = pair(relay.addr, "i44b");
    a.send(&envelope(&id_b, r#""intruder""#));
    pb.silent(ms(150));
    counted(&relay, "unknown_conn_id", |c| {
        c.dropped(DropReason::UnknownConnId) == 1
    });
}

pub fn item_45_close_directive<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i45");
    b.send(&format!(
        r#"{{"conn_id":"{id}","frame":null,"close_code":4401}}"#
    ));
    assert_eq!(p.expect_close(), (4401, String::new()));
    p.wait_gone();
    b.silent(ms(150));
    counted(&relay, "phone gone", |c| c.connected_phones == 0);
}

pub fn item_46_directive_with_frame_in_order<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i46");
    b.send(&envelope(&id, r#"{"n":1}"#));
    b.send(&envelope(&id, r#"{"n":2}"#));
    b.send(&format!(
        r#"{{"conn_id":"{id}","frame":{{"n":3}},"close_code":4000}}"#
    ));
    b.send(&envelope(&id, r#"{"n":4}"#));
    assert_eq!(p.text(), r#"{"n":1}"#);
    assert_eq!(p.text(), r#"{"n":2}"#);
    assert_eq!(p.text(), r#"{"n":3}"#);
    assert_eq!(p.expect_close(), (4000, String::new()));
    b.silent(ms(100));
}

/// A JSON string message of exactly `len` bytes.
fn json_of_len(len: usize) -> String {
    format!("\"{}\"", "a".repeat(len - 2))
}

pub fn item_47_phone_message_limit<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i47");
    let (mut other_b, mut other_p, other_id) = pair(relay.addr, "i47-other");
    let max = Config::default().max_message_size;
    let fits = json_of_len(max);
    p.send(&fits);
    assert_eq!(b.text(), envelope(&id, &fits));
    p.send(&json_of_len(max + 1));
    assert_eq!(p.expect_close(), (1009, "message too big".to_owned()));
    assert_eq!(b.text(), notice(&id, 1009));
    // Another pair is unaffected, and the oversized phone is gone.
    other_p.send("[47]");
    assert_eq!(other_b.text(), envelope(&other_id, "[47]"));
    other_b.send(&envelope(&other_id, "[48]"));
    assert_eq!(other_p.text(), "[48]");
    p.wait_gone();
    settles_at(&relay, 3);
    counted(&relay, "oversized phone unregistered", |c| {
        c.connected_phones == 1
    });
}

pub fn item_48_binary_message_too_big<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i48");
    let (mut other_b, mut other_p, other_id) = pair(relay.addr, "i48-other");
    b.send(&json_of_len(Config::default().max_message_size + 1));
    assert_eq!(b.expect_close(), (1009, "message too big".to_owned()));
    counted(&relay, "grace", |c| {
        c.connected_binaries == 1 && c.connected_phones == 2
    });
    p.silent(ms(100));
    other_b.send(&envelope(&other_id, "[48]"));
    assert_eq!(other_p.text(), "[48]");
    other_p.send("[49]");
    assert_eq!(other_b.text(), envelope(&other_id, "[49]"));
}

pub fn item_49_phone_close_notice<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i49");
    assert_eq!(p.close(Some(1000)), Some((1000, String::new())));
    assert_eq!(b.text(), notice(&id, 1000));
    b.silent(ms(100));
}

pub fn item_50_notice_codes<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p1, id1) = pair(relay.addr, "i50");
    let (mut p2, id2) = known_phone(relay.addr, "i50", &mut b);
    let (p3, id3) = known_phone(relay.addr, "i50", &mut b);
    assert_eq!(p1.close(Some(4000)).map(|c| c.0), Some(4000));
    assert_eq!(b.text(), notice(&id1, 4000));
    assert_eq!(p2.close(None), None);
    assert_eq!(b.text(), notice(&id2, 1005));
    p3.reset();
    assert_eq!(b.text(), notice(&id3, 1001));
}

pub fn item_51_notice_after_last_frame<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i51");
    for i in 0..5 {
        p.send(&format!("[{i}]"));
    }
    p.send_close(Some(1000));
    for i in 0..5 {
        assert_eq!(b.text(), envelope(&id, &format!("[{i}]")));
    }
    assert_eq!(b.text(), notice(&id, 1000));
}

pub fn item_52_replaced_binary_gets_no_notice<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i52");
    b.close(Some(1000));
    b.wait_gone();
    let mut b2 = binary(relay.addr, "i52");
    assert_eq!(p.expect_close(), owned(RECLAIMED));
    b2.silent(ms(200));
}

// ---- liveness and backpressure ------------------------------------------------------------

pub fn item_53_heartbeat_timeout<R: RelayUnderTest>() {
    let relay = start::<R>(|c| {
        c.ping_interval = ms(200);
        c.pong_timeout = ms(300);
        c.close_timeout = Duration::from_secs(3);
    });
    let (mut b, mut p, _) = pair(relay.addr, "i53");
    // Neither reads (so neither pongs) until the relay has given up on both. (Reading any later
    // would make the client's pong hit a closed socket.)
    thread::sleep(ms(800));
    for (which, ws) in [&mut b, &mut p].into_iter().enumerate() {
        let mut pings = 0;
        loop {
            match ws.next(crate::client::WAIT) {
                Some(Msg::Ping(payload)) => {
                    assert!(payload.is_empty());
                    pings += 1;
                }
                Some(Msg::Close(c)) => {
                    assert_eq!(c, Some((1011, "heartbeat timeout".to_owned())));
                    break;
                }
                other => panic!("{which}: unexpected {other:?} after {pings} pings"),
            }
        }
        assert!(pings >= 1);
    }
    counted(&relay, "both gone", |c| {
        c.connected_binaries == 0 && c.connected_phones == 0
    });
}

pub fn item_54_pongs_keep_alive<R: RelayUnderTest>() {
    // Each client answers pings only while it reads, half of the time here: the pong deadline
    // leaves room for that and for a loaded machine, over a dozen ping periods.
    let relay = start::<R>(|c| {
        c.ping_interval = ms(100);
        c.pong_timeout = ms(600);
    });
    let (mut b, mut p, id) = pair(relay.addr, "i54");
    for _ in 0..12 {
        b.silent(ms(50));
        p.silent(ms(50));
    }
    p.send("[54]");
    assert_eq!(b.text(), envelope(&id, "[54]"));
    let c = relay.counters();
    assert_eq!((c.connected_binaries, c.connected_phones), (1, 1));
}

/// Reads (answering pings) on every client until the relay reports `n` quiet connections.
fn until_quiet(relay: &Running, n: usize, clients: &mut [&mut Ws]) {
    let deadline = Instant::now() + crate::client::WAIT;
    while relay.quiet_connections() != n {
        assert!(Instant::now() < deadline, "not {n} quiet connections");
        for c in clients.iter_mut() {
            c.silent(ms(20));
        }
    }
}

/// Quiet connections drop their codec (PERFORMANCE.md, idle memory); whatever arrives next,
/// from either side, wakes it with nothing lost.
pub fn quiet_connections_sleep_and_wake<R: RelayUnderTest>() {
    let relay = start::<R>(|c| {
        c.ping_interval = ms(100);
        c.pong_timeout = ms(3000);
    });
    let (mut b, mut p, id) = pair(relay.addr, "quiet");
    let (mut p2, id2) = known_phone(relay.addr, "quiet", &mut b);
    until_quiet(&relay, 3, &mut [&mut b, &mut p, &mut p2]);
    // A phone's frame wakes its reader, the envelope wakes the binary's writer.
    p.send("[1]");
    assert_eq!(b.text(), envelope(&id, "[1]"));
    b.send(&envelope(&id2, "[2]"));
    assert_eq!(p2.text(), "[2]");
    // Data keeps a connection awake until a whole heartbeat period passes without any.
    until_quiet(&relay, 3, &mut [&mut b, &mut p, &mut p2]);
    // A message in fragments, the first byte waking the codec.
    p.send_fragment(true, b"[3,", false);
    p.send_fragment(false, b"4]", true);
    assert_eq!(b.text(), envelope(&id, "[3,4]"));
    until_quiet(&relay, 3, &mut [&mut b, &mut p, &mut p2]);
    // A close frame, and an abrupt end, reach a sleeping connection.
    assert_eq!(p2.close(Some(4000)).map(|c| c.0), Some(4000));
    assert_eq!(b.text(), notice(&id2, 4000));
    until_quiet(&relay, 2, &mut [&mut b, &mut p]);
    p.reset();
    assert_eq!(b.text(), notice(&id, 1001));
    eventually(
        "no connection counted quiet after the last one ends",
        || {
            drop(b.recv_within(ms(10)));
            relay.quiet_connections() <= 1
        },
    );
    let c = relay.counters();
    assert_eq!((c.connected_binaries, c.connected_phones), (1, 0));
}

pub fn item_55_read_timeout<R: RelayUnderTest>() {
    let timeout = ms(300);
    let relay = start::<R>(|c| c.read_timeout = timeout);
    let (mut b, mut p, id) = pair(relay.addr, "i55");
    let (mut idle, idle_id) = known_phone(relay.addr, "i55", &mut b);
    let t = Instant::now();
    p.send_fragment(true, b"[1,", false);
    assert_eq!(p.expect_close(), (1008, "read timeout".to_owned()));
    assert!(t.elapsed() >= timeout - ms(50));
    assert_eq!(b.text(), notice(&id, 1008));
    // Idle time between messages is unbounded.
    thread::sleep(timeout + ms(200));
    idle.send("[2]");
    assert_eq!(b.text(), envelope(&idle_id, "[2]"));

    // The deadline is per message, not per byte: a message that keeps trickling in, a fragment
    // every sixth of the deadline, is closed all the same; the idle phone is served meanwhile.
    let mut trickler = phone(relay.addr, "i55");
    trickler.send("[3]");
    let trickler_id = conn_id(&b.text());
    let t = Instant::now();
    assert!(trickler.try_send_fragment(true, b"[", false));
    idle.send("[4]");
    assert_eq!(b.text(), envelope(&idle_id, "[4]"));
    let mut fragments = 1;
    let close = loop {
        if let Some(m) = trickler.recv_within(timeout / 6) {
            break m;
        }
        assert!(
            t.elapsed() < timeout * 10,
            "still open after {:?}",
            t.elapsed()
        );
        if trickler.try_send_fragment(false, b"1,", false) {
            fragments += 1;
        }
    };
    assert_eq!(close, Msg::Close(Some((1008, "read timeout".to_owned()))));
    assert!(
        t.elapsed() >= timeout - ms(50),
        "closed early: {:?}",
        t.elapsed()
    );
    assert!(
        fragments >= 3,
        "only {fragments} fragments before the close"
    );
    assert_eq!(b.text(), notice(&trickler_id, 1008));
    trickler.wait_gone();
    // Nothing of the unfinished messages is kept: the binary and the idle phone are left.
    settles_at(&relay, 2);
    counted(&relay, "two phones gone", |c| c.connected_phones == 1);
}

pub fn item_56_ping_answered<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (_b, mut p, _) = pair(relay.addr, "i56");
    p.send_message(tungstenite::Message::Ping(b"abc"[..].into()));
    loop {
        match p.next(crate::client::WAIT) {
            Some(Msg::Pong(payload)) => {
                assert_eq!(payload, b"abc");
                break;
            }
            Some(Msg::Ping(_)) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

/// A phone or binary whose socket has a tiny receive buffer, for a peer that stops reading.
fn stalled(addr: SocketAddr, path: &str, headers: &[(String, String)]) -> Ws {
    let tcp = Tcp {
        recv_buffer: Some(4096),
        ..Tcp::default()
    };
    dial_raw(tcp, addr, &upgrade_request("GET", path, headers)).ws()
}

pub fn item_57_phone_stops_reading<R: RelayUnderTest>() {
    let budget = 256 * 1024;
    let relay = start::<R>(|c| {
        c.phone_outbox_bytes = budget;
        // Longer than the flood takes: the outbox overflows before any write times out, so the
        // close is §10.1's, not §9's.
        c.write_timeout = Duration::from_secs(20);
        c.close_timeout = Duration::from_secs(3);
    });
    let (mut b, mut sibling, sibling_id) = pair(relay.addr, "i57");
    let mut slow = stalled(relay.addr, "/v1/client", &phone_headers("i57"));
    slow.send("{}");
    let slow_id = conn_id(&b.text());
    let pad = "x".repeat(4000);
    let frame = format!(r#"{{"pad":"{pad}"}}"#);
    let notice_text = notice(&slow_id, 1011);
    // Send until the relay gives up on the phone: its socket buffers fill first (their size is
    // the kernel's), then the outbox overflows. The sibling gets a numbered frame now and then.
    let mut got_notice = false;
    let mut to_sibling = 0;
    for i in 0..8000 {
        b.send(&envelope(&slow_id, &frame));
        if i % 16 == 0 {
            b.send(&envelope(&sibling_id, &format!("[{to_sibling}]")));
            to_sibling += 1;
            let c = relay.counters();
            assert!(
                c.phone_outbox_bytes <= budget as u64,
                "phone outboxes hold {} bytes, over the {budget}-byte budget",
                c.phone_outbox_bytes
            );
            if let Some(m) = b.recv_within(ms(1)) {
                assert_eq!(m, Msg::Text(notice_text.clone()));
                got_notice = true;
                break;
            }
        }
    }
    if !got_notice {
        assert_eq!(b.text(), notice_text);
    }
    // Everything queued for it was dropped for the backlog; the phone gets §10.1's close after
    // what its socket already held.
    counted(&relay, "backlog dropped", |c| {
        c.dropped(DropReason::PhoneBacklogFull) > 0
    });
    loop {
        match slow.recv() {
            Msg::Text(_) => {}
            Msg::Close(c) => {
                assert_eq!(c, Some((1011, "phone backlog full".to_owned())));
                break;
            }
            other => panic!("expected the backlog close, got {other:?}"),
        }
    }
    // The sibling got every frame, in order, and the binary is unaffected.
    for n in 0..to_sibling {
        assert_eq!(sibling.text(), format!("[{n}]"));
    }
    b.send(&envelope(&sibling_id, "[57]"));
    assert_eq!(sibling.text(), "[57]");
    sibling.send("[58]");
    assert_eq!(b.text(), envelope(&sibling_id, "[58]"));
    counted(&relay, "slow phone gone", |c| c.connected_phones == 1);
    // Memory is released: nothing charged, the slow phone's connection closed.
    counted(&relay, "outboxes empty", |c| {
        c.phone_outbox_bytes == 0 && c.binary_outbox_bytes == 0
    });
    settles_at(&relay, 2);
}

/// The other way item 57 ends (§9): a phone whose socket stays full for the write timeout, while
/// its outbox is still under budget, is dropped at once (decision C8): notice 1011, no close
/// frame, its queued frames counted `phone_gone`.
pub fn item_57_phone_write_timeout<R: RelayUnderTest>() {
    let budget = Config::default().phone_outbox_bytes as u64;
    let relay = start::<R>(|c| c.write_timeout = ms(500));
    let (mut b, mut sibling, sibling_id) = pair(relay.addr, "i57w");
    let mut slow = stalled(relay.addr, "/v1/client", &phone_headers("i57w"));
    slow.send("{}");
    let slow_id = conn_id(&b.text());
    let frame = format!(r#"{{"pad":"{}"}}"#, "x".repeat(4000));
    let notice_text = notice(&slow_id, 1011);
    // About 4 KB a millisecond: the kernel's buffers fill within a second or two, and the
    // write timeout then fires long before the 4 MiB budget could.
    let t = Instant::now();
    loop {
        b.send(&envelope(&slow_id, &frame));
        let c = relay.counters();
        assert!(c.phone_outbox_bytes <= budget, "{c:?}");
        if let Some(m) = b.recv_within(ms(1)) {
            assert_eq!(m, Msg::Text(notice_text.clone()));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no notice");
    }
    // Dropped, not closed: whatever its socket held, then the end, never a close frame.
    loop {
        match slow.recv() {
            Msg::Text(_) => {}
            Msg::Gone => break,
            other => panic!("expected the connection to be dropped, got {other:?}"),
        }
    }
    counted(&relay, "queued frames dropped as phone_gone", |c| {
        c.dropped(DropReason::PhoneGone) > 0 && c.connected_phones == 1
    });
    let c = relay.counters();
    assert_eq!(c.dropped(DropReason::PhoneBacklogFull), 0, "{c:?}");
    b.send(&envelope(&sibling_id, "[57]"));
    assert_eq!(sibling.text(), "[57]");
    sibling.send("[58]");
    assert_eq!(b.text(), envelope(&sibling_id, "[58]"));
    counted(&relay, "outboxes empty", |c| c.phone_outbox_bytes == 0);
    settles_at(&relay, 2);
}

pub fn item_58_burst_to_one_phone<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i58");
    let pad = "y".repeat(1000);
    for i in 0..300 {
        b.send(&envelope(&id, &format!(r#"{{"i":{i},"p":"{pad}"}}"#)));
    }
    for i in 0..300 {
        assert_eq!(p.text(), format!(r#"{{"i":{i},"p":"{pad}"}}"#));
    }
    counted(&relay, "300 forwarded", |c| {
        c.forwarded(Direction::BinaryToPhone) == 300
    });
}

/// Sends `count` frames from a phone on its own thread, ignoring errors once the relay closes it.
fn send_in_background(mut p: Ws, tag: usize, count: usize, size: usize) -> thread::JoinHandle<Ws> {
    let pad = "z".repeat(size);
    thread::spawn(move || {
        for i in 0..count {
            if !p.try_send(&format!(r#"{{"t":{tag},"i":{i},"p":"{pad}"}}"#)) {
                break;
            }
        }
        p
    })
}

pub fn item_59_binary_stalls_briefly<R: RelayUnderTest>() {
    let relay = start::<R>(|c| {
        c.binary_outbox_bytes = 64 * 1024;
        c.write_timeout = Duration::from_secs(3);
    });
    let mut b = stalled(relay.addr, "/v1/server", &binary_headers("i59"));
    // A third phone that only listens: binary → phone keeps flowing while phones are paused.
    let (mut listener, listener_id) = known_phone(relay.addr, "i59", &mut b);
    let phones: Vec<Ws> = (0..2).map(|_| phone(relay.addr, "i59")).collect();
    counted(&relay, "phones", |c| c.connected_phones == 3);
    // Well past what the kernel buffers towards the binary absorb (4 MiB on Linux by default),
    // so the outbox fills and the phones are paused.
    let count = 2000;
    let size = 2000;
    let senders: Vec<_> = phones
        .into_iter()
        .enumerate()
        .map(|(tag, p)| send_in_background(p, tag, count, size))
        .collect();
    // Stop reading for well under the write timeout; the outbox fills and the phones pause.
    // §10.2's peak: the budget plus one message per phone read before the pause took hold
    // (the limit there is the largest message these phones send), each as envelope + charge.
    let largest = format!(r#"{{"t":1,"i":{},"p":""}}"#, count - 1).len() + size;
    let peak_bound = 64 * 1024 + 3 * (largest + 384);
    let mut peak = 0;
    let stall = Instant::now();
    while stall.elapsed() < ms(700) {
        let c = relay.counters();
        assert!(
            c.binary_outbox_bytes <= peak_bound as u64,
            "binary outbox holds {} bytes, over §10.2's bound {peak_bound}",
            c.binary_outbox_bytes
        );
        peak = peak.max(c.binary_outbox_bytes);
        thread::sleep(ms(10));
    }
    assert!(
        peak > 64 * 1024,
        "the outbox never went over its budget (peak {peak}): the phones were never paused"
    );
    b.send(&envelope(&listener_id, "[59]"));
    assert_eq!(listener.text(), "[59]");
    let mut next = [0usize; 2];
    for _ in 0..2 * count {
        let env = b.text();
        let v: serde_json::Value = serde_json::from_str(&env).expect("envelope");
        let tag = v["frame"]["t"].as_u64().expect("tag") as usize;
        assert_eq!(
            v["frame"]["i"].as_u64(),
            Some(next[tag] as u64),
            "phone {tag} out of order"
        );
        next[tag] += 1;
    }
    for s in senders {
        s.join().expect("sender");
    }
    let c = relay.counters();
    assert_eq!(c.frames_dropped.iter().sum::<u64>(), 0, "{c:?}");
    assert_eq!(c.connected_binaries, 1);
    counted(&relay, "binary outbox drained", |c| {
        c.binary_outbox_bytes == 0
    });
}

pub fn item_60_binary_never_resumes<R: RelayUnderTest>() {
    let write_timeout = ms(500);
    let relay = start::<R>(|c| {
        c.binary_outbox_bytes = 64 * 1024;
        c.write_timeout = write_timeout;
    });
    let _b = stalled(relay.addr, "/v1/server", &binary_headers("i60"));
    let p = phone(relay.addr, "i60");
    let (mut other_b, mut other_p, other_id) = pair(relay.addr, "i60-other");
    counted(&relay, "phones", |c| c.connected_phones == 2);
    let t = Instant::now();
    // Enough to fill the relay's socket buffers towards the binary; the phone is paused (and
    // blocks) long before the end.
    let sender = send_in_background(p, 0, 5000, 4000);
    counted(&relay, "binary gone", |c| c.connected_binaries == 1);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    // Its queue is dropped with it: nothing stays charged.
    counted(&relay, "binary outbox released", |c| {
        c.binary_outbox_bytes == 0
    });
    // Another pair is unaffected.
    other_p.send("[60]");
    assert_eq!(other_b.text(), envelope(&other_id, "[60]"));
    other_b.send(&envelope(&other_id, "[61]"));
    assert_eq!(other_p.text(), "[61]");
    // The id is in grace: the phone stays registered until its next frame.
    let mut p = sender.join().expect("sender");
    let c = relay.counters();
    assert!(
        c.dropped(DropReason::BinaryGone) > 0 || c.dropped(DropReason::NoBinary) > 0,
        "{c:?}"
    );
    if c.connected_phones == 2 {
        p.send("{}");
    }
    loop {
        match p.recv() {
            Msg::Close(c) => {
                assert_eq!(c, Some((1000, String::new())));
                break;
            }
            Msg::Gone => panic!("no close frame"),
            _ => {}
        }
    }
}

// ---- metrics and lifecycle ----------------------------------------------------------------

pub fn item_67_metrics_before_traffic<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let m = get(relay.metrics_addr, "/metrics");
    assert_eq!(m.status, 200);
    let body = m.body_text();
    let mut expected = vec![
        "pyrycode_relay_connected_binaries 0".to_owned(),
        "pyrycode_relay_connected_phones 0".to_owned(),
        "pyrycode_relay_grace_expiries_total 0".to_owned(),
        "pyrycode_relay_phone_outbox_bytes 0".to_owned(),
        "pyrycode_relay_binary_outbox_bytes 0".to_owned(),
        "pyrycode_relay_open_connections 0".to_owned(),
        "pyrycode_relay_pending_heads 0".to_owned(),
    ];
    for d in Direction::ALL {
        expected.push(format!(
            "pyrycode_relay_frames_forwarded_total{{direction=\"{}\"}} 0",
            d.as_str()
        ));
        expected.push(format!(
            "pyrycode_relay_forward_latency_seconds_count{{direction=\"{}\"}} 0",
            d.as_str()
        ));
    }
    for e in Endpoint::ALL {
        for o in UpgradeOutcome::ALL {
            expected.push(format!(
                "pyrycode_relay_ws_upgrade_attempts_total{{endpoint=\"{}\",outcome=\"{}\"}} 0",
                e.as_str(),
                o.as_str()
            ));
        }
    }
    for k in RegisterFailure::ALL {
        expected.push(format!(
            "pyrycode_relay_register_failures_total{{kind=\"{}\"}} 0",
            k.as_str()
        ));
    }
    for r in DropReason::ALL {
        expected.push(format!(
            "pyrycode_relay_frames_dropped_total{{reason=\"{}\"}} 0",
            r.as_str()
        ));
    }
    for r in RejectReason::ALL {
        expected.push(format!(
            "pyrycode_relay_connections_rejected_total{{reason=\"{}\"}} 0",
            r.as_str()
        ));
    }
    let lines: Vec<&str> = body.lines().collect();
    for e in &expected {
        assert!(lines.contains(&e.as_str()), "missing {e:?} in\n{body}");
    }
    assert!(!body.contains("push_wakes"), "push is off");
    assert!(body.ends_with("# EOF\n"));
}

/// Upgrade-attempt cells and register-failure kinds that moved, with how much.
type Moves = (
    Vec<(Endpoint, UpgradeOutcome, u64)>,
    Vec<(RegisterFailure, u64)>,
);

/// The upgrade-attempt and register-failure cells that moved between two snapshots.
fn upgrade_moves(before: &Counters, after: &Counters) -> Moves {
    let mut cells = Vec::new();
    for e in Endpoint::ALL {
        for o in UpgradeOutcome::ALL {
            let d = after.upgrades(*e, *o) - before.upgrades(*e, *o);
            if d != 0 {
                cells.push((*e, *o, d));
            }
        }
    }
    let mut kinds = Vec::new();
    for k in RegisterFailure::ALL {
        let d = after.register_failed(*k) - before.register_failed(*k);
        if d != 0 {
            kinds.push((*k, d));
        }
    }
    (cells, kinds)
}

fn expect_one_move(
    relay: &Running,
    before: &mut Counters,
    cell: (Endpoint, UpgradeOutcome),
    kind: Option<RegisterFailure>,
) {
    counted(relay, "the outcome", |c| {
        c.upgrades(cell.0, cell.1) > before.upgrades(cell.0, cell.1)
    });
    thread::sleep(ms(30));
    let after = relay.counters();
    let (cells, kinds) = upgrade_moves(before, &after);
    assert_eq!(cells, vec![(cell.0, cell.1, 1)]);
    assert_eq!(kinds, kind.map(|k| (k, 1)).into_iter().collect::<Vec<_>>());
    *before = after;
}

pub fn item_68_upgrade_outcomes<R: RelayUnderTest>() {
    let relay = start::<R>(|c| c.max_phones_per_server = 1);
    let mut before = relay.counters();
    let mut b = binary(relay.addr, "i68");
    expect_one_move(
        &relay,
        &mut before,
        (Endpoint::Server, UpgradeOutcome::Accept),
        None,
    );
    let _p = phone(relay.addr, "i68");
    expect_one_move(
        &relay,
        &mut before,
        (Endpoint::Client, UpgradeOutcome::Accept),
        None,
    );
    let mut at_cap = phone(relay.addr, "i68");
    assert_eq!(at_cap.expect_close().0, 4429);
    expect_one_move(
        &relay,
        &mut before,
        (Endpoint::Client, UpgradeOutcome::Reject429),
        Some(RegisterFailure::PhonesAtCap),
    );
    let mut unknown = phone(relay.addr, "i68-none");
    assert_eq!(unknown.expect_close().0, 4404);
    expect_one_move(
        &relay,
        &mut before,
        (Endpoint::Client, UpgradeOutcome::Reject404),
        Some(RegisterFailure::NoServer),
    );
    let mut claimant = binary(relay.addr, "i68");
    let _ = b.next(crate::client::WAIT); // the probe ping, answered
    let _ = b.next(ms(20));
    assert_eq!(claimant.expect_close().0, 4409);
    expect_one_move(
        &relay,
        &mut before,
        (Endpoint::Server, UpgradeOutcome::Reject409),
        Some(RegisterFailure::ServerInUse),
    );
    let bad = dial(
        relay.addr,
        "/v1/client",
        &headers(&[("x-pyrycode-server", "i68")]),
    )
    .rejected();
    assert_eq!(bad.status, 400);
    expect_one_move(
        &relay,
        &mut before,
        (Endpoint::Client, UpgradeOutcome::RejectHeaders),
        None,
    );
    // Non-counted outcomes: 426 and 431 move nothing here.
    let h = http(
        relay.addr,
        &request("GET", "/v1/server", "HTTP/1.1", &BINARY),
    );
    assert_eq!(h.status, 426);
    thread::sleep(ms(30));
    assert_eq!(upgrade_moves(&before, &relay.counters()), (vec![], vec![]));

    let limited = start::<R>(|c| c.rate_burst = 1);
    let mut first = phone(limited.addr, "i68");
    assert_eq!(first.expect_close().0, 4404);
    let mut before = limited.counters();
    let h = dial(limited.addr, "/v1/client", &phone_headers("i68")).rejected();
    assert_eq!(h.status, 429);
    expect_one_move(
        &limited,
        &mut before,
        (Endpoint::Client, UpgradeOutcome::RejectRateLimit),
        Some(RegisterFailure::Ratelimit),
    );
}

pub fn item_69_frames_forwarded_and_dropped<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "i69");
    for i in 0..2 {
        p.send(&format!("[{i}]"));
        b.text();
    }
    for i in 0..2 {
        b.send(&envelope(&id, &format!("{i}")));
        p.text();
    }
    counted(&relay, "forwarded", |c| {
        c.forwarded(Direction::PhoneToBinary) == 3 && c.forwarded(Direction::BinaryToPhone) == 2
    });
    b.send(&envelope("client-i69-ffffffffffffffff", "1"));
    counted(&relay, "unknown", |c| {
        c.dropped(DropReason::UnknownConnId) == 1
    });
    // A notice is neither forwarded nor dropped.
    p.close(Some(1000));
    assert_eq!(b.text(), notice(&id, 1000));
    thread::sleep(ms(30));
    let c = relay.counters();
    assert_eq!(c.forwarded(Direction::PhoneToBinary), 3);
    assert_eq!(c.frames_dropped.iter().sum::<u64>(), 1);
    assert_eq!(
        c.forward_latency[Direction::PhoneToBinary as usize].count,
        3
    );
}

pub fn item_70_rejections_by_reason<R: RelayUnderTest>() {
    let reject = |relay: &Running, req: &[u8], from: Tcp| {
        Http::parse(&raw_with(from, relay.addr, req))
            .expect("response")
            .status
    };
    let binary_req = |sid: &str| upgrade_request("GET", "/v1/server", &binary_headers(sid));

    let domain = start::<R>(|c| c.domains = vec!["relay.example".to_owned()]);
    let wrong_host = request(
        "GET",
        "/v1/server",
        "HTTP/1.1",
        &with(
            handshake()
                .into_iter()
                .map(|(n, v)| if n == "Host" { (n, "x") } else { (n, v) })
                .collect(),
            &BINARY,
        ),
    );
    assert_eq!(reject(&domain, &wrong_host, Tcp::default()), 421);
    assert_eq!(domain.counters().rejected(RejectReason::Host), 1);

    let limited = start::<R>(|c| c.rate_burst = 1);
    assert_eq!(
        reject(
            &limited,
            &upgrade_request("GET", "/v1/server", &[]),
            Tcp::default()
        ),
        400
    );
    assert_eq!(reject(&limited, &binary_req("a"), Tcp::default()), 429);
    assert_eq!(limited.counters().rejected(RejectReason::RateLimit), 1);

    let capped = start::<R>(|c| {
        c.max_connections_per_ip = 1;
        c.max_connections = 2;
    });
    let _one = binary(capped.addr, "c1");
    assert_eq!(reject(&capped, &binary_req("c2"), Tcp::default()), 503);
    let _two = dial_raw(Tcp::from([127, 0, 0, 2]), capped.addr, &binary_req("c3")).ws();
    assert_eq!(
        reject(&capped, &binary_req("c4"), Tcp::from([127, 0, 0, 3])),
        503
    );
    let c = capped.counters();
    assert_eq!(
        (
            c.rejected(RejectReason::IpCap),
            c.rejected(RejectReason::GlobalCap)
        ),
        (1, 1)
    );

    let plain = start::<R>(|_| {});
    let mut big = binary_req("big");
    big.truncate(big.len() - 2);
    big.extend_from_slice(format!("X-Pad: {}\r\n\r\n", "p".repeat(17_000)).as_bytes());
    assert_eq!(reject(&plain, &big, Tcp::default()), 431);
    assert_eq!(
        reject(
            &plain,
            &upgrade_request("GET", "/v1/client", &[]),
            Tcp::default()
        ),
        400
    );
    assert_eq!(
        reject(
            &plain,
            &request("GET", "/v1/server", "HTTP/1.1", &BINARY),
            Tcp::default()
        ),
        426
    );
    assert_eq!(
        reject(
            &plain,
            &request(
                "POST",
                "/v1/server",
                "HTTP/1.1",
                &with(handshake(), &BINARY)
            ),
            Tcp::default()
        ),
        405
    );
    let c = plain.counters();
    assert_eq!(c.rejected(RejectReason::HeadTooLarge), 1);
    assert_eq!(c.rejected(RejectReason::Headers), 1);
    assert_eq!(c.rejected(RejectReason::Handshake), 2);
    assert_eq!(c.connections_rejected.iter().sum::<u64>(), 4);
    // /healthz and unknown paths are not rejections.
    get(plain.addr, "/healthz");
    get(plain.addr, "/nope");
    assert_eq!(plain.counters().connections_rejected.iter().sum::<u64>(), 4);
}

pub fn item_72_shutdown<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i72");
    let (_b2, mut p2, _) = pair(relay.addr, "i72b");
    let mut pending = Tcp::default().connect(relay.addr).expect("connect");
    std::io::Write::write_all(&mut pending, b"GET /healthz HTTP/1.1\r\n").expect("write");
    let t = Instant::now();
    relay.shutdown();
    assert_eq!(b.expect_close(), (1001, "shutting down".to_owned()));
    assert_eq!(p.expect_close(), (1001, "shutting down".to_owned()));
    assert_eq!(p2.expect_close(), (1001, "shutting down".to_owned()));
    // No notices: the binary's first and only frame was its close.
    b.wait_gone();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut pending, &mut rest);
    assert!(rest.is_empty(), "a pending request got {rest:?}");
    eventually("listener closed", || {
        std::net::TcpStream::connect(relay.addr).is_err()
    });
    relay.stop();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
}

pub fn item_73_rebalance<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, _) = pair(relay.addr, "i73");
    let mut claimant_holder = binary(relay.addr, "i73b");
    relay.rebalance();
    assert_eq!(b.expect_close(), (1012, "rebalance".to_owned()));
    assert_eq!(
        claimant_holder.expect_close(),
        (1012, "rebalance".to_owned())
    );
    p.silent(ms(150));
    counted(&relay, "grace", |c| {
        c.connected_binaries == 0 && c.connected_phones == 1
    });
    // The binary reconnects and reclaims; its old phones re-dial.
    let mut b2 = binary(relay.addr, "i73");
    assert_eq!(p.expect_close(), owned(RECLAIMED));
    let _ = known_phone(relay.addr, "i73", &mut b2);
}

pub fn item_79_bad_peer_close_codes<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p1, id1) = pair(relay.addr, "i79");
    let (mut p2, id2) = known_phone(relay.addr, "i79", &mut b);
    assert_eq!(
        p1.close(Some(1005)),
        Some((1002, "Protocol violation".to_owned()))
    );
    assert_eq!(b.text(), notice(&id1, 1002));
    assert_eq!(
        p2.close(Some(999)),
        Some((1002, "Protocol violation".to_owned()))
    );
    assert_eq!(b.text(), notice(&id2, 1002));
}

/// §7.1: fragmented inbound messages are reassembled; limits apply to the whole.
pub fn fragmented_message_is_reassembled<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "frag");
    p.send_fragment(true, b"[1,", false);
    p.send_message(tungstenite::Message::Ping(b"mid"[..].into()));
    p.send_fragment(false, b"2,", false);
    p.send_fragment(false, b"3]", true);
    assert_eq!(b.text(), envelope(&id, "[1,2,3]"));
}

/// §8: a phone closing with an allowed code the codec does not know (1014) is reported with that
/// code.
pub fn close_code_1014_notice<R: RelayUnderTest>() {
    let relay = start::<R>(|_| {});
    let (mut b, mut p, id) = pair(relay.addr, "c1014");
    p.send_close(Some(1014));
    assert_eq!(b.text(), notice(&id, 1014));
}
