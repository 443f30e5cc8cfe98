//! The built `switchyard` binary as a process: listeners, signals and exit codes (PROTOCOL.md
//! §13, checklist items 4, 72, 75, 78).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Polls `path` until it answers.
fn wait_for(addr: SocketAddr, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = get(addr, path) {
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

/// A request to the main listener behind `prefix`; `None` when the relay closed writing nothing.
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
