//! Replay: the same seed and the same inputs give byte-identical outputs and deadlines; another
//! seed gives other conn ids (STYLE.md "Randomness is a seed").
#![allow(clippy::disallowed_methods)] // the test's own clock origin

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use switchyard_core::{Config, ConnKey, Ended, Input, Open, Output, Relay, Role, ServerId};

const SIDS: [&str; 2] = ["s1", "s\"2"];

fn config() -> Config {
    Config {
        max_phones_per_server: 3,
        phone_outbox_bytes: 200,
        binary_outbox_bytes: 300,
        ping_interval: Duration::from_secs(5),
        pong_timeout: Duration::from_secs(3),
        probe_timeout: Duration::from_secs(2),
        grace: Duration::from_secs(6),
        ..Config::default()
    }
}

#[derive(Debug, Clone)]
enum Step {
    Open {
        binary: bool,
        sid: usize,
    },
    PhoneSays(Index, &'static str),
    /// A connection (a holder, usually) addresses the `Index`-th phone ever opened.
    BinarySays(Index, Index, &'static str),
    Written(Index),
    Pong(Index),
    Closed(Index),
    Advance(u64),
    Rebalance,
}

fn step() -> impl Strategy<Value = Step> {
    let frame = prop::sample::select(vec![r#"{"t":"hi"}"#, " 42 ", "nope", "[1, 2]", ""]);
    prop_oneof![
        4 => (any::<bool>(), 0..SIDS.len()).prop_map(|(binary, sid)| Step::Open { binary, sid }),
        4 => (any::<Index>(), frame.clone()).prop_map(|(i, f)| Step::PhoneSays(i, f)),
        4 => (any::<Index>(), any::<Index>(), frame).prop_map(|(i, p, f)| Step::BinarySays(i, p, f)),
        3 => any::<Index>().prop_map(Step::Written),
        2 => any::<Index>().prop_map(Step::Pong),
        2 => any::<Index>().prop_map(Step::Closed),
        3 => (0..9000u64).prop_map(Step::Advance),
        1 => Just(Step::Rebalance),
    ]
}

/// Everything a run hands out, step by step: the outputs, then the next deadline.
type Trace = Vec<(Vec<Output>, Option<Duration>)>;

/// Plays `steps` on a relay seeded with `seed`; conn ids are read back from the relay itself.
fn play(seed: [u8; 32], steps: &[Step]) -> (Trace, Vec<String>) {
    let t0 = Instant::now();
    let mut relay = Relay::new(config(), seed, t0);
    let mut now = t0;
    let mut trace = Trace::new();
    let mut conns: Vec<(ConnKey, bool)> = Vec::new();
    // Phones' ids, for envelopes; every connection's id, in opening order.
    let mut ids: Vec<String> = Vec::new();
    let mut all_ids = Vec::new();
    let mut closed = BTreeSet::new();
    let record = |relay: &mut Relay, trace: &mut Trace| {
        let outs: Vec<Output> = std::iter::from_fn(|| relay.poll_output()).collect();
        trace.push((outs, relay.poll_timeout().map(|t| t - t0)));
    };
    for step in steps {
        let live: Vec<(ConnKey, bool)> = conns
            .iter()
            .copied()
            .filter(|(k, _)| !closed.contains(k))
            .collect();
        let pick = |i: &Index, phones: Option<bool>| {
            let v: Vec<ConnKey> = live
                .iter()
                .filter(|(_, phone)| phones.is_none_or(|p| p == *phone))
                .map(|(k, _)| *k)
                .collect();
            (!v.is_empty()).then(|| *i.get(&v))
        };
        let input = match step {
            Step::Open { binary, sid } => {
                let conn = ConnKey(conns.len() as u64 + 1);
                conns.push((conn, !binary));
                let role = if *binary {
                    Role::Binary {
                        version: "1".into(),
                    }
                } else {
                    Role::Phone { device_name: None }
                };
                let server_id = ServerId::parse(SIDS[*sid].as_bytes()).unwrap();
                let open = Open {
                    server_id,
                    role,
                    client: [127, 0, 0, 1].into(),
                };
                Some(Input::Open { conn, open })
            }
            Step::PhoneSays(i, f) => pick(i, Some(true)).map(|conn| Input::Message {
                conn,
                data: Bytes::from_static(f.as_bytes()),
            }),
            Step::BinarySays(i, p, f) => pick(i, Some(false)).map(|conn| {
                let phone = if ids.is_empty() {
                    "client-s1-0".to_owned()
                } else {
                    p.get(&ids).clone()
                };
                let id = serde_json::to_string(&phone).unwrap();
                let data = format!(r#"{{"conn_id":{id},"frame":{f}}}"#).into();
                Input::Message { conn, data }
            }),
            Step::Written(i) => pick(i, None).map(|conn| Input::Written { conn }),
            Step::Pong(i) => pick(i, None).map(|conn| Input::Pong { conn }),
            Step::Closed(i) => pick(i, None).map(|conn| {
                closed.insert(conn);
                Input::Closed {
                    conn,
                    ended: Ended::Dropped,
                }
            }),
            Step::Advance(ms) => {
                let end = now + Duration::from_millis(*ms);
                while let Some(at) = relay.poll_timeout().filter(|at| *at <= end) {
                    now = at;
                    relay.handle_timeout(now);
                    record(&mut relay, &mut trace);
                }
                now = end;
                None
            }
            Step::Rebalance => Some(Input::Rebalance),
        };
        if let Some(input) = input {
            let opened = match &input {
                Input::Open { conn, .. } => Some(*conn),
                _ => None,
            };
            relay.handle_input(now, input);
            if let Some(conn) = opened {
                let id = relay.conn_id(conn).expect("opened").to_string();
                if conns.last().is_some_and(|(_, phone)| *phone) {
                    ids.push(id.clone());
                }
                all_ids.push(id);
            }
            record(&mut relay, &mut trace);
        }
    }
    (trace, all_ids)
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proptest-regressions/determinism.txt"
        )))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn same_seed_same_outputs(seed in any::<[u8; 32]>(), steps in prop::collection::vec(step(), 1..80)) {
        // A binary and two phones per server-id first, so that most cases forward frames.
        let mut all: Vec<Step> = (0..6)
            .map(|i| Step::Open { binary: i < 2, sid: i % 2 })
            .collect();
        all.extend(steps);
        let a = play(seed, &all);
        let b = play(seed, &all);
        prop_assert_eq!(a, b);
    }
}

#[test]
fn other_seed_other_ids() {
    let steps: Vec<Step> = (0..6)
        .map(|i| Step::Open {
            binary: i % 3 == 0,
            sid: i % 2,
        })
        .collect();
    let (_, a) = play([1; 32], &steps);
    let (_, b) = play([2; 32], &steps);
    let (_, a2) = play([1; 32], &steps);
    assert_eq!(a.len(), 6);
    assert_eq!(a, a2, "same seed, same ids");
    for (x, y) in a.iter().zip(&b) {
        assert_ne!(x, y, "another seed must draw other ids");
    }
    for id in &a {
        let (prefix, hex) = id.rsplit_once('-').unwrap();
        let want = if prefix.starts_with("server-") { 8 } else { 16 };
        assert_eq!(hex.len(), want, "{id}");
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
        assert!(
            SIDS.iter()
                .any(|s| prefix == format!("server-{s}") || prefix == format!("client-{s}")),
            "{id}"
        );
    }
    let unique: BTreeSet<&String> = a.iter().collect();
    assert_eq!(unique.len(), a.len(), "ids are unique");
}
