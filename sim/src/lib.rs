//! A deterministic simulator for Switchyard: one relay node of [`Relay`](switchyard_core::Relay)
//! shards, a simulated network and scriptable peers, all in virtual time and all decided by one
//! `u64` seed.
//!
//! The simulator plays the runtime the way `switchyard-tokio` does, so a test (or a client
//! author checking a binary's or a phone's logic) can script connections, frames, slow readers,
//! dead peers and clock jumps, and see what each peer's WebSocket library would report.
//!
//! - **Shards.** [`SimConfig::shards`] relays; a connection goes to the shard
//!   [`ServerId::shard`](switchyard_core::ServerId::shard) names. Each shard's 32-byte seed is
//!   derived from the `u64` seed.
//! - **Network.** Per connection two FIFO directions. Every message is delayed by a latency drawn
//!   from [`SimConfig::latency`] with a seeded generator, never reordered within a direction
//!   (delivery = max(previous delivery, now + latency)). The runtime hands at most
//!   [`SimConfig::window`] messages to a socket before its peer has read them.
//! - **The runtime.** `Send` is delivered after a latency and acknowledged with
//!   [`Input::Written`](switchyard_core::Input::Written) when the peer reads it; a peer that is not
//!   reading ([`Sim::set_reading`]) acknowledges nothing, a slow reader ([`Sim::set_read_delay`])
//!   acknowledges at its pace. `Ping` is answered after a latency unless the peer is unresponsive
//!   ([`Sim::set_responsive`]). `Close` reaches the peer, which answers (unless unresponsive),
//!   and the shard then gets `Closed(Local)`; `Abort` gives `Closed(Local)` at once and the peer
//!   sees a reset. `PauseReading` holds the peer's messages until reading resumes.
//! - **Steps.** [`Sim::advance`] runs to a deadline one step at a time, each step being the
//!   earliest of the next network delivery and the shards' next
//!   [`poll_timeout`](switchyard_core::Relay::poll_timeout) (timers first on a tie), the shape of
//!   quinn-proto's `Pair::drive`. [`Sim::jump`] moves the clock at once: every due deadline fires
//!   before anything that arrived meanwhile is read.
//! - **Trace.** Every step appends `(now, actor, event)` lines; [`Sim::trace_hash`] folds them, so
//!   a seed run twice gives the same hash.
//!
//! # Peers
//!
//! [`Sim::connect_binary`] and [`Sim::connect_phone`] dial one connection each (a client that
//! re-dials gets a new [`PeerId`]). A peer [`send`](Sim::send)s text, sends a message in two
//! fragments ([`Sim::send_fragmented`], which starts the relay's read deadline), pings
//! ([`Sim::ping`]), breaks the framing rules ([`Sim::violate`]), closes with any code
//! ([`Sim::close`]) or drops TCP ([`Sim::disconnect`]); its application reads what arrived with
//! [`Sim::recv`]. Node-wide, [`Sim::rebalance`] is SIGHUP and [`Sim::shutdown`] SIGTERM.
//!
//! # Invariants
//!
//! The simulator keeps a small reference model beside the shards: per server-id the holder and
//! the claimants waiting on a probe (§6), per connection the messages the core has charged and
//! not yet seen written, per phone the frames accepted each way. After every step (and, for what
//! one call must cause, after every call into a shard) it checks, and a violation panics with the
//! seed, the step, the last trace lines and a replay command
//! (`SWITCHYARD_SIM_SEED=<seed> cargo test -p switchyard-sim --test seeds -- replay`, or
//! [`SimConfig::replay_command`]):
//!
//! 1. **Registry (§6).** At most one holder per server-id, on the shard the id lives on, and it is
//!    the one the model expects: a claim on a FREE or GRACE id holds at once (evicting GRACE's
//!    phones with 4404), a claim on a held id waits; a frame from the holder turns the claimants
//!    away (4409); a holder's end hands the id to the first claimant (phones evicted, the others
//!    4409) or starts GRACE. A phone is registered, or refused 4404 (FREE) or 4429 (at the cap),
//!    exactly as the model predicts.
//! 2. **Frames.** Phone → binary: every frame a phone sent while registered with a live holder
//!    reaches that binary exactly once, in order, as the exact envelope
//!    `{"conn_id":…,"frame":<trimmed>}` (§7.2). Binary → phone: every envelope's frame reaches the
//!    phone it names exactly once, in order, byte for byte (§7.3). What does not arrive is counted:
//!    the model predicts every `frames_dropped_total` reason and `frames_forwarded_total` direction
//!    and the shards' counters must match it after every step.
//! 3. **Notices (§8).** Exactly the ones §8 calls for, with the right code, to the binary the phone
//!    registered with, after that phone's last envelope, at most one per phone, none at shutdown.
//! 4. **Deadlines (§6, §9).** No unacknowledged write outlives the write timeout, no close
//!    handshake the close timeout, no begun message the read timeout; no peer without a pong for
//!    ping interval + pong timeout stays undecided (paused reading excepted, clock jumps allowed
//!    for); no claimant waits past the probe timeout; no phone stays registered past its id's grace
//!    window; nothing opened before a shutdown outlives the drain timeout.
//! 5. **Backpressure (§10.2).** A phone is paused only while its binary's outbox is charged over
//!    half its budget, and resumes once it is not.
//! 6. **Every close has a cause**: the input that called for it (not JSON, a frame in GRACE, a
//!    close directive, a full phone backlog, a violation, an oversized message), a pong deadline
//!    passed without a pong, an unanswered probe, an expired grace window, a reclaim or takeover,
//!    a rebalance or shutdown; an abort needs an overdue write, close handshake or drain.
//! 7. **Closes.** Every peer sees at most one close; the core commands nothing but an abort for a
//!    connection whose close it decided, and nothing at all after it was reported closed.
//! 8. **Gauges and counters (§12).** `connected_phones` equals the registered phones the model
//!    knows, `connected_binaries` the holders, the outbox gauges the bytes charged for
//!    unacknowledged messages (§10), upgrade outcomes the accepts and 4404/4429/4409 rejections;
//!    every shard tracks exactly the connections the runtime has open.
//!
//! [`Sim::check_delivered`] adds the liveness half: once the network has settled, nothing accepted
//! is still in flight to a peer that is open and reading.
//!
//! # Seeds
//!
//! [`workload::run`] drives a randomized workload from a seed: echo binaries that restart within
//! and after grace, collide (probe, takeover, 4409) and reclaim; phones that re-dial with backoff
//! after 4404, 4429 or any close; frames both ways, fragmented and malformed messages, violations,
//! abrupt disconnects, slow and stalled readers, unresponsive peers, clock jumps, rebalances, and
//! for some seeds `--grace 0`, push on, a slow network, a closing shutdown. The seeds test
//! (`cargo test -p switchyard-sim --test seeds`) runs 300 seeds of 200 steps; the environment
//! variable `SWITCHYARD_SIM_SEEDS=N` runs N seeds instead, `SWITCHYARD_SIM_STEPS=S` sets the steps,
//! and `SWITCHYARD_SIM_SEED=S` with the `replay` test replays one seed with its full trace printed
//! on failure.
//!
//! # Example
//!
//! A binary and a phone, one frame each way, then the binary restarts within the grace window and
//! reclaims its server-id: the phone is evicted with 4404 and re-dials.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_sim::{PeerEvent, Sim, SimConfig};
//!
//! let mut sim = Sim::new(SimConfig::new(7));
//! let binary = sim.connect_binary("abc");
//! let phone = sim.connect_phone("abc");
//! sim.send(phone, r#" {"t":"hi"} "#);
//! sim.advance(Duration::from_millis(100));
//!
//! let id = sim.conn_id(phone).unwrap().to_owned();
//! let envelope = format!(r#"{{"conn_id":"{id}","frame":{{"t":"hi"}}}}"#);
//! assert_eq!(sim.recv(binary), [PeerEvent::Text(envelope)]);
//!
//! sim.send(binary, &format!(r#"{{"conn_id":"{id}","frame":{{"t":"yo"}}}}"#));
//! sim.advance(Duration::from_millis(100));
//! assert_eq!(sim.recv(phone), [PeerEvent::Text(r#"{"t":"yo"}"#.into())]);
//!
//! sim.disconnect(binary);
//! sim.advance(Duration::from_secs(1));
//! let binary = sim.connect_binary("abc"); // within the 30 s grace window
//! sim.advance(Duration::from_millis(100));
//! assert_eq!(
//!     sim.recv(phone),
//!     [PeerEvent::Closed { code: 4404, reason: "binary reclaimed server-id".into() }]
//! );
//! let phone = sim.connect_phone("abc");
//! sim.send(phone, "42");
//! sim.advance(Duration::from_millis(100));
//! assert_eq!(sim.recv(binary).len(), 1);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod sim;
mod trace;
pub mod workload;

pub use sim::{PeerEvent, PeerId, Sim, SimConfig};
