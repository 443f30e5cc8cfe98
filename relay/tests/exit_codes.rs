//! The executable's exit codes and stderr for the cases that end before the runtime starts
//! (PROTOCOL.md §13, §14.3; checklist item 74).

use std::process::{Command, Output};

mod common;

use common::free_port;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

/// Arguments, environment, and a name the error line must contain.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_and_help_exit_0_on_stdout() {
    let out = run(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("switchyard ", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--max-connections"));
    assert!(out.stderr.is_empty());
}

#[test]
fn refusals_exit_2_with_one_line_and_an_event() {
    let cases: &[Case] = &[
        (&["--max-connections", "0"], &[], "--max-connections"),
        (&["--tls-cert", "/nonexistent.pem"], &[], "--tls-cert"),
        (
            &["--metrics-listen", "localhost:9090"],
            &[],
            "--metrics-listen",
        ),
        (
            &[],
            &[("PYRYCODE_RELAY_PRODUCTION", "true")],
            "PYRYCODE_RELAY_PRODUCTION",
        ),
        (
            &[],
            &[("FLY_APP_NAME", "relay")],
            "PYRYCODE_RELAY_SINGLE_INSTANCE",
        ),
        (
            &["--production", "--listen", "0.0.0.0:8080"],
            &[],
            "production",
        ),
        (&["--bogus"], &[], "--bogus"),
    ];
    for (args, env, names) in cases {
        let out = run(args, env);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        let err = stderr(&out);
        let mut lines = err.lines();
        let first = lines.next().unwrap_or_default();
        assert!(first.starts_with("switchyard: "), "{err}");
        assert!(first.contains(names), "{err}");
        let event = lines.next().unwrap_or_default();
        assert!(
            event.contains("level=error msg=refusing_to_start reason="),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn refusal_event_follows_the_wanted_log_format() {
    let out = run(&["--log-format", "json", "--max-connections", "0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let event = err.lines().nth(1).unwrap();
    assert!(event.starts_with("{\"time\":"), "{err}");
    assert!(event.contains("\"msg\":\"refusing_to_start\""), "{err}");
}

#[test]
fn credentials_are_never_echoed() {
    let key = r#"{"type":"service_account","client_email":"","private_key":"TOP-SECRET"}"#;
    let out = run(&[], &[("PYRYCODE_RELAY_FCM_CREDENTIALS", key)]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("PYRYCODE_RELAY_FCM_CREDENTIALS"), "{err}");
    assert!(!err.contains("TOP-SECRET"), "{err}");
}

// ---- production mode (§14.3 item 5, checklist item 74) ------------------------------------
//
// The relay checks, in order: a plain listener on a non-loopback address, a metrics address
// that is not loopback, then the effective uid, then the capabilities. The first two are
// therefore refused the same way whether or not the tests run as root (CI runs them as root).
// The uid and capability rules depend on who runs the test: as root, a loopback configuration
// must be refused for root, and `setpriv` (util-linux) runs the relay as `nobody` to show that
// the same configuration starts, that `CAP_NET_BIND_SERVICE` alone is allowed and that any other
// capability is refused. As an ordinary user, the configuration must start, and capabilities
// cannot be granted, so that rule is left to the unit tests of `cli.rs`.

const RUNTIMES: [&str; 2] = ["tokio", "smol"];

/// Environment variables given to the relay.
type Env = &'static [(&'static str, &'static str)];

/// The two ways to ask for production mode: the flag, and the reference relay's variable.
const PRODUCTION_WAYS: [(&[&str], Env); 2] = [
    (&["--production"], &[]),
    (&[], &[("PYRYCODE_RELAY_PRODUCTION", "1")]),
];

/// Every combination of runtime and way of asking for production mode, as extra arguments and
/// environment.
fn production_variants() -> Vec<(Vec<&'static str>, Env)> {
    let mut v = Vec::new();
    for runtime in RUNTIMES {
        for (flags, env) in PRODUCTION_WAYS {
            let mut args = vec!["--runtime", runtime];
            args.extend_from_slice(flags);
            v.push((args, env));
        }
    }
    v
}

/// Asserts a production refusal: exit 2, nothing on stdout, and on stderr exactly one line for
/// people (naming the rule and its fix) and the `refusing_to_start` event with `reason`.
fn assert_refused(out: &Output, reason: &str, says: &str, context: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{context}: {err}");
    assert!(out.stdout.is_empty(), "{context}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{context}: {err}");
    assert!(
        lines[0].starts_with("switchyard: production mode: ") && lines[0].contains(says),
        "{context}: {err}"
    );
    assert!(
        lines[1].contains(&format!(
            "level=error msg=refusing_to_start reason={reason} "
        )),
        "{context}: {err}"
    );
}

#[test]
fn production_refuses_a_plain_listener_on_a_non_loopback_address() {
    // `:PORT` means every address (L5); a host name never counts as loopback.
    for listen in [
        "0.0.0.0:8080",
        "[::]:8080",
        ":8080",
        "192.0.2.10:8080",
        "localhost:8080",
    ] {
        for (mut args, env) in production_variants() {
            args.extend_from_slice(&["--listen", listen]);
            let out = run(&args, env);
            assert_refused(
                &out,
                "production_plain_listener",
                "plain HTTP on a non-loopback address",
                &format!("{args:?} {env:?}"),
            );
        }
    }
}

#[test]
fn production_refuses_metrics_on_a_non_loopback_address() {
    let listen = format!("127.0.0.1:{}", free_port());
    for metrics in ["0.0.0.0:9090", "[::]:9090", "192.0.2.10:9090"] {
        for (mut args, env) in production_variants() {
            args.extend_from_slice(&["--listen", &listen, "--metrics-listen", metrics]);
            let out = run(&args, env);
            assert_refused(
                &out,
                "production_metrics",
                "--metrics-listen is not a loopback address",
                &format!("{args:?} {env:?}"),
            );
        }
    }
}

/// The effective uid of this test process, read as the relay reads its own.
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .expect("an effective uid")
}

/// `setpriv`, to run the relay as `nobody` with chosen capabilities, when it is installed and
/// this process may switch users (root with `CAP_SETUID`, which a container may withhold).
fn setpriv() -> Option<&'static str> {
    let path = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let works = relay_command(Some((path, &[])), &["--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    works.then_some(path)
}

/// The relay, or the relay as `nobody` with exactly `caps` (names such as `net_raw`) when
/// `as_nobody` is given the `setpriv` path.
fn relay_command(as_nobody: Option<(&str, &[&str])>, args: &[&str]) -> Command {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let mut cmd = match as_nobody {
        None => Command::new(bin),
        Some((setpriv, caps)) => {
            let mut c = Command::new(setpriv);
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
            if !caps.is_empty() {
                let list: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
                let list = list.join(",");
                c.arg(format!("--inh-caps={list}"));
                c.arg(format!("--ambient-caps={list}"));
            }
            c.arg(bin);
            c
        }
    };
    cmd.args(args).env_clear();
    cmd
}

/// Starts the relay, waits for `/healthz` to answer 200, sends SIGTERM and expects exit 0.
fn assert_starts(mut cmd: Command, main: u16, context: &str) {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the relay");
    let deadline = Instant::now() + Duration::from_secs(10);
    let healthz = || -> Option<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], main));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let answer = loop {
        if let Some(a) = healthz() {
            break a;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("{context}: exited {status} instead of starting: {err}");
        }
        assert!(Instant::now() < deadline, "{context}: never answered");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(answer.starts_with("HTTP/1.1 200 "), "{context}: {answer}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(11);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{context}: still running after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{context}");
}

#[test]
fn production_refuses_root_and_extra_capabilities_and_starts_otherwise() {
    let root = euid() == 0;
    let setpriv = if root { setpriv() } else { None };
    if root && setpriv.is_none() {
        eprintln!(
            "note: root without a working setpriv: only the root refusal is checked; \
             install util-linux to check the capability rule and the allowed start"
        );
    }
    for (flags, env) in production_variants() {
        let (main, metrics) = (free_port(), free_port());
        let (listen, metrics_listen) =
            (format!("127.0.0.1:{main}"), format!("127.0.0.1:{metrics}"));
        let mut args = flags.clone();
        args.extend_from_slice(&["--listen", &listen, "--metrics-listen", &metrics_listen]);
        let context = format!("{args:?} {env:?}");
        let with_env = |mut cmd: Command| {
            cmd.envs(env.iter().copied());
            cmd
        };
        if !root {
            // An ordinary user cannot gain capabilities to test the last rule here.
            assert_starts(with_env(relay_command(None, &args)), main, &context);
            continue;
        }
        let out = with_env(relay_command(None, &args))
            .output()
            .expect("the binary runs");
        assert_refused(&out, "production_root", "running as root", &context);
        let Some(setpriv) = setpriv else {
            continue;
        };
        let out = with_env(relay_command(Some((setpriv, &["net_raw"])), &args))
            .output()
            .expect("setpriv runs");
        assert_refused(
            &out,
            "production_capabilities",
            "effective capabilities beyond CAP_NET_BIND_SERVICE",
            &format!("{context} as nobody with CAP_NET_RAW"),
        );
        assert_starts(
            with_env(relay_command(Some((setpriv, &[])), &args)),
            main,
            &format!("{context} as nobody"),
        );
        assert_starts(
            with_env(relay_command(Some((setpriv, &["net_bind_service"])), &args)),
            main,
            &format!("{context} as nobody with CAP_NET_BIND_SERVICE"),
        );
    }
}

/// §14.3 item 2: a certificate and a key that do not belong together are refused before any
/// listener is bound, with one line naming the flag and nothing from the files.
#[test]
fn mismatched_tls_pair_refuses_to_start_with_exit_2() {
    let dir = std::env::temp_dir().join(format!("switchyard-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert_key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&cert, params.self_signed(&cert_key).unwrap().pem()).unwrap();
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    std::fs::write(&key, &other).unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listen.local_addr().unwrap().to_string();
    drop(listen);
    let out = run(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--listen",
            &addr,
            "--metrics-listen",
            "",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let mut lines = err.lines();
    assert_eq!(
        lines.next().unwrap_or_default(),
        "switchyard: the private key named by --tls-key does not belong to the certificate named \
         by --tls-cert; give the key the certificate was issued for"
    );
    let event = lines.next().unwrap_or_default();
    assert!(
        event.contains("level=error msg=refusing_to_start reason=tls_file"),
        "{err}"
    );
    assert_eq!(lines.next(), None, "{err}");
    let body_line = other.lines().nth(1).unwrap();
    assert!(!err.contains(body_line), "{err}");
    assert!(!err.contains(dir.to_str().unwrap()), "{err}");
    // Nothing was bound.
    assert!(std::net::TcpStream::connect(&addr).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
