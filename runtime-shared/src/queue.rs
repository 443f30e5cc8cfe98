//! The hand-off from a shard to one connection: the commands the core addressed to it.
//!
//! The shard never waits on a connection: it pushes into this queue under a short lock and wakes
//! the connection's task. The queue is bounded by the core's outbox budgets (PROTOCOL.md §10),
//! which charge every queued message until the connection reports it written. Reading controls
//! (pause, abort) bypass the write order: they act on the socket, not on the stream of frames.

use std::collections::VecDeque;
use std::task::{Context, Waker};

use bytes::Bytes;
use switchyard_core::{CloseCode, Role};

use crate::sync::Mutex;

/// A frame for the connection's writer, in the order the core emitted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// A TEXT message; report `Written` once the socket accepted it.
    Send(Bytes),
    /// A ping with an empty payload.
    Ping,
    /// The close frame; nothing is queued after it.
    Close {
        code: CloseCode,
        reason: &'static str,
    },
}

#[derive(Debug, Default)]
struct State {
    cmds: VecDeque<Cmd>,
    paused: bool,
    aborted: bool,
    /// Messages read and handed to the shard that it has not handled yet.
    unhandled: u32,
    waker: Option<Waker>,
}

/// Messages a phone may have read that its shard has not handled yet (decision A3). With one, a
/// pause the shard decides stops every phone after at most that one message, which is what
/// bounds a binary outbox's peak to PROTOCOL.md §10.2's budget + phones × (limit + 384).
pub const PHONE_READ_CREDIT: u32 = 1;

/// One connection's command queue, shared by its shard (producer) and its task (consumer).
#[derive(Debug, Default)]
pub struct ConnQueue {
    state: Mutex<State>,
    /// At most this many unhandled messages before reading waits; `None`: no limit.
    read_credit: Option<u32>,
}

/// The controls the connection's task acts on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controls {
    pub paused: bool,
    pub aborted: bool,
    /// The read credit is used up: read nothing until the shard handles a message.
    pub credit_exhausted: bool,
}

impl ConnQueue {
    pub fn new() -> ConnQueue {
        ConnQueue::default()
    }

    /// The queue of a connection in `role`: phones read under [`PHONE_READ_CREDIT`]; a binary's
    /// messages go to phone outboxes, which §10.1 bounds by closing, so it reads freely.
    pub fn for_role(role: &Role) -> ConnQueue {
        ConnQueue {
            read_credit: match role {
                Role::Phone { .. } => Some(PHONE_READ_CREDIT),
                Role::Binary { .. } => None,
            },
            ..ConnQueue::default()
        }
    }

    /// The task read a message and hands it to the shard.
    pub fn message_read(&self) {
        if self.read_credit.is_some() {
            self.state.lock().expect("queue lock").unhandled += 1;
        }
    }

    /// The shard handled one message of this connection (and queued whatever it decided, a
    /// pause included); wakes the task if it was waiting for credit.
    pub fn message_handled(&self) {
        let Some(credit) = self.read_credit else {
            return;
        };
        let waker = {
            let mut s = self.state.lock().expect("queue lock");
            let was_exhausted = s.unhandled >= credit;
            s.unhandled = s.unhandled.saturating_sub(1);
            if was_exhausted { s.waker.take() } else { None }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let waker = {
            let mut s = self.state.lock().expect("queue lock");
            f(&mut s);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queues a TEXT message.
    pub fn send(&self, data: Bytes) {
        self.update(|s| s.cmds.push_back(Cmd::Send(data)));
    }

    /// Queues a ping.
    pub fn ping(&self) {
        self.update(|s| s.cmds.push_back(Cmd::Ping));
    }

    /// Queues the close frame, first throwing away every message not yet started when
    /// `discard_queued`.
    pub fn close(&self, code: CloseCode, reason: &'static str, discard_queued: bool) {
        self.update(|s| {
            if discard_queued {
                s.cmds.clear();
            }
            s.cmds.push_back(Cmd::Close { code, reason });
        });
    }

    /// Asks the task to drop TCP now.
    pub fn abort(&self) {
        self.update(|s| s.aborted = true);
    }

    /// Stops or resumes reading.
    pub fn pause_reading(&self, paused: bool) {
        self.update(|s| s.paused = paused);
    }

    /// The current controls; registers the task to be woken by the next change.
    ///
    /// Call it first in every poll, before [`has_cmd`](Self::has_cmd) and [`pop`](Self::pop):
    /// then a command queued after those found nothing wakes the task (the loom model
    /// `queue_no_lost_wakeup` checks this order).
    pub fn poll_controls(&self, cx: &mut Context<'_>) -> Controls {
        let mut s = self.state.lock().expect("queue lock");
        match &mut s.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => s.waker = Some(cx.waker().clone()),
        }
        Controls {
            paused: s.paused,
            aborted: s.aborted,
            credit_exhausted: self.read_credit.is_some_and(|c| s.unhandled >= c),
        }
    }

    /// Whether a command is waiting.
    pub fn has_cmd(&self) -> bool {
        !self.state.lock().expect("queue lock").cmds.is_empty()
    }

    /// Frees the command buffer if it is empty: a quiet connection keeps none.
    pub fn release_buffer(&self) {
        let mut s = self.state.lock().expect("queue lock");
        if s.cmds.is_empty() {
            s.cmds = VecDeque::new();
        }
    }

    /// Takes the oldest command.
    pub fn pop(&self) -> Option<Cmd> {
        self.state.lock().expect("queue lock").cmds.pop_front()
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::*;

    #[test]
    fn discarding_close_drops_what_is_not_started() {
        let q = ConnQueue::new();
        q.send(Bytes::from_static(b"1"));
        assert_eq!(q.pop(), Some(Cmd::Send(Bytes::from_static(b"1"))));
        q.send(Bytes::from_static(b"2"));
        q.ping();
        q.close(CloseCode::INTERNAL, "x", true);
        assert_eq!(
            q.pop(),
            Some(Cmd::Close {
                code: CloseCode::INTERNAL,
                reason: "x"
            })
        );
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn close_behind_queued_messages() {
        let q = ConnQueue::new();
        q.send(Bytes::from_static(b"1"));
        q.close(CloseCode::NORMAL, "", false);
        assert!(matches!(q.pop(), Some(Cmd::Send(_))));
        assert!(matches!(q.pop(), Some(Cmd::Close { .. })));
    }

    #[test]
    fn changes_wake_the_task() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let q = ConnQueue::new();
        let c = q.poll_controls(&mut Context::from_waker(&waker));
        assert_eq!(
            c,
            Controls {
                paused: false,
                aborted: false,
                credit_exhausted: false,
            }
        );
        q.pause_reading(true);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Not registered again: no second wake.
        q.abort();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let c = q.poll_controls(&mut Context::from_waker(&waker));
        assert!(c.paused && c.aborted);
    }

    fn counting_waker() -> (Waker, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;

        struct Count(Arc<AtomicUsize>);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let n = Arc::new(AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(n.clone()))), n)
    }

    #[test]
    fn phone_reads_one_message_ahead_of_its_shard() {
        use std::sync::atomic::Ordering;
        let (waker, wakes) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let q = ConnQueue::for_role(&Role::Phone { device_name: None });
        assert!(!q.poll_controls(&mut cx).credit_exhausted);
        q.message_read();
        assert!(q.poll_controls(&mut cx).credit_exhausted);
        q.message_handled();
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            1,
            "handling returns the credit"
        );
        assert!(!q.poll_controls(&mut cx).credit_exhausted);
        // Handling with credit to spare wakes nobody.
        q.message_handled();
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn binary_reads_freely() {
        let (waker, _) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let q = ConnQueue::for_role(&Role::Binary {
            version: String::new(),
        });
        for _ in 0..10 {
            q.message_read();
        }
        assert!(!q.poll_controls(&mut cx).credit_exhausted);
    }
}
