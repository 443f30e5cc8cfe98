//! Fuzz targets on the stable toolchain: the request-head gate, the metrics and http-01
//! listeners, the envelope parser and the PROXY v2 header decision, fed raw and structurally mutated bytes. Each asserts no panic and that
//! every answer is one PROTOCOL.md names; the envelope and PROXY targets also check the code
//! against an independent oracle (built on `serde_json::Value`, and written from the PROXY
//! protocol specification).
//!
//! `cargo test -p switchyard-core --test fuzz` runs a fixed budget; `FUZZ_CASES=1000000` runs more.
#![allow(clippy::disallowed_methods)] // the test's own clock origin

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, FileFailurePersistence};
use serde_json::Value;
use switchyard_core::{
    ACME_CHALLENGE_PREFIX, Answer, BinaryMessage, CloseCode, Config, Gate, Load, Verdict,
    answer_acme_http, answer_metrics, wrap_phone_frame,
};

fn runner(default_cases: u32) -> RunnerConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    RunnerConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proptest-regressions/fuzz.txt"
        )))),
        ..RunnerConfig::default()
    }
}

// ---- request heads -----------------------------------------------------------------------------

const HEADS: &[&str] = &[
    "GET /v1/server HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Pyrycode-Server: abc\r\nX-Pyrycode-Version: 1\r\nUser-Agent: ua\r\n\r\n",
    "GET /v1/client HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-pyrycode-server: abc\r\nx-pyrycode-token: t\r\nuser-agent: ua\r\nx-pyrycode-device-name: d\r\n\r\n",
    "GET /v2/client?x=1 HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-pyrycode-server: abc\r\nuser-agent: ua\r\nX-Forwarded-For: 10.1.2.3, 10.0.0.1\r\n\r\n",
    "POST /healthz HTTP/1.1\r\nHost: r\r\n\r\n",
    "GET /nope HTTP/1.0\r\n\r\n",
];

/// One structural mutation of a head.
#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Flip { at: usize, byte: u8 },
    DuplicateLine { line: usize },
    Truncate { at: usize },
    Uppercase,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..20))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u8),
                Just(b'\n'),
                Just(b'\r'),
                Just(b' '),
                Just(b':'),
                Just(0x7f),
                Just(0xff),
                any::<u8>()
            ]
        )
            .prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        Just(Mutation::Uppercase),
    ]
}

fn apply(head: &mut Vec<u8>, m: &Mutation) {
    let n = head.len().max(1);
    match m {
        Mutation::Delete { at, len } => {
            let at = at % n;
            let end = (at + len).min(head.len());
            head.drain(at.min(end)..end);
        }
        Mutation::Insert { at, bytes } => {
            let at = at % (head.len() + 1);
            head.splice(at..at, bytes.iter().copied());
        }
        Mutation::Flip { at, byte } => {
            if !head.is_empty() {
                let at = at % head.len();
                head[at] = *byte;
            }
        }
        Mutation::DuplicateLine { line } => {
            let text = head.clone();
            let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
            if lines.len() > 2 {
                let i = 1 + line % (lines.len() - 2);
                let dup = lines[i].to_vec();
                let at: usize = lines[..i].iter().map(|l| l.len()).sum();
                head.splice(at..at, dup);
            }
        }
        Mutation::Truncate { at } => head.truncate(at % n),
        Mutation::Uppercase => head.make_ascii_uppercase(),
    }
}

/// One of `heads`, structurally mutated up to five times.
fn mutated(heads: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(heads),
        prop::collection::vec(mutation(), 0..6),
    )
        .prop_map(|(h, ms)| {
            let mut head = h.as_bytes().to_vec();
            for m in &ms {
                apply(&mut head, m);
            }
            head
        })
}

fn head_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..600), mutated(HEADS),]
}

/// Checks one rendered response against §2–§3: status line, framing headers, body length.
fn check_response(bytes: &[u8], status: u16) {
    let text = String::from_utf8(bytes.to_vec()).expect("responses are ASCII");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
    if status != 101 {
        let connection = head.lines().find_map(|l| l.strip_prefix("Connection: "));
        // 426 says `Upgrade, close` (§3); every other answer `close`.
        assert!(connection.is_some_and(|c| c.ends_with("close")), "{head}");
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse::<usize>()
            .unwrap();
        // HEAD answers carry the length without the body.
        assert!(body.len() == len || body.is_empty(), "{head}");
        if status >= 400 && len > 0 {
            assert!(head.contains("X-Content-Type-Options: nosniff"), "{head}");
        }
    } else {
        assert!(body.is_empty());
        assert!(head.contains("\r\nSec-WebSocket-Accept: "));
    }
}

#[test]
fn gate_answers_every_head_with_a_status_protocol_md_names() {
    let t0 = Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new(runner(3000));
    let peers = [
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([10, 0, 0, 1]),
        "::ffff:10.0.0.1".parse().unwrap(),
    ];
    runner
        .run(
            &(
                prop::collection::vec((head_input(), 0..3usize, any::<bool>()), 1..8),
                any::<bool>(),
            ),
            |(heads, trust)| {
                let config = Config {
                    trust_forwarded_for: trust,
                    rate_burst: 3,
                    max_connections_per_ip: 2,
                    max_connections: 4,
                    domains: if trust { vec!["r".into()] } else { vec![] },
                    ..Config::default()
                };
                let max_head = config.max_head_size;
                let mut gate = Gate::new(config, t0);
                let mut held = Vec::new();
                for (i, (head, peer, release_now)) in heads.into_iter().enumerate() {
                    let head = &head[..head.len().min(max_head)];
                    let now = t0 + Duration::from_millis(i as u64 * 700);
                    match gate.handle_head(now, peers[peer], head, Load::default()) {
                        Verdict::Drop => {}
                        Verdict::Respond { response, slot } => {
                            prop_assert!(
                                [200, 400, 404, 405, 421, 426, 429, 431, 503]
                                    .contains(&response.status),
                                "status {}",
                                response.status
                            );
                            check_response(&response.bytes, response.status);
                            if let Some(slot) = slot {
                                prop_assert!([400, 405, 426, 431].contains(&response.status));
                                gate.release(slot);
                            }
                        }
                        Verdict::Upgrade {
                            response,
                            slot,
                            open,
                        } => {
                            prop_assert_eq!(response.status, 101);
                            check_response(&response.bytes, 101);
                            prop_assert!(!open.server_id.as_str().is_empty());
                            if release_now {
                                gate.release(slot)
                            } else {
                                held.push(slot)
                            }
                        }
                    }
                    prop_assert!(gate.open_slots() <= 4);
                }
                for slot in held {
                    gate.release(slot);
                }
                prop_assert_eq!(gate.open_slots(), 0, "every slot comes back");
                Ok(())
            },
        )
        .unwrap();
}

// ---- the metrics and http-01 listeners ---------------------------------------------------------

const LISTENER_HEADS: &[&str] = &[
    "GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n",
    "GET /metrics?a=b HTTP/1.1\r\n\r\n",
    "GET /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\nHost: d\r\n\r\n",
    "HEAD /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\n\r\n",
    "GET /.well-known/acme-challenge/other HTTP/1.0\r\n\r\n",
];

fn listener_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![head_input(), mutated(LISTENER_HEADS)]
}

/// The status of a written answer, after checking its framing.
fn listener_status(answer: &Answer) -> Option<u16> {
    let Answer::Write(bytes) = answer else {
        return None;
    };
    let status = std::str::from_utf8(&bytes[9..12]).unwrap().parse().unwrap();
    check_response(bytes, status);
    Some(status)
}

/// Whatever the bytes: no panic, a 200 or the 404 (or nothing written), the counters rendered
/// only for a 200, and a key authorization asked only for a one-segment base64url token.
#[test]
fn listeners_answer_every_head_with_200_or_404() {
    let mut runner = proptest::test_runner::TestRunner::new(runner(3000));
    runner
        .run(&listener_input(), |head| {
            let mut rendered = false;
            let answer = answer_metrics(&head, || {
                rendered = true;
                "# EOF\n".to_owned()
            });
            let status = listener_status(&answer);
            prop_assert!(matches!(status, None | Some(200) | Some(404)));
            prop_assert_eq!(rendered, status == Some(200));

            let mut asked = None;
            let answer = answer_acme_http(&head, |token| {
                asked = Some(token.to_owned());
                (token == "tok_EN-1").then(|| "tok_EN-1.key".to_owned())
            });
            let status = listener_status(&answer);
            prop_assert!(matches!(status, None | Some(200) | Some(404)));
            if let Some(token) = &asked {
                prop_assert!(!token.is_empty());
                prop_assert!(
                    token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                );
                let line = String::from_utf8_lossy(&head);
                let path = format!("{ACME_CHALLENGE_PREFIX}{token}");
                prop_assert!(line.contains(&path));
            }
            prop_assert_eq!(status == Some(200), asked.as_deref() == Some("tok_EN-1"));
            Ok(())
        })
        .unwrap();
}

// ---- envelopes -----------------------------------------------------------------------------------

/// JSON text of a value, sometimes with odd spacing, from a small grammar.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i32>().prop_map(|n| n.to_string()),
        Just("1.5e3".to_owned()),
        Just("-0".to_owned()),
        "[a-z\"\\\\é\\u{1}]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just(r#""\u00e9\n""#.to_owned()),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(" , "))),
            prop::collection::vec(("[a-z_]{1,3}", inner), 0..4).prop_map(|kv| {
                let parts: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\" :{v}")).collect();
                format!("{{ {} }}", parts.join(","))
            }),
        ]
    })
}

/// A top-level envelope object from its fields (keys may repeat).
fn envelope() -> impl Strategy<Value = String> {
    let conn_id = prop_oneof![
        Just(r#""client-abc-0000000000000001""#.to_owned()),
        Just(r#""""#.to_owned()),
        Just("null".to_owned()),
        Just(r#""c\u006c""#.to_owned()),
        json_value(),
    ];
    let close = prop_oneof![
        Just("0".to_owned()),
        Just("null".to_owned()),
        Just("1000".to_owned()),
        Just("4401".to_owned()),
        Just("1005".to_owned()),
        Just("4000.0".to_owned()),
        Just("\"4000\"".to_owned()),
        Just("-1".to_owned()),
        Just("99999999999999999999".to_owned()),
        any::<u16>().prop_map(|n| n.to_string()),
    ];
    let push = prop_oneof![
        Just(r#"{"platform":"fcm","token":"t"}"#.to_owned()),
        Just(r#"{"platform":"apns","token":"t"}"#.to_owned()),
        Just("null".to_owned()),
        json_value(),
    ];
    let field = prop_oneof![
        conn_id.prop_map(|v| ("conn_id".to_owned(), v)),
        json_value().prop_map(|v| ("frame".to_owned(), v)),
        close.prop_map(|v| ("close_code".to_owned(), v)),
        push.prop_map(|v| ("push_wake".to_owned(), v)),
        ("[A-Za-z_]{1,8}", json_value()),
    ];
    prop::collection::vec(field, 0..6).prop_map(|fields| {
        let parts: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!(" {{{}}}\n", parts.join(","))
    })
}

/// What PROTOCOL.md §7.3 says about `text`, computed independently of the parser under test.
#[derive(Debug, PartialEq)]
enum Expected {
    Malformed,
    PushWake(Option<String>),
    Deliver {
        conn_id: String,
        frame: Option<Value>,
        close: Option<u16>,
    },
}

fn oracle(text: &str) -> Expected {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) else {
        return Expected::Malformed;
    };
    // serde_json keeps the last of repeated keys; the protocol calls any repeat malformed.
    if has_repeated_top_level_key(text) {
        return Expected::Malformed;
    }
    let conn_id = match map.get("conn_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Expected::Malformed,
    };
    let close = match map.get("close_code") {
        None | Some(Value::Null) => None,
        Some(Value::Number(_)) => {
            // Integer-ness is a property of the text: `4000.0` is not an integer on the wire.
            let raw = raw_field(text, "close_code");
            if raw.contains(['.', 'e', 'E']) {
                return Expected::Malformed;
            }
            match raw.parse::<i128>() {
                Ok(0) => None,
                Ok(c) => match u16::try_from(c).ok().and_then(CloseCode::new) {
                    Some(code) => Some(code.get()),
                    None => return Expected::Malformed,
                },
                Err(_) => return Expected::Malformed,
            }
        }
        Some(_) => return Expected::Malformed,
    };
    let conn_id = conn_id.filter(|c| !c.is_empty());
    let Some(conn_id) = conn_id else {
        return match map.get("push_wake") {
            None | Some(Value::Null) => Expected::Malformed,
            Some(p) => Expected::PushWake(match (p.get("platform"), p.get("token")) {
                (Some(Value::String(pl)), Some(Value::String(t)))
                    if pl == "fcm" && !t.is_empty() && t.len() <= 4096 =>
                {
                    Some(t.clone())
                }
                _ => None,
            }),
        };
    };
    let frame = map.get("frame").filter(|f| !f.is_null()).cloned();
    if close.is_none() && frame.is_none() {
        return Expected::Malformed;
    }
    Expected::Deliver {
        conn_id,
        frame,
        close,
    }
}

/// The raw text of a top-level field's value (only used for numbers, which hold no `,` or `}`).
fn raw_field(text: &str, key: &str) -> String {
    let needle = format!("\"{key}\":");
    let start = text.rfind(&needle).map(|i| i + needle.len()).unwrap_or(0);
    text[start..]
        .chars()
        .take_while(|c| !matches!(c, ',' | '}'))
        .collect::<String>()
        .trim()
        .to_owned()
}

fn has_repeated_top_level_key(text: &str) -> bool {
    // Collect top-level keys with a streaming pass through serde_json's own map access.
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    let Ok(Keys(keys)) = serde_json::from_str::<Keys>(text) else {
        return false;
    };
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    sorted.len() != keys.len()
}

#[test]
fn envelope_parser_agrees_with_an_independent_oracle() {
    let mut runner = proptest::test_runner::TestRunner::new(runner(3000));
    runner
        .run(&envelope(), |text| {
            let data = Bytes::from(text.clone());
            let got = BinaryMessage::parse(&data);
            match (oracle(&text), got) {
                (Expected::Malformed, Err(_)) => {}
                (Expected::PushWake(Some(t)), Ok(BinaryMessage::PushWake { token })) => {
                    prop_assert_eq!(t, token)
                }
                (Expected::PushWake(None), Ok(BinaryMessage::PushInvalid)) => {}
                (
                    Expected::Deliver {
                        conn_id,
                        frame,
                        close,
                    },
                    Ok(BinaryMessage::Deliver {
                        conn_id: got_id,
                        frame: got_frame,
                        close: got_close,
                    }),
                ) => {
                    prop_assert_eq!(conn_id, got_id.into_owned());
                    prop_assert_eq!(close, got_close.map(CloseCode::get));
                    let got_frame = got_frame
                        .map(|f| {
                            // The frame is the raw bytes of the value, a slice of the message.
                            prop_assert!(data.as_ptr_range().contains(&f.as_ptr()));
                            Ok(serde_json::from_slice::<Value>(&f).unwrap())
                        })
                        .transpose()?;
                    prop_assert_eq!(frame, got_frame);
                }
                (want, got) => prop_assert!(false, "{text:?}: oracle {want:?}, parser {got:?}"),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn envelope_parser_survives_arbitrary_bytes() {
    let mut runner = proptest::test_runner::TestRunner::new(runner(5000));
    runner
        .run(
            &prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                envelope().prop_flat_map(|e| {
                    let len = e.len();
                    (Just(e), 0..len.max(1), any::<u8>()).prop_map(|(e, at, b)| {
                        let mut v = e.into_bytes();
                        if !v.is_empty() {
                            v[at] = b;
                        }
                        v
                    })
                })
            ],
            |bytes| {
                let data = Bytes::from(bytes.clone());
                let got = BinaryMessage::parse(&data);
                if std::str::from_utf8(&bytes).is_err() {
                    prop_assert!(got.is_err(), "non-UTF-8 is malformed");
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn phone_frames_are_wrapped_iff_they_are_one_json_value() {
    let mut runner = proptest::test_runner::TestRunner::new(runner(3000));
    let prefix = br#"{"conn_id":"client-abc-0000000000000001","frame":"#;
    let input = prop_oneof![
        json_value().prop_map(|v| format!(" \t{v}\r\n").into_bytes()),
        json_value().prop_map(|v| format!("{v} {v}").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    runner
        .run(&input, |bytes| {
            let oracle = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(t).ok());
            match (oracle, wrap_phone_frame(prefix, &bytes)) {
                (None, Err(_)) => {}
                (Some(value), Ok(env)) => {
                    let env: Value = serde_json::from_slice(&env).expect("the envelope is JSON");
                    prop_assert_eq!(&env["frame"], &value);
                    prop_assert_eq!(env.as_object().unwrap().len(), 2);
                }
                (o, w) => prop_assert!(false, "{bytes:?}: oracle {o:?}, wrap {w:?}"),
            }
            Ok(())
        })
        .unwrap();
}

// ---- PROXY v2 headers ----------------------------------------------------------------------------

const PROXY_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY v2 header as a balancer would write it, before any mutation.
#[derive(Debug, Clone)]
struct ProxyParts {
    v6: bool,
    source: [u8; 16],
    destination: [u8; 16],
    ports: [u16; 2],
    tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyParts {
    fn bytes(&self) -> Vec<u8> {
        let width = if self.v6 { 16 } else { 4 };
        let mut body = Vec::new();
        body.extend(&self.source[..width]);
        body.extend(&self.destination[..width]);
        body.extend(self.ports[0].to_be_bytes());
        body.extend(self.ports[1].to_be_bytes());
        for (kind, value) in &self.tlvs {
            body.push(*kind);
            body.extend((value.len() as u16).to_be_bytes());
            body.extend(value);
        }
        let mut h = PROXY_SIGNATURE.to_vec();
        h.push(0x21);
        h.push(if self.v6 { 0x21 } else { 0x11 });
        h.extend((body.len() as u16).to_be_bytes());
        h.extend(body);
        h
    }
}

/// One structural mutation of a PROXY header (or of what follows it).
#[derive(Debug, Clone)]
enum ProxyMutation {
    VersionCommand(u8),
    FamilyProtocol(u8),
    Length(u16),
    LengthBy(i16),
    /// Overwrites the two length bytes of whatever TLV starts `at` bytes into the TLV area.
    TlvLength {
        at: usize,
        len: u16,
    },
    Flip {
        at: usize,
        byte: u8,
    },
    Truncate {
        at: usize,
    },
    /// Bytes after the header: a request head, or noise.
    Append(Vec<u8>),
}

fn proxy_mutation() -> impl Strategy<Value = ProxyMutation> {
    prop_oneof![
        prop_oneof![
            Just(0x20u8),
            Just(0x22),
            Just(0x11),
            Just(0x31),
            any::<u8>()
        ]
        .prop_map(ProxyMutation::VersionCommand),
        prop_oneof![
            Just(0x00u8),
            Just(0x01),
            Just(0x12),
            Just(0x22),
            Just(0x31),
            Just(0x32),
            Just(0x10),
            Just(0x21),
            Just(0x11),
            any::<u8>()
        ]
        .prop_map(ProxyMutation::FamilyProtocol),
        prop_oneof![
            Just(0u16),
            Just(11),
            Just(12),
            Just(35),
            Just(36),
            Just(216),
            Just(4080),
            Just(4081),
            Just(u16::MAX),
            any::<u16>()
        ]
        .prop_map(ProxyMutation::Length),
        (-40i16..40).prop_map(ProxyMutation::LengthBy),
        (0..120usize, any::<u16>()).prop_map(|(at, len)| ProxyMutation::TlvLength { at, len }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| ProxyMutation::Flip { at, byte }),
        any::<usize>().prop_map(|at| ProxyMutation::Truncate { at }),
        prop_oneof![
            Just(HEADS[0].as_bytes().to_vec()),
            prop::collection::vec(any::<u8>(), 1..40)
        ]
        .prop_map(ProxyMutation::Append),
    ]
}

fn apply_proxy(h: &mut Vec<u8>, m: &ProxyMutation) {
    let set = |h: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            if let Some(slot) = h.get_mut(at + i) {
                *slot = *b;
            }
        }
    };
    match m {
        ProxyMutation::VersionCommand(b) => set(h, 12, &[*b]),
        ProxyMutation::FamilyProtocol(b) => set(h, 13, &[*b]),
        ProxyMutation::Length(n) => set(h, 14, &n.to_be_bytes()),
        ProxyMutation::LengthBy(d) => {
            if h.len() >= 16 {
                let n = u16::from_be_bytes([h[14], h[15]]).wrapping_add_signed(*d);
                set(h, 14, &n.to_be_bytes());
            }
        }
        ProxyMutation::TlvLength { at, len } => {
            let tlvs = if h.get(13) == Some(&0x21) { 52 } else { 28 };
            set(h, tlvs + at + 1, &len.to_be_bytes());
        }
        ProxyMutation::Flip { at, byte } => {
            if !h.is_empty() {
                let at = at % h.len();
                h[at] = *byte;
            }
        }
        ProxyMutation::Truncate { at } => h.truncate(at % (h.len() + 1)),
        ProxyMutation::Append(bytes) => h.extend(bytes),
    }
}

fn proxy_input() -> impl Strategy<Value = Vec<u8>> {
    let parts = (
        any::<bool>(),
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<[u16; 2]>(),
        prop::collection::vec(
            (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
            0..4,
        ),
    )
        .prop_map(|(v6, source, destination, ports, tlvs)| ProxyParts {
            v6,
            source,
            destination,
            ports,
            tlvs,
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        (any::<[u8; 4]>(), prop::collection::vec(any::<u8>(), 0..80)).prop_map(|(fixed, body)| {
            let mut h = PROXY_SIGNATURE.to_vec();
            h.extend(fixed);
            h.extend(body);
            h
        }),
        Just(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\nGET / HTTP/1.1\r\n\r\n".to_vec()),
        (parts, prop::collection::vec(proxy_mutation(), 0..4)).prop_map(|(parts, ms)| {
            let mut h = parts.bytes();
            for m in &ms {
                apply_proxy(&mut h, m);
            }
            h
        }),
    ]
}

/// What PROTOCOL.md §3.2 and the PROXY protocol specification say about `b`, written from the
/// specification without the relay's code: refuse at the first byte that is not the signature;
/// the fixed part must be version 2, command PROXY, TCP over IPv4 or IPv6, with a length that
/// holds the addresses and stays within the relay's limit; the rest must be whole TLVs.
#[derive(Debug, PartialEq, Eq)]
enum ProxyClass {
    Need(usize),
    Accept(std::net::SocketAddr, usize),
    Refuse,
}

fn proxy_oracle(b: &[u8]) -> ProxyClass {
    if b.iter().zip(PROXY_SIGNATURE).any(|(x, s)| x != s) {
        return ProxyClass::Refuse;
    }
    if b.len() < 16 {
        return ProxyClass::Need(16);
    }
    let addresses = match (b[12], b[13]) {
        (0x21, 0x11) => 12,
        (0x21, 0x21) => 36,
        _ => return ProxyClass::Refuse,
    };
    let total = 16 + usize::from(b[14]) * 256 + usize::from(b[15]);
    if total < 16 + addresses || total > switchyard_core::PROXY_HEADER_MAX {
        return ProxyClass::Refuse;
    }
    if b.len() < total {
        return ProxyClass::Need(total);
    }
    let mut at = 16 + addresses;
    while at < total {
        if total - at < 3 {
            return ProxyClass::Refuse;
        }
        at += 3 + usize::from(b[at + 1]) * 256 + usize::from(b[at + 2]);
    }
    if at != total {
        return ProxyClass::Refuse;
    }
    let source = if addresses == 12 {
        let ip: [u8; 4] = b[16..20].try_into().unwrap();
        std::net::SocketAddr::from((ip, u16::from_be_bytes([b[24], b[25]])))
    } else {
        let ip: [u8; 16] = b[16..32].try_into().unwrap();
        std::net::SocketAddr::from((ip, u16::from_be_bytes([b[48], b[49]])))
    };
    ProxyClass::Accept(source, total)
}

/// Reads `stream` as a runtime does: `chunks` bounds each read, and no read goes past what the
/// core asked for. Returns the decision (`None`: the stream ended first) and the bytes consumed.
fn read_proxy_like_a_runtime(
    stream: &[u8],
    chunks: &[usize],
) -> (Option<switchyard_core::ProxyHeader>, usize) {
    use switchyard_core::{ProxyHeader, judge_proxy_header};
    let mut buf = Vec::new();
    let mut reads = chunks.iter().cycle();
    loop {
        match judge_proxy_header(&buf) {
            ProxyHeader::Incomplete { needed } => {
                assert!(needed > buf.len(), "asks for bytes it has");
                assert!(needed <= switchyard_core::PROXY_HEADER_MAX, "unbounded");
                let left = &stream[buf.len()..];
                if left.is_empty() {
                    return (None, buf.len());
                }
                let n = (needed - buf.len())
                    .min(*reads.next().unwrap())
                    .min(left.len());
                buf.extend_from_slice(&left[..n]);
            }
            decided => return (Some(decided), buf.len()),
        }
    }
}

#[test]
fn proxy_header_agrees_with_an_independent_oracle() {
    use switchyard_core::{ProxyHeader, judge_proxy_header};
    let mut runner = proptest::test_runner::TestRunner::new(runner(5000));
    runner
        .run(
            &(
                proxy_input(),
                prop::collection::vec(1..20usize, 1..4),
                any::<usize>(),
            ),
            |(bytes, chunks, cut)| {
                let got = judge_proxy_header(&bytes);
                match (proxy_oracle(&bytes), got) {
                    (ProxyClass::Refuse, ProxyHeader::Rejected(_)) => {}
                    (ProxyClass::Need(n), ProxyHeader::Incomplete { needed }) => {
                        prop_assert_eq!(n, needed)
                    }
                    (ProxyClass::Accept(s, l), ProxyHeader::Accepted { source, len }) => {
                        prop_assert_eq!((s, l), (source, len))
                    }
                    (want, got) => {
                        prop_assert!(false, "{bytes:?}: oracle {want:?}, judged {got:?}")
                    }
                }
                // Read in pieces, the decision is the same and nothing past the header is read.
                let (streamed, consumed) = read_proxy_like_a_runtime(&bytes, &chunks);
                match (got, streamed) {
                    (ProxyHeader::Incomplete { .. }, None) => {
                        prop_assert_eq!(consumed, bytes.len())
                    }
                    (ProxyHeader::Accepted { len, .. }, Some(s)) => {
                        prop_assert_eq!(s, got);
                        prop_assert_eq!(consumed, len);
                    }
                    (ProxyHeader::Rejected(_), Some(ProxyHeader::Rejected(_))) => {
                        prop_assert!(consumed <= bytes.len());
                    }
                    (whole, pieces) => {
                        prop_assert!(false, "{bytes:?}: whole {whole:?}, in pieces {pieces:?}")
                    }
                }
                // A refusal stays a refusal whatever follows; an acceptance ignores what follows.
                let prefix = &bytes[..cut % (bytes.len() + 1)];
                match (judge_proxy_header(prefix), got) {
                    (ProxyHeader::Incomplete { .. }, _) => {}
                    (ProxyHeader::Rejected(r), ProxyHeader::Rejected(g)) => prop_assert_eq!(r, g),
                    (p @ ProxyHeader::Accepted { .. }, g) => prop_assert_eq!(p, g),
                    (p, g) => prop_assert!(false, "{bytes:?}: prefix {p:?}, whole {g:?}"),
                }
                Ok(())
            },
        )
        .unwrap();
}
