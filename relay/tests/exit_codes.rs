//! The executable's exit codes and stderr for the cases that end before the runtime starts
//! (PROTOCOL.md §13, §14.3; checklist item 74).

use std::process::{Command, Output};

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

/// The PROXY protocol (main and http-01 listeners) is parsed but not built yet: refused at boot
/// (exit 2), never silently ignored.
#[test]
fn unimplemented_features_refuse_to_start_with_exit_2() {
    let dir = std::env::temp_dir().join(format!("switchyard-unimpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("certs");
    for args in [
        vec![
            "--proxy-protocol",
            "--listen",
            "127.0.0.1:1",
            "--metrics-listen",
            "",
        ],
        vec![
            "--domain",
            "relay.example.com",
            "--cert-cache",
            cache.to_str().unwrap(),
            "--acme-http-listen",
            "127.0.0.1:1",
            "--acme-http-proxy-protocol",
            "--listen",
            "127.0.0.1:1",
            "--metrics-listen",
            "",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("not_implemented"));
    }
    let _ = std::fs::remove_dir_all(&dir);
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
