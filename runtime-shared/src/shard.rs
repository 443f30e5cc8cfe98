//! One actor task per shard: it owns the shard's [`Relay`], its single timer and its routing
//! table, and is the only place the shard's state is touched.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use switchyard_core::{Config, ConnKey, Input, Open, Output, Relay};

use crate::future::yield_now;
use crate::inbox::{Batch, Receiver};
use crate::published::Published;
use crate::queue::ConnQueue;
use crate::{Executor, PushSink};

/// Inputs taken from the inbox at once, and handled before the shard publishes its figures and
/// re-arms its timer.
const BATCH: usize = 64;

/// What connections and the node send a shard.
#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// A connection was upgraded: route the core's commands for `conn` to `queue`.
    Open {
        conn: ConnKey,
        open: Open,
        queue: Arc<ConnQueue>,
    },
    /// Any other input; the routing entry goes with [`Input::Closed`].
    Input(Input),
    /// One flush completed `count` sends of `conn`: that many [`Input::Written`], in one message
    /// so a batch costs the channel one hand-off.
    Written { conn: ConnKey, count: usize },
}

struct Shard {
    relay: Relay,
    conns: HashMap<ConnKey, Arc<ConnQueue>>,
    push: Option<Arc<dyn PushSink>>,
}

impl Shard {
    fn handle(&mut self, now: Instant, msg: ShardMsg) {
        match msg {
            ShardMsg::Open { conn, open, queue } => {
                self.conns.insert(conn, queue);
                self.relay.handle_input(now, Input::Open { conn, open });
                self.drain();
            }
            ShardMsg::Input(input) => {
                let (closed, message) = match input {
                    Input::Closed { conn, .. } => (Some(conn), None),
                    Input::Message { conn, .. } => (None, Some(conn)),
                    _ => (None, None),
                };
                self.relay.handle_input(now, input);
                self.drain();
                // After the drain, so a pause it decided is in place before reading resumes.
                if let Some(queue) = message.and_then(|conn| self.conns.get(&conn)) {
                    queue.message_handled();
                }
                if let Some(conn) = closed {
                    self.conns.remove(&conn);
                }
            }
            ShardMsg::Written { conn, count } => {
                for _ in 0..count {
                    self.relay.handle_input(now, Input::Written { conn });
                }
                self.drain();
            }
        }
    }

    fn timeout(&mut self, now: Instant) {
        self.relay.handle_timeout(now);
        self.drain();
    }

    /// Carries out every command the last step produced.
    fn drain(&mut self) {
        while let Some(out) = self.relay.poll_output() {
            let queue = |conn: &ConnKey| self.conns.get(conn);
            match out {
                Output::Send { conn, data } => {
                    if let Some(q) = queue(&conn) {
                        q.send(data);
                    }
                }
                Output::Ping { conn } => {
                    if let Some(q) = queue(&conn) {
                        q.ping();
                    }
                }
                Output::Close {
                    conn,
                    code,
                    reason,
                    discard_queued,
                } => {
                    if let Some(q) = queue(&conn) {
                        q.close(code, reason, discard_queued);
                    }
                }
                Output::Abort { conn } => {
                    if let Some(q) = queue(&conn) {
                        q.abort();
                    }
                }
                Output::PauseReading { conn, paused } => {
                    if let Some(q) = queue(&conn) {
                        q.pause_reading(paused);
                    }
                }
                Output::PushWake { server_id, token } => match &self.push {
                    Some(push) => push.wake(server_id, token),
                    None => {
                        tracing::debug!(server_id = %server_id, reason = "push_off", "push_wake_dropped");
                    }
                },
            }
        }
    }

    fn publish(&self, published: &Published) {
        published.publish(self.relay.counters());
    }
}

enum Wake {
    Batch(Batch),
    Timer,
}

/// Runs one shard until it has drained after [`Input::Shutdown`] (or every sender is gone).
pub(crate) async fn run<E: Executor>(
    config: Config,
    seed: [u8; 32],
    rx: Receiver<ShardMsg>,
    published: Arc<Published>,
    push: Option<Arc<dyn PushSink>>,
) {
    let mut shard = Shard {
        relay: Relay::new(config, seed, E::now()),
        conns: HashMap::new(),
        push,
    };
    let mut batch = VecDeque::with_capacity(BATCH);
    let mut timer = pin!(E::timer(E::now()));
    let mut armed: Option<Instant> = None;
    loop {
        let wake = poll_fn(|cx| {
            if let Poll::Ready(b) = rx.poll_batch(cx, &mut batch, BATCH) {
                return Poll::Ready(Wake::Batch(b));
            }
            if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Batch(Batch::Ended) => break,
            Wake::Batch(Batch::Taken) => {
                let full = batch.len() == BATCH;
                // One reading of the clock for the batch: it arrived together.
                let now = E::now();
                while let Some(msg) = batch.pop_front() {
                    shard.handle(now, msg);
                }
                if full {
                    yield_now().await;
                }
            }
            Wake::Timer => {
                armed = None;
                shard.timeout(E::now());
            }
        }
        // A busy inbox must not starve the timer.
        let now = E::now();
        if shard.relay.poll_timeout().is_some_and(|at| at <= now) {
            shard.timeout(now);
        }
        shard.publish(&published);
        match shard.relay.poll_timeout() {
            Some(at) if armed != Some(at) => {
                E::reset(timer.as_mut(), at);
                armed = Some(at);
            }
            Some(_) => {}
            None => armed = None,
        }
        if shard.relay.is_drained() {
            break;
        }
    }
    shard.publish(&published);
}
