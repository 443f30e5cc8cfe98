//! The node: listeners, admission through the gate, connection tasks, and the [`Handle`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::TokioAdapter;
use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use switchyard_core::{
    Config, ConnKey, Counters, Ended, Gate, Input, Load, Response, Slot, Verdict,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::agnostic::driver::{self, ConnDriver, Event};
use crate::agnostic::head::{Head, read_head};
use crate::agnostic::http::{self, MetricsRoute};
use crate::agnostic::queue::ConnQueue;
use crate::agnostic::scanner::Watched;
use crate::shard::{self, Published, ShardMsg};
use crate::{Options, RESPONSE_LINGER, RenderMetrics, clock, shard_seed};

/// Inputs a shard's channel holds before connections wait (backpressure on reading).
const SHARD_CHANNEL: usize = 1024;
/// Pause after a failed `accept` (out of file descriptors, …) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long [`Handle::wait`] waits beyond the drain deadline before giving up on a shard.
const DRAIN_MARGIN: Duration = Duration::from_secs(2);

type Socket = TokioAdapter<TcpStream>;

struct ShardLink {
    tx: mpsc::Sender<ShardMsg>,
    published: Arc<Published>,
}

/// State shared by every task of the node.
struct Node {
    config: Config,
    gate: Mutex<Gate>,
    shards: Vec<ShardLink>,
    next_conn: AtomicU64,
    /// `true` once shutdown began: listeners close, connections not yet upgraded are dropped.
    stopping: watch::Sender<bool>,
    render_metrics: RenderMetrics,
}

impl Node {
    fn load(&self) -> Load {
        let mut load = Load::default();
        for s in &self.shards {
            load.binaries += s.published.binaries.load(Ordering::Relaxed);
            load.phones += s.published.phones.load(Ordering::Relaxed);
        }
        load
    }

    fn counters(&self) -> Counters {
        let mut sum = self.gate.lock().expect("gate lock").counters().clone();
        for s in &self.shards {
            sum.add(&s.published.counters.lock().expect("counters lock"));
        }
        // Push outcomes join here once the push dispatcher exists (issue 8).
        sum
    }

    fn release(&self, slot: Slot) {
        self.gate.lock().expect("gate lock").release(slot);
    }

    fn handle_head(&self, peer: IpAddr, head: &[u8]) -> Verdict {
        let load = self.load();
        self.gate
            .lock()
            .expect("gate lock")
            .handle_head(clock::now(), peer, head, load)
    }
}

/// A running node. Dropping it without [`wait`](Handle::wait) stops everything at once.
pub struct Handle {
    runtime: Option<Runtime>,
    node: Arc<Node>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shard_tasks: Vec<JoinHandle<()>>,
    listener_tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("local_addr", &self.local_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

pub(crate) fn start(options: Options) -> std::io::Result<Handle> {
    let workers = options.workers.max(1);
    let main = std::net::TcpListener::bind(options.listen)?;
    let metrics = options
        .metrics_listen
        .map(std::net::TcpListener::bind)
        .transpose()?;
    let local_addr = main.local_addr()?;
    let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
    main.set_nonblocking(true)?;
    if let Some(m) = &metrics {
        m.set_nonblocking(true)?;
    }
    let node_seed = match options.seed {
        Some(seed) => seed,
        None => {
            let mut seed = [0; 32];
            getrandom::fill(&mut seed).map_err(std::io::Error::other)?;
            seed
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("switchyard-worker")
        .enable_all()
        .build()?;
    let _enter = runtime.enter();
    let main = TcpListener::from_std(main)?;
    let metrics = metrics.map(TcpListener::from_std).transpose()?;

    let mut shards = Vec::with_capacity(workers);
    let mut receivers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel(SHARD_CHANNEL);
        shards.push(ShardLink {
            tx,
            published: Arc::default(),
        });
        receivers.push(rx);
    }
    let node = Arc::new(Node {
        gate: Mutex::new(Gate::new(options.config.clone(), clock::now())),
        config: options.config,
        shards,
        next_conn: AtomicU64::new(1),
        stopping: watch::Sender::new(false),
        render_metrics: options.render_metrics,
    });
    let shard_tasks = receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| {
            runtime.spawn(shard::run(
                node.config.clone(),
                shard_seed(&node_seed, i),
                rx,
                node.shards[i].published.clone(),
            ))
        })
        .collect();
    let mut listener_tasks = vec![runtime.spawn(accept_loop(main, node.clone(), Listener::Main))];
    if let Some(m) = metrics {
        listener_tasks.push(runtime.spawn(accept_loop(m, node.clone(), Listener::Metrics)));
    }
    drop(_enter);
    Ok(Handle {
        runtime: Some(runtime),
        node,
        local_addr,
        metrics_addr,
        shard_tasks,
        listener_tasks,
    })
}

impl Handle {
    /// The main listener's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics listener's bound address, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The node's counters: the gate's and every shard's, summed.
    pub fn counters(&self) -> Counters {
        self.node.counters()
    }

    /// SIGHUP (PROTOCOL.md §16.3): every shard closes its claimants and holders.
    pub fn rebalance(&self) {
        self.broadcast(|| Input::Rebalance);
    }

    /// The drain delay (§13): `/healthz` answers 503 "draining"; everything else is unchanged.
    pub fn start_draining(&self) {
        self.node.gate.lock().expect("gate lock").start_draining();
    }

    /// Begins shutdown (§13): listeners close, connections not yet upgraded are dropped, every
    /// shard closes its connections. Later calls do nothing.
    pub fn shutdown(&self) {
        if self.node.stopping.send_replace(true) {
            return;
        }
        self.broadcast(|| Input::Shutdown);
    }

    fn broadcast(&self, input: impl Fn() -> Input) {
        let Some(runtime) = &self.runtime else { return };
        for s in &self.node.shards {
            let tx = s.tx.clone();
            let msg = ShardMsg::Input(input());
            runtime.spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Blocks until shutdown has begun and every shard has drained (the core's drain deadline
    /// closes whatever is left), then stops the runtime.
    pub fn wait(mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let shard_tasks = std::mem::take(&mut self.shard_tasks);
        let listener_tasks = std::mem::take(&mut self.listener_tasks);
        let mut stopping = self.node.stopping.subscribe();
        let limit = self.node.config.drain_timeout + DRAIN_MARGIN;
        runtime.block_on(async move {
            stopped(&mut stopping).await;
            let shards = async {
                for t in shard_tasks {
                    let _ = t.await;
                }
            };
            if tokio::time::timeout(limit, shards).await.is_err() {
                tracing::warn!("drain_incomplete");
            }
            for t in listener_tasks {
                let _ = t.await;
            }
        });
        runtime.shutdown_timeout(Duration::from_millis(100));
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Resolves once shutdown has begun.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

#[derive(Debug, Clone, Copy)]
enum Listener {
    Main,
    Metrics,
}

async fn accept_loop(listener: TcpListener, node: Arc<Node>, kind: Listener) {
    let mut stopping = node.stopping.subscribe();
    loop {
        tokio::select! {
            () = stopped(&mut stopping) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let node = node.clone();
                    match kind {
                        Listener::Main => tokio::spawn(serve_main(node, stream, peer)),
                        Listener::Metrics => tokio::spawn(serve_metrics(node, stream)),
                    };
                }
                Err(e) => {
                    tracing::warn!(err = accept_error(&e), "accept_failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Reads the request head within the header timeout; `None`: timed out, ended, failed, or the
/// node is stopping. The connection is then closed writing nothing.
async fn head(node: &Node, socket: &mut Socket) -> Option<Head> {
    let mut stopping = node.stopping.subscribe();
    if *stopping.borrow_and_update() {
        return None;
    }
    let read = tokio::time::timeout(
        node.config.header_timeout,
        read_head(socket, node.config.max_head_size),
    );
    tokio::select! {
        r = read => r.ok()?.ok()?,
        () = stopped(&mut stopping) => None,
    }
}

async fn serve_main(node: Arc<Node>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut socket = TokioAdapter::new(stream);
    let Some(Head { head, rest }) = head(&node, &mut socket).await else {
        return;
    };
    let verdict = node.handle_head(peer.ip().to_canonical(), &head);
    drop(head);
    match verdict {
        Verdict::Drop => {}
        Verdict::Respond { response, slot } => {
            let written = socket.write_all(&response.bytes).await;
            if let Some(slot) = slot {
                node.release(slot);
            }
            if written.is_ok() {
                linger(&node, socket).await;
            }
        }
        Verdict::Upgrade {
            response,
            slot,
            open,
        } => {
            let conn = ConnKey(node.next_conn.fetch_add(1, Ordering::Relaxed));
            let shard = &node.shards[open.server_id.shard(node.shards.len())];
            let queue = Arc::new(ConnQueue::new());
            // The shard hears of the connection before the client can see its 101, so anything
            // the client does after the 101 (or makes others do) reaches the shard after the
            // claim or registration. Commands issued meanwhile wait in the queue.
            let opened = shard.tx.send(ShardMsg::Open {
                conn,
                open,
                queue: queue.clone(),
            });
            if opened.await.is_err() {
                node.release(slot);
                return;
            }
            let ended = match switch_protocols(socket, response, rest, &node.config).await {
                Some(ws) => pump(conn, ConnDriver::new(conn, ws, queue), &shard.tx).await,
                None => Ended::Dropped,
            };
            node.release(slot);
            let _ = shard
                .tx
                .send(ShardMsg::Input(Input::Closed { conn, ended }))
                .await;
        }
    }
}

/// Writes the 101 and starts framing; `None` if the socket failed.
async fn switch_protocols(
    mut socket: Socket,
    response: Response,
    rest: Vec<u8>,
    config: &Config,
) -> Option<WebSocketStream<Watched<Socket>>> {
    socket.write_all(&response.bytes).await.ok()?;
    socket.flush().await.ok()?;
    drop(response);
    Some(driver::accept(socket, rest, config.max_message_size).await)
}

/// Carries one upgraded connection until its socket is gone; the socket is dropped on return.
async fn pump(conn: ConnKey, mut driver: ConnDriver<Socket>, tx: &mpsc::Sender<ShardMsg>) -> Ended {
    loop {
        match driver.next_event().await {
            Event::Input(input) => {
                if tx.send(ShardMsg::Input(input)).await.is_err() {
                    return Ended::Local;
                }
            }
            Event::Written(n) => {
                for _ in 0..n {
                    if tx
                        .send(ShardMsg::Input(Input::Written { conn }))
                        .await
                        .is_err()
                    {
                        return Ended::Local;
                    }
                }
            }
            Event::End(ended) => return ended,
        }
    }
}

/// After a response: shut down the sending side, discard input for up to a second, close
/// (§2.1). Shutdown of the node cuts it short.
async fn linger(node: &Node, mut socket: Socket) {
    if socket.close().await.is_err() {
        return;
    }
    let mut stopping = node.stopping.subscribe();
    let discard = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = socket.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(RESPONSE_LINGER, discard) => {}
        () = stopped(&mut stopping) => {}
    }
}

async fn serve_metrics(node: Arc<Node>, stream: TcpStream) {
    let mut socket = TokioAdapter::new(stream);
    let Some(head) = head(&node, &mut socket).await else {
        return;
    };
    let response = match http::metrics_route(&head.head) {
        MetricsRoute::Drop => return,
        MetricsRoute::NotFound => http::NOT_FOUND.to_vec(),
        MetricsRoute::Metrics => http::metrics_response(&(node.render_metrics)(&node.counters())),
    };
    if socket.write_all(&response).await.is_ok() {
        linger(&node, socket).await;
    }
}

/// Fixed text for a failed `accept` (logs carry no OS text, §15).
fn accept_error(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset => {
            "connection aborted before accept"
        }
        std::io::ErrorKind::OutOfMemory => "out of memory",
        _ => "accept failed (file descriptors exhausted?)",
    }
}
