//! The cost floor: a bare WebSocket pipe on the relay's own stack.
//!
//! A binary (`/v1/server`) and the first phone (`/v1/client`) naming the same
//! `x-pyrycode-server` are paired and frames are copied across unchanged: no envelope, no
//! registry, no limits. What the relay does beyond this is its overhead.
//!
//! It runs on the relay's executor (`switchyard-tokio`'s or `switchyard-smol`'s, through the
//! same [`Executor`] trait: same worker threads, same accept with `TCP_NODELAY`, same
//! futures-io streams) and the relay's codec settings ([`websocket_config`]), and it writes the
//! way the relay's connection driver does: up to [`MAX_BATCH`] messages fed to the codec, then
//! one flush. It does strictly less per frame than the relay: one task per pair, so a frame
//! crosses no channel and wakes no other task; no frame scanner, no read credit, no shard.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_tungstenite::WebSocketStream;
use futures_util::{Sink, Stream};
use switchyard_runtime::Executor;
use switchyard_runtime::driver::websocket_config;
use tungstenite::Message;
use tungstenite::handshake::server::{Request, Response};

use crate::Error;

/// Messages fed to a codec before it is flushed: the relay's connection driver's batch.
const MAX_BATCH: usize = 64;
/// The relay's default `--max-message-size`.
const MAX_MESSAGE_SIZE: usize = 256 * 1024;

type Ws<E> = WebSocketStream<<E as Executor>::Stream>;
type Waiting<E> = Arc<Mutex<HashMap<String, async_channel::Sender<Ws<E>>>>>;

/// The runtime the floor runs on, as the relay's `--runtime`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Runtime {
    Tokio,
    Smol,
}

/// Serves the pipe on `threads` workers of `runtime` until the process is killed.
pub fn serve(listen: SocketAddr, threads: usize, runtime: Runtime) -> Result<(), Error> {
    match runtime {
        Runtime::Tokio => serve_on::<switchyard_tokio::Tokio>(listen, threads),
        Runtime::Smol => serve_on::<switchyard_smol::Smol>(listen, threads),
    }
}

fn serve_on<E: Executor>(listen: SocketAddr, threads: usize) -> Result<(), Error> {
    use switchyard_runtime::Threads as _;
    let std_listener = std::net::TcpListener::bind(listen)?;
    std_listener.set_nonblocking(true)?;
    println!("floor listening on {}", std_listener.local_addr()?);
    let (exec, workers) = E::launch(threads.max(1))?;
    let listener = exec.listener(std_listener)?;
    let accept = {
        let exec = exec.clone();
        async move {
            let waiting: Waiting<E> = Arc::default();
            while let Ok((stream, _)) = E::accept(&listener).await {
                exec.spawn(pair::<E>(stream, waiting.clone()));
            }
        }
    };
    exec.spawn(accept);
    workers.block_on(std::future::pending::<()>());
    Ok(())
}

/// Upgrades one connection; a binary waits for its phone, then runs the pair.
async fn pair<E: Executor>(stream: E::Stream, waiting: Waiting<E>) {
    let mut route = (String::new(), String::new());
    #[allow(clippy::result_large_err)] // the signature is tungstenite's `Callback`
    let callback = |req: &Request, resp: Response| {
        let sid = req
            .headers()
            .get("x-pyrycode-server")
            .and_then(|v| v.to_str().ok());
        route = (
            req.uri().path().to_owned(),
            sid.unwrap_or_default().to_owned(),
        );
        Ok(resp)
    };
    let config = Some(websocket_config(MAX_MESSAGE_SIZE));
    let Ok(ws) = async_tungstenite::accept_hdr_async_with_config(stream, callback, config).await
    else {
        return;
    };
    let (path, sid) = route;
    if path == "/v1/server" {
        let (tx, rx) = async_channel::bounded(1);
        waiting.lock().expect("lock").insert(sid, tx);
        if let Ok(phone) = rx.recv().await {
            pipe(ws, phone).await;
        }
    } else {
        let binary = waiting.lock().expect("lock").remove(&sid);
        if let Some(tx) = binary {
            let _ = tx.try_send(ws);
        }
    }
}

/// One direction of the pipe: messages read from one codec and not yet flushed by the other.
#[derive(Default)]
struct Leg {
    /// Something was fed to the destination since its last completed flush.
    dirty: bool,
}

impl Leg {
    /// Moves what `from` has read into `to`, a batch at a time with one flush per batch.
    /// `Ready` when either side is finished.
    fn poll<S>(
        &mut self,
        from: &mut WebSocketStream<S>,
        to: &mut WebSocketStream<S>,
        cx: &mut Context<'_>,
    ) -> Poll<()>
    where
        S: futures_util::io::AsyncRead + futures_util::io::AsyncWrite + Unpin,
    {
        loop {
            let mut fed = 0;
            while fed < MAX_BATCH {
                match Pin::new(&mut *to).poll_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                }
                let message = match Pin::new(&mut *from).poll_next(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None | Some(Err(_))) => return Poll::Ready(()),
                    Poll::Ready(Some(Ok(m))) => m,
                };
                if let Message::Text(_) = message {
                    if Pin::new(&mut *to).start_send(message).is_err() {
                        return Poll::Ready(());
                    }
                    fed += 1;
                    self.dirty = true;
                }
            }
            if !self.dirty {
                return Poll::Pending;
            }
            match Pin::new(&mut *to).poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => self.dirty = false,
            }
            if fed < MAX_BATCH {
                return Poll::Pending;
            }
        }
    }
}

/// Copies text messages both ways until either side ends, in one task and without locks: each
/// poll moves what each side has read to the other.
async fn pipe<S>(mut a: WebSocketStream<S>, mut b: WebSocketStream<S>)
where
    S: futures_util::io::AsyncRead + futures_util::io::AsyncWrite + Unpin,
{
    let (mut ab, mut ba) = (Leg::default(), Leg::default());
    poll_fn(|cx| {
        if ab.poll(&mut a, &mut b, cx).is_ready() || ba.poll(&mut b, &mut a, cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}
