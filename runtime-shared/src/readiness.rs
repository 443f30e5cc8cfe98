//! Whether the socket woke a connection's task for reading.
//!
//! A connection's task is woken by its socket and by its shard (a command to write, read credit
//! returned, a pause lifted). Reading a socket that last reported nothing costs a pass through the
//! codec (tungstenite zero-fills its read buffer before every read) and, depending on the
//! runtime, a `recv` that fails. So every read goes through a waker of its own, which records
//! that it fired before waking the task: the task reads again only after it did.

use std::sync::Arc as StdArc;
use std::task::{Context, Wake, Waker};

use crate::sync::Mutex;

/// Shared between the connection's task and whatever holds its read waker (the socket's
/// reactor, through the codec).
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The socket woke the read side since the task last looked.
    woken: bool,
    /// The task to wake.
    task: Option<Waker>,
}

impl Wake for Shared {
    fn wake(self: StdArc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &StdArc<Self>) {
        let task = {
            let mut s = self.state.lock().expect("readiness lock");
            s.woken = true;
            s.task.clone()
        };
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// One connection's read waker and what it recorded. Lives with the codec: a sleeping
/// connection holds none.
#[derive(Debug)]
pub(crate) struct Readiness {
    shared: StdArc<Shared>,
    /// A waker over `shared`, made once.
    waker: Waker,
}

impl Readiness {
    pub(crate) fn new() -> Readiness {
        let shared = StdArc::new(Shared::default());
        Readiness {
            waker: Waker::from(shared.clone()),
            shared,
        }
    }

    /// At the start of a poll of the task: makes `cx`'s waker the one woken, and says whether
    /// the socket woke the read side since the last call (forgetting that it did). Both under
    /// one lock, so a wake-up is either seen now or wakes the task again.
    pub(crate) fn begin(&self, cx: &Context<'_>) -> bool {
        let mut s = self.shared.state.lock().expect("readiness lock");
        match &mut s.task {
            Some(w) => w.clone_from(cx.waker()),
            None => s.task = Some(cx.waker().clone()),
        }
        std::mem::take(&mut s.woken)
    }

    /// The context every read of the socket is made with.
    pub(crate) fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: StdArc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_read_wake_up_is_recorded_once_and_wakes_the_task() {
        let count = StdArc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let cx = Context::from_waker(&task);
        let r = Readiness::new();
        assert!(!r.begin(&cx), "nothing has woken it yet");
        r.context().waker().wake_by_ref();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(r.begin(&cx));
        assert!(!r.begin(&cx), "taken by the previous call");
    }

    #[test]
    fn a_wake_up_before_any_task_is_kept() {
        let r = Readiness::new();
        r.context().waker().wake_by_ref();
        let cx = Context::from_waker(Waker::noop());
        assert!(r.begin(&cx));
    }
}
