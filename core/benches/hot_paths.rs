//! The per-frame and per-request hot paths of the core, with heap allocations counted per op.
//!
//! `cargo bench -p switchyard-core --bench hot_paths`
#![allow(unsafe_code)] // the counting allocator below
#![allow(clippy::disallowed_methods)] // the bench's own clock origin

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard_core::{
    Config, ConnKey, Gate, Input, Load, Open, Output, Relay, Role, ServerId, wrap_phone_frame,
};

/// Counts allocations so each hot path can report allocations per operation.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs_per_op(ops: u64, mut f: impl FnMut()) -> f64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..ops {
        f();
    }
    (ALLOCS.load(Ordering::Relaxed) - before) as f64 / ops as f64
}

const FRAME: &[u8] =
    br#"{"t":"msg","nonce":"8f1c0a7e2b","body":"c2VhbGVkIGJveCBjaXBoZXJ0ZXh0IGJ5dGVzIC4uLg=="}"#;

/// A shard with one binary (key 1) and one phone (key 2) on "bench".
fn connected() -> (Relay, Instant, String) {
    let now = Instant::now();
    let mut relay = Relay::new(Config::default(), [3; 32], now);
    let sid = ServerId::parse(b"bench").unwrap();
    let open = |role| Open {
        server_id: sid.clone(),
        role,
        client: [127, 0, 0, 1].into(),
    };
    relay.handle_input(
        now,
        Input::Open {
            conn: ConnKey(1),
            open: open(Role::Binary {
                version: "1".into(),
            }),
        },
    );
    relay.handle_input(
        now,
        Input::Open {
            conn: ConnKey(2),
            open: open(Role::Phone { device_name: None }),
        },
    );
    while relay.poll_output().is_some() {}
    let id = relay.conn_id(ConnKey(2)).unwrap().to_string();
    (relay, now, id)
}

/// Feeds one message and acknowledges what it produced, as a runtime would.
fn step(relay: &mut Relay, now: Instant, conn: ConnKey, data: &Bytes) {
    relay.handle_input(
        now,
        Input::Message {
            conn,
            data: data.clone(),
        },
    );
    while let Some(out) = relay.poll_output() {
        if let Output::Send { conn, data } = out {
            black_box(&data);
            relay.handle_input(now, Input::Written { conn });
        }
    }
}

fn benches(c: &mut Criterion) {
    let prefix = br#"{"conn_id":"client-bench-0f3a9c21d4e5b687","frame":"#;
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("wrap_phone_frame_96B", |b| {
        b.iter(|| wrap_phone_frame(black_box(prefix), black_box(FRAME)).unwrap())
    });
    g.finish();

    let (mut relay, now, id) = connected();
    let phone_msg = Bytes::from_static(FRAME);
    let envelope = Bytes::from(format!(
        r#"{{"conn_id":"{id}","frame":{}}}"#,
        std::str::from_utf8(FRAME).unwrap()
    ));
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(1));
    g.bench_function("phone_to_binary_96B", |b| {
        b.iter(|| step(&mut relay, now, ConnKey(2), &phone_msg))
    });
    g.bench_function("binary_to_phone_96B", |b| {
        b.iter(|| step(&mut relay, now, ConnKey(1), &envelope))
    });
    g.finish();

    let head = b"GET /v1/client HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
x-pyrycode-server: bench\r\nx-pyrycode-token: t0k3n\r\nuser-agent: pyrycode-ios/1.0\r\n\r\n";
    let config = Config {
        rate_burst: u32::MAX,
        max_connections_per_ip: u32::MAX,
        ..Config::default()
    };
    let mut gate = Gate::new(config, now);
    let mut g = c.benchmark_group("gate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("admit_phone_upgrade", |b| {
        b.iter(|| {
            match gate.handle_head(now, [127, 0, 0, 1].into(), black_box(head), Load::default()) {
                switchyard_core::Verdict::Upgrade { slot, response, .. } => {
                    black_box(response);
                    gate.release(slot);
                }
                other => panic!("{other:?}"),
            }
        })
    });
    g.finish();

    // Allocations per operation, printed once (criterion reports the time).
    let (mut relay, now, _) = connected();
    let p2b = allocs_per_op(10_000, || step(&mut relay, now, ConnKey(2), &phone_msg));
    let b2p = allocs_per_op(10_000, || step(&mut relay, now, ConnKey(1), &envelope));
    let wrap = allocs_per_op(10_000, || {
        black_box(wrap_phone_frame(prefix, FRAME).unwrap());
    });
    println!(
        "allocations/op: wrap_phone_frame {wrap:.2}, phone_to_binary {p2b:.2}, binary_to_phone {b2p:.2}"
    );
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
