//! The tokio runtime of Switchyard: a multi-thread tokio runtime with `workers` threads, tokio
//! listeners and `tokio::time` timers under the executor-neutral node of
//! [`switchyard_runtime`], which holds everything else (see its documentation for the
//! architecture).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_tungstenite::tokio::TokioAdapter;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

pub use switchyard_runtime::{Options, RESPONSE_LINGER, RenderMetrics, shard_seed};

/// A running node on tokio.
pub type Handle = switchyard_runtime::Handle<Tokio>;

/// Binds both listeners (a bind error is returned at once) and starts the node on its own
/// threads.
pub fn start(options: Options) -> io::Result<Handle> {
    switchyard_runtime::start::<Tokio>(options)
}

/// The node's view of its tokio runtime: a handle, which does not keep the runtime alive.
#[derive(Debug, Clone)]
pub struct Tokio(tokio::runtime::Handle);

/// Owns the tokio runtime.
#[derive(Debug)]
pub struct TokioThreads(Option<Runtime>);

impl switchyard_runtime::Executor for Tokio {
    type Threads = TokioThreads;
    type Listener = TcpListener;
    type Stream = TokioAdapter<TcpStream>;
    type Timer = tokio::time::Sleep;

    fn launch(workers: usize) -> io::Result<(Tokio, TokioThreads)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("switchyard-worker")
            .enable_all()
            .build()?;
        Ok((Tokio(runtime.handle().clone()), TokioThreads(Some(runtime))))
    }

    fn listener(&self, listener: std::net::TcpListener) -> io::Result<TcpListener> {
        let _enter = self.0.enter();
        TcpListener::from_std(listener)
    }

    async fn accept(listener: &TcpListener) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((TokioAdapter::new(stream), peer))
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.spawn(task);
    }

    /// Through tokio, so a paused test clock applies.
    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn timer(at: Instant) -> tokio::time::Sleep {
        tokio::time::sleep_until(at.into())
    }

    fn reset(timer: Pin<&mut tokio::time::Sleep>, at: Instant) {
        timer.reset(at.into());
    }
}

impl switchyard_runtime::Threads for TokioThreads {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.0.as_ref().expect("running").block_on(future)
    }

    fn stop(mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
    }
}

impl Drop for TokioThreads {
    fn drop(&mut self) {
        // Dropping a runtime blocks; a `Handle` may be dropped anywhere, even on a runtime.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
