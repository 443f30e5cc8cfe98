//! TLS on the main listener (PROTOCOL.md §2.1, §3 stage 0), each scenario generic over the
//! runtime. Certificates are made per test ([`pki`](crate::pki)); clients are blocking rustls.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ProtocolVersion};
use switchyard_core::Config;
use switchyard_runtime::tls::Alpn;

use crate::client::{
    Conn, Dialed, Http, Tcp, Ws, binary_headers, dial_over, https_raw, phone_headers, raw,
    tls_connect, tls_connect_after, upgrade_request,
};
use crate::pki::{Leaf, SERVER_NAME, TestCa};
use crate::{RelayUnderTest, Running, test_config};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A relay with TLS from a fixed pair of a fresh CA.
fn start<R: RelayUnderTest>(
    alpn: Alpn,
    tweak: impl FnOnce(&mut Config),
) -> (Running, TestCa, Leaf) {
    let ca = TestCa::new("switchyard test CA");
    let leaf = ca.leaf();
    let mut config = test_config();
    tweak(&mut config);
    let relay = R::start_tls(config, leaf.server_config(alpn));
    (relay, ca, leaf)
}

/// An upgrade over TLS that must be admitted.
fn dial_tls(addr: SocketAddr, client: &Arc<ClientConfig>, path: &str, sid: &str) -> Ws {
    let headers = if path == "/v1/server" {
        binary_headers(sid)
    } else {
        phone_headers(sid)
    };
    let conn = tls_connect(addr, client.clone()).expect("TLS handshake");
    dial_over(conn, &upgrade_request("GET", path, &headers)).ws()
}

/// The certificate the relay presents to a new handshake.
fn presented(addr: SocketAddr, client: &Arc<ClientConfig>) -> std::io::Result<Vec<u8>> {
    let conn = tls_connect(addr, client.clone())?;
    let tls = conn.tls().expect("TLS");
    Ok(tls.peer_certificates().expect("server certificate")[0].to_vec())
}

/// Bytes the relay sends after `hello` before it closes (or until the read times out).
fn answer_to(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    raw(addr, hello)
}

/// A ClientHello offering at most `version` (0x0301 TLS 1.0, 0x0302 TLS 1.1), without the
/// supported_versions extension, as a client that predates TLS 1.2 sends it.
fn legacy_client_hello(version: u16) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    // AEAD suites the relay has for TLS 1.2, and CBC ones of the older versions: only the
    // version can be the reason for a refusal.
    let suites: [u8; 12] = [
        0xc0, 0x2b, 0xc0, 0x2c, 0xcc, 0xa9, 0xc0, 0x13, 0xc0, 0x14, 0x00, 0x2f,
    ];
    body.extend((suites.len() as u16).to_be_bytes());
    body.extend(suites);
    body.extend([1, 0]); // compression: null
    // supported_groups: secp256r1; ec_point_formats: uncompressed; signature_algorithms:
    // ecdsa_secp256r1_sha256.
    let ext: [u8; 22] = [
        0, 10, 0, 4, 0, 2, 0, 23, 0, 11, 0, 2, 1, 0, 0, 13, 0, 4, 0, 2, 4, 3,
    ];
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1]; // client_hello
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((hs.len() as u16).to_be_bytes());
    record.extend(hs);
    record
}

/// The record types in `bytes`, read as a sequence of TLS records.
fn record_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 5 {
        let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        types.push(bytes[0]);
        bytes = &bytes[(5 + len).min(bytes.len())..];
    }
    types
}

/// The first bytes of a TLS 1.3 ClientHello, without its end.
fn partial_client_hello() -> Vec<u8> {
    let ca = TestCa::new("unused");
    let name = ServerName::try_from(SERVER_NAME).expect("name");
    let mut session = ClientConnection::new(ca.client(), name).expect("session");
    let mut hello = Vec::new();
    session.write_tls(&mut hello).expect("hello");
    hello.truncate(hello.len() / 2);
    hello
}

// ---- scenarios ----------------------------------------------------------------------------

/// `/healthz` and a 404 over TLS: the same bytes as plain HTTP, and the relay ends each with
/// close_notify before closing TCP (the §2.1 linger runs over TLS).
pub fn tls_healthz_and_404<R: RelayUnderTest>() {
    let (relay, ca, _) = start::<R>(Alpn::Http, |_| {});
    let client = ca.client();
    let (bytes, clean) = https_raw(
        relay.addr,
        client.clone(),
        b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n",
    );
    let h = Http::parse(&bytes).expect("an HTTP response over TLS");
    assert_eq!(h.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&h.body).expect("healthz JSON");
    assert_eq!(v["status"], "ok");
    assert!(clean, "the TLS session ended without close_notify");
    let (bytes, clean) = https_raw(relay.addr, client, b"GET /nope HTTP/1.1\r\n\r\n");
    let h = Http::parse(&bytes).expect("an HTTP response over TLS");
    assert_eq!((h.status, h.body_text()), (404, "404 page not found\n"));
    assert!(clean, "the TLS session ended without close_notify");
}

/// A binary and a phone over TLS: envelopes both ways, a close notice at the end.
pub fn tls_binary_and_phone_exchange<R: RelayUnderTest>() {
    let (relay, ca, _) = start::<R>(Alpn::Http, |_| {});
    let client = ca.client();
    let mut b = dial_tls(relay.addr, &client, "/v1/server", "tls-sid");
    let mut p = dial_tls(relay.addr, &client, "/v1/client", "tls-sid");
    p.send(r#"{"hello":"over tls"}"#);
    let env = b.text();
    let v: serde_json::Value = serde_json::from_str(&env).expect("envelope");
    let id = v["conn_id"].as_str().expect("conn_id").to_owned();
    assert_eq!(
        env,
        format!(r#"{{"conn_id":"{id}","frame":{{"hello":"over tls"}}}}"#)
    );
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100_000));
    b.send(&format!(r#"{{"conn_id":"{id}","frame":{big}}}"#));
    assert_eq!(p.text(), big);
    for i in 0..50 {
        b.send(&format!(r#"{{"conn_id":"{id}","frame":{i}}}"#));
    }
    for i in 0..50 {
        assert_eq!(p.text(), i.to_string());
    }
    assert_eq!(p.close(Some(1000)), Some((1000, String::new())));
    assert!(
        p.transport_ends_cleanly(),
        "no close_notify after the close handshake"
    );
    assert_eq!(
        b.text(),
        format!(r#"{{"conn_id":"{id}","close_code":1000}}"#)
    );
    let tls = b.conn().tls().expect("TLS");
    assert_eq!(tls.alpn_protocol(), Some(&b"http/1.1"[..]));
}

/// Plain HTTP to the TLS listener is not answered in HTTP: at most a TLS alert, then close.
pub fn tls_plain_http_is_not_answered<R: RelayUnderTest>() {
    let (relay, _, _) = start::<R>(Alpn::Http, |_| {});
    let bytes = raw(relay.addr, b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n");
    assert!(Http::parse(&bytes).is_none(), "an HTTP answer: {bytes:?}");
    assert!(!bytes.starts_with(b"HTTP"), "{bytes:?}");
    assert!(
        record_types(&bytes).iter().all(|&t| t == 0x15),
        "not only alerts: {bytes:?}"
    );
}

/// A client that stops mid-ClientHello is closed when the header timeout runs out, with
/// nothing written.
pub fn tls_stalled_handshake_closed_by_header_timeout<R: RelayUnderTest>() {
    let timeout = ms(400);
    let (relay, _, _) = start::<R>(Alpn::Http, |c| c.header_timeout = timeout);
    let t = Instant::now();
    let bytes = raw(relay.addr, &partial_client_hello());
    assert!(bytes.is_empty(), "wrote {bytes:?}");
    assert!(
        t.elapsed() >= timeout - ms(50),
        "closed early: {:?}",
        t.elapsed()
    );
}

/// The handshake and the head share one deadline from TCP accept (§3 stage 0): time spent
/// before and in the handshake is not given again to the head.
pub fn tls_handshake_and_head_share_the_deadline<R: RelayUnderTest>() {
    let timeout = ms(1500);
    let (relay, ca, _) = start::<R>(Alpn::Http, |c| c.header_timeout = timeout);
    let name = ServerName::try_from(SERVER_NAME).expect("name");
    let session = ClientConnection::new(ca.client(), name).expect("session");
    let tcp = Tcp::default().connect(relay.addr).expect("connect");
    let t = Instant::now();
    std::thread::sleep(ms(1000));
    let mut s = rustls::StreamOwned::new(session, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake");
    }
    let mut conn = Conn::Tls(Box::new(s));
    conn.write_all(b"GET /healthz HTTP/1.1\r\n")
        .expect("part of a head");
    let mut buf = [0; 64];
    let n = conn.read(&mut buf).unwrap_or(0);
    let elapsed = t.elapsed();
    assert_eq!(n, 0, "answered a head that never ended");
    assert!(elapsed >= timeout - ms(50), "closed early: {elapsed:?}");
    // A fresh timer for the head would close at 2.5 s at the earliest (timers never fire early).
    assert!(
        elapsed < ms(2400),
        "the head got a deadline of its own: {elapsed:?}"
    );
}

/// TLS 1.0 and 1.1 clients are refused with an alert before any ServerHello; TLS 1.2 and 1.3
/// clients are served (rustls clients cannot speak below 1.2, so the old hellos are written by
/// hand).
pub fn tls_versions_below_1_2_refused<R: RelayUnderTest>() {
    let (relay, ca, _) = start::<R>(Alpn::Http, |c| c.header_timeout = ms(300));
    // The same hello saying TLS 1.2 gets a ServerHello: only the version decides.
    let bytes = answer_to(relay.addr, &legacy_client_hello(0x0303));
    assert_eq!(record_types(&bytes).first(), Some(&0x16), "{bytes:?}");
    for version in [0x0301, 0x0302] {
        let bytes = answer_to(relay.addr, &legacy_client_hello(version));
        assert!(!bytes.is_empty(), "no alert for {version:#06x}");
        assert_eq!(record_types(&bytes), [0x15], "{version:#06x}: {bytes:?}");
        // A fatal protocol_version alert.
        assert_eq!(&bytes[5..7], [2, 70], "{version:#06x}: {bytes:?}");
    }
    for (versions, expected) in [
        (&[&rustls::version::TLS12][..], ProtocolVersion::TLSv1_2),
        (&[&rustls::version::TLS13][..], ProtocolVersion::TLSv1_3),
    ] {
        let client = ca.client_with(versions, &[b"http/1.1"]);
        let conn = tls_connect(relay.addr, client.clone()).expect("handshake");
        assert_eq!(conn.tls().unwrap().protocol_version(), Some(expected));
        let (bytes, _) = https_raw(relay.addr, client, b"GET /healthz HTTP/1.1\r\n\r\n");
        assert_eq!(Http::parse(&bytes).expect("HTTP").status, 200);
    }
}

/// ALPN: `http/1.1` when offered (even after `h2`), nothing when the client offers nothing,
/// and a client offering only `h2` is refused: the relay never speaks HTTP/2.
pub fn tls_alpn_http_1_1_or_none_never_h2<R: RelayUnderTest>() {
    let (relay, ca, _) = start::<R>(Alpn::Http, |_| {});
    let v13 = [&rustls::version::TLS13, &rustls::version::TLS12];
    let both = ca.client_with(&v13, &[b"h2", b"http/1.1"]);
    let conn = tls_connect(relay.addr, both.clone()).expect("handshake");
    assert_eq!(conn.tls().unwrap().alpn_protocol(), Some(&b"http/1.1"[..]));
    let none = ca.client_with(&v13, &[]);
    let conn = tls_connect(relay.addr, none.clone()).expect("handshake");
    assert_eq!(conn.tls().unwrap().alpn_protocol(), None);
    let (bytes, _) = https_raw(relay.addr, none, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(Http::parse(&bytes).expect("HTTP").status, 200);
    let h2 = ca.client_with(&v13, &[b"h2"]);
    assert!(
        tls_connect(relay.addr, h2).is_err(),
        "a handshake for h2 only"
    );
    // Without ACME mode a TLS-ALPN-01 validation finds no protocol either.
    let acme = ca.client_with(&v13, &[b"acme-tls/1"]);
    assert!(
        tls_connect(relay.addr, acme).is_err(),
        "acme-tls/1 outside ACME mode"
    );
}

/// In ACME mode a handshake that negotiates `acme-tls/1` completes and is then closed: the
/// relay reads no request on it (RFC 8737 needs only the handshake).
pub fn tls_acme_alpn_closes_after_handshake<R: RelayUnderTest>() {
    let (relay, ca, _) = start::<R>(Alpn::HttpAndAcme, |_| {});
    let v13 = [&rustls::version::TLS13, &rustls::version::TLS12];
    let acme = ca.client_with(&v13, &[b"acme-tls/1"]);
    let mut conn = tls_connect(relay.addr, acme).expect("handshake");
    assert_eq!(
        conn.tls().unwrap().alpn_protocol(),
        Some(&b"acme-tls/1"[..])
    );
    let _ = conn.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    assert!(
        out.is_empty(),
        "answered on a challenge connection: {out:?}"
    );
    // HTTP/1.1 clients are still served in ACME mode.
    let (bytes, _) = https_raw(relay.addr, ca.client(), b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(Http::parse(&bytes).expect("HTTP").status, 200);
    let mut b = dial_tls(relay.addr, &ca.client(), "/v1/server", "acme-mode");
    b.silent(ms(100));
}

/// A client that does not trust the relay's certificate cannot connect, and the relay keeps
/// serving others (a failed handshake is stage 0: closed, nothing but an alert).
pub fn tls_untrusted_client_fails_others_served<R: RelayUnderTest>() {
    let (relay, ca, leaf) = start::<R>(Alpn::Http, |_| {});
    let stranger = TestCa::new("another CA");
    assert!(tls_connect(relay.addr, stranger.client()).is_err());
    assert_eq!(
        presented(relay.addr, &ca.client()).expect("handshake"),
        leaf.cert.to_vec()
    );
    let d = dial_over(
        tls_connect(relay.addr, ca.client()).expect("handshake"),
        &upgrade_request("GET", "/v1/client", &phone_headers("x")),
    );
    assert!(matches!(d, Dialed::Upgraded(..)), "{d:?}");
}

/// Polls `check` until it holds; generous, for a reload that takes a few watcher intervals.
fn eventually_long(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(ms(20));
    }
}

fn log_count(needle: &str) -> usize {
    let logs = crate::push::captured_logs().lock().unwrap();
    String::from_utf8_lossy(&logs).matches(needle).count()
}

/// `--tls-cert`/`--tls-key` rotation (§14.2): with connections open, a new pair from another
/// CA written over the files is served to new handshakes, the open connections go on; a broken
/// pair is logged once and the previous pair kept; a later good pair is picked up again.
pub fn tls_rotation_serves_new_pair_keeps_connections<R: RelayUnderTest>() {
    let interval = ms(50);
    let dir = std::env::temp_dir().join(format!("switchyard-tls-rotation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ca_a = TestCa::new("rotation CA A");
    let a = ca_a.leaf();
    a.write(&cert, &key);
    let (certs, watcher) =
        switchyard::tls::watch(cert.clone(), key.clone(), interval).expect("pair a loads");
    let relay = R::start_tls(
        test_config(),
        Arc::new(switchyard_runtime::tls::server_config(certs, Alpn::Http)),
    );
    let client_a = ca_a.client();
    assert_eq!(
        presented(relay.addr, &client_a).expect("a"),
        a.cert.to_vec()
    );
    let mut b = dial_tls(relay.addr, &client_a, "/v1/server", "rotation");
    let mut p = dial_tls(relay.addr, &client_a, "/v1/client", "rotation");
    p.send("1");
    let id = {
        let v: serde_json::Value = serde_json::from_str(&b.text()).expect("envelope");
        v["conn_id"].as_str().expect("conn_id").to_owned()
    };
    let exchange = |b: &mut Ws, p: &mut Ws, n: u32| {
        p.send(&n.to_string());
        assert_eq!(b.text(), format!(r#"{{"conn_id":"{id}","frame":{n}}}"#));
        b.send(&format!(r#"{{"conn_id":"{id}","frame":{}}}"#, n + 1));
        assert_eq!(p.text(), (n + 1).to_string());
    };

    // A renewed pair from another CA.
    let ca_b = TestCa::new("rotation CA B");
    let pair_b = ca_b.leaf();
    pair_b.write(&cert, &key);
    let client_b = ca_b.client();
    eventually_long("the new certificate", || {
        presented(relay.addr, &client_b).ok() == Some(pair_b.cert.to_vec())
    });
    assert!(
        tls_connect(relay.addr, client_a.clone()).is_err(),
        "a still served"
    );
    exchange(&mut b, &mut p, 10);

    // A broken pair: a certificate of a third CA with the key of b.
    let failures = log_count("msg=tls_reload_failed");
    let ca_c = TestCa::new("rotation CA C");
    let pair_c = ca_c.leaf();
    std::fs::write(&cert, &pair_c.cert_pem).expect("write certificate");
    eventually_long("the refusal in the log", || {
        log_count("msg=tls_reload_failed") > failures
    });
    std::thread::sleep(interval * 10);
    assert_eq!(
        log_count("msg=tls_reload_failed"),
        failures + 1,
        "logged more than once"
    );
    {
        let logs = crate::push::captured_logs().lock().unwrap();
        let text = String::from_utf8_lossy(&logs);
        let line = text
            .lines()
            .find(|l| l.contains("msg=tls_reload_failed"))
            .expect("line");
        assert!(line.contains("reason=key_mismatch"), "{line}");
        assert!(!line.contains(dir.to_str().unwrap()), "{line}");
    }
    assert_eq!(
        presented(relay.addr, &client_b).expect("b"),
        pair_b.cert.to_vec()
    );
    exchange(&mut b, &mut p, 20);

    // Its key arrives: the pair is whole again and served.
    std::fs::write(&key, &pair_c.key_pem).expect("write key");
    let client_c = ca_c.client();
    eventually_long("the third certificate", || {
        presented(relay.addr, &client_c).ok() == Some(pair_c.cert.to_vec())
    });
    exchange(&mut b, &mut p, 30);
    drop(watcher);
    relay.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Shutdown (§13) closes connections still in their handshake at once, writing nothing, rather
/// than letting them run out their header timeout.
pub fn tls_shutdown_drops_pending_handshakes<R: RelayUnderTest>() {
    let (relay, _, _) = start::<R>(Alpn::Http, |c| c.header_timeout = Duration::from_secs(30));
    let addr = relay.addr;
    let pending = std::thread::spawn(move || {
        let t = Instant::now();
        (raw(addr, &partial_client_hello()), t.elapsed())
    });
    std::thread::sleep(ms(200));
    // Begun, not waited for: the workers keep running, so only the relay's own reaction to
    // shutdown can end the handshake.
    relay.shutdown();
    let (bytes, elapsed) = pending.join().expect("client");
    assert!(bytes.is_empty(), "wrote {bytes:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    relay.stop();
}

/// `--proxy-protocol` with TLS (stage 0: the PROXY header, then the handshake): the PROXY source
/// is the client address, so the token bucket counts by it although every TCP peer here is
/// 127.0.0.1; a ClientHello without the header is closed with nothing written.
pub fn tls_behind_proxy_header<R: RelayUnderTest>() {
    let ca = TestCa::new("switchyard test CA");
    let leaf = ca.leaf();
    let config = Config {
        rate_burst: 1,
        ..test_config()
    };
    let relay = R::start_proxied_tls(config, leaf.server_config(Alpn::Http));
    let client = ca.client();
    let over = |source: &str, path: &str, sid: &str| {
        let headers = if path == "/v1/server" {
            binary_headers(sid)
        } else {
            phone_headers(sid)
        };
        let conn = tls_connect_after(relay.addr, client.clone(), &crate::proxy::header(source))
            .expect("TLS handshake after the PROXY header");
        dial_over(conn, &upgrade_request("GET", path, &headers))
    };
    let mut b = over("198.51.100.7:40000", "/v1/server", "ptls").ws();
    let mut p = over("203.0.113.9:40001", "/v1/client", "ptls").ws();
    p.send("[1]");
    let env = b.text();
    assert!(env.ends_with(r#","frame":[1]}"#), "{env}");
    // The binary's source has spent its one token; another source has its own.
    match over("198.51.100.7:40002", "/v1/client", "ptls") {
        Dialed::Rejected(h) => assert_eq!(h.status, 429),
        other => panic!("expected 429 for a spent source, got {other:?}"),
    }
    assert!(matches!(
        over("192.0.2.44:40003", "/v1/client", "ptls"),
        Dialed::Upgraded(..)
    ));
    // No PROXY header: the ClientHello is not one, so the connection closes silently.
    assert!(tls_connect(relay.addr, client).is_err());
}
