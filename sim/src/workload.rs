//! A randomized workload: echo binaries that restart, reclaim and collide, phones that re-dial
//! with backoff, frames both ways, abrupt disconnects, slow readers, dead peers and clock jumps,
//! all chosen from one seed, with the simulator's invariants checked after every step.

use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use switchyard_core::{Config, Direction, DropReason, Violation};

use crate::{PeerEvent, PeerId, Sim, SimConfig};

/// Steps the seeds test runs per seed by default.
pub const DEFAULT_STEPS: usize = 200;

/// How a workload run is set up. [`WorkloadConfig::new`] gives the one [`run`] uses.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Decides the simulator and every action.
    pub seed: u64,
    /// Actions to take before the network is left to settle.
    pub steps: usize,
    /// Shards of the simulated node.
    pub shards: usize,
    /// Server-ids in play, each with one binary application.
    pub server_ids: usize,
    /// Phone applications per server-id (one more than the cap, so 4429 happens).
    pub phones_per_id: usize,
    /// The relay configuration: short timers and small outbox budgets, so that heartbeat,
    /// grace, probe, write timeouts and both backpressure paths happen within a short run.
    pub relay: Config,
    /// One-way latency range.
    pub latency: (Duration, Duration),
    /// Keep the whole trace (for a replay).
    pub record_trace: bool,
    /// End with a node shutdown (§13) after the network settled.
    pub shutdown: bool,
}

impl WorkloadConfig {
    /// The configuration [`run`] uses for `seed` and `steps`.
    pub fn new(seed: u64, steps: usize) -> WorkloadConfig {
        let relay = Config {
            max_phones_per_server: 3,
            phone_outbox_bytes: 700,
            binary_outbox_bytes: 1500,
            ping_interval: Duration::from_secs(4),
            pong_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(2),
            probe_timeout: Duration::from_millis(1500),
            grace: Duration::from_secs(5),
            close_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        // Variations by seed: `--grace 0` (§6 rule 4), push on, a slow network.
        let relay = Config {
            grace: if seed % 5 == 4 {
                Duration::ZERO
            } else {
                relay.grace
            },
            push_enabled: seed % 2 == 1,
            ..relay
        };
        let max_latency = if seed % 4 == 3 { 300 } else { 60 };
        WorkloadConfig {
            seed,
            steps,
            shards: 1 + (seed % 3) as usize,
            server_ids: 3,
            phones_per_id: 4,
            relay,
            latency: (Duration::from_millis(1), Duration::from_millis(max_latency)),
            record_trace: false,
            shutdown: seed % 4 == 1,
        }
    }
}

/// What a run did, for the test log and for spotting a workload that stopped exercising things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Workload actions taken.
    pub steps: usize,
    /// Simulator steps (each followed by an invariant check).
    pub sim_steps: u64,
    /// Virtual time the run covered.
    pub virtual_time: Duration,
    /// Connections dialled.
    pub connections: u64,
    /// `frames_forwarded_total` by [`Direction`] (index with `as usize`).
    pub forwarded: [u64; Direction::COUNT],
    /// `frames_dropped_total` by [`DropReason`] (index with `as usize`).
    pub dropped: [u64; DropReason::COUNT],
    /// Grace windows that expired.
    pub grace_expiries: u64,
    /// The trace hash at the end.
    pub trace_hash: u64,
}

impl Summary {
    /// Frames delivered in both directions.
    pub fn frames_delivered(&self) -> u64 {
        self.forwarded.iter().sum()
    }

    /// Frames dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }
}

/// Runs the workload for `seed` with [`WorkloadConfig::new`]; panics on a violated invariant.
pub fn run(seed: u64, steps: usize) -> Summary {
    run_with(&WorkloadConfig::new(seed, steps))
}

/// Runs the workload described by `cfg`; panics on a violated invariant.
pub fn run_with(cfg: &WorkloadConfig) -> Summary {
    let mut w = Workload::new(cfg);
    for _ in 0..cfg.steps {
        w.step();
    }
    w.settle();
    let c = w.sim.counters();
    Summary {
        seed: cfg.seed,
        steps: cfg.steps,
        sim_steps: w.sim.steps(),
        virtual_time: w.sim.now(),
        connections: w.connections,
        forwarded: c.frames_forwarded,
        dropped: c.frames_dropped,
        grace_expiries: c.grace_expiries,
        trace_hash: w.sim.trace_hash(),
    }
}

/// Runs `cfg` and returns the simulator as the run left it, for inspection (e.g. its trace).
pub fn run_to_end(cfg: &WorkloadConfig) -> Sim {
    let mut w = Workload::new(cfg);
    for _ in 0..cfg.steps {
        w.step();
    }
    w.settle();
    w.sim
}

/// A daemon holding one server-id: echoes every phone frame back to its phone.
struct BinaryApp {
    sid: String,
    peer: Option<PeerId>,
    retry_at: Option<Duration>,
    /// Earlier instances still connected (a hung process), with when they are killed.
    zombies: Vec<(PeerId, Duration)>,
    /// Conn ids of phones it has heard from, oldest first.
    phones: Vec<String>,
}

/// A phone app for one server-id: sends frames, re-dials with backoff after any close.
struct PhoneApp {
    sid: String,
    index: usize,
    peer: Option<PeerId>,
    retry_at: Option<Duration>,
    backoff: Duration,
    sent: u64,
}

#[derive(Clone, Copy)]
enum Restore {
    Reading,
    Responsive,
    ReadDelay,
}

struct Workload {
    sim: Sim,
    rng: ChaCha8Rng,
    binaries: Vec<BinaryApp>,
    phones: Vec<PhoneApp>,
    restores: Vec<(Duration, PeerId, Restore)>,
    grace: Duration,
    drain: Duration,
    /// End the run with a shutdown.
    shutdown: bool,
    echo: bool,
    connections: u64,
}

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

impl Workload {
    fn new(cfg: &WorkloadConfig) -> Workload {
        let mut replay = format!(
            "SWITCHYARD_SIM_SEED={} cargo test -p switchyard-sim --test seeds -- replay",
            cfg.seed
        );
        if cfg.steps != DEFAULT_STEPS {
            replay = format!("SWITCHYARD_SIM_STEPS={} {replay}", cfg.steps);
        }
        let sim = Sim::new(SimConfig {
            seed: cfg.seed,
            shards: cfg.shards,
            relay: cfg.relay.clone(),
            latency: cfg.latency,
            window: 3,
            record_trace: cfg.record_trace,
            replay_command: Some(replay),
            ..SimConfig::new(cfg.seed)
        });
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.rotate_left(17) ^ 0x574f_524b_4c4f_4144);
        let mut binaries = Vec::new();
        let mut phones = Vec::new();
        for i in 0..cfg.server_ids {
            let sid = format!("sid-{i}");
            binaries.push(BinaryApp {
                sid: sid.clone(),
                peer: None,
                retry_at: Some(Duration::from_millis(rng.next_u64() % 2000)),
                zombies: Vec::new(),
                phones: Vec::new(),
            });
            for _ in 0..cfg.phones_per_id {
                phones.push(PhoneApp {
                    sid: sid.clone(),
                    index: phones.len(),
                    peer: None,
                    retry_at: Some(Duration::from_millis(rng.next_u64() % 3000)),
                    backoff: MIN_BACKOFF,
                    sent: 0,
                });
            }
        }
        Workload {
            sim,
            rng,
            binaries,
            phones,
            restores: Vec::new(),
            grace: cfg.relay.grace,
            drain: cfg.relay.drain_timeout,
            shutdown: cfg.shutdown,
            echo: true,
            connections: 0,
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }

    fn step(&mut self) {
        self.react();
        self.housekeeping();
        self.act();
        let dt = match self.below(20) {
            0 => self.between(Duration::from_secs(2), Duration::from_secs(8)),
            1..=5 => self.between(Duration::from_millis(300), Duration::from_secs(2)),
            _ => self.between(Duration::from_millis(5), Duration::from_millis(300)),
        };
        self.sim.advance(dt);
    }

    /// Every application reads what arrived and reacts as its client library would.
    fn react(&mut self) {
        let now = self.sim.now();
        for b in 0..self.binaries.len() {
            self.binaries[b]
                .zombies
                .retain(|&(z, _)| self.sim.is_open(z));
            for (z, _) in self.binaries[b].zombies.clone() {
                self.sim.recv(z);
            }
            let Some(peer) = self.binaries[b].peer else {
                continue;
            };
            for event in self.sim.recv(peer) {
                match event {
                    PeerEvent::Text(text) => self.binary_reads(b, peer, &text),
                    PeerEvent::Ping | PeerEvent::Pong => {}
                    PeerEvent::Closed { code, .. } => {
                        let wait = if code == 4409 {
                            self.between(Duration::from_millis(500), Duration::from_secs(3))
                        } else {
                            self.between(Duration::from_millis(100), Duration::from_secs(2))
                        };
                        let app = &mut self.binaries[b];
                        app.peer = None;
                        app.phones.clear();
                        app.retry_at = Some(now + wait);
                    }
                    PeerEvent::Dropped => {
                        let wait = self.between(Duration::from_millis(100), Duration::from_secs(2));
                        let app = &mut self.binaries[b];
                        app.peer = None;
                        app.phones.clear();
                        app.retry_at = Some(now + wait);
                    }
                }
            }
        }
        for p in 0..self.phones.len() {
            let Some(peer) = self.phones[p].peer else {
                continue;
            };
            for event in self.sim.recv(peer) {
                match event {
                    PeerEvent::Text(_) => self.phones[p].backoff = MIN_BACKOFF,
                    PeerEvent::Ping | PeerEvent::Pong => {}
                    PeerEvent::Closed { .. } | PeerEvent::Dropped => {
                        let jitter = self.between(Duration::ZERO, Duration::from_millis(200));
                        let app = &mut self.phones[p];
                        app.peer = None;
                        app.retry_at = Some(now + app.backoff + jitter);
                        app.backoff = (app.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    fn binary_reads(&mut self, b: usize, peer: PeerId, text: &str) {
        let Some(rest) = text.strip_prefix(r#"{"conn_id":""#) else {
            return;
        };
        let Some(end) = rest.find('"') else {
            return;
        };
        let id = rest[..end].to_owned();
        let after = &rest[end..];
        if let Some(frame) = after
            .strip_prefix(r#"","frame":"#)
            .and_then(|f| f.strip_suffix('}'))
        {
            if !self.binaries[b].phones.contains(&id) {
                self.binaries[b].phones.push(id.clone());
            }
            if self.echo && self.chance(85) {
                let reply = if self.chance(4) {
                    format!(r#"{{"conn_id":"{id}","frame":{frame},"close_code":4000}}"#)
                } else {
                    format!(r#"{{"conn_id":"{id}","frame":{frame}}}"#)
                };
                self.sim.send(peer, &reply);
            }
        } else {
            self.binaries[b].phones.retain(|p| *p != id);
        }
    }

    /// Restores, zombie kills and re-dials that are due.
    fn housekeeping(&mut self) {
        let now = self.sim.now();
        let due: Vec<_> = self
            .restores
            .iter()
            .filter(|r| r.0 <= now)
            .copied()
            .collect();
        self.restores.retain(|r| r.0 > now);
        for (_, peer, what) in due {
            match what {
                Restore::Reading => self.sim.set_reading(peer, true),
                Restore::Responsive => self.sim.set_responsive(peer, true),
                Restore::ReadDelay => self.sim.set_read_delay(peer, Duration::ZERO),
            }
        }
        for b in 0..self.binaries.len() {
            let kills: Vec<PeerId> = self.binaries[b]
                .zombies
                .iter()
                .filter(|z| z.1 <= now)
                .map(|z| z.0)
                .collect();
            self.binaries[b].zombies.retain(|z| z.1 > now);
            for z in kills {
                self.sim.disconnect(z);
            }
            if self.binaries[b].peer.is_none()
                && self.binaries[b].retry_at.is_some_and(|t| t <= now)
            {
                let peer = self.sim.connect_binary(&self.binaries[b].sid.clone());
                self.connections += 1;
                let app = &mut self.binaries[b];
                app.peer = Some(peer);
                app.retry_at = None;
            }
        }
        for p in 0..self.phones.len() {
            if self.phones[p].peer.is_none() && self.phones[p].retry_at.is_some_and(|t| t <= now) {
                let peer = self.sim.connect_phone(&self.phones[p].sid.clone());
                self.connections += 1;
                let app = &mut self.phones[p];
                app.peer = Some(peer);
                app.retry_at = None;
            }
        }
    }

    fn phone_frame(&mut self, p: usize) -> String {
        let app = &mut self.phones[p];
        app.sent += 1;
        let (i, n) = (app.index, app.sent);
        match self.below(9) {
            0 => format!(r#"{{"p":{i},"n":{n}}}"#),
            1 => {
                let pad = "x".repeat(self.below(200) as usize);
                format!(r#"  {{"p":{i},"n":{n},"pad":"{pad}"}} "#)
            }
            2 => format!("{n}"),
            3 => format!(r#""s-{i}-{n}""#),
            4 => format!("[{n},true,null]"),
            5 => format!("\n\t{{\"p\":{i},\"n\":{n}}}\r\n"),
            6 => format!(r#"{{"a":{{"b":[{i},{n}]}},"q":"\"<&>\""}}"#),
            7 if self.chance(25) => "{not json".to_owned(),
            _ => format!(r#"{{"n":{n}}}"#),
        }
    }

    fn open_phone(&mut self) -> Option<(usize, PeerId)> {
        let live: Vec<(usize, PeerId)> = self
            .phones
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                p.peer
                    .filter(|&peer| self.sim.is_open(peer))
                    .map(|peer| (i, peer))
            })
            .collect();
        (!live.is_empty()).then(|| live[self.below(live.len() as u64) as usize])
    }

    fn open_binary(&mut self) -> Option<(usize, PeerId)> {
        let live: Vec<(usize, PeerId)> = self
            .binaries
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.peer
                    .filter(|&peer| self.sim.is_open(peer))
                    .map(|peer| (i, peer))
            })
            .collect();
        (!live.is_empty()).then(|| live[self.below(live.len() as u64) as usize])
    }

    fn any_open_peer(&mut self) -> Option<PeerId> {
        let open = self.sim.open_peers();
        (!open.is_empty()).then(|| open[self.below(open.len() as u64) as usize])
    }

    fn binary_message(&mut self, b: usize) -> String {
        let known = self.binaries[b].phones.len() as u64;
        let target = if known == 0 {
            None
        } else {
            let i = self.below(known) as usize;
            Some(self.binaries[b].phones[i].clone())
        };
        let n = self.below(1000);
        match (self.below(100), target) {
            (0..=4, _) => r#"{"conn_id":1,"frame":{}}"#.to_owned(),
            (5..=7, _) => "not json at all".to_owned(),
            (8..=12, _) => format!(
                r#"{{"conn_id":"client-{}-0000000000000000","frame":{n}}}"#,
                self.binaries[b].sid
            ),
            (13..=15, _) => r#"{"push_wake":{"platform":"fcm","token":"t"}}"#.to_owned(),
            (16..=19, Some(id)) => {
                format!(r#"{{"conn_id":"{id}","frame":null,"close_code":4001}}"#)
            }
            (20..=27, Some(id)) => {
                format!(r#"{{"conn_id":"{id}","frame":{{"m":{n}}},"close_code":4000}}"#)
            }
            (_, Some(id)) => format!(r#"{{"conn_id":"{id}","frame":{{"m":{n},"b":{b}}}}}"#),
            (_, None) => format!(r#"{{"conn_id":"","frame":{n}}}"#),
        }
    }

    fn act(&mut self) {
        let now = self.sim.now();
        match self.below(100) {
            0..=29 => {
                if let Some((p, peer)) = self.open_phone() {
                    let frame = self.phone_frame(p);
                    self.sim.send(peer, &frame);
                }
            }
            30..=44 => {
                if let Some((b, peer)) = self.open_binary() {
                    let msg = self.binary_message(b);
                    self.sim.send(peer, &msg);
                }
            }
            45..=49 => {
                // The daemon crashes and restarts, within or after the grace window.
                if let Some((b, peer)) = self.open_binary() {
                    self.sim.disconnect(peer);
                    let wait = if self.chance(50) {
                        self.between(Duration::from_millis(100), Duration::from_secs(3))
                    } else {
                        self.between(
                            self.grace + Duration::from_millis(500),
                            self.grace * 2 + Duration::from_secs(1),
                        )
                    };
                    let app = &mut self.binaries[b];
                    app.peer = None;
                    app.phones.clear();
                    app.retry_at = Some(now + wait);
                }
            }
            50..=52 => {
                // A second instance starts while the first hangs (takeover) or lives on (4409).
                if let Some((b, peer)) = self.open_binary() {
                    if self.chance(50) {
                        self.sim.set_responsive(peer, false);
                    }
                    let kill = now + self.between(Duration::from_secs(1), Duration::from_secs(8));
                    let sid = self.binaries[b].sid.clone();
                    let new = self.sim.connect_binary(&sid);
                    self.connections += 1;
                    let app = &mut self.binaries[b];
                    app.zombies.push((peer, kill));
                    app.peer = Some(new);
                    app.phones.clear();
                }
            }
            53..=57 => {
                if let Some((p, peer)) = self.open_phone() {
                    self.sim.disconnect(peer);
                    self.phone_gone(p);
                }
            }
            58..=61 => {
                if let Some((p, peer)) = self.open_phone() {
                    let code = [1000, 4000, 4999, 1001, 999, 1005][self.below(6) as usize];
                    self.sim.close(peer, code);
                    self.phone_gone(p);
                }
            }
            62..=64 => {
                if let Some(peer) = self.any_open_peer() {
                    self.sim.set_reading(peer, false);
                    let at = now + self.between(Duration::from_millis(300), Duration::from_secs(6));
                    self.restores.push((at, peer, Restore::Reading));
                }
            }
            65..=67 => {
                if let Some(peer) = self.any_open_peer() {
                    let delay =
                        self.between(Duration::from_millis(100), Duration::from_millis(1500));
                    self.sim.set_read_delay(peer, delay);
                    let at = now + self.between(Duration::from_secs(1), Duration::from_secs(10));
                    self.restores.push((at, peer, Restore::ReadDelay));
                }
            }
            68..=70 => {
                if let Some(peer) = self.any_open_peer() {
                    self.sim.set_responsive(peer, false);
                    let at = now + self.between(Duration::from_secs(1), Duration::from_secs(12));
                    self.restores.push((at, peer, Restore::Responsive));
                }
            }
            71..=72 => {
                let d = self.between(Duration::from_millis(500), Duration::from_secs(12));
                self.sim.jump(d);
            }
            73..=75 => {
                if let Some((b, peer)) = self.open_binary() {
                    for _ in 0..5 + self.below(6) {
                        let msg = self.binary_message(b);
                        self.sim.send(peer, &msg);
                    }
                }
            }
            76..=79 => {
                if let Some((p, peer)) = self.open_phone() {
                    for _ in 0..5 + self.below(11) {
                        let frame = self.phone_frame(p);
                        self.sim.send(peer, &frame);
                    }
                }
            }
            80..=82 => {
                // A message that takes a while to arrive completely (read timeout, §9).
                let gap = self.between(Duration::from_millis(50), Duration::from_secs(8));
                if self.chance(60) {
                    if let Some((p, peer)) = self.open_phone() {
                        let frame = self.phone_frame(p);
                        self.sim.send_fragmented(peer, &frame, gap);
                    }
                } else if let Some((b, peer)) = self.open_binary() {
                    let msg = self.binary_message(b);
                    self.sim.send_fragmented(peer, &msg, gap);
                }
            }
            83 => {
                if let Some(peer) = self.any_open_peer() {
                    let violation = [
                        Violation::TooBig,
                        Violation::InvalidUtf8,
                        Violation::Protocol,
                    ][self.below(3) as usize];
                    self.sim.violate(peer, violation);
                }
            }
            84..=85 => {
                if let Some((_, peer)) = self.open_binary() {
                    self.sim.ping(peer);
                }
            }
            86 if self.chance(50) => self.sim.rebalance(),
            _ => {}
        }
    }

    fn phone_gone(&mut self, p: usize) {
        let now = self.sim.now();
        let wait = self.between(Duration::from_millis(100), Duration::from_secs(2));
        let app = &mut self.phones[p];
        app.peer = None;
        app.retry_at = Some(now + wait);
    }

    /// Stops acting, revives every peer and lets the network drain; then nothing accepted may
    /// still be on its way to an open, reading peer.
    fn settle(&mut self) {
        self.echo = false;
        for peer in self.sim.open_peers() {
            self.sim.set_reading(peer, true);
            self.sim.set_responsive(peer, true);
            self.sim.set_read_delay(peer, Duration::ZERO);
        }
        self.restores.clear();
        // At least a few seconds, then until nothing is in flight (things keep happening: a
        // heartbeat timeout sends a notice), within a minute.
        for i in 0..600 {
            self.sim.advance(Duration::from_millis(100));
            self.react();
            if i >= 30 && self.sim.in_flight() == 0 {
                break;
            }
        }
        self.sim.check_delivered();
        if self.shutdown {
            // SIGTERM (§13): everything closes 1001 within the drain timeout, queues flushed.
            self.sim.shutdown();
            for _ in 0..(self.drain.as_millis() / 100 + 20) {
                self.sim.advance(Duration::from_millis(100));
                self.react();
            }
            if !self.sim.is_drained() {
                panic!(
                    "seed {}: shards not drained after the drain timeout",
                    self.sim.seed()
                );
            }
        }
    }
}
