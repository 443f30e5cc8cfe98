//! Small runtime-neutral combinators over [`Executor`]'s timer.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::Executor;

/// Polls both futures; the first to finish gives the result (`a` on a tie).
pub(crate) async fn race<T>(a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    let mut a = pin!(a);
    let mut b = pin!(b);
    poll_fn(|cx| match a.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(v),
        Poll::Pending => b.as_mut().poll(cx),
    })
    .await
}

/// The instant `d` from now on the executor's clock.
pub(crate) fn deadline_after<E: Executor>(d: Duration) -> Instant {
    let now = E::now();
    // A limit too far to represent never fires in practice.
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Resolves once `d` has passed on the executor's clock.
pub(crate) async fn sleep<E: Executor>(d: Duration) {
    E::timer(deadline_after::<E>(d)).await;
}

/// `f`'s output, or `None` once `limit` has passed.
pub(crate) async fn timeout<E: Executor, T>(
    limit: Duration,
    f: impl Future<Output = T>,
) -> Option<T> {
    timeout_at::<E, T>(deadline_after::<E>(limit), f).await
}

/// `f`'s output, or `None` once the executor's clock reaches `deadline`.
pub(crate) async fn timeout_at<E: Executor, T>(
    deadline: Instant,
    f: impl Future<Output = T>,
) -> Option<T> {
    race(async { Some(f.await) }, async {
        E::timer(deadline).await;
        None
    })
    .await
}

/// Lets the other tasks on this worker run once. futures-io sockets and `async-channel` have no
/// cooperative budget like tokio's, so a task that always finds input ready would otherwise keep
/// its worker until the input runs dry.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}
