//! Signals between tasks on different workers: the shutdown broadcast ([`Flag`]) and the count
//! of tasks still running ([`latch`]).
//!
//! Both are small on purpose, written on [`crate::sync`] so the loom models cover them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{Arc, AtomicBool, AtomicUsize, Mutex, Ordering};

/// A switch set once and never cleared, which any number of tasks wait on.
///
/// Waiting costs nothing until the first poll that finds it unset; a waiter dropped before the
/// flag is set takes its waker back out, so short-lived waiters (a request head being read) do
/// not pile up.
#[derive(Debug, Default)]
pub(crate) struct Flag {
    set: AtomicBool,
    waiters: Mutex<Waiters>,
}

/// Wakers of the pending [`Wait`]s. Ordered by key so wake-ups happen in a repeatable order.
#[derive(Debug, Default)]
struct Waiters {
    next_key: u64,
    wakers: BTreeMap<u64, Waker>,
}

impl Flag {
    /// Sets the flag and wakes every waiter. Returns `false` if it was already set.
    pub(crate) fn set(&self) -> bool {
        if self.set.swap(true, Ordering::AcqRel) {
            return false;
        }
        // A waiter holds the lock from its check of the flag to its registration, so it either
        // registered before this take (and is woken) or sees the flag set.
        let wakers = std::mem::take(&mut self.waiters.lock().expect("flag lock").wakers);
        for waker in wakers.into_values() {
            waker.wake();
        }
        true
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set.
    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait {
            flag: self,
            key: None,
        }
    }

    /// Wakers registered and not yet woken or withdrawn.
    #[cfg(all(test, switchyard_loom))]
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.lock().expect("flag lock").wakers.len()
    }
}

/// The future of [`Flag::wait`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub(crate) struct Wait<'a> {
    flag: &'a Flag,
    /// Where this waiter's waker is registered.
    key: Option<u64>,
}

impl Wait<'_> {
    fn withdraw(&mut self) {
        // Once the flag is set its setter takes every registration, so a crowd of woken waiters
        // does not queue for the lock.
        let Some(key) = self.key.take() else { return };
        if !self.flag.is_set() {
            self.flag
                .waiters
                .lock()
                .expect("flag lock")
                .wakers
                .remove(&key);
        }
    }
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.flag.is_set() {
            this.withdraw();
            return Poll::Ready(());
        }
        let mut waiters = this.flag.waiters.lock().expect("flag lock");
        if this.flag.is_set() {
            drop(waiters);
            this.withdraw();
            return Poll::Ready(());
        }
        let key = match this.key {
            Some(key) => key,
            None => {
                let key = waiters.next_key;
                waiters.next_key += 1;
                this.key = Some(key);
                key
            }
        };
        waiters
            .wakers
            .entry(key)
            .and_modify(|w| w.clone_from(cx.waker()))
            .or_insert_with(|| cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// A count of running tasks, like a channel whose senders are the tasks: each task holds an
/// [`Alive`] (cloned from the first), and [`Done::wait`] resolves once the last is dropped.
/// Everything a task did before dropping its `Alive` is visible to the waiter after that.
pub(crate) fn latch() -> (Alive, Done) {
    let latch = Arc::new(Latch {
        live: AtomicUsize::new(1),
        done: Flag::default(),
    });
    (Alive(latch.clone()), Done(latch))
}

#[derive(Debug)]
struct Latch {
    live: AtomicUsize,
    done: Flag,
}

/// One running task's share of a [`latch`].
#[derive(Debug)]
pub(crate) struct Alive(Arc<Latch>);

impl Clone for Alive {
    fn clone(&self) -> Alive {
        // Cloned from a live share, so the count is at least one and cannot have reached zero.
        self.0.live.fetch_add(1, Ordering::Relaxed);
        Alive(self.0.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        // AcqRel: the last share acquires what every other share released, then publishes it
        // all through the flag.
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.done.set();
        }
    }
}

/// The waiting end of a [`latch`].
#[derive(Debug)]
pub(crate) struct Done(Arc<Latch>);

impl Done {
    /// Resolves once every [`Alive`] is gone.
    pub(crate) fn wait(&self) -> Wait<'_> {
        self.0.done.wait()
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize as Count, Ordering::SeqCst};
    use std::task::Wake;

    struct Counter(Count);
    impl Wake for Counter {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn counter() -> (std::sync::Arc<Counter>, Waker) {
        let c = std::sync::Arc::new(Counter(Count::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn set_wakes_each_waiter_once_and_only_the_first_set_counts() {
        let flag = Flag::default();
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut a = flag.wait();
        let mut b = flag.wait();
        assert!(Pin::new(&mut a).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut b).poll(&mut cx).is_pending());
        // Polled again: the registration is replaced, not added.
        assert!(Pin::new(&mut a).poll(&mut cx).is_pending());
        assert!(flag.set());
        assert!(!flag.set());
        assert_eq!(count.0.load(SeqCst), 2);
        assert!(Pin::new(&mut a).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut b).poll(&mut cx).is_ready());
        assert!(flag.is_set());
    }

    #[test]
    fn a_dropped_waiter_withdraws() {
        let flag = Flag::default();
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut a = flag.wait();
        assert!(Pin::new(&mut a).poll(&mut cx).is_pending());
        drop(a);
        assert!(flag.waiters.lock().unwrap().wakers.is_empty());
        flag.set();
        assert_eq!(count.0.load(SeqCst), 0);
    }

    #[test]
    fn latch_is_done_when_the_last_share_goes() {
        let (alive, done) = latch();
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let other = alive.clone();
        let mut wait = done.wait();
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        drop(alive);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        drop(other);
        assert_eq!(count.0.load(SeqCst), 1);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
    }
}
