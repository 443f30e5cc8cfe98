//! The smol runtime of Switchyard: one `async-executor` run by `workers` threads, async-io
//! listeners and `async-io` timers under the executor-neutral node of [`switchyard_runtime`],
//! which holds everything else (see its documentation for the architecture).

use std::future::Future;
use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::thread::JoinHandle;
use std::time::Instant;

use async_executor::Executor;
use async_io::{Async, Timer};
use futures_io::{AsyncRead, AsyncWrite};

pub use switchyard_runtime::{Options, RESPONSE_LINGER, RenderMetrics, shard_seed};

/// An accepted connection: async-io's socket itself rather than async-net's `TcpStream`, which
/// adds an `Arc` and two stored readiness futures to every connection, idle ones included.
/// Closing shuts down the sending side, as async-net does (async-io's own close only flushes):
/// the linger after a response (§2.1) needs the FIN.
///
/// Reading skips the `recv` calls that can only fail. async-io's own `poll_read` tries the
/// socket first every time, so each message cost one `recv` that read it and two that found
/// nothing (one before the readiness event was consumed, one after). Here a read that returns
/// less than was asked for means the socket was empty, so the next read waits for readiness
/// first, as tokio does. Re-arming interest (epoll's `EPOLL_CTL_MOD`) reports data that arrived
/// in between, so nothing is missed (PERFORMANCE.md).
#[derive(Debug)]
pub struct Stream {
    io: Async<std::net::TcpStream>,
    /// The last read found the socket empty: wait for readiness before the next `recv`.
    drained: bool,
}

impl Stream {
    fn new(io: Async<std::net::TcpStream>) -> Stream {
        Stream { io, drained: false }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if this.drained {
                ready!(this.io.poll_readable(cx))?;
                this.drained = false;
            }
            match (&mut this.io.get_ref()).read(buf) {
                Ok(n) => {
                    this.drained = n < buf.len();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.drained = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.io.get_ref().shutdown(Shutdown::Write))
    }
}

/// A running node on smol.
pub type Handle = switchyard_runtime::Handle<Smol>;

/// Binds both listeners (a bind error is returned at once) and starts the node on its own
/// threads.
pub fn start(options: Options) -> io::Result<Handle> {
    switchyard_runtime::start::<Smol>(options)
}

/// The node's view of its executor. Weak: spawned tasks hold it, and the executor holds them.
#[derive(Debug, Clone)]
pub struct Smol(Weak<Executor<'static>>);

/// The worker threads, which own the executor: when the last one leaves, the executor and every
/// task still in it are dropped.
#[derive(Debug)]
pub struct SmolThreads {
    /// Closing it ends every worker's `run`.
    stop: async_channel::Sender<()>,
    workers: Vec<JoinHandle<()>>,
}

impl switchyard_runtime::Executor for Smol {
    type Threads = SmolThreads;
    type Listener = Async<std::net::TcpListener>;
    type Stream = Stream;
    type Timer = Timer;

    fn launch(workers: usize) -> io::Result<(Smol, SmolThreads)> {
        let executor = Arc::new(Executor::new());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let mut threads = SmolThreads {
            stop,
            workers: Vec::with_capacity(workers),
        };
        for _ in 0..workers {
            let (executor, stopped) = (executor.clone(), stopped.clone());
            let worker = std::thread::Builder::new()
                .name("switchyard-worker".to_owned())
                .spawn(move || {
                    async_io::block_on(executor.run(async {
                        let _ = stopped.recv().await;
                    }));
                })?;
            threads.workers.push(worker);
        }
        Ok((Smol(Arc::downgrade(&executor)), threads))
    }

    fn listener(&self, listener: std::net::TcpListener) -> io::Result<Self::Listener> {
        Async::new(listener)
    }

    async fn accept(listener: &Self::Listener) -> io::Result<(Stream, SocketAddr)> {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.get_ref().set_nodelay(true);
        Ok((Stream::new(stream), peer))
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Some(executor) = self.0.upgrade() {
            executor.spawn(task).detach();
        }
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn timer(at: Instant) -> Timer {
        Timer::at(at)
    }

    fn reset(timer: Pin<&mut Timer>, at: Instant) {
        timer.get_mut().set_at(at);
    }
}

impl switchyard_runtime::Threads for SmolThreads {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        async_io::block_on(future)
    }

    fn stop(mut self) {
        self.stop.close();
        for worker in std::mem::take(&mut self.workers) {
            let _ = worker.join();
        }
    }
}

impl Drop for SmolThreads {
    fn drop(&mut self) {
        self.stop.close();
    }
}
