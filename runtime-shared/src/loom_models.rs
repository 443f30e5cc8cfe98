//! Loom models of every structure the runtime shares between threads, run on the real code: with
//! `--cfg switchyard_loom` the `sync` module hands these structures loom's types, and loom runs
//! each model under every interleaving of its threads (up to a preemption bound).
//!
//! Run them as `.ci/run` does (a separate target dir keeps the main build cache):
//!
//! ```text
//! RUSTFLAGS="--cfg switchyard_loom" CARGO_TARGET_DIR=target/loom \
//!   CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
//!   cargo test -p switchyard-runtime --release --lib loom_models -- --nocapture
//! ```
//!
//! Debug assertions stay on so the core's own checks (time never goes back, a slot is never
//! released twice) are part of every model. `LOOM_MAX_PREEMPTIONS=n` widens the search
//! (default [`PREEMPTIONS`]).
//!
//! A failing model prints how to replay the failing interleaving alone: the same command with
//! `LOOM_CHECKPOINT_FILE=<file> LOOM_CHECKPOINT_INTERVAL=1`, run twice (the first run records the
//! failing schedule, the second starts from it), adding `LOOM_LOG=trace LOOM_LOCATION=1` to see
//! every step of it.
//!

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Once;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use loom::future::block_on;
use loom::thread;
use switchyard_core::{CloseCode, Config, Counters, Gate, Load, Verdict};

use crate::gate::SharedGate;
use crate::inbox::{Batch, Closed, inbox};
use crate::published::Published;
use crate::queue::{Cmd, ConnQueue};
use crate::signal::{Flag, latch};
use crate::sync::{Arc, AtomicU64, Ordering};

/// Preemptions explored per interleaving unless `LOOM_MAX_PREEMPTIONS` says otherwise. Loom's
/// documentation finds two or three enough to catch most bugs; these models take seconds at three.
const PREEMPTIONS: usize = 3;

thread_local! {
    /// The model running on this thread and its current interleaving, for the panic hook. Loom
    /// runs a model's threads as coroutines on the test's own thread, so they all see it.
    static RUNNING: Cell<Option<(&'static str, usize)>> = const { Cell::new(None) };
}

/// Runs `model` under every interleaving, printing how many there were; on failure, prints how
/// to replay the failing one.
fn check(name: &'static str, model: impl Fn() + Sync + Send + 'static) {
    install_replay_hint();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(PREEMPTIONS);
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("LOOM_LOG"))
        .with_test_writer()
        .with_ansi(false)
        .without_time()
        .finish();
    let started = std::time::Instant::now();
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    tracing::subscriber::with_default(subscriber, || {
        builder.check(move || {
            let run = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            RUNNING.set(Some((name, run)));
            model();
        });
    });
    RUNNING.set(None);
    println!(
        "loom model {name}: {} interleavings (preemption bound {}) in {:.1?}",
        runs.load(std::sync::atomic::Ordering::Relaxed),
        builder.preemption_bound.unwrap_or(PREEMPTIONS),
        started.elapsed()
    );
}

/// A panic inside a model prints, after the usual message, how to replay the failing
/// interleaving. From a hook rather than after unwinding: loom may abort on a second panic while
/// it unwinds a deadlocked model.
fn install_replay_hint() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let Some((name, run)) = RUNNING.take() else {
                return;
            };
            let file = std::env::temp_dir().join(format!("switchyard-loom-{name}.json"));
            eprintln!(
                "\nloom model {name} failed in interleaving {run}. Replay that interleaving \
                 alone: run this twice (the first run records it, the second starts from it); \
                 add LOOM_LOG=trace LOOM_LOCATION=1 to the second to see each step.\n\n  \
                 LOOM_CHECKPOINT_FILE={} LOOM_CHECKPOINT_INTERVAL=1 \
                 RUSTFLAGS=\"--cfg switchyard_loom\" CARGO_TARGET_DIR=target/loom \
                 CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true cargo test -p switchyard-runtime \
                 --release --lib loom_models::{name} -- --exact --nocapture\n",
                file.display()
            );
        }));
    });
}

// ---- connection queue: shard (producer) → connection task (consumer) ----------------------

/// What the connection task acted on in one wake-up.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Cmd(Cmd),
    Aborted,
}

/// The connection task's side in `ConnDriver::poll_event`'s order: the controls first (which
/// registers the waker), then the commands.
fn next_step(queue: &ConnQueue) -> impl Future<Output = Step> + '_ {
    poll_fn(move |cx| {
        let controls = queue.poll_controls(cx);
        if controls.aborted {
            return Poll::Ready(Step::Aborted);
        }
        match queue.pop() {
            Some(cmd) => Poll::Ready(Step::Cmd(cmd)),
            None => Poll::Pending,
        }
    })
}

/// Pops commands until the close frame.
fn until_close(queue: &ConnQueue) -> Vec<Cmd> {
    block_on(async {
        let mut got = Vec::new();
        loop {
            match next_step(queue).await {
                Step::Cmd(cmd) => {
                    let close = matches!(cmd, Cmd::Close { .. });
                    got.push(cmd);
                    if close {
                        return got;
                    }
                }
                Step::Aborted => panic!("nothing aborted"),
            }
        }
    })
}

fn text(s: &'static str) -> Cmd {
    Cmd::Send(Bytes::from_static(s.as_bytes()))
}

const CLOSE: Cmd = Cmd::Close {
    code: CloseCode::NORMAL,
    reason: "",
};

/// Commands the shard queues while the task polls and sleeps all arrive, in order: a command
/// queued just after the task found the queue empty wakes it (loom reports a deadlock if not).
#[test]
fn queue_fifo_no_lost_wakeup() {
    check("queue_fifo_no_lost_wakeup", || {
        let queue = Arc::new(ConnQueue::new());
        let shard = thread::spawn({
            let queue = queue.clone();
            move || {
                queue.send(Bytes::from_static(b"1"));
                queue.ping();
                queue.close(CloseCode::NORMAL, "", false);
            }
        });
        assert_eq!(until_close(&queue), [text("1"), Cmd::Ping, CLOSE]);
        assert_eq!(queue.pop(), None);
        shard.join().unwrap();
    });
}

/// A discarding close throws away exactly what the task had not taken yet: the task sees a
/// prefix of the messages, in order, then the close, and nothing after it.
#[test]
fn queue_discarding_close_drops_only_unstarted() {
    check("queue_discarding_close_drops_only_unstarted", || {
        let queue = Arc::new(ConnQueue::new());
        let shard = thread::spawn({
            let queue = queue.clone();
            move || {
                queue.send(Bytes::from_static(b"1"));
                queue.send(Bytes::from_static(b"2"));
                queue.close(CloseCode::NORMAL, "", true);
            }
        });
        let got = until_close(&queue);
        let sent = [text("1"), text("2")];
        let (close, started) = got.split_last().unwrap();
        assert_eq!(*close, CLOSE);
        assert_eq!(started, &sent[..started.len()], "{got:?}");
        shard.join().unwrap();
        assert_eq!(queue.pop(), None);
    });
}

/// Reading controls are never lost: pause then resume then abort, racing the task. The task is
/// woken until it sees the abort, sees the pauses in the order given, and sees the resume
/// together with the abort (both changed under one lock).
#[test]
fn queue_controls_pause_resume_abort() {
    check("queue_controls_pause_resume_abort", || {
        let queue = Arc::new(ConnQueue::new());
        let shard = thread::spawn({
            let queue = queue.clone();
            move || {
                queue.pause_reading(true);
                queue.pause_reading(false);
                queue.abort();
            }
        });
        let seen = block_on(async {
            let mut seen = Vec::new();
            poll_fn(|cx| {
                let c = queue.poll_controls(cx);
                if seen.last() != Some(&c.paused) {
                    seen.push(c.paused);
                }
                if c.aborted {
                    assert!(!c.paused, "abort seen before the resume");
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            seen
        });
        // The changes of `paused` the task saw follow the shard's order (false, true, false).
        assert!(
            matches!(seen[..], [false] | [true, false] | [false, true, false]),
            "{seen:?}"
        );
        shard.join().unwrap();
    });
}

/// A phone's read credit (decision A3) is returned without a lost wake-up, and a pause the
/// shard decides before returning it is seen before the task reads again: the task reads two
/// messages, the shard handles the first and pauses; the task ends up paused, never having read
/// while the credit was used up.
#[test]
fn queue_read_credit_no_lost_wakeup() {
    check("queue_read_credit_no_lost_wakeup", || {
        let queue = Arc::new(ConnQueue::for_role(&switchyard_core::Role::Phone {
            device_name: None,
        }));
        queue.message_read();
        let shard = thread::spawn({
            let queue = queue.clone();
            move || {
                queue.pause_reading(true);
                queue.message_handled();
            }
        });
        block_on(async {
            poll_fn(|cx| {
                let c = queue.poll_controls(cx);
                if c.credit_exhausted {
                    Poll::Pending
                } else {
                    assert!(c.paused, "credit returned before the pause was in place");
                    Poll::Ready(())
                }
            })
            .await;
        });
        shard.join().unwrap();
    });
}

// ---- shard inbox: connection tasks and the node (senders) → the shard (receiver) -----------

/// Takes batches until `n` messages have arrived (or every sender is gone).
fn receive(rx: &crate::inbox::Receiver<u32>, n: usize) -> Vec<u32> {
    let mut got = std::collections::VecDeque::new();
    block_on(poll_fn(|cx| {
        while got.len() < n {
            match rx.poll_batch(cx, &mut got, 2) {
                Poll::Ready(Batch::Taken) => {}
                Poll::Ready(Batch::Ended) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }));
    got.into()
}

/// A sender fills an inbox of one slot: neither the shard nor the sender waiting for room
/// misses its wake-up, and the messages arrive once each, in the order sent (what puts `Open`
/// before a connection's inputs).
#[test]
fn inbox_fifo_backpressure_no_lost_wakeup() {
    check("inbox_fifo_backpressure_no_lost_wakeup", || {
        let (tx, rx) = inbox::<u32>(1);
        let sender = thread::spawn(move || {
            block_on(async {
                tx.send(1).await?;
                tx.send(2).await?;
                tx.send(3).await
            })
        });
        assert_eq!(receive(&rx, 3), [1, 2, 3]);
        assert_eq!(sender.join().unwrap(), Ok(()));
    });
}

/// Two senders wait on a full inbox: taking one message releases both (one may find it full
/// again and wait again), and neither is left waiting beside free room.
#[test]
fn inbox_every_waiting_sender_released() {
    check("inbox_every_waiting_sender_released", || {
        let (tx, rx) = inbox::<u32>(1);
        tx.try_send(0).unwrap();
        let other = tx.clone();
        let first = thread::spawn(move || block_on(tx.send(10)));
        let second = thread::spawn(move || block_on(other.send(20)));
        let mut got = receive(&rx, 3);
        assert_eq!(got[0], 0);
        got.sort_unstable();
        assert_eq!(got, [0, 10, 20]);
        assert_eq!(first.join().unwrap(), Ok(()));
        assert_eq!(second.join().unwrap(), Ok(()));
    });
}

/// The shard sees the end only after the last message of the last sender, and is woken for it:
/// a sender's final message (a connection's `Closed`) is never cut off by its own drop.
#[test]
fn inbox_ends_after_last_sender() {
    check("inbox_ends_after_last_sender", || {
        let (tx, rx) = inbox::<u32>(4);
        let other = tx.clone();
        let first = thread::spawn(move || {
            tx.try_send(1).unwrap();
        });
        let second = thread::spawn(move || {
            other.try_send(2).unwrap();
        });
        let mut got = receive(&rx, usize::MAX);
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
        first.join().unwrap();
        second.join().unwrap();
    });
}

/// A sender waiting for room is released, with its message refused, when the shard goes.
#[test]
fn inbox_closed_releases_waiting_sender() {
    check("inbox_closed_releases_waiting_sender", || {
        let (tx, rx) = inbox::<u32>(1);
        tx.try_send(1).unwrap();
        let sender = thread::spawn(move || block_on(tx.send(2)));
        drop(rx);
        assert_eq!(sender.join().unwrap(), Err(Closed));
    });
}

// ---- read readiness: the socket's reactor → a connection's task ---------------------------

/// A read wake-up racing the start of the task's poll is never lost: either the poll sees it in
/// the flag, or the task is woken again and the next poll does.
#[test]
fn readiness_no_lost_wakeup() {
    check("readiness_no_lost_wakeup", || {
        let readiness = crate::readiness::Readiness::new();
        let read_waker = readiness.context().waker().clone();
        let reactor = thread::spawn(move || read_waker.wake());
        block_on(poll_fn(|cx| {
            if readiness.begin(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        reactor.join().unwrap();
    });
}

// ---- published figures: shard (writer) → /healthz and /metrics (readers) -------------------

fn counters(step: u64) -> Counters {
    Counters {
        connected_binaries: step,
        connected_phones: step,
        grace_expiries: step,
        frames_forwarded: [step, 2 * step],
        ..Counters::default()
    }
}

fn read_counters(published: &Published) -> Counters {
    let mut sum = Counters::default();
    published.add_to(&mut sum);
    sum
}

/// A reader racing the shard's two publications sees, in `/metrics`, whole snapshots only
/// (never fields of two steps), never an older one after a newer; and in each `/healthz` gauge,
/// a published value, never going back. The two gauges are read apart and may pair neighbouring
/// steps (`binaries` of step 2 with `phones` of step 1): `/healthz` promises each figure, not a
/// joint snapshot. Once the shard is joined, the last step is what everyone reads.
#[test]
fn published_snapshots_whole_and_monotone() {
    check("published_snapshots_whole_and_monotone", || {
        let published = Arc::new(Published::default());
        let shard = thread::spawn({
            let published = published.clone();
            move || {
                published.publish(&counters(1));
                published.publish(&counters(2));
            }
        });
        let mut last_step = 0;
        let mut last_load = Load::default();
        for _ in 0..2 {
            let load = published.load();
            assert!(load.binaries <= 2 && load.phones <= 2, "{load:?}");
            assert!(load.binaries >= last_load.binaries && load.phones >= last_load.phones);
            last_load = load;
            let snapshot = read_counters(&published);
            let step = snapshot.connected_binaries;
            assert_eq!(snapshot, counters(step), "a torn snapshot");
            assert!(
                step >= last_step,
                "went back from step {last_step} to {step}"
            );
            last_step = step;
        }
        shard.join().unwrap();
        assert_eq!(
            published.load(),
            Load {
                binaries: 2,
                phones: 2
            }
        );
        assert_eq!(read_counters(&published), counters(2));
    });
}

// ---- shutdown: the node's flag, and the latch `Handle::wait` waits on -----------------------

fn poll_once(future: impl Future) -> bool {
    let mut future = pin!(future);
    future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

/// Shutdown reaches every waiter whenever it is set: a waiter that checked the flag just before
/// it was set is still woken (loom reports a deadlock if not). A waiter dropped after one poll (a
/// request head that finished first) takes its registration back; none is left behind.
#[test]
fn flag_no_missed_shutdown() {
    check("flag_no_missed_shutdown", || {
        let flag = Arc::new(Flag::default());
        let listener = thread::spawn({
            let flag = flag.clone();
            move || {
                block_on(flag.wait());
                assert!(flag.is_set());
            }
        });
        let head = thread::spawn({
            let flag = flag.clone();
            move || {
                poll_once(flag.wait());
            }
        });
        assert!(flag.set());
        assert!(!flag.set(), "shutdown began twice");
        listener.join().unwrap();
        head.join().unwrap();
        assert_eq!(flag.waiting(), 0, "a registration outlived its waiter");
    });
}

/// `Handle::wait` resolves only after every shard task has ended, and then sees what each
/// published last, even the gauges read without a lock: a task's final publication happens
/// before its share of the latch is dropped.
#[test]
fn latch_done_after_every_task() {
    check("latch_done_after_every_task", || {
        let (alive, done) = latch();
        let shards: Vec<_> = (1..=2)
            .map(|i| {
                let published = Arc::new(Published::default());
                let alive = alive.clone();
                let task = thread::spawn({
                    let published = published.clone();
                    move || {
                        published.publish(&counters(i));
                        drop(alive);
                    }
                });
                (published, task)
            })
            .collect();
        drop(alive);
        block_on(done.wait());
        for (i, (published, _)) in (1..).zip(&shards) {
            let load = published.load();
            assert_eq!(
                (load.binaries, load.phones),
                (i, i),
                "shard {i}'s last figures"
            );
        }
        for (_, task) in shards {
            task.join().unwrap();
        }
    });
}

/// The node's shutdown as `Handle::shutdown`, `accept_loop` and `Handle::wait` run it: the
/// listener task waits for the flag, then drops its share of the latch; `wait` waits for the
/// flag, then for the latch. Whoever gets there first, `wait` returns, and only after the
/// listener's last action.
#[test]
fn shutdown_sequence() {
    check("shutdown_sequence", || {
        let stopping = Arc::new(Flag::default());
        let (alive, listeners_done) = latch();
        let closed = Arc::new(AtomicU64::new(0));
        let listener = thread::spawn({
            let (stopping, closed) = (stopping.clone(), closed.clone());
            move || {
                block_on(stopping.wait());
                closed.store(1, Ordering::Relaxed);
                drop(alive);
            }
        });
        let handle = thread::spawn({
            let stopping = stopping.clone();
            move || assert!(stopping.set())
        });
        block_on(async {
            stopping.wait().await;
            listeners_done.wait().await;
        });
        assert_eq!(
            closed.load(Ordering::Relaxed),
            1,
            "wait returned before the listener ended"
        );
        listener.join().unwrap();
        handle.join().unwrap();
    });
}

// ---- the gate: slots taken and released by connection tasks on different workers -----------

const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

fn upgrade_head() -> &'static [u8] {
    b"GET /v1/server HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
      X-Pyrycode-Server: abc\r\nX-Pyrycode-Version: 1.0\r\nUser-Agent: ua\r\n\r\n"
}

/// Two connections from one address race for its single slot while a third, from another
/// address, takes one of the two global slots; each releases its slot when done. The counts
/// stay exact: one holder per address at a time, never more than the global cap, the loser
/// answered 503 without a slot, the other address always admitted (a leaked or double-counted
/// slot would refuse it), nothing held at the end. The clock is read under the gate's lock, so
/// the gate never sees time go back (its debug assertion is on in these runs).
#[test]
fn gate_slots_exact() {
    let base = Instant::now();
    check("gate_slots_exact", move || {
        let gate = Arc::new(SharedGate::new(Gate::new(
            Config {
                max_connections_per_ip: 1,
                max_connections: 2,
                ..Config::default()
            },
            base,
        )));
        let ticks = Arc::new(AtomicU64::new(0));
        let connect = move |gate: &SharedGate, ticks: &AtomicU64, peer: IpAddr| {
            let now = || base + Duration::from_millis(ticks.fetch_add(1, Ordering::Relaxed));
            match gate.handle_head(now, peer, upgrade_head(), Load::default()) {
                Verdict::Upgrade { slot, .. } => {
                    let (global, own) = gate.open_slots(peer);
                    assert!(own == 1 && (1..=2).contains(&global), "{global} {own}");
                    gate.release(slot);
                    true
                }
                Verdict::Respond { response, slot } => {
                    assert_eq!((response.status, slot), (503, None));
                    false
                }
                Verdict::Drop => panic!("a valid head dropped"),
            }
        };
        let spawn = |peer| {
            let (gate, ticks) = (gate.clone(), ticks.clone());
            thread::spawn(move || connect(&gate, &ticks, peer))
        };
        let (same, other) = (spawn(PEER), spawn(OTHER));
        let here = connect(&gate, &ticks, PEER);
        let there = same.join().unwrap();
        assert!(here || there, "the slot was free for one of them");
        assert!(other.join().unwrap(), "the other address was refused");
        assert_eq!(gate.open_slots(PEER), (0, 0), "a slot leaked");
        assert_eq!(gate.open_slots(OTHER), (0, 0), "a slot leaked");
    });
}
