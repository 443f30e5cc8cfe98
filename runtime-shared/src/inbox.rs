//! The hand-off from connections (and the node) to one shard: a bounded FIFO under one short
//! lock.
//!
//! The shard takes whatever has arrived in one batch, under one lock, and is woken only when it
//! went to sleep on an empty inbox; under load it never is. A sender that finds the inbox full
//! waits for room (backpressure on reading, decision R1) and is woken when the shard makes some.
//! One sender's messages arrive in the order it sent them: `Open` before that connection's
//! inputs, and a connection's inputs in order.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};

use crate::sync::{Arc, Mutex};

struct Inbox<T> {
    state: Mutex<State<T>>,
    capacity: usize,
}

struct State<T> {
    queue: VecDeque<T>,
    /// Live [`Sender`]s. At zero the receiver sees the end once the queue is empty.
    senders: usize,
    /// The [`Receiver`] is gone: sends fail.
    closed: bool,
    /// The receiver, asleep on an empty queue.
    receiver: Option<Waker>,
    /// Senders that found the queue full, oldest first. Taking `n` messages wakes the `n`
    /// oldest; emptying the queue wakes them all, so none can be left waiting beside free room
    /// (a woken sender that finds it full again waits again).
    waiting: VecDeque<Waker>,
}

/// A new inbox holding at most `capacity` messages.
pub(crate) fn inbox<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let inbox = Arc::new(Inbox {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            senders: 1,
            closed: false,
            receiver: None,
            waiting: VecDeque::new(),
        }),
        capacity: capacity.max(1),
    });
    (Sender(inbox.clone()), Receiver(inbox))
}

impl<T> Inbox<T> {
    fn lock(&self) -> crate::sync::MutexGuard<'_, State<T>> {
        self.state.lock().expect("inbox lock")
    }
}

/// Why [`Sender::try_send`] gave the message back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError<T> {
    /// No room now: wait with [`Sender::poll_room`].
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// The receiver is gone; the message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

pub(crate) struct Sender<T>(Arc<Inbox<T>>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock();
            s.senders -= 1;
            if s.senders == 0 {
                s.receiver.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T> Sender<T> {
    /// Queues `msg` if there is room, waking the receiver if it sleeps.
    pub(crate) fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let waker = {
            let mut s = self.0.lock();
            if s.closed {
                return Err(TrySendError::Closed(msg));
            }
            if s.queue.len() >= self.0.capacity {
                return Err(TrySendError::Full(msg));
            }
            s.queue.push_back(msg);
            s.receiver.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Ready once the inbox has room or is closed; otherwise the task is woken when the
    /// receiver makes room. Room is not reserved: [`try_send`](Self::try_send) may find the
    /// inbox full again, and then this waits again.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.lock();
        if s.closed || s.queue.len() < self.0.capacity {
            return Poll::Ready(());
        }
        s.waiting.push_back(cx.waker().clone());
        Poll::Pending
    }

    /// Queues `msg`, waiting for room as long as it takes.
    pub(crate) async fn send(&self, msg: T) -> Result<(), Closed> {
        let mut msg = Some(msg);
        poll_fn(|cx| {
            loop {
                let Some(m) = msg.take() else {
                    return Poll::Ready(Ok(()));
                };
                match self.try_send(m) {
                    Ok(()) => return Poll::Ready(Ok(())),
                    Err(TrySendError::Closed(_)) => return Poll::Ready(Err(Closed)),
                    Err(TrySendError::Full(m)) => {
                        msg = Some(m);
                        if self.poll_room(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                }
            }
        })
        .await
    }
}

pub(crate) struct Receiver<T>(Arc<Inbox<T>>);

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let (waiting, queue) = {
            let mut s = self.0.lock();
            s.closed = true;
            (std::mem::take(&mut s.waiting), std::mem::take(&mut s.queue))
        };
        // Outside the lock: a message's drop may take other locks.
        drop(queue);
        for w in waiting {
            w.wake();
        }
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

/// What [`Receiver::poll_batch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Batch {
    /// At least one message was moved into the batch.
    Taken,
    /// Every sender is gone and nothing is left.
    Ended,
}

impl<T> Receiver<T> {
    /// Moves up to `max` of the oldest messages to the end of `batch`, under one lock; wakes
    /// the senders waiting for room. Pending (and woken by the next send) when there are none.
    pub(crate) fn poll_batch(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<T>,
        max: usize,
    ) -> Poll<Batch> {
        let waiting = {
            let mut s = self.0.lock();
            if s.queue.is_empty() {
                if s.senders == 0 {
                    return Poll::Ready(Batch::Ended);
                }
                match &mut s.receiver {
                    Some(w) => w.clone_from(cx.waker()),
                    None => s.receiver = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            let n = max.max(1).min(s.queue.len());
            batch.extend(s.queue.drain(..n));
            if s.queue.is_empty() {
                std::mem::take(&mut s.waiting)
            } else {
                let woken = n.min(s.waiting.len());
                s.waiting.drain(..woken).collect()
            }
        };
        for w in waiting {
            w.wake();
        }
        Poll::Ready(Batch::Taken)
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Waker, std::sync::Arc<Count>) {
        let count = std::sync::Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(count.clone()), count)
    }

    fn wakes(count: &Count) -> usize {
        count.0.load(Ordering::SeqCst)
    }

    #[test]
    fn batches_keep_order_and_respect_max() {
        let (tx, rx) = inbox(8);
        for i in 0..5 {
            tx.try_send(i).unwrap();
        }
        let (waker, _) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert_eq!(
            rx.poll_batch(&mut cx, &mut batch, 3),
            Poll::Ready(Batch::Taken)
        );
        assert_eq!(batch, [0, 1, 2]);
        assert_eq!(
            rx.poll_batch(&mut cx, &mut batch, 3),
            Poll::Ready(Batch::Taken)
        );
        assert_eq!(batch, [0, 1, 2, 3, 4]);
        assert!(rx.poll_batch(&mut cx, &mut batch, 3).is_pending());
    }

    #[test]
    fn a_sleeping_receiver_is_woken_once_by_a_send() {
        let (tx, rx) = inbox(8);
        let (waker, count) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert!(rx.poll_batch(&mut cx, &mut batch, 8).is_pending());
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(wakes(&count), 1, "the second send finds the receiver awake");
    }

    #[test]
    fn full_inbox_refuses_then_wakes_waiting_senders() {
        let (tx, rx) = inbox(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        let (waker, count) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(tx.poll_room(&mut cx).is_pending());
        let mut batch = VecDeque::new();
        assert!(rx.poll_batch(&mut cx, &mut batch, 1).is_ready());
        assert_eq!(wakes(&count), 1);
        assert!(tx.poll_room(&mut cx).is_ready());
        tx.try_send(3).unwrap();
    }

    #[test]
    fn room_for_n_wakes_the_n_oldest_waiters_and_an_empty_inbox_wakes_all() {
        let (tx, rx) = inbox(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        let waiters: Vec<_> = (0..3).map(|_| counting()).collect();
        for (waker, _) in &waiters {
            assert!(tx.poll_room(&mut Context::from_waker(waker)).is_pending());
        }
        let woken = || waiters.iter().map(|(_, c)| wakes(c)).collect::<Vec<_>>();
        let (waker, _) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert!(rx.poll_batch(&mut cx, &mut batch, 1).is_ready());
        assert_eq!(woken(), [1, 0, 0]);
        assert!(rx.poll_batch(&mut cx, &mut batch, 1).is_ready());
        assert_eq!(
            woken(),
            [1, 1, 1],
            "the inbox is empty: nobody may be left waiting"
        );
    }

    #[test]
    fn the_end_is_seen_after_the_last_message_and_the_last_sender() {
        let (tx, rx) = inbox(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        drop(tx);
        let (waker, count) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert_eq!(
            rx.poll_batch(&mut cx, &mut batch, 4),
            Poll::Ready(Batch::Taken)
        );
        assert!(rx.poll_batch(&mut cx, &mut batch, 4).is_pending());
        drop(tx2);
        assert_eq!(wakes(&count), 1);
        assert_eq!(
            rx.poll_batch(&mut cx, &mut batch, 4),
            Poll::Ready(Batch::Ended)
        );
    }

    #[test]
    fn sends_fail_once_the_receiver_is_gone() {
        let (tx, rx) = inbox(1);
        tx.try_send(1).unwrap();
        let (waker, count) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(tx.poll_room(&mut cx).is_pending());
        drop(rx);
        assert_eq!(wakes(&count), 1);
        assert!(tx.poll_room(&mut cx).is_ready());
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
        assert_eq!(run_ready(tx.send(3)), Err(Closed));
    }

    /// Polls `f` to completion; for futures that need no other thread.
    fn run_ready<F: std::future::Future>(f: F) -> F::Output {
        let (waker, _) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}
