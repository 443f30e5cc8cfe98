//! Push wake end to end (PROTOCOL.md §11, §18 items 61–66): a binary's wake goes through the
//! relay to real HTTP doubles of the token endpoint and FCM on loopback ([`crate::doubles`]).
//! The relay's push sender is built as the `switchyard` binary builds it, from a
//! service-account JSON holding a test-only RSA key.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use switchyard_core::{Config, Counters, PushOutcome};
use switchyard_runtime::PushSink;

use crate::client::{Ws, binary, eventually, get, phone};
use crate::doubles::{HttpDouble, Reply, Request, refused_url};
use crate::{RelayUnderTest, Running, test_config};

/// A test-only key: it signs nothing outside these tests.
const TEST_KEY: &str = include_str!("../../push/testdata/test-only-key-pkcs8.pem");
const PROJECT: &str = "test-project";
const EMAIL: &str = "relay@test-project.iam.gserviceaccount.com";
const KEY_ID: &str = "test-key-id";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const SEND_PATH: &str = "/v1/projects/test-project/messages:send";

// ---- rig ----------------------------------------------------------------------------------

/// The service-account JSON an operator would give `--fcm-credentials`.
fn credentials_json() -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": KEY_ID,
        "private_key": TEST_KEY,
        "client_email": EMAIL,
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string()
}

/// Where a relay's push sender calls, and its per-call timeout.
struct Rig {
    token_url: String,
    endpoint: String,
    timeout: Duration,
}

impl Rig {
    fn new(token: &HttpDouble, fcm: &HttpDouble) -> Rig {
        Rig {
            token_url: token.url("/token"),
            endpoint: fcm.url(""),
            timeout: Duration::from_secs(2),
        }
    }

    fn timeout(self, timeout: Duration) -> Rig {
        Rig { timeout, ..self }
    }

    fn start<R: RelayUnderTest>(&self, tweak: impl FnOnce(&mut Config)) -> Running {
        let mut config = test_config();
        config.push_enabled = true;
        tweak(&mut config);
        let credentials = switchyard::cli::parse_service_account(&credentials_json())
            .expect("the test credentials are valid");
        let push = switchyard::Push {
            credentials,
            endpoint: self.endpoint.clone(),
            token_url: self.token_url.clone(),
            project_id: PROJECT.to_owned(),
            timeout: self.timeout,
        };
        let sink: Arc<dyn PushSink> = switchyard::pusher(&push, &config).expect("push sender");
        R::start_with_push(config, Some(sink))
    }
}

/// A token endpoint answering request `n` with access token `ya29.test-access-<n+1>`.
fn token_double(expires_in: Option<u64>) -> HttpDouble {
    HttpDouble::start(move |_, n| {
        let mut body = serde_json::json!({
            "access_token": format!("ya29.test-access-{}", n + 1),
            "token_type": "Bearer",
        });
        if let Some(e) = expires_in {
            body["expires_in"] = e.into();
        }
        Reply::json(200, body.to_string())
    })
}

fn fcm_ok(_: &Request, n: usize) -> Reply {
    Reply::json(
        200,
        format!(r#"{{"name":"projects/{PROJECT}/messages/0:{n}%25test"}}"#),
    )
}

fn fcm_unregistered(_: &Request, _: usize) -> Reply {
    Reply::json(
        404,
        r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND",
            "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
    )
}

fn wake(token: &str) -> String {
    format!(r#"{{"push_wake":{{"platform":"fcm","token":"{token}"}}}}"#)
}

fn push(c: &Counters, o: PushOutcome) -> u64 {
    c.push(o)
}

/// Waits until the push counters are exactly `expected` (outcome, count); others 0.
fn outcomes(relay: &Running, expected: &[(PushOutcome, u64)]) {
    let want = |o: PushOutcome| {
        expected
            .iter()
            .find(|(e, _)| *e == o)
            .map_or(0, |(_, n)| *n)
    };
    eventually(&format!("push outcomes {expected:?}"), || {
        let c = relay.counters();
        PushOutcome::ALL.iter().all(|o| push(&c, *o) == want(*o))
    });
}

fn metrics(addr: SocketAddr) -> String {
    get(addr, "/metrics").body_text().to_owned()
}

fn cell(outcome: PushOutcome, n: u64) -> String {
    format!(
        "pyrycode_relay_push_wakes_total{{outcome=\"{}\"}} {n}",
        outcome.as_str()
    )
}

/// Decodes `application/x-www-form-urlencoded`.
fn form(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                    out.push(u8::from_str_radix(hex, 16).expect("hex"));
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).expect("UTF-8")
    };
    body.split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("k=v");
            (decode(k), decode(v))
        })
        .collect()
}

fn b64_json(part: &str) -> serde_json::Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

/// Checks a token request: a JWT-bearer grant whose assertion is an RS256 JWT with §11's
/// header and claims, signed by the test key. Returns the assertion.
fn check_token_request(r: &Request, token_url: &str) -> String {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/token");
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let fields = form(r.body_text());
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["grant_type", "assertion"]);
    assert_eq!(fields[0].1, GRANT);
    let jwt = fields[1].1.clone();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS compact serialisation");
    assert_eq!(
        b64_json(parts[0]),
        serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": KEY_ID})
    );
    let claims = b64_json(parts[1]);
    assert_eq!(claims["iss"], EMAIL);
    assert_eq!(claims["scope"], SCOPE);
    assert_eq!(claims["aud"], token_url);
    let iat = claims["iat"].as_u64().expect("iat");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(iat.abs_diff(now) < 300, "iat {iat} is now ({now})");
    assert_eq!(claims["exp"].as_u64(), Some(iat + 3600));
    assert_eq!(
        claims.as_object().unwrap().len(),
        5,
        "exactly iss, scope, aud, iat, exp"
    );
    let public = switchyard_push::SigningKey::from_pem(TEST_KEY).unwrap();
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("signature");
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public.public_key_der())
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .expect("the JWT signature verifies with the service account's public key");
    jwt
}

/// Checks an FCM request: §11's path, headers and exact body for `device`.
fn check_send(r: &Request, device: &str, bearer: &str) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, SEND_PATH);
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {bearer}").as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        r.header("user-agent")
            .is_some_and(|ua| ua.starts_with("switchyard/"))
    );
    assert_eq!(
        r.body_text(),
        format!(r#"{{"message":{{"token":"{device}","android":{{"priority":"HIGH"}}}}}}"#)
    );
}

// ---- scenarios ----------------------------------------------------------------------------

pub fn item_61_wake_sent_with_jwt_and_exact_body<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(fcm_ok);
    let rig = Rig::new(&token, &fcm);
    let relay = rig.start::<R>(|_| {});
    // Every outcome cell exists at 0 before any wake (§12).
    let before = metrics(relay.metrics_addr);
    for o in PushOutcome::ALL {
        assert!(before.contains(&cell(*o, 0)), "{}", cell(*o, 0));
    }
    let mut b = binary(relay.addr, "i61");
    b.send(&wake("device-token-61"));
    outcomes(&relay, &[(PushOutcome::Sent, 1)]);
    let tokens = token.requests();
    assert_eq!(tokens.len(), 1);
    check_token_request(&tokens[0], &rig.token_url);
    let sends = fcm.requests();
    assert_eq!(sends.len(), 1);
    check_send(&sends[0], "device-token-61", "ya29.test-access-1");
    assert!(metrics(relay.metrics_addr).contains(&cell(PushOutcome::Sent, 1)));
    // Nothing is reported back to the binary.
    b.silent(Duration::from_millis(100));
}

pub fn item_62_seventh_wake_dropped_by_bucket<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(fcm_ok);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "i62");
    for i in 0..7 {
        b.send(&wake(&format!("device-62-{i}")));
    }
    outcomes(&relay, &[(PushOutcome::Sent, 6), (PushOutcome::Dropped, 1)]);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(fcm.count(), 6);
    // The six concurrent sends shared one access token.
    assert_eq!(token.count(), 1);
    // Another server-id has its own bucket.
    let mut other = binary(relay.addr, "i62b");
    other.send(&wake("device-62-other"));
    outcomes(&relay, &[(PushOutcome::Sent, 7), (PushOutcome::Dropped, 1)]);
    let m = metrics(relay.metrics_addr);
    assert!(m.contains(&cell(PushOutcome::Sent, 7)));
    assert!(m.contains(&cell(PushOutcome::Dropped, 1)));
}

pub fn item_63_outcomes_unregistered_redirect_token_down<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(fcm_unregistered);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "i63");
    b.send(&wake("device-63-a"));
    outcomes(&relay, &[(PushOutcome::Unregistered, 1)]);

    // A 3xx is a failure and is not followed.
    let elsewhere = fcm.url("/elsewhere");
    fcm.set_reply(move |_, _| Reply::Respond {
        status: 302,
        headers: vec![("Location", elsewhere.clone())],
        body: String::new(),
    });
    b.send(&wake("device-63-b"));
    outcomes(
        &relay,
        &[(PushOutcome::Unregistered, 1), (PushOutcome::SendFailed, 1)],
    );
    thread::sleep(Duration::from_millis(100));
    let paths: Vec<String> = fcm.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, [SEND_PATH, SEND_PATH]);

    // Token endpoint down: nothing reaches FCM.
    let fcm = HttpDouble::start(fcm_ok);
    let rig = Rig {
        token_url: refused_url("/token"),
        ..Rig::new(&token, &fcm)
    };
    let relay = rig.start::<R>(|_| {});
    let mut b = binary(relay.addr, "i63");
    b.send(&wake("device-63-c"));
    outcomes(&relay, &[(PushOutcome::TokenFetchFailed, 1)]);
    assert_eq!(fcm.count(), 0);
    assert!(metrics(relay.metrics_addr).contains(&cell(PushOutcome::TokenFetchFailed, 1)));
}

pub fn item_64_invalid_wakes_send_nothing<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(fcm_ok);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "i64");
    let mut p = phone(relay.addr, "i64");
    p.send(r#"{"hello":1}"#);
    let env: serde_json::Value = serde_json::from_str(&b.text()).unwrap();
    let id = env["conn_id"].as_str().unwrap().to_owned();
    let long = "t".repeat(4097);
    for bad in [
        r#"{"push_wake":{"platform":"apns","token":"device-64"}}"#.to_owned(),
        r#"{"push_wake":{"platform":"fcm","token":""}}"#.to_owned(),
        r#"{"push_wake":{"platform":"FCM","token":"device-64"}}"#.to_owned(),
        r#"{"push_wake":{"platform":"fcm","token":42}}"#.to_owned(),
        r#"{"push_wake":"fcm"}"#.to_owned(),
        wake(&long),
    ] {
        b.send(&bad);
    }
    // With a conn_id it is a delivery; the wake is ignored (row 7).
    b.send(&format!(
        r#"{{"conn_id":"{id}","frame":{{"t":"hi"}},"push_wake":{{"platform":"fcm","token":"device-64-row7"}}}}"#
    ));
    assert_eq!(p.text(), r#"{"t":"hi"}"#);
    // A valid wake after them all: once it is sent, nothing else was.
    b.send(&wake("device-64-valid"));
    outcomes(&relay, &[(PushOutcome::Sent, 1)]);
    thread::sleep(Duration::from_millis(200));
    let sends = fcm.requests();
    assert_eq!(sends.len(), 1);
    check_send(&sends[0], "device-64-valid", "ya29.test-access-1");
    outcomes(&relay, &[(PushOutcome::Sent, 1)]);
}

pub fn item_65_push_off_sends_nothing<R: RelayUnderTest>() {
    let relay = R::start(test_config());
    let mut b = binary(relay.addr, "i65");
    let mut p = phone(relay.addr, "i65");
    b.send(&wake("device-65"));
    // The binary is unaffected: frames still flow.
    p.send(r#"{"after":"wake"}"#);
    assert!(b.text().ends_with(r#""frame":{"after":"wake"}}"#));
    let c = relay.counters();
    assert!(PushOutcome::ALL.iter().all(|o| c.push(*o) == 0));
    assert!(!metrics(relay.metrics_addr).contains("push_wakes"));
}

pub fn item_66_stalled_fcm_does_not_slow_frames<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(|_, _| Reply::Stall);
    let relay = Rig::new(&token, &fcm)
        .timeout(Duration::from_secs(60))
        .start::<R>(|_| {});
    let mut b = binary(relay.addr, "i66");
    let mut p = phone(relay.addr, "i66");
    p.send(r#"{"n":-1}"#);
    let env: serde_json::Value = serde_json::from_str(&b.text()).unwrap();
    let id = env["conn_id"].as_str().unwrap().to_owned();
    for i in 0..3 {
        b.send(&wake(&format!("device-66-{i}")));
    }
    eventually("three sends stuck at FCM", || fcm.count() == 3);
    let started = Instant::now();
    for n in 0..200 {
        p.send(&format!(r#"{{"n":{n}}}"#));
        assert_eq!(
            b.text(),
            format!(r#"{{"conn_id":"{id}","frame":{{"n":{n}}}}}"#)
        );
        b.send(&format!(r#"{{"conn_id":"{id}","frame":{{"back":{n}}}}}"#));
        assert_eq!(p.text(), format!(r#"{{"back":{n}}}"#));
    }
    // A generous bound: a frame path that waited on FCM would not finish at all.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // The wakes are still in flight: no outcome yet.
    outcomes(&relay, &[]);
    // Shutdown cancels them (§13), counted send_failed (§11).
    relay.shutdown();
    outcomes(&relay, &[(PushOutcome::SendFailed, 3)]);
    drop(b);
    drop(p);
    relay.stop();
}

pub fn push_token_reused_until_expiry<R: RelayUnderTest>() {
    // A long-lived token serves every send.
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(fcm_ok);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "tok");
    for i in 1..=3 {
        b.send(&wake(&format!("device-tok-{i}")));
        outcomes(&relay, &[(PushOutcome::Sent, i)]);
    }
    assert_eq!(token.count(), 1);
    for (i, r) in fcm.requests().iter().enumerate() {
        check_send(r, &format!("device-tok-{}", i + 1), "ya29.test-access-1");
    }

    // 63 s of life: cached for 3 s (refreshed 60 s before expiry), then fetched again.
    let token = token_double(Some(63));
    let fcm = HttpDouble::start(fcm_ok);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "tok");
    let first = Instant::now();
    b.send(&wake("device-exp-1"));
    outcomes(&relay, &[(PushOutcome::Sent, 1)]);
    b.send(&wake("device-exp-2"));
    outcomes(&relay, &[(PushOutcome::Sent, 2)]);
    assert_eq!(token.count(), 1, "reused within its life");
    let wait = Duration::from_millis(3300).saturating_sub(first.elapsed());
    thread::sleep(wait);
    b.send(&wake("device-exp-3"));
    outcomes(&relay, &[(PushOutcome::Sent, 3)]);
    assert_eq!(token.count(), 2, "refreshed 60 s before expiry");
    let sends = fcm.requests();
    check_send(&sends[1], "device-exp-2", "ya29.test-access-1");
    check_send(&sends[2], "device-exp-3", "ya29.test-access-2");
    check_token_request(&token.requests()[1], &token.url("/token"));

    // A token with 60 s or less to live is never cached.
    let token = token_double(Some(60));
    let fcm = HttpDouble::start(fcm_ok);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "tok");
    b.send(&wake("device-short-1"));
    outcomes(&relay, &[(PushOutcome::Sent, 1)]);
    b.send(&wake("device-short-2"));
    outcomes(&relay, &[(PushOutcome::Sent, 2)]);
    assert_eq!(token.count(), 2);
}

pub fn push_errors_and_timeouts_are_send_failed<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(|_, _| Reply::json(503, r#"{"error":{"status":"UNAVAILABLE"}}"#));
    let relay = Rig::new(&token, &fcm)
        .timeout(Duration::from_millis(500))
        .start::<R>(|c| c.push_burst = 100);
    let mut b = binary(relay.addr, "err");
    let mut failed = 0;
    let mut step = |b: &mut Ws, name: &str| {
        b.send(&wake(name));
        failed += 1;
        outcomes(&relay, &[(PushOutcome::SendFailed, failed)]);
    };
    // 5xx.
    step(&mut b, "device-err-503");
    // A 404 without the FcmError UNREGISTERED detail is not `unregistered`.
    fcm.set_reply(|_, _| {
        Reply::json(
            404,
            r#"{"error":{"code":404,"message":"Not found","status":"NOT_FOUND"}}"#,
        )
    });
    step(&mut b, "device-err-404");
    fcm.set_reply(|_, _| {
        Reply::json(
            400,
            r#"{"error":{"status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#,
        )
    });
    step(&mut b, "device-err-400");
    // A reply larger than 4 KiB: only the start is read, the outcome still decided.
    fcm.set_reply(|_, _| Reply::json(500, "x".repeat(64 * 1024)));
    step(&mut b, "device-err-big");
    // No answer within the timeout.
    fcm.set_reply(|_, _| Reply::Stall);
    let before = Instant::now();
    step(&mut b, "device-err-timeout");
    assert!(before.elapsed() >= Duration::from_millis(400));
    // A 401 fails the send and drops the cached access token: the next send fetches another.
    fcm.set_reply(|_, _| Reply::json(401, r#"{"error":{"status":"UNAUTHENTICATED"}}"#));
    step(&mut b, "device-err-401");
    assert_eq!(token.count(), 1);
    fcm.set_reply(fcm_ok);
    b.send(&wake("device-err-after-401"));
    outcomes(
        &relay,
        &[(PushOutcome::SendFailed, 6), (PushOutcome::Sent, 1)],
    );
    assert_eq!(token.count(), 2);
    let sends = fcm.requests();
    assert_eq!(sends.len(), 7);
    check_send(&sends[5], "device-err-401", "ya29.test-access-1");
    check_send(&sends[6], "device-err-after-401", "ya29.test-access-2");

    // The token endpoint failing or stalling is `token_fetch_failed`, and FCM is not called.
    let fcm = HttpDouble::start(fcm_ok);
    let token = HttpDouble::start(|_, _| Reply::json(500, "{}"));
    let relay = Rig::new(&token, &fcm)
        .timeout(Duration::from_millis(500))
        .start::<R>(|c| c.push_burst = 100);
    let mut b = binary(relay.addr, "err");
    b.send(&wake("device-tok-500"));
    outcomes(&relay, &[(PushOutcome::TokenFetchFailed, 1)]);
    token.set_reply(|_, _| Reply::json(200, r#"{"token_type":"Bearer"}"#));
    b.send(&wake("device-tok-empty"));
    outcomes(&relay, &[(PushOutcome::TokenFetchFailed, 2)]);
    token.set_reply(|_, _| Reply::Stall);
    b.send(&wake("device-tok-stall"));
    outcomes(&relay, &[(PushOutcome::TokenFetchFailed, 3)]);
    assert_eq!(token.count(), 3);
    assert_eq!(fcm.count(), 0);
}

pub fn push_in_flight_cap_drops_excess<R: RelayUnderTest>() {
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(|_, _| Reply::Stall);
    let relay = Rig::new(&token, &fcm)
        .timeout(Duration::from_secs(1))
        .start::<R>(|c| {
            c.push_max_in_flight = 2;
            c.push_burst = 100;
        });
    // Two server-ids: the cap is node-wide.
    let mut a = binary(relay.addr, "cap-a");
    let mut b = binary(relay.addr, "cap-b");
    a.send(&wake("device-cap-1"));
    eventually("first send at FCM", || fcm.count() == 1);
    b.send(&wake("device-cap-2"));
    eventually("second send at FCM", || fcm.count() == 2);
    a.send(&wake("device-cap-3"));
    b.send(&wake("device-cap-4"));
    outcomes(&relay, &[(PushOutcome::Dropped, 2)]);
    // The two in flight time out; then the cap has room again.
    outcomes(
        &relay,
        &[(PushOutcome::Dropped, 2), (PushOutcome::SendFailed, 2)],
    );
    fcm.set_reply(fcm_ok);
    a.send(&wake("device-cap-5"));
    outcomes(
        &relay,
        &[
            (PushOutcome::Dropped, 2),
            (PushOutcome::SendFailed, 2),
            (PushOutcome::Sent, 1),
        ],
    );
    assert_eq!(fcm.count(), 3);
    let m = metrics(relay.metrics_addr);
    assert!(m.contains(&cell(PushOutcome::Dropped, 2)));
    assert!(m.contains(&cell(PushOutcome::SendFailed, 2)));
}

/// Log lines of this test process, captured by the relay's own formatter.
pub(crate) fn captured_logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let subscriber = switchyard::logging::subscriber(
            switchyard::logging::LineFormat::new(switchyard::LogFormat::Text, None),
            move || Capture(logs),
        );
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the suite");
        logs
    })
}

struct Capture(&'static Mutex<Vec<u8>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn push_logs_fingerprint_never_token<R: RelayUnderTest>() {
    let logs = captured_logs();
    let token = token_double(Some(3600));
    let fcm = HttpDouble::start(fcm_ok);
    let relay = Rig::new(&token, &fcm).start::<R>(|_| {});
    let mut b = binary(relay.addr, "logs");
    let (sent, unregistered) = ("device-secret-sent-71", "device-secret-unreg-71");
    b.send(&wake(sent));
    outcomes(&relay, &[(PushOutcome::Sent, 1)]);
    fcm.set_reply(fcm_unregistered);
    b.send(&wake(unregistered));
    outcomes(
        &relay,
        &[(PushOutcome::Sent, 1), (PushOutcome::Unregistered, 1)],
    );
    let jwt = check_token_request(&token.requests()[0], &token.url("/token"));
    let fp = |t: &str| switchyard_push::token_fp(t);
    let line_with = |needle: &str| {
        eventually(needle, || {
            String::from_utf8_lossy(&logs.lock().unwrap()).contains(needle)
        });
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        text.lines()
            .find(|l| l.contains(needle))
            .expect("line")
            .to_owned()
    };
    let line = line_with(&format!("token_fp={}", fp(sent)));
    assert!(line.contains("msg=push_wake_sent"), "{line}");
    assert!(line.contains("server_id=logs"), "{line}");
    assert!(line.contains("fcm_message_id=0:0%25test"), "{line}");
    let line = line_with(&format!("token_fp={}", fp(unregistered)));
    assert!(line.contains("msg=push_wake_send_failed"), "{line}");
    assert!(line.contains("outcome=unregistered"), "{line}");
    assert!(line.contains("kind=NOT_FOUND"), "{line}");
    assert!(line.contains("reason=UNREGISTERED"), "{line}");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let key_line = TEST_KEY.lines().nth(1).unwrap();
    for secret in [
        sent,
        unregistered,
        "ya29.test-access",
        jwt.as_str(),
        jwt.split('.').nth(2).unwrap(),
        key_line,
        "Requested entity was not found",
    ] {
        assert!(!text.contains(secret), "logs contain {secret}");
    }
}
