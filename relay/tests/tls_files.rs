//! The `switchyard` binary with `--tls-cert`/`--tls-key` (PROTOCOL.md §2.1, §14.2): it serves
//! over TLS, says `mode=tls` when it starts listening, picks up a renewed pair written over the
//! files without a restart, and treats SIGHUP as a rebalance, not a reload.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use switchyard_runtime::rustls::client::Resumption;
use switchyard_runtime::rustls::pki_types::{CertificateDer, ServerName};
use switchyard_runtime::rustls::{
    self, ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A CA and a `localhost` certificate it signed: (CA certificate, leaf PEM, key PEM, leaf DER).
fn pki() -> (CertificateDer<'static>, String, String, Vec<u8>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        ca_cert.der().clone(),
        leaf.pem(),
        key.serialize_pem(),
        leaf.der().to_vec(),
    )
}

fn client(ca: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// `GET /healthz` over TLS: the status and the certificate the relay presented.
fn healthz(addr: SocketAddr, config: &Arc<ClientConfig>) -> Option<(u16, Vec<u8>)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).ok()?;
    let mut s = StreamOwned::new(conn, tcp);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let cert = s.conn.peer_certificates()?[0].to_vec();
    Some((status, cert))
}

fn eventually<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_pair(cert: &Path, key: &Path, cert_pem: &str, key_pem: &str) {
    std::fs::write(cert, cert_pem).unwrap();
    std::fs::write(key, key_pem).unwrap();
}

fn kill(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn serves_tls_and_reloads_renewed_files_without_restart() {
    let dir = std::env::temp_dir().join(format!("switchyard-tls-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, log) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("stderr"),
    );
    let (ca_a, cert_a, key_a, der_a) = pki();
    write_pair(&cert, &key, &cert_a, &key_a);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", &addr.to_string(), "--metrics-listen", ""])
        .args(["--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", key.to_str().unwrap()])
        .env_remove("FLY_APP_NAME")
        .env_remove("PYRYCODE_RELAY_PRODUCTION")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn switchyard");
    let a = client(&ca_a);
    let (status, served) = eventually("TLS /healthz", Duration::from_secs(10), || {
        healthz(addr, &a)
    });
    assert_eq!((status, served), (200, der_a.clone()));
    let logs = std::fs::read_to_string(&log).unwrap();
    let listening = logs
        .lines()
        .find(|l| l.contains("msg=listening"))
        .expect("listening line");
    assert!(listening.contains("mode=tls"), "{listening}");

    // SIGHUP is a rebalance: the process keeps serving the same pair.
    kill(&child, "HUP");
    assert_eq!(healthz(addr, &a), Some((200, der_a)));

    let (ca_b, cert_b, key_b, der_b) = pki();
    write_pair(&cert, &key, &cert_b, &key_b);
    let b = client(&ca_b);
    let served = eventually("the renewed pair", Duration::from_secs(15), || {
        healthz(addr, &b)
    });
    assert_eq!(served, (200, der_b));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("msg=tls_reloaded")
    );

    kill(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(11);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
