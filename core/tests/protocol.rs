//! One scenario per PROTOCOL.md §18 conformance item that a shard decides, driven in virtual time.
#![allow(clippy::disallowed_methods)] // the test's own clock origin

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_core::{
    CloseCode, Config, ConnKey, Counters, Direction, DropReason, Ended, Endpoint, Input, Open,
    Output, Relay, Role, ServerId, UpgradeOutcome, Violation,
};

/// A shard with a virtual clock and a mailbox per connection.
struct Sim {
    relay: Relay,
    now: Instant,
    next_conn: u64,
    mail: BTreeMap<ConnKey, Vec<Output>>,
    /// Sends handed out and not yet acknowledged with `Written`, per connection.
    unacked: BTreeMap<ConnKey, usize>,
    /// Outputs not addressed to a connection (push wakes).
    other: Vec<Output>,
}

impl Sim {
    fn new(config: Config) -> Sim {
        let now = Instant::now();
        Sim {
            relay: Relay::new(config, [1; 32], now),
            now,
            next_conn: 0,
            mail: BTreeMap::new(),
            unacked: BTreeMap::new(),
            other: Vec::new(),
        }
    }

    fn default() -> Sim {
        Sim::new(Config::default())
    }

    fn input(&mut self, input: Input) {
        self.relay.handle_input(self.now, input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.relay.poll_output() {
            let conn = match &out {
                Output::Send { conn, .. } => {
                    *self.unacked.entry(*conn).or_default() += 1;
                    *conn
                }
                Output::Ping { conn }
                | Output::Close { conn, .. }
                | Output::Abort { conn }
                | Output::PauseReading { conn, .. } => *conn,
                Output::PushWake { .. } => {
                    self.other.push(out);
                    continue;
                }
            };
            self.mail.entry(conn).or_default().push(out);
        }
    }

    /// Advances the clock by `d`, firing every deadline on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(at) = self.relay.poll_timeout().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            self.relay.handle_timeout(self.now);
            self.drain();
        }
        self.now = end;
    }

    /// Advances by `d` in one-second steps, with `alive` answering every ping.
    fn keep_alive(&mut self, d: Duration, alive: &[ConnKey]) {
        let end = self.now + d;
        while self.now < end {
            let step = Duration::from_secs(1).min(end - self.now);
            self.advance(step);
            for &conn in alive {
                self.relay.handle_input(self.now, Input::Pong { conn });
            }
            self.drain();
        }
    }

    fn open(&mut self, sid: &str, role: Role) -> ConnKey {
        self.next_conn += 1;
        let conn = ConnKey(self.next_conn);
        let open = Open {
            server_id: sid_of(sid),
            role,
            client: [127, 0, 0, 1].into(),
        };
        self.input(Input::Open { conn, open });
        conn
    }

    fn binary(&mut self, sid: &str) -> ConnKey {
        self.open(
            sid,
            Role::Binary {
                version: "1.0".into(),
            },
        )
    }

    fn phone(&mut self, sid: &str) -> ConnKey {
        self.open(
            sid,
            Role::Phone {
                device_name: Some("pixel".into()),
            },
        )
    }

    fn send(&mut self, conn: ConnKey, text: &str) {
        self.input(Input::Message {
            conn,
            data: Bytes::copy_from_slice(text.as_bytes()),
        });
    }

    fn send_bytes(&mut self, conn: ConnKey, data: Vec<u8>) {
        self.input(Input::Message {
            conn,
            data: data.into(),
        });
    }

    /// Everything sent to `conn` since the last call.
    fn take(&mut self, conn: ConnKey) -> Vec<Output> {
        self.mail.remove(&conn).unwrap_or_default()
    }

    /// The text messages sent to `conn` since the last call.
    fn texts(&mut self, conn: ConnKey) -> Vec<String> {
        self.take(conn)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { data, .. } => Some(String::from_utf8(data.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }

    /// The close sent to `conn` (and anything after it) since the last call.
    fn closed_with(&mut self, conn: ConnKey) -> Option<(u16, &'static str)> {
        self.take(conn).into_iter().find_map(|o| match o {
            Output::Close { code, reason, .. } => Some((code.get(), reason)),
            _ => None,
        })
    }

    /// Acknowledges every Send handed out so far, as a runtime whose sockets keep up would.
    fn ack_all(&mut self) {
        let unacked = std::mem::take(&mut self.unacked);
        for (conn, n) in unacked {
            for _ in 0..n {
                self.relay.handle_input(self.now, Input::Written { conn });
            }
        }
        self.drain();
    }

    fn finish(&mut self, conn: ConnKey, ended: Ended) {
        self.unacked.remove(&conn);
        self.input(Input::Closed { conn, ended });
    }

    fn phone_id(&self, conn: ConnKey) -> String {
        self.relay.conn_id(conn).unwrap().to_string()
    }

    fn counters(&self) -> &Counters {
        self.relay.counters()
    }
}

fn sid_of(s: &str) -> ServerId {
    ServerId::parse(s.as_bytes()).unwrap()
}

fn envelope(id: &str, frame: &str) -> String {
    format!(r#"{{"conn_id":"{id}","frame":{frame}}}"#)
}

/// A binary and one phone, connected, with nothing pending.
fn pair(sim: &mut Sim) -> (ConnKey, ConnKey) {
    let b = sim.binary("abc");
    let p = sim.phone("abc");
    (b, p)
}

#[test]
fn item_25_conn_ids_and_nothing_sent_on_connect() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    assert!(sim.take(b).is_empty());
    assert!(sim.take(p).is_empty());
    let id = sim.phone_id(p);
    let hex = id.strip_prefix("client-abc-").unwrap();
    assert_eq!(hex.len(), 16);
    assert!(
        hex.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    );
    let bid = sim.relay.conn_id(b).unwrap().to_string();
    assert_eq!(bid.strip_prefix("server-abc-").unwrap().len(), 8);
}

#[test]
fn item_26_phone_for_unclaimed_id_gets_4404() {
    let mut sim = Sim::default();
    let p = sim.phone("nobody");
    assert_eq!(sim.closed_with(p), Some((4404, "no server with that id")));
    assert_eq!(
        sim.counters()
            .upgrades(Endpoint::Client, UpgradeOutcome::Reject404),
        1
    );
    sim.finish(p, Ended::Local);
    assert_eq!(sim.relay.connections(), 0);
}

#[test]
fn item_27_seventeenth_phone_gets_4429_and_a_slot_frees() {
    let mut sim = Sim::default();
    sim.binary("abc");
    let phones: Vec<_> = (0..16).map(|_| sim.phone("abc")).collect();
    let extra = sim.phone("abc");
    assert_eq!(
        sim.closed_with(extra),
        Some((4429, "too many phones for server-id"))
    );
    assert_eq!(
        sim.counters()
            .upgrades(Endpoint::Client, UpgradeOutcome::Reject429),
        1
    );
    sim.finish(phones[0], Ended::PeerClose(Some(1000)));
    let again = sim.phone("abc");
    assert_eq!(sim.closed_with(again), None);
    assert_eq!(sim.counters().connected_phones, 16);
}

#[test]
fn item_28_second_binary_while_incumbent_answers_gets_4409() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let c = sim.binary("abc");
    assert_eq!(sim.take(b), vec![Output::Ping { conn: b }]);
    sim.advance(Duration::from_secs(1));
    sim.input(Input::Pong { conn: b });
    assert_eq!(
        sim.closed_with(c),
        Some((4409, "server-id already claimed"))
    );
    assert_eq!(
        sim.counters()
            .upgrades(Endpoint::Server, UpgradeOutcome::Reject409),
        1
    );
    // Incumbent and phone untouched: frames still flow.
    let id = sim.phone_id(p);
    sim.send(p, "1");
    assert_eq!(sim.texts(b), vec![envelope(&id, "1")]);
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b));
}

#[test]
fn item_29_silent_incumbent_is_taken_over() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let c = sim.binary("abc");
    sim.advance(Duration::from_millis(9_999));
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b));
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.closed_with(b), Some((1011, "heartbeat timeout")));
    assert_eq!(
        sim.closed_with(p),
        Some((4404, "binary reclaimed server-id"))
    );
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(c));
    assert_eq!(
        sim.counters()
            .upgrades(Endpoint::Server, UpgradeOutcome::Accept),
        2
    );
    // The newcomer routes frames from a new phone.
    let q = sim.phone("abc");
    let id = sim.phone_id(q);
    sim.send(q, "{}");
    assert_eq!(sim.texts(c), vec![envelope(&id, "{}")]);
    assert!(sim.texts(b).is_empty());
}

#[test]
fn difference_14_incumbent_gone_during_probe_hands_over() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let c = sim.binary("abc");
    let d = sim.binary("abc");
    sim.finish(b, Ended::Dropped);
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(c));
    assert_eq!(
        sim.closed_with(p),
        Some((4404, "binary reclaimed server-id"))
    );
    assert_eq!(
        sim.closed_with(d),
        Some((4409, "server-id already claimed"))
    );
    assert_eq!(sim.closed_with(c), None);
}

#[test]
fn claimant_leaving_abandons_the_probe() {
    let mut sim = Sim::default();
    let (b, _p) = pair(&mut sim);
    let c = sim.binary("abc");
    sim.send(c, r#"{"conn_id":"x","frame":1}"#);
    assert_eq!(sim.counters().dropped(DropReason::NoBinary), 1);
    sim.finish(c, Ended::Dropped);
    sim.advance(Duration::from_secs(11));
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b));
    assert!(sim.closed_with(b).is_none());
}

#[test]
fn item_30_31_grace_keeps_phones_and_closes_a_talking_one() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::PeerClose(Some(1000)));
    assert_eq!(sim.counters().connected_binaries, 0);
    assert_eq!(sim.counters().connected_phones, 1);
    assert!(sim.take(p).is_empty());
    let q = sim.phone("abc");
    assert_eq!(sim.closed_with(q), None);
    sim.send(p, "1");
    assert_eq!(sim.closed_with(p), Some((1000, "")));
    assert_eq!(sim.counters().dropped(DropReason::NoBinary), 1);
}

#[test]
fn item_32_reclaim_evicts_phones_without_notices() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::Dropped);
    let b2 = sim.binary("abc");
    assert_eq!(
        sim.closed_with(p),
        Some((4404, "binary reclaimed server-id"))
    );
    sim.finish(p, Ended::Local);
    assert!(sim.take(b2).is_empty(), "no notice to the new binary");
    let p2 = sim.phone("abc");
    let id = sim.phone_id(p2);
    sim.send(p2, "2");
    assert_eq!(sim.texts(b2), vec![envelope(&id, "2")]);
}

#[test]
fn item_33_grace_expiry_closes_phones_and_frees_the_id() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::Dropped);
    sim.advance(Duration::from_millis(29_999));
    assert!(sim.take(p).is_empty());
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.closed_with(p), Some((1000, "")));
    assert_eq!(sim.counters().grace_expiries, 1);
    sim.finish(p, Ended::Local);
    let q = sim.phone("abc");
    assert_eq!(sim.closed_with(q), Some((4404, "no server with that id")));
    let b2 = sim.binary("abc");
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b2));
}

#[test]
fn rule_3_stale_grace_timer_has_no_effect() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::Dropped);
    sim.advance(Duration::from_secs(10));
    let b2 = sim.binary("abc");
    sim.finish(p, Ended::Local);
    sim.keep_alive(Duration::from_secs(60), &[b2]);
    assert_eq!(sim.counters().grace_expiries, 0);
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b2));
}

#[test]
fn rule_4_zero_grace_frees_at_once() {
    let mut sim = Sim::new(Config {
        grace: Duration::ZERO,
        ..Config::default()
    });
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::Dropped);
    assert_eq!(sim.closed_with(p), Some((1000, "")));
    assert_eq!(sim.counters().grace_expiries, 1);
}

#[test]
fn item_34_35_36_phone_frames_are_wrapped_verbatim() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(p, r#"{ "b" : "<&>" ,"a":1 }"#);
    sim.send(p, " \n42\t");
    sim.send(p, "null");
    assert_eq!(
        sim.texts(b),
        vec![
            envelope(&id, r#"{ "b" : "<&>" ,"a":1 }"#),
            envelope(&id, "42"),
            envelope(&id, "null")
        ]
    );
    sim.ack_all();
    assert_eq!(sim.counters().forwarded(Direction::PhoneToBinary), 3);
}

#[test]
fn item_37_non_json_closes_the_phone_1007_with_notice() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(p, "1");
    sim.send(p, "not json");
    sim.send(p, "2");
    assert_eq!(sim.closed_with(p), Some((1007, "frame is not JSON")));
    assert_eq!(
        sim.texts(b),
        vec![
            envelope(&id, "1"),
            format!(r#"{{"conn_id":"{id}","close_code":1007}}"#)
        ]
    );
    assert_eq!(sim.counters().dropped(DropReason::NotJson), 1);
}

#[test]
fn item_38_binary_opcode_payload_is_just_bytes() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.send_bytes(p, b"{\"x\":1}".to_vec());
    assert_eq!(sim.texts(b).len(), 1);
    sim.send_bytes(p, vec![0xff, 0xfe]);
    assert_eq!(sim.closed_with(p), Some((1007, "frame is not JSON")));
}

#[test]
fn item_39_40_44_envelopes_reach_only_the_named_phone() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let q = sim.phone("abc");
    let other_b = sim.binary("other");
    let other_p = sim.phone("other");
    let (pid, other_id) = (sim.phone_id(p), sim.phone_id(other_p));
    sim.send(b, &envelope("client-abc-0000000000000000", "1"));
    assert_eq!(sim.counters().dropped(DropReason::UnknownConnId), 1);
    sim.send(b, &envelope(&other_id, "1"));
    assert_eq!(sim.counters().dropped(DropReason::UnknownConnId), 2);
    sim.send(b, &envelope(&pid, r#"{"t" : "hello"}"#));
    assert_eq!(sim.texts(p), vec![r#"{"t" : "hello"}"#]);
    assert!(sim.take(q).is_empty());
    assert!(sim.take(other_p).is_empty());
    assert!(sim.take(other_b).is_empty());
    assert!(sim.closed_with(b).is_none());
    sim.ack_all();
    assert_eq!(sim.counters().forwarded(Direction::BinaryToPhone), 1);
}

#[test]
fn item_41_42_malformed_envelopes_are_dropped_binary_stays() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    let bad = [
        "nope".to_owned(),
        "[]".to_owned(),
        r#"{"frame":1}"#.to_owned(),
        format!(r#"{{"conn_id":"{id}","frame":null}}"#),
        format!(r#"{{"conn_id":"{id}","frame":1,"frame":2}}"#),
        format!(r#"{{"CONN_ID":"{id}","frame":1}}"#),
        format!(r#"{{"conn_id":"{id}","frame":1,"close_code":1005}}"#),
        format!(r#"{{"conn_id":"{id}","frame":1,"close_code":"4000"}}"#),
        format!(r#"{{"conn_id":"{id}","frame":1,"close_code":4000.5}}"#),
    ];
    for msg in &bad {
        sim.send(b, msg);
    }
    assert_eq!(
        sim.counters().dropped(DropReason::Malformed),
        bad.len() as u64
    );
    assert!(sim.take(p).is_empty());
    assert!(sim.take(b).is_empty());
    sim.send(b, &envelope(&id, "7"));
    assert_eq!(sim.texts(p), vec!["7"]);
}

#[test]
fn item_43_45_46_close_directives() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(
        b,
        &format!(r#"{{"conn_id":"{id}","frame":1,"close_code":0}}"#),
    );
    assert_eq!(sim.texts(p), vec!["1"]);
    sim.send(b, &envelope(&id, "2"));
    sim.send(
        b,
        &format!(r#"{{"conn_id":"{id}","frame":{{"t":"bye"}},"close_code":4000}}"#),
    );
    sim.send(b, &envelope(&id, "3"));
    let out = sim.take(p);
    assert!(matches!(&out[0], Output::Send { data, .. } if &data[..] == b"2"));
    assert!(matches!(&out[1], Output::Send { data, .. } if &data[..] == br#"{"t":"bye"}"#));
    assert!(
        matches!(&out[2], Output::Close { code, reason: "", discard_queued: false, .. } if code.get() == 4000)
    );
    assert_eq!(out.len(), 3);
    assert_eq!(sim.counters().dropped(DropReason::PhoneGone), 1);
    sim.finish(p, Ended::Local);
    assert!(
        sim.take(b).is_empty(),
        "no notice for a close the binary asked for"
    );

    let q = sim.phone("abc");
    let qid = sim.phone_id(q);
    sim.send(
        b,
        &format!(r#"{{"conn_id":"{qid}","frame":null,"close_code":4401}}"#),
    );
    assert_eq!(sim.closed_with(q), Some((4401, "")));
}

#[test]
fn item_47_48_message_limit() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    let big = format!("\"{}\"", "a".repeat(262_144 - 2));
    sim.send(p, &big);
    assert_eq!(sim.texts(b).len(), 1);
    let too_big = format!("\"{}\"", "a".repeat(262_145 - 2));
    sim.send(p, &too_big);
    assert_eq!(sim.closed_with(p), Some((1009, "message too big")));
    assert_eq!(
        sim.texts(b),
        vec![format!(r#"{{"conn_id":"{id}","close_code":1009}}"#)]
    );
    // The runtime's codec may catch it first: same outcome.
    let q = sim.phone("abc");
    sim.input(Input::Violation {
        conn: q,
        violation: Violation::TooBig,
    });
    assert_eq!(sim.closed_with(q), Some((1009, "message too big")));

    sim.send(b, &"1".repeat(262_145));
    assert_eq!(sim.closed_with(b), Some((1009, "message too big")));
    assert_eq!(sim.relay.holder(&sid_of("abc")), None);
    assert_eq!(sim.counters().connected_binaries, 0);
}

#[test]
fn item_49_50_79_close_notices_by_how_the_phone_ended() {
    let mut sim = Sim::default();
    let b = sim.binary("abc");
    for (ended, code) in [
        (Ended::PeerClose(Some(1000)), 1000),
        (Ended::PeerClose(Some(4000)), 4000),
        (Ended::PeerClose(None), 1005),
        (Ended::Dropped, 1001),
        (Ended::PeerClose(Some(1005)), 1002),
        (Ended::PeerClose(Some(999)), 1002),
    ] {
        let p = sim.phone("abc");
        let id = sim.phone_id(p);
        sim.finish(p, ended);
        assert_eq!(
            sim.texts(b),
            vec![format!(r#"{{"conn_id":"{id}","close_code":{code}}}"#)]
        );
    }
    assert_eq!(sim.counters().connected_phones, 0);
    sim.ack_all();
    assert_eq!(
        sim.counters().forwarded(Direction::PhoneToBinary),
        0,
        "notices are not frames"
    );
}

#[test]
fn item_51_notice_follows_last_frame() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(p, "1");
    sim.send(p, "2");
    sim.finish(p, Ended::PeerClose(Some(1000)));
    assert_eq!(
        sim.texts(b),
        vec![
            envelope(&id, "1"),
            envelope(&id, "2"),
            format!(r#"{{"conn_id":"{id}","close_code":1000}}"#)
        ]
    );
}

#[test]
fn item_52_phone_of_a_replaced_binary_notifies_nobody() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::Dropped);
    let b2 = sim.binary("abc");
    sim.finish(p, Ended::PeerClose(Some(1000)));
    assert!(sim.take(b2).is_empty());
}

#[test]
fn item_53_54_heartbeat() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let silent = sim.binary("quiet");
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.take(b), vec![Output::Ping { conn: b }]);
    assert_eq!(sim.take(p), vec![Output::Ping { conn: p }]);
    // b and p pong for five minutes without sending data; `silent` never pongs.
    sim.keep_alive(Duration::from_secs(300), &[b, p]);
    for conn in [b, p] {
        assert!(
            sim.take(conn)
                .iter()
                .all(|o| matches!(o, Output::Ping { .. }))
        );
    }
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b));
    let closes: Vec<_> = sim
        .take(silent)
        .into_iter()
        .filter(|o| matches!(o, Output::Close { .. }))
        .collect();
    assert!(
        matches!(&closes[..], [Output::Close { code, reason: "heartbeat timeout", .. }] if code.get() == 1011)
    );
}

#[test]
fn heartbeat_loss_is_detected_at_ping_plus_pong_deadline() {
    let mut sim = Sim::default();
    let b = sim.binary("abc");
    sim.advance(Duration::from_millis(59_999));
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b));
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.relay.holder(&sid_of("abc")), None);
}

#[test]
fn item_55_read_deadline() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    sim.keep_alive(Duration::from_secs(90), &[b, p]);
    sim.send(p, "1");
    assert_eq!(sim.texts(b).len(), 1);
    sim.input(Input::MessageStarted { conn: p });
    sim.keep_alive(Duration::from_secs(29), &[b, p]);
    assert_eq!(sim.closed_with(p), None);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.closed_with(p), Some((1008, "read timeout")));
}

#[test]
fn item_57_phone_backlog_full() {
    let config = Config {
        phone_outbox_bytes: 1000,
        ..Config::default()
    };
    let mut sim = Sim::new(config);
    let (b, p) = pair(&mut sim);
    let q = sim.phone("abc");
    let id = sim.phone_id(p);
    let frame = format!("\"{}\"", "x".repeat(400 - 2));
    sim.send(b, &envelope(&id, &frame));
    sim.send(b, &envelope(&id, &frame));
    assert_eq!(sim.texts(p).len(), 2);
    sim.send(b, &envelope(&id, &frame));
    let out = sim.take(p);
    assert!(
        matches!(&out[..], [Output::Close { code, reason: "phone backlog full", discard_queued: true, .. }] if code.get() == 1011)
    );
    assert_eq!(sim.counters().dropped(DropReason::PhoneBacklogFull), 3);
    assert_eq!(sim.counters().phone_outbox_bytes, 0);
    assert_eq!(
        sim.texts(b),
        vec![format!(r#"{{"conn_id":"{id}","close_code":1011}}"#)]
    );
    // The sibling is unaffected.
    let qid = sim.phone_id(q);
    sim.send(b, &envelope(&qid, "1"));
    assert_eq!(sim.texts(q), vec!["1"]);
}

#[test]
fn item_57_phone_write_stall_aborts_with_notice() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(b, &envelope(&id, "1"));
    sim.take(p);
    sim.advance(Duration::from_secs(10));
    assert_eq!(sim.take(p), vec![Output::Abort { conn: p }]);
    assert_eq!(
        sim.texts(b),
        vec![format!(r#"{{"conn_id":"{id}","close_code":1011}}"#)]
    );
    sim.finish(p, Ended::Local);
    assert_eq!(sim.counters().dropped(DropReason::PhoneGone), 1);
}

#[test]
fn item_58_burst_arrives_in_order() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    let frame = format!("\"{}\"", "y".repeat(1022));
    for i in 0..300 {
        sim.send(b, &envelope(&id, &format!("[{i},{frame}]")));
    }
    let got = sim.texts(p);
    assert_eq!(got.len(), 300);
    for (i, g) in got.iter().enumerate() {
        assert!(g.starts_with(&format!("[{i},")));
    }
    sim.ack_all();
    assert_eq!(sim.counters().forwarded(Direction::BinaryToPhone), 300);
    assert_eq!(sim.counters().phone_outbox_bytes, 0);
}

#[test]
fn item_59_binary_backpressure_pauses_and_resumes_phones() {
    // A long write timeout, so the binary may stall past a phone's ping interval.
    let write_timeout = Duration::from_secs(200);
    let config = Config {
        binary_outbox_bytes: 2000,
        write_timeout,
        ..Config::default()
    };
    let mut sim = Sim::new(config);
    let (b, p) = pair(&mut sim);
    let q = sim.phone("abc");
    let frame = format!("\"{}\"", "z".repeat(500));
    for _ in 0..4 {
        sim.send(p, &frame);
    }
    assert_eq!(sim.texts(b).len(), 4);
    assert!(sim.take(p).contains(&Output::PauseReading {
        conn: p,
        paused: true
    }));
    assert!(sim.take(q).contains(&Output::PauseReading {
        conn: q,
        paused: true
    }));
    // A phone registering meanwhile is paused too.
    let r = sim.phone("abc");
    assert_eq!(
        sim.take(r),
        vec![Output::PauseReading {
            conn: r,
            paused: true
        }]
    );
    // Heartbeats of paused phones are suspended.
    sim.keep_alive(Duration::from_secs(100), &[b]);
    assert!(sim.take(p).is_empty());
    assert!(sim.relay.conn_id(p).is_some());
    sim.ack_all();
    assert!(sim.take(p).contains(&Output::PauseReading {
        conn: p,
        paused: false
    }));
    assert!(sim.take(r).contains(&Output::PauseReading {
        conn: r,
        paused: false
    }));
    assert_eq!(sim.counters().frames_dropped.iter().sum::<u64>(), 0);
}

#[test]
fn a_phone_paused_mid_message_gets_a_whole_read_deadline_on_resume() {
    let config = Config {
        binary_outbox_bytes: 2000,
        write_timeout: Duration::from_secs(200),
        ..Config::default()
    };
    let mut sim = Sim::new(config);
    let (b, p) = pair(&mut sim);
    let q = sim.phone("abc");
    sim.input(Input::MessageStarted { conn: p });
    let frame = format!("\"{}\"", "z".repeat(500));
    for _ in 0..4 {
        sim.send(q, &frame);
    }
    assert!(sim.take(p).contains(&Output::PauseReading {
        conn: p,
        paused: true
    }));
    // Paused past the 30 s read deadline: the pause suspended it.
    sim.keep_alive(Duration::from_secs(40), &[b]);
    sim.ack_all();
    assert!(sim.take(p).contains(&Output::PauseReading {
        conn: p,
        paused: false
    }));
    // Resumed mid-message, the phone has a whole read timeout again.
    sim.keep_alive(Duration::from_secs(29), &[b, p]);
    assert_eq!(sim.closed_with(p), None);
    sim.keep_alive(Duration::from_secs(1), &[b, p]);
    assert_eq!(sim.closed_with(p), Some((1008, "read timeout")));
}

#[test]
fn item_60_binary_that_never_drains_is_ended_and_phones_resume() {
    let config = Config {
        binary_outbox_bytes: 1000,
        ..Config::default()
    };
    let mut sim = Sim::new(config);
    let (b, p) = pair(&mut sim);
    let frame = format!("\"{}\"", "z".repeat(600));
    sim.send(p, &frame);
    sim.send(p, &frame);
    sim.take(b);
    assert!(sim.take(p).contains(&Output::PauseReading {
        conn: p,
        paused: true
    }));
    sim.advance(Duration::from_secs(10));
    assert_eq!(sim.take(b), vec![Output::Abort { conn: b }]);
    assert_eq!(
        sim.take(p),
        vec![Output::PauseReading {
            conn: p,
            paused: false
        }]
    );
    assert_eq!(sim.counters().dropped(DropReason::BinaryGone), 2);
    assert_eq!(sim.counters().binary_outbox_bytes, 0);
    // The id is in grace: the phone's next frame closes it.
    sim.send(p, "1");
    assert_eq!(sim.closed_with(p), Some((1000, "")));
}

#[test]
fn item_62_push_wakes_are_bucketed_per_server_id() {
    let mut sim = Sim::new(Config {
        push_enabled: true,
        ..Config::default()
    });
    let (b, _p) = pair(&mut sim);
    for _ in 0..7 {
        sim.send(b, r#"{"push_wake":{"platform":"fcm","token":"tok"}}"#);
    }
    assert_eq!(sim.other.len(), 6);
    assert_eq!(
        sim.counters().push(switchyard_core::PushOutcome::Dropped),
        1
    );
    sim.advance(Duration::from_secs(10));
    sim.send(b, r#"{"push_wake":{"platform":"fcm","token":"tok"}}"#);
    assert_eq!(sim.other.len(), 7);
}

#[test]
fn item_64_65_invalid_or_disabled_push_sends_nothing() {
    let mut sim = Sim::new(Config {
        push_enabled: true,
        ..Config::default()
    });
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(b, r#"{"push_wake":{"platform":"apns","token":"tok"}}"#);
    sim.send(b, r#"{"push_wake":{"platform":"fcm","token":""}}"#);
    sim.send(
        b,
        &format!(r#"{{"conn_id":"{id}","frame":1,"push_wake":{{"platform":"fcm","token":"t"}}}}"#),
    );
    assert!(sim.other.is_empty());
    assert_eq!(sim.texts(p), vec!["1"]);
    assert_eq!(sim.counters().push_wakes.iter().sum::<u64>(), 0);

    let mut off = Sim::default();
    let (b, _p) = pair(&mut off);
    off.send(b, r#"{"push_wake":{"platform":"fcm","token":"tok"}}"#);
    assert!(off.other.is_empty());
}

#[test]
fn item_72_shutdown_closes_everything_1001_without_notices() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let (b2, p2) = (sim.binary("x"), sim.phone("x"));
    sim.finish(b2, Ended::Dropped); // x is in grace
    sim.input(Input::Shutdown);
    for conn in [b, p, p2] {
        assert_eq!(sim.closed_with(conn), Some((1001, "shutting down")));
    }
    sim.finish(p, Ended::Local);
    assert!(sim.take(b).is_empty(), "no notices during shutdown");
    // New arrivals are turned away too.
    let late = sim.phone("abc");
    assert_eq!(sim.closed_with(late), Some((1001, "shutting down")));
    assert!(!sim.relay.is_drained());
    // Peers that never answer are dropped at the drain deadline.
    sim.advance(Duration::from_secs(10));
    let aborted: Vec<_> = [b, p2, late]
        .into_iter()
        .filter(|c| sim.take(*c).contains(&Output::Abort { conn: *c }))
        .collect();
    assert_eq!(aborted.len(), 3);
    for conn in [b, p2, late] {
        sim.finish(conn, Ended::Local);
    }
    assert!(sim.relay.is_drained());
    assert_eq!(sim.counters().grace_expiries, 0);
}

#[test]
fn item_73_rebalance_closes_binaries_1012_and_keeps_phones() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let c = sim.binary("abc"); // a waiting claimant
    sim.take(b);
    sim.input(Input::Rebalance);
    assert_eq!(sim.closed_with(c), Some((1012, "rebalance")));
    assert_eq!(sim.closed_with(b), Some((1012, "rebalance")));
    assert!(sim.take(p).is_empty());
    let b2 = sim.binary("abc");
    assert_eq!(sim.relay.holder(&sid_of("abc")), Some(b2));
    assert_eq!(
        sim.closed_with(p),
        Some((4404, "binary reclaimed server-id"))
    );
}

#[test]
fn close_handshake_timeout_drops_tcp() {
    let mut sim = Sim::default();
    let p = sim.phone("none");
    assert!(sim.closed_with(p).is_some());
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.take(p), vec![Output::Abort { conn: p }]);
}

#[test]
fn protocol_violations_close_1002_and_invalid_utf8_1007() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.input(Input::Violation {
        conn: p,
        violation: Violation::Protocol,
    });
    assert_eq!(sim.closed_with(p), Some((1002, "Protocol violation")));
    assert_eq!(
        sim.texts(b),
        vec![format!(r#"{{"conn_id":"{id}","close_code":1002}}"#)]
    );
    let q = sim.phone("abc");
    sim.input(Input::Violation {
        conn: q,
        violation: Violation::InvalidUtf8,
    });
    assert_eq!(sim.closed_with(q), Some((1007, "frame is not JSON")));
    sim.input(Input::Violation {
        conn: b,
        violation: Violation::InvalidUtf8,
    });
    assert_eq!(sim.closed_with(b), Some((1007, "invalid utf-8")));
    assert_eq!(sim.relay.holder(&sid_of("abc")), None);
}

#[test]
fn state_is_forgotten_after_connections_and_grace() {
    let mut sim = Sim::default();
    let (b, p) = pair(&mut sim);
    let id = sim.phone_id(p);
    sim.send(p, "1");
    sim.send(b, &envelope(&id, "2"));
    sim.finish(b, Ended::Dropped);
    sim.finish(p, Ended::Dropped);
    sim.advance(Duration::from_secs(31));
    assert_eq!(sim.relay.connections(), 0);
    assert_eq!(sim.relay.poll_timeout(), None);
    let c = sim.counters();
    assert_eq!((c.connected_binaries, c.connected_phones), (0, 0));
    assert_eq!((c.phone_outbox_bytes, c.binary_outbox_bytes), (0, 0));
    assert_eq!(c.dropped(DropReason::BinaryGone), 1);
    assert_eq!(c.dropped(DropReason::PhoneGone), 1);
    assert_eq!(CloseCode::new(1000).map(CloseCode::get), Some(1000));
}

#[test]
fn item_32_evicted_phones_free_their_cap_slot_at_once() {
    let mut sim = Sim::new(Config {
        max_phones_per_server: 1,
        ..Config::default()
    });
    let (b, p) = pair(&mut sim);
    sim.finish(b, Ended::Dropped);
    let b2 = sim.binary("abc");
    assert_eq!(
        sim.closed_with(p),
        Some((4404, "binary reclaimed server-id"))
    );
    // The evicted phone has not finished its close handshake; a re-dialled phone still gets in.
    let again = sim.phone("abc");
    assert_eq!(sim.closed_with(again), None);
    assert_eq!(sim.counters().connected_phones, 1);
    let id = sim.phone_id(again);
    sim.send(again, "1");
    assert_eq!(sim.texts(b2), vec![envelope(&id, "1")]);
    // An envelope for the evicted phone is for an unknown conn id now.
    let old = sim.phone_id(p);
    sim.send(b2, &envelope(&old, "2"));
    assert_eq!(sim.counters().dropped(DropReason::UnknownConnId), 1);
    sim.finish(p, Ended::Local);
    assert_eq!(sim.counters().connected_phones, 1);
}

#[test]
fn accessors_report_config_load_and_the_next_timer() {
    let config = Config {
        ping_interval: Duration::from_secs(7),
        ..Config::default()
    };
    let mut sim = Sim::new(config.clone());
    assert_eq!(sim.relay.config(), &config);
    assert_eq!(sim.relay.next_timer(), None);
    let (b, _p) = pair(&mut sim);
    let load = sim.relay.load();
    assert_eq!((load.binaries, load.phones), (1, 1));
    let (at, timer) = sim.relay.next_timer().unwrap();
    assert_eq!(at, sim.relay.poll_timeout().unwrap());
    assert_eq!(*timer, switchyard_core::Timer::Ping(b));
}
