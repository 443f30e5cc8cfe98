//! How a client author tests a binary's reconnect logic against the simulated relay.
//!
//! The binary (daemon) loses its connection, reconnects within the grace window and reclaims its
//! server-id. Its phone is evicted with 4404 "binary reclaimed server-id", re-dials, and frames flow
//! again. Every step asserts what the client's WebSocket library would report.
//!
//! Run it with `cargo run -p switchyard-sim --example reconnect`; the test suite runs it too.

use std::time::Duration;

use switchyard_sim::{PeerEvent, PeerId, Sim, SimConfig};

const SID: &str = "daemon-42";

/// The daemon under test: echoes each phone frame back inside an envelope.
fn echo_binary(sim: &mut Sim, binary: PeerId) -> Vec<String> {
    let mut seen = Vec::new();
    for event in sim.recv(binary) {
        let PeerEvent::Text(envelope) = event else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_str(&envelope).expect("envelopes are JSON");
        let conn_id = value["conn_id"].as_str().expect("conn_id is a string");
        if let Some(frame) = value.get("frame") {
            let reply = serde_json::json!({ "conn_id": conn_id, "frame": { "echo": frame } });
            sim.send(binary, &reply.to_string());
        }
        seen.push(envelope);
    }
    seen
}

fn texts(events: Vec<PeerEvent>) -> Vec<String> {
    events
        .into_iter()
        .filter_map(|e| match e {
            PeerEvent::Text(t) => Some(t),
            _ => None,
        })
        .collect()
}

pub fn main() {
    let mut sim = Sim::new(SimConfig {
        latency: (Duration::from_millis(5), Duration::from_millis(40)),
        ..SimConfig::new(2024)
    });
    let rtt = Duration::from_millis(200);

    // The daemon claims its id; a phone registers and says hello.
    let binary = sim.connect_binary(SID);
    let phone = sim.connect_phone(SID);
    sim.send(phone, r#"{"hello":1}"#);
    sim.advance(rtt);
    let seen = echo_binary(&mut sim, binary);
    let phone_id = sim.conn_id(phone).expect("registered").to_owned();
    assert_eq!(
        seen,
        [format!(
            r#"{{"conn_id":"{phone_id}","frame":{{"hello":1}}}}"#
        )]
    );
    sim.advance(rtt);
    assert_eq!(texts(sim.recv(phone)), [r#"{"echo":{"hello":1}}"#]);

    // The daemon's connection dies (no close frame). Its phone stays connected: the id is in its
    // grace window, so nothing happens to the phone yet.
    sim.disconnect(binary);
    sim.advance(Duration::from_secs(2));
    assert!(sim.is_open(phone));
    assert_eq!(sim.recv(phone), []);
    assert_eq!(sim.counters().connected_binaries, 0);
    assert_eq!(sim.counters().connected_phones, 1);

    // The daemon reconnects with backoff, well within the 30 s grace window, and reclaims.
    let binary = sim.connect_binary(SID);
    sim.advance(rtt);
    assert_eq!(
        sim.recv(phone),
        [PeerEvent::Closed {
            code: 4404,
            reason: "binary reclaimed server-id".into()
        }]
    );
    assert!(!sim.is_open(phone));
    // No close notice for an evicted phone: the new daemon hears nothing.
    assert_eq!(echo_binary(&mut sim, binary), Vec::<String>::new());

    // The phone re-dials and reaches the new daemon under a new conn id.
    let phone = sim.connect_phone(SID);
    let new_id = sim.conn_id(phone).expect("registered").to_owned();
    assert_ne!(new_id, phone_id);
    sim.send(phone, r#"{"hello":2}"#);
    sim.advance(rtt);
    assert_eq!(
        echo_binary(&mut sim, binary),
        [format!(r#"{{"conn_id":"{new_id}","frame":{{"hello":2}}}}"#)]
    );
    sim.advance(rtt);
    assert_eq!(texts(sim.recv(phone)), [r#"{"echo":{"hello":2}}"#]);

    // The phone leaves; the daemon gets exactly one close notice.
    sim.close(phone, 1000);
    sim.advance(rtt);
    assert_eq!(
        echo_binary(&mut sim, binary),
        [format!(r#"{{"conn_id":"{new_id}","close_code":1000}}"#)]
    );
    sim.advance(Duration::from_secs(1));
    sim.check_delivered();
    println!(
        "reconnect story ok: {} steps, trace hash {:016x}",
        sim.steps(),
        sim.trace_hash()
    );
}
