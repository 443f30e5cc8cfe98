//! ACME mode end to end against a real ACME server: Debian's `pebble` on loopback, with
//! `pebble-challtestsrv` as its DNS (every name is 127.0.0.1). The validation is real: pebble's
//! validator dials the relay's main listener for TLS-ALPN-01 (pebble's `tlsPort` is the relay's
//! port) or the relay's `--acme-http-listen` for http-01 (its `httpPort`).
//!
//! For each runtime and challenge: the relay (the built binary) orders a certificate from
//! pebble; a TLS client trusting pebble's issuing root (from its management API, `/roots/0`)
//! connects with SNI = the domain, a binary and a phone exchange a frame each way through it, a
//! wrong `Host` gets 421 (stage 1), and a connection offering only `acme-tls/1` gets no HTTP.
//! The TLS-ALPN-01 tokio run also restarts the relay with pebble stopped: the certificate comes
//! from `--cert-cache`.
//!
//! Needs `pebble` and `pebble-challtestsrv` (`apt-get install pebble`; `.ci/run` installs it).
//! Under CI (`CI` set) a missing pebble fails the tests; elsewhere they are skipped with a
//! notice. `SWITCHYARD_SKIP_PEBBLE=1` skips them explicitly.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::Value;
use switchyard_runtime::rustls::pki_types::pem::PemObject;
use switchyard_runtime::rustls::pki_types::{CertificateDer, ServerName};
use switchyard_runtime::rustls::{
    self, ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

mod common;

use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const DOMAIN: &str = "relay.switchyard.test";
/// How long an order may take (pebble answers at once with `PEBBLE_VA_NOSLEEP=1`; the client
/// polls authorizations after 1, 2, 4 … s).
const ISSUE_BOUND: Duration = Duration::from_secs(60);

/// Pebble and the relays are heavy for two shared cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn tls_alpn_01_tokio_issues_serves_and_reuses_the_cache() {
    acme_story("tokio", Challenge::TlsAlpn01);
}

#[test]
fn tls_alpn_01_smol_issues_and_serves() {
    acme_story("smol", Challenge::TlsAlpn01);
}

#[test]
fn http_01_tokio_issues_and_serves() {
    acme_story("tokio", Challenge::Http01);
}

#[test]
fn http_01_smol_issues_and_serves() {
    acme_story("smol", Challenge::Http01);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Challenge {
    TlsAlpn01,
    Http01,
}

fn acme_story(runtime: &str, challenge: Challenge) {
    let Some(bins) = pebble_or_skip() else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let dir = work_dir(&format!("{runtime}-{challenge:?}"));
    let relay_addr = addr(free_port());
    let http01_addr = addr(free_port());
    let mut pebble = Pebble::start(&bins, &dir, relay_addr.port(), http01_addr.port());

    let cache = dir.join("certs");
    let mut args = vec![
        "--domain".to_owned(),
        DOMAIN.to_owned(),
        "--acme-directory".to_owned(),
        format!("https://{}/dir", pebble.api),
        "--acme-ca-file".to_owned(),
        pebble.api_ca.display().to_string(),
        "--acme-contact".to_owned(),
        "ops@switchyard.test".to_owned(),
        "--cert-cache".to_owned(),
        cache.display().to_string(),
        "--listen".to_owned(),
        relay_addr.to_string(),
        "--metrics-listen".to_owned(),
        addr(free_port()).to_string(),
        "--runtime".to_owned(),
        runtime.to_owned(),
        "--workers".to_owned(),
        "1".to_owned(),
    ];
    if challenge == Challenge::Http01 {
        args.extend(["--acme-http-listen".to_owned(), http01_addr.to_string()]);
    }
    let log = dir.join("relay.log");
    let mut relay = Relay::spawn(&args, &log);
    let roots = pebble.issuing_roots();

    let issued =
        wait_until(ISSUE_BOUND, || handshake(relay_addr, &roots).ok()).unwrap_or_else(|| {
            panic!(
                "no certificate within {ISSUE_BOUND:?}\nrelay log:\n{}\npebble log:\n{}",
                read(&log),
                read(&pebble.log)
            )
        });
    let issue_time = started.elapsed();
    assert_eq!(issued.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(
        issued.leaf_names_domain,
        "the certificate does not name {DOMAIN}"
    );
    wait_until(Duration::from_secs(5), || {
        read(&log)
            .contains("msg=acme_certificate outcome=issued")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no acme_certificate line:\n{}", read(&log)));

    serves_over_tls(relay_addr, &roots);
    if challenge == Challenge::Http01 {
        http01_listener_answers_404(http01_addr);
    }
    cache_is_private(&cache);

    assert!(relay.stop().success(), "relay exit:\n{}", read(&log));
    if challenge == Challenge::TlsAlpn01 && runtime == "tokio" {
        // The certificate now comes from the cache: with pebble gone nothing else could give one.
        pebble.stop();
        let log2 = dir.join("relay-cached.log");
        let mut again = Relay::spawn(&args, &log2);
        wait_until(Duration::from_secs(10), || {
            handshake(relay_addr, &roots).ok()
        })
        .unwrap_or_else(|| panic!("cached certificate not served:\n{}", read(&log2)));
        assert!(read(&log2).contains("msg=acme_certificate outcome=cached"));
        serves_over_tls(relay_addr, &roots);
        assert!(again.stop().success());
    }
    let logs = read(&log);
    assert!(!logs.contains(DOMAIN), "a domain reached the log:\n{logs}");
    eprintln!(
        "{runtime} {challenge:?}: certificate after {:.1} s, story {:.1} s",
        issue_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// A binary and a phone through the TLS listener; 421 for a wrong Host; no HTTP for a
/// connection that offers only `acme-tls/1`.
fn serves_over_tls(relay: SocketAddr, roots: &RootCertStore) {
    let sid = "acme-e2e";
    let mut binary = upgrade(
        relay,
        roots,
        DOMAIN,
        "/v1/server",
        &[
            ("X-Pyrycode-Server", sid),
            ("X-Pyrycode-Version", "1"),
            ("User-Agent", "acme-test"),
        ],
    );
    let mut phone = upgrade(
        relay,
        roots,
        &format!("{}:443", DOMAIN.to_uppercase()),
        "/v1/client",
        &[
            ("X-Pyrycode-Server", sid),
            ("X-Pyrycode-Token", "t"),
            ("User-Agent", "acme-test"),
        ],
    );
    phone
        .send(Message::text(r#"{"t":"hi"}"#))
        .expect("phone send");
    let envelope: Value = serde_json::from_str(&next_text(&mut binary)).expect("json");
    assert_eq!(envelope["frame"], serde_json::json!({"t": "hi"}));
    let conn_id = envelope["conn_id"].as_str().expect("conn_id").to_owned();
    assert!(conn_id.starts_with("client-acme-e2e-"), "{conn_id}");
    binary
        .send(Message::text(format!(
            r#"{{"conn_id":"{conn_id}","frame":{{"t":"hello"}}}}"#
        )))
        .expect("binary send");
    assert_eq!(next_text(&mut phone), r#"{"t":"hello"}"#);

    let (status, _) = https_get(relay, roots, "other.example", "/healthz").expect("421");
    assert_eq!(status, 421);
    let (status, body) = https_get(relay, roots, DOMAIN, "/healthz").expect("healthz");
    assert_eq!(status, 200);
    assert!(body.contains(r#""connected_binaries":1"#), "{body}");

    // A TLS-ALPN-01 handshake outside a validation gets no certificate, and no HTTP either way.
    let mut probe = tls_client(relay, roots, vec![b"acme-tls/1".to_vec()]);
    let mut out = Vec::new();
    let wrote = probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay.switchyard.test\r\n\r\n");
    if wrote.is_ok() {
        let _ = probe.read_to_end(&mut out);
    }
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
}

fn http01_listener_answers_404(http01: SocketAddr) {
    for path in ["/", "/healthz", "/.well-known/acme-challenge/unknown-token"] {
        let mut s = TcpStream::connect(http01).expect("http-01 listener");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("HTTP/1.1 404 "), "{path}: {out}");
        assert!(
            out.ends_with("\r\n\r\n404 page not found\n"),
            "{path}: {out}"
        );
        assert!(!out.contains("Location"), "{out}");
    }
}

fn cache_is_private(cache: &Path) {
    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(cache), 0o700);
    let files: Vec<PathBuf> = fs::read_dir(cache)
        .expect("cache")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        files.len(),
        2,
        "an account key and a certificate: {files:?}"
    );
    for f in files {
        assert_eq!(mode(&f), 0o600, "{f:?}");
    }
}

// --- pebble ---------------------------------------------------------------------------------

struct Bins {
    pebble: PathBuf,
    challtestsrv: PathBuf,
}

fn pebble_or_skip() -> Option<Bins> {
    if std::env::var_os("SWITCHYARD_SKIP_PEBBLE").is_some_and(|v| v == "1") {
        eprintln!("skipped: SWITCHYARD_SKIP_PEBBLE=1");
        return None;
    }
    let find = |name: &str| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/bin".into(), "/usr/local/bin".into()])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    match (find("pebble"), find("pebble-challtestsrv")) {
        (Some(pebble), Some(challtestsrv)) => Some(Bins {
            pebble,
            challtestsrv,
        }),
        _ if !ci => {
            eprintln!(
                "skipped: pebble or pebble-challtestsrv not found; `apt-get install pebble` runs \
                 the ACME test (under CI it is required)"
            );
            None
        }
        _ => panic!(
            "pebble or pebble-challtestsrv not found on PATH. The ACME test needs them: \
             `apt-get install pebble` (.ci/run does this), or set SWITCHYARD_SKIP_PEBBLE=1 to \
             skip it explicitly."
        ),
    }
}

/// pebble and its DNS, killed on drop.
struct Pebble {
    pebble: Option<Child>,
    dns: Child,
    /// The ACME API (`/dir`).
    api: SocketAddr,
    /// The CA of the API's own certificate (made here), for `--acme-ca-file`.
    api_ca: PathBuf,
    api_roots: RootCertStore,
    management: SocketAddr,
    log: PathBuf,
}

impl Pebble {
    fn start(bins: &Bins, dir: &Path, tls_port: u16, http_port: u16) -> Pebble {
        let dns = addr(free_port());
        let dns_mgmt = addr(free_port());
        let dns_log = fs::File::create(dir.join("challtestsrv.log")).expect("log");
        let dns_child = Command::new(&bins.challtestsrv)
            .args([
                "-dns01",
                &dns.to_string(),
                "-management",
                &dns_mgmt.to_string(),
            ])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdin(Stdio::null())
            .stdout(dns_log.try_clone().expect("log"))
            .stderr(dns_log)
            .spawn()
            .expect("spawn pebble-challtestsrv");

        // pebble's API certificate, from a CA made for this run.
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test ACME API CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let issuer = Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let api_ca = dir.join("api-ca.pem");
        fs::write(&api_ca, ca.pem()).expect("write");
        fs::write(dir.join("api-cert.pem"), cert.pem()).expect("write");
        fs::write(dir.join("api-key.pem"), key.serialize_pem()).expect("write");
        let mut api_roots = RootCertStore::empty();
        api_roots.add(ca.der().clone()).expect("root");

        let api = addr(free_port());
        let management = addr(free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": api.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.join("api-cert.pem"),
                "privateKey": dir.join("api-key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.join("pebble.json");
        fs::write(&config_path, config.to_string()).expect("write");
        let log = dir.join("pebble.log");
        let out = fs::File::create(&log).expect("log");
        let pebble = Command::new(&bins.pebble)
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn pebble");
        let mut p = Pebble {
            pebble: Some(pebble),
            dns: dns_child,
            api,
            api_ca,
            api_roots,
            management,
            log,
        };
        wait_until(Duration::from_secs(20), || {
            let (status, _) = https_get_ip(p.api, &p.api_roots, "/dir")?;
            (status == 200).then_some(())
        })
        .unwrap_or_else(|| panic!("pebble did not start:\n{}", read(&p.log)));
        assert!(
            p.dns.try_wait().expect("try_wait").is_none(),
            "pebble-challtestsrv exited"
        );
        p
    }

    /// Pebble's issuing root, from its management API.
    fn issuing_roots(&mut self) -> RootCertStore {
        let (status, pem) =
            https_get_ip(self.management, &self.api_roots, "/roots/0").expect("roots/0");
        assert_eq!(status, 200, "{pem}");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.expect("PEM")).expect("root");
        }
        assert_eq!(roots.len(), 1);
        roots
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.pebble.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}

// --- the relay ------------------------------------------------------------------------------

struct Relay(Child);

impl Relay {
    fn spawn(args: &[String], log: &Path) -> Relay {
        let out = fs::File::create(log).expect("log");
        let child = Command::new(BIN)
            .args(args)
            .env_remove("FLY_APP_NAME")
            .env_remove("PYRYCODE_RELAY_PRODUCTION")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn switchyard");
        Relay(child)
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay still running after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// --- TLS clients ----------------------------------------------------------------------------

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn client_config(roots: &RootCertStore, alpn: Vec<Vec<u8>>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Arc::new(config)
}

/// A TLS connection to the relay with SNI = [`DOMAIN`] (not yet handshaken).
fn try_tls_client(
    relay: SocketAddr,
    roots: &RootCertStore,
    alpn: Vec<Vec<u8>>,
) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect_timeout(&relay, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let name = ServerName::try_from(DOMAIN).expect("name");
    let conn = ClientConnection::new(client_config(roots, alpn), name).expect("client");
    Ok(StreamOwned::new(conn, tcp))
}

fn tls_client(relay: SocketAddr, roots: &RootCertStore, alpn: Vec<Vec<u8>>) -> Tls {
    try_tls_client(relay, roots, alpn).expect("connect to the relay")
}

struct Issued {
    alpn: Option<Vec<u8>>,
    leaf_names_domain: bool,
}

/// A completed handshake with SNI = [`DOMAIN`], verified against `roots`.
fn handshake(relay: SocketAddr, roots: &RootCertStore) -> Result<Issued, std::io::Error> {
    let mut tls = try_tls_client(relay, roots, vec![b"http/1.1".to_vec()])?;
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default();
    Ok(Issued {
        alpn: tls.conn.alpn_protocol().map(<[u8]>::to_vec),
        leaf_names_domain: leaf.windows(DOMAIN.len()).any(|w| w == DOMAIN.as_bytes()),
    })
}

fn get_over(mut s: impl Read + Write, host: &str, path: &str) -> Option<(u16, String)> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // A peer that closes without close_notify after a full response.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(_) => return None,
    }
    let out = String::from_utf8(out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

fn https_get(
    relay: SocketAddr,
    roots: &RootCertStore,
    host: &str,
    path: &str,
) -> Option<(u16, String)> {
    get_over(
        tls_client(relay, roots, vec![b"http/1.1".to_vec()]),
        host,
        path,
    )
}

/// GET over HTTPS to a loopback IP (pebble's API and management).
fn https_get_ip(addr: SocketAddr, roots: &RootCertStore, path: &str) -> Option<(u16, String)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = ClientConnection::new(client_config(roots, vec![]), name).ok()?;
    get_over(StreamOwned::new(conn, tcp), &addr.to_string(), path)
}

type Ws = WebSocket<Tls>;

/// One WebSocket upgrade through TLS; panics unless it gets a 101.
fn upgrade(
    relay: SocketAddr,
    roots: &RootCertStore,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Ws {
    let mut s = tls_client(relay, roots, vec![b"http/1.1".to_vec()]);
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write upgrade");
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read 101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    WebSocket::from_raw_socket(s, Role::Client, None)
}

fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

// --- small things ---------------------------------------------------------------------------

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("acme-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("work dir");
    dir
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn wait_until<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
