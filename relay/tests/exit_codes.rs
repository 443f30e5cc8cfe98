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

/// TLS is parsed but not built yet: refused at boot (exit 2), never silently ignored.
#[test]
fn unimplemented_features_refuse_to_start_with_exit_2() {
    let dir = std::env::temp_dir().join(format!("switchyard-unimpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let args = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:1",
        "--metrics-listen",
        "",
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
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
    let _ = std::fs::remove_dir_all(&dir);
}
