//! The built `switchyard` binary as a process: listeners, signals and exit codes (PROTOCOL.md
//! §13, checklist items 4, 72, 75, 78).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, http_get};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .env_remove("FLY_APP_NAME")
        .env_remove("PYRYCODE_RELAY_PRODUCTION")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn switchyard")
}

/// Polls `path` until it answers.
fn wait_for(addr: SocketAddr, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = http_get(addr, path) {
            return r;
        }
        assert!(Instant::now() < deadline, "{addr}{path} never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ports() -> (SocketAddr, SocketAddr) {
    let main: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (main, metrics)
}

#[test]
fn item_4_no_arguments_serve_the_defaults() {
    let main: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let metrics: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    // The default ports are shared with whatever else runs on this machine.
    if TcpListener::bind(main).is_err() || TcpListener::bind(metrics).is_err() {
        eprintln!("skipped: 127.0.0.1:8080 or :9090 is in use");
        return;
    }
    let mut child = spawn(&[]);
    let (status, body) = wait_for(main, "/healthz");
    assert_eq!(status, 200);
    assert!(body.starts_with(r#"{"status":"ok""#), "{body}");
    let (status, body) = wait_for(metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"));
    signal(&child, "TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(11)).code(),
        Some(0)
    );
}

/// Serves on ephemeral ports with `runtime_args`, survives SIGHUP, exits 0 on SIGTERM and stops
/// listening.
fn sigterm_exits_0_and_stops_listening(runtime_args: &[&str]) {
    let (main, metrics) = ports();
    let (main_arg, metrics_arg) = (main.to_string(), metrics.to_string());
    let mut args = vec!["--listen", &main_arg, "--metrics-listen", &metrics_arg];
    args.extend_from_slice(runtime_args);
    let mut child = spawn(&args);
    assert_eq!(wait_for(main, "/healthz").0, 200);
    let (status, body) = wait_for(metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"));
    // SIGHUP (rebalance) does not stop the process.
    signal(&child, "HUP");
    assert_eq!(wait_for(main, "/healthz").0, 200);
    let t = Instant::now();
    signal(&child, "TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(11)).code(),
        Some(0)
    );
    assert!(t.elapsed() < Duration::from_secs(11));
    assert!(TcpStream::connect(main).is_err(), "still listening");
}

#[test]
fn item_72_sigterm_exits_0_and_stops_listening() {
    sigterm_exits_0_and_stops_listening(&[]);
}

#[test]
fn item_72_smol_runtime_sigterm_exits_0() {
    sigterm_exits_0_and_stops_listening(&["--runtime", "smol"]);
}

#[test]
fn item_78_drain_delay_answers_draining_then_exits() {
    let (main, metrics) = ports();
    let mut child = spawn(&[
        "--listen",
        &main.to_string(),
        "--metrics-listen",
        &metrics.to_string(),
        "--drain-delay",
        "1s",
    ]);
    assert_eq!(wait_for(main, "/healthz").0, 200);
    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, body) = wait_for(main, "/healthz");
        if status == 503 {
            assert!(body.starts_with(r#"{"status":"draining""#), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never draining");
    }
    // A second signal during the delay is ignored.
    signal(&child, "TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(11)).code(),
        Some(0)
    );
}

#[test]
fn item_75_port_in_use_exits_1() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = spawn(&["--listen", &addr, "--metrics-listen", ""]);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(5)).code(),
        Some(1)
    );
}

#[test]
fn bad_flag_exits_2() {
    let mut child = spawn(&["--no-such-flag"]);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(5)).code(),
        Some(2)
    );
}

/// ACME-mode arguments with an unreachable directory: the node starts, orders fail (logged).
fn acme_args<'a>(cache: &'a str, main: &'a str) -> Vec<&'a str> {
    vec![
        "--domain",
        "relay.example.com",
        "--acme-directory",
        "https://127.0.0.1:1/dir",
        "--cert-cache",
        cache,
        "--listen",
        main,
        "--metrics-listen",
        "",
    ]
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("process-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn run_output(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("FLY_APP_NAME")
        .env_remove("PYRYCODE_RELAY_PRODUCTION")
        .stdin(Stdio::null())
        .output()
        .expect("run switchyard")
}

#[test]
fn unusable_cert_cache_exits_1() {
    let dir = scratch("cache-unusable");
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (main, _) = ports();
    let main = main.to_string();
    for cache in [file.clone(), file.join("below")] {
        let out = run_output(&acme_args(cache.to_str().unwrap(), &main));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cache:?}: {err}");
        assert!(err.contains("reason=cert_cache"), "{err}");
        assert!(!err.contains("msg=listening"), "{err}");
    }
    // Owned by another user: only root can make one here.
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    if root {
        let foreign = dir.join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(
            &foreign,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let out = run_output(&acme_args(foreign.to_str().unwrap(), &main));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("not owned by the effective uid"), "{err}");
        assert_eq!(mode(&foreign), 0o755, "a foreign cache is left alone");
    } else {
        eprintln!("not root: the foreign-owner case is covered by the unit tests only");
    }
}

#[test]
fn open_cert_cache_is_tightened_and_a_missing_one_created_0700() {
    let dir = scratch("cache-modes");
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o775)).unwrap();
    let fresh = dir.join("fresh").join("certs");
    for (cache, log) in [(&open, "outcome=tightened"), (&fresh, "msg=listening")] {
        let (main, _) = ports();
        let main = main.to_string();
        let mut child = Command::new(BIN)
            .args(acme_args(cache.to_str().unwrap(), &main))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(main.as_str()).is_err() {
            assert!(Instant::now() < deadline, "never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(mode(cache), 0o700, "{cache:?}");
        signal(&child, "TERM");
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(10)).code(),
            Some(0)
        );
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(err.contains(log), "{err}");
        assert!(err.contains("mode=acme"), "{err}");
    }
}

#[test]
fn bad_acme_ca_file_exits_2() {
    let dir = scratch("acme-refusals");
    // Looks like PEM but holds no certificate a root store takes (refused as it is parsed).
    let bad_ca = dir.join("bad-ca.pem");
    std::fs::write(
        &bad_ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cache = dir.join("certs");
    let (main, _) = ports();
    let main = main.to_string();
    let mut with_ca = acme_args(cache.to_str().unwrap(), &main);
    with_ca.extend(["--acme-ca-file", bad_ca.to_str().unwrap()]);
    let out = run_output(&with_ca);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--acme-ca-file"), "{err}");
    assert!(err.contains("reason=tls_file"), "{err}");
}

/// A request to a listener behind `prefix`; `None` when the relay closed writing nothing.
fn get_behind(addr: SocketAddr, prefix: &[u8], path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = prefix.to_vec();
    request.extend(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").bytes());
    let _ = s.write_all(&request);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => panic!("not closed"),
        _ => {}
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// `--proxy-protocol` (and its alias and variable) on both runtimes: the main listener serves
/// only behind a PROXY v2 header, the metrics listener plain HTTP, and the `listening` line says
/// so (item 24).
#[test]
fn item_24_proxy_protocol_flag_on_both_runtimes() {
    // PROXY, TCP over IPv4, 203.0.113.1:40000 → 10.0.0.1:8080.
    let header =
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x01\x0a\x00\x00\x01\x9c\x40\x1f\x90";
    let setups = [
        (&["--proxy-protocol"][..], None),
        (&["--runtime", "smol", "--https-proxy-protocol"], None),
        (
            &["--runtime", "smol"],
            Some(("SWITCHYARD_PROXY_PROTOCOL", "1")),
        ),
    ];
    for (flags, env) in setups {
        let (main, metrics) = ports();
        let (main_arg, metrics_arg) = (main.to_string(), metrics.to_string());
        let mut args = vec!["--listen", &main_arg, "--metrics-listen", &metrics_arg];
        args.extend_from_slice(flags);
        let mut command = Command::new(BIN);
        command
            .args(&args)
            .env_remove("FLY_APP_NAME")
            .env_remove("PYRYCODE_RELAY_PRODUCTION")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((k, v)) = env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn switchyard");
        assert_eq!(wait_for(metrics, "/metrics").0, 200, "{args:?}");
        assert_eq!(get_behind(main, header, "/healthz"), Some(200), "{args:?}");
        assert_eq!(get_behind(main, b"", "/healthz"), None, "{args:?}");
        signal(&child, "TERM");
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(11)).code(),
            Some(0)
        );
        let mut log = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut log)
            .unwrap();
        let listening = log
            .lines()
            .find(|l| l.contains("msg=listening"))
            .unwrap_or_else(|| panic!("no listening line: {log}"));
        assert!(listening.contains("mode=proxy+http"), "{listening}");
    }
}

/// `--acme-http-proxy-protocol` (§3.2) on both runtimes: the http-01 listener takes a PROXY v2
/// header before the head; without one the connection is closed writing nothing.
#[test]
fn acme_http_listener_takes_proxy_v2_when_asked() {
    let header =
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x01\x0a\x00\x00\x01\x9c\x40\x1f\x90";
    let dir = scratch("acme-http-proxy");
    for runtime in ["tokio", "smol"] {
        let cache = dir.join(runtime);
        let (main, http01) = ports();
        let (main_arg, http01_arg) = (main.to_string(), http01.to_string());
        let mut args = acme_args(cache.to_str().unwrap(), &main_arg);
        args.extend(["--runtime", runtime, "--acme-http-listen", &http01_arg]);
        args.push("--acme-http-proxy-protocol");
        let mut child = spawn(&args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(http01).is_err() {
            assert!(Instant::now() < deadline, "{runtime}: never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let path = "/.well-known/acme-challenge/no-such-token";
        assert_eq!(get_behind(http01, header, path), Some(404), "{runtime}");
        assert_eq!(get_behind(http01, header, "/"), Some(404), "{runtime}");
        assert_eq!(get_behind(http01, b"", path), None, "{runtime}");
        signal(&child, "TERM");
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(10)).code(),
            Some(0),
            "{runtime}"
        );
    }
}
