//! The randomized workload over many seeds, replay of one seed, and determinism of the trace.
//!
//! - `cargo test -p switchyard-sim --test seeds` runs 300 seeds of 200 steps.
//! - `SWITCHYARD_SIM_SEEDS=N` runs N seeds; `SWITCHYARD_SIM_STEPS=S` sets the steps per seed.
//! - `SWITCHYARD_SIM_SEED=S cargo test -p switchyard-sim --test seeds -- replay` replays one seed
//!   with its full trace kept.

use std::time::Instant;

use switchyard_core::{Direction, DropReason};
use switchyard_sim::workload::{self, DEFAULT_STEPS, WorkloadConfig};

const DEFAULT_SEEDS: u64 = 300;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn steps() -> usize {
    env_u64("SWITCHYARD_SIM_STEPS").map_or(DEFAULT_STEPS, |s| s as usize)
}

#[test]
fn seeds() {
    let count = env_u64("SWITCHYARD_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let steps = steps();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    #[allow(clippy::disallowed_methods)] // wall time of the test itself, not of the simulation
    let started = Instant::now();
    let summaries: Vec<workload::Summary> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (0..count)
                        .filter(|seed| seed % threads == t)
                        .map(|seed| workload::run(seed, steps))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut forwarded = [0u64; Direction::COUNT];
    let mut dropped = [0u64; DropReason::COUNT];
    let mut sim_steps = 0;
    let mut grace = 0;
    for s in &summaries {
        sim_steps += s.sim_steps;
        grace += s.grace_expiries;
        for (a, b) in forwarded.iter_mut().zip(s.forwarded) {
            *a += b;
        }
        for (a, b) in dropped.iter_mut().zip(s.dropped) {
            *a += b;
        }
    }
    eprintln!(
        "{count} seeds x {steps} steps: {sim_steps} simulator steps in {:?}; forwarded {forwarded:?}; grace expiries {grace}",
        started.elapsed()
    );
    for r in DropReason::ALL {
        eprintln!("  dropped {:>18}: {}", r.as_str(), dropped[*r as usize]);
    }
    if count >= 100 && steps >= DEFAULT_STEPS {
        // The workload must keep exercising what it is for.
        assert!(forwarded.iter().all(|&f| f > 0), "no frames forwarded");
        assert!(grace > 0, "no grace window expired");
        for r in [
            DropReason::Malformed,
            DropReason::UnknownConnId,
            DropReason::NotJson,
            DropReason::NoBinary,
            DropReason::PhoneGone,
        ] {
            assert!(dropped[r as usize] > 0, "no drop for {}", r.as_str());
        }
    }
}

#[test]
fn replay() {
    let seed = env_u64("SWITCHYARD_SIM_SEED").unwrap_or(0);
    let mut cfg = WorkloadConfig::new(seed, steps());
    cfg.record_trace = true;
    let sim = workload::run_to_end(&cfg);
    if std::env::var_os("SWITCHYARD_SIM_SEED").is_some() {
        for line in sim.trace().unwrap_or_default() {
            println!("{line}");
        }
    }
    eprintln!(
        "seed {seed}: {} steps, trace hash {:016x}",
        sim.steps(),
        sim.trace_hash()
    );
}

#[test]
fn same_seed_same_trace_different_seed_different_trace() {
    let mut hashes = Vec::new();
    for seed in [1, 2, 3, 1234, u64::MAX] {
        let a = workload::run(seed, 150);
        let b = workload::run(seed, 150);
        assert_eq!(a, b, "seed {seed} ran differently twice");
        hashes.push(a.trace_hash);
    }
    let mut unique = hashes.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        hashes.len(),
        "different seeds, same trace: {hashes:x?}"
    );
}
