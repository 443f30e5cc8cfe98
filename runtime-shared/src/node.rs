//! The node: listeners, admission through the gate, connection tasks, and the [`Handle`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures_rustls::TlsAcceptor;
use futures_rustls::server::TlsStream;
use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use switchyard_core::{
    Answer, Config, ConnKey, Counters, Ended, Gate, Input, Load, Response, Slot, Verdict,
    answer_acme_http, answer_metrics,
};

use crate::driver::{ConnDriver, Event};
use crate::future::{deadline_after, race, sleep, timeout, timeout_at};
use crate::gate::SharedGate;
use crate::gauges::{Gauges, Held};
use crate::head::{Head, read_head};
use crate::inbox::{self, Sender, TrySendError};
use crate::proxy::read_proxy_header;
use crate::published::Published;
use crate::queue::ConnQueue;
use crate::shard::{self, ShardMsg};
use crate::signal::{self, Alive, Done, Flag};
use crate::tls::{self, Negotiated};
use crate::{
    AcmeHttp, Executor, Options, PushSink, RESPONSE_LINGER, RenderMetrics, Threads, shard_seed,
};

/// Inputs a shard's inbox holds before connections wait (backpressure on reading).
const SHARD_INBOX: usize = 1024;
/// Pause after a failed `accept` (out of file descriptors, …) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Events a connection task handles before letting others on its worker run.
const FAIR_SHARE: u32 = 64;
/// How long [`Handle::wait`] waits beyond the drain deadline before giving up on a shard.
const DRAIN_MARGIN: Duration = Duration::from_secs(2);

struct ShardLink {
    tx: Sender<ShardMsg>,
    published: Arc<Published>,
}

/// State shared by every task of the node.
struct Node<E> {
    exec: E,
    config: Config,
    gate: SharedGate,
    shards: Vec<ShardLink>,
    next_conn: AtomicU64,
    /// Upgraded connections whose codec is asleep (holding no buffers).
    asleep: Arc<AtomicUsize>,
    /// Set once shutdown begins: listeners close, connections not yet upgraded are dropped.
    stopping: Flag,
    render_metrics: RenderMetrics,
    push: Option<Arc<dyn PushSink>>,
    /// Every main-listener connection begins with a PROXY v2 header (§3.2).
    proxy_protocol: bool,
    /// TLS on the main listener; `None`: plain HTTP.
    tls: Option<TlsAcceptor>,
    /// The http-01 listener's answers and PROXY setting; `None` when it is off.
    acme_http: Option<AcmeHttp>,
    gauges: Gauges,
}

impl<E: Executor> Node<E> {
    fn load(&self) -> Load {
        let mut load = Load::default();
        for s in &self.shards {
            load += s.published.load();
        }
        load
    }

    fn counters(&self) -> Counters {
        let mut sum = self.gate.counters();
        for s in &self.shards {
            s.published.add_to(&mut sum);
        }
        if let Some(push) = &self.push {
            sum.add(&push.counters());
        }
        self.gauges.read_into(&mut sum);
        sum
    }

    fn release(&self, slot: Slot) {
        self.gate.release(slot);
    }

    fn handle_head(&self, peer: IpAddr, head: &[u8]) -> Verdict {
        let load = self.load();
        self.gate.handle_head(E::now, peer, head, load)
    }
}

/// A running node. Dropping it without [`wait`](Handle::wait) stops everything at once.
pub struct Handle<E: Executor> {
    threads: Option<E::Threads>,
    node: Arc<Node<E>>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    acme_http_addr: Option<SocketAddr>,
    /// Done once every shard task has ended.
    shards_done: Done,
    /// Done once every listener task has ended.
    listeners_done: Done,
}

impl<E: Executor> std::fmt::Debug for Handle<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("local_addr", &self.local_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("acme_http_addr", &self.acme_http_addr)
            .finish_non_exhaustive()
    }
}

/// Binds every listener (a bind error is returned at once) and starts the node on `workers`
/// threads of the executor `E`.
pub fn start<E: Executor>(options: Options) -> io::Result<Handle<E>> {
    let workers = options.workers.max(1);
    let main = std::net::TcpListener::bind(options.listen)?;
    let metrics = options
        .metrics_listen
        .map(std::net::TcpListener::bind)
        .transpose()?;
    let acme_http = options
        .acme_http
        .as_ref()
        .map(|a| std::net::TcpListener::bind(a.listen))
        .transpose()?;
    let local_addr = main.local_addr()?;
    let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
    let acme_http_addr = acme_http.as_ref().map(|a| a.local_addr()).transpose()?;
    main.set_nonblocking(true)?;
    for l in metrics.iter().chain(acme_http.iter()) {
        l.set_nonblocking(true)?;
    }
    let node_seed = match options.seed {
        Some(seed) => seed,
        None => {
            let mut seed = [0; 32];
            getrandom::fill(&mut seed).map_err(io::Error::other)?;
            seed
        }
    };
    let (exec, threads) = E::launch(workers)?;
    let main = exec.listener(main)?;
    let metrics = metrics.map(|m| exec.listener(m)).transpose()?;
    let acme_http = acme_http.map(|a| exec.listener(a)).transpose()?;

    let mut shards = Vec::with_capacity(workers);
    let mut receivers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = inbox::inbox(SHARD_INBOX);
        shards.push(ShardLink {
            tx,
            published: Arc::default(),
        });
        receivers.push(rx);
    }
    let node = Arc::new(Node {
        exec: exec.clone(),
        gate: SharedGate::new(Gate::new(options.config.clone(), E::now())),
        config: options.config,
        shards,
        next_conn: AtomicU64::new(1),
        asleep: Arc::default(),
        stopping: Flag::default(),
        render_metrics: options.render_metrics,
        push: options.push,
        proxy_protocol: options.proxy_protocol,
        tls: options.tls.map(TlsAcceptor::from),
        acme_http: options.acme_http,
        gauges: Gauges::default(),
    });
    let (shard_alive, shards_done) = signal::latch();
    for (i, rx) in receivers.into_iter().enumerate() {
        let run = shard::run::<E>(
            node.config.clone(),
            shard_seed(&node_seed, i),
            rx,
            node.shards[i].published.clone(),
            node.push.clone(),
        );
        let alive = shard_alive.clone();
        exec.spawn(async move {
            run.await;
            drop(alive);
        });
    }
    let (listener_alive, listeners_done) = signal::latch();
    let alive = listener_alive.clone();
    exec.spawn(accept_loop(main, node.clone(), Listener::Main, alive));
    if let Some(m) = metrics {
        let alive = listener_alive.clone();
        exec.spawn(accept_loop(m, node.clone(), Listener::Metrics, alive));
    }
    if let Some(a) = acme_http {
        let alive = listener_alive.clone();
        exec.spawn(accept_loop(a, node.clone(), Listener::AcmeHttp, alive));
    }
    Ok(Handle {
        threads: Some(threads),
        node,
        local_addr,
        metrics_addr,
        acme_http_addr,
        shards_done,
        listeners_done,
    })
}

impl<E: Executor> Handle<E> {
    /// The main listener's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics listener's bound address, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The http-01 listener's bound address, if it is on.
    pub fn acme_http_addr(&self) -> Option<SocketAddr> {
        self.acme_http_addr
    }

    /// The node's counters: the gate's and every shard's, summed.
    pub fn counters(&self) -> Counters {
        self.node.counters()
    }

    /// Upgraded connections quiet enough that their codec is asleep: they hold a socket and no
    /// read or write buffer (see `driver`).
    pub fn quiet_connections(&self) -> usize {
        self.node.asleep.load(Ordering::Relaxed)
    }

    /// SIGHUP (PROTOCOL.md §16.3): every shard closes its claimants and holders.
    pub fn rebalance(&self) {
        self.broadcast(|| Input::Rebalance);
    }

    /// The drain delay (§13): `/healthz` answers 503 "draining"; everything else is unchanged.
    pub fn start_draining(&self) {
        self.node.gate.start_draining();
    }

    /// Begins shutdown (§13): listeners close, connections not yet upgraded are dropped, every
    /// shard closes its connections, push sends in flight are cancelled. Later calls do nothing.
    pub fn shutdown(&self) {
        if self.node.stopping.set() {
            self.broadcast(|| Input::Shutdown);
            if let Some(push) = &self.node.push {
                push.cancel();
            }
        }
    }

    fn broadcast(&self, input: impl Fn() -> Input) {
        for s in &self.node.shards {
            let tx = s.tx.clone();
            let msg = ShardMsg::Input(input());
            self.node.exec.spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Blocks until shutdown has begun and every shard has drained (the core's drain deadline
    /// closes whatever is left), then stops the workers.
    pub fn wait(mut self) {
        let Some(threads) = self.threads.take() else {
            return;
        };
        let node = &self.node;
        let limit = node.config.drain_timeout + DRAIN_MARGIN;
        let (shards_done, listeners_done) = (&self.shards_done, &self.listeners_done);
        threads.block_on(async {
            node.stopping.wait().await;
            if timeout::<E, _>(limit, shards_done.wait()).await.is_none() {
                tracing::warn!("drain_incomplete");
            }
            listeners_done.wait().await;
        });
        threads.stop();
    }
}

#[derive(Debug, Clone, Copy)]
enum Listener {
    Main,
    Metrics,
    AcmeHttp,
}

async fn accept_loop<E: Executor>(
    listener: E::Listener,
    node: Arc<Node<E>>,
    kind: Listener,
    alive: Alive,
) {
    let mut stopped = pin!(async {
        node.stopping.wait().await;
        None
    });
    loop {
        let accepted = async { Some(E::accept(&listener).await) };
        match race(stopped.as_mut(), accepted).await {
            None => break,
            Some(Ok((stream, peer))) => {
                // Stage 0's limit runs from the accept (§3).
                let deadline = deadline_after::<E>(node.config.header_timeout);
                let node = node.clone();
                let exec = node.exec.clone();
                match kind {
                    Listener::Main => exec.spawn(serve_main(node, stream, peer, deadline)),
                    Listener::Metrics => exec.spawn(serve_metrics(node, stream, deadline)),
                    Listener::AcmeHttp => exec.spawn(serve_acme_http(node, stream, deadline)),
                }
            }
            Some(Err(e)) => {
                tracing::warn!(err = accept_error(&e), "accept_failed");
                sleep::<E>(ACCEPT_BACKOFF).await;
            }
        }
    }
    // The listener closes before the task counts as ended.
    drop(listener);
    drop(alive);
}

/// A stage-0 read (§3) finished by `deadline`; `None`: timed out, ended, failed, refused, or the
/// node is stopping. The connection is then closed writing nothing.
async fn stage_0<E: Executor, T>(
    node: &Node<E>,
    deadline: Instant,
    read: impl Future<Output = io::Result<Option<T>>>,
) -> Option<T> {
    if node.stopping.is_set() {
        return None;
    }
    let read = async { timeout_at::<E, _>(deadline, read).await?.ok()? };
    let stopped = async {
        node.stopping.wait().await;
        None
    };
    race(read, stopped).await
}

/// Reads the request head by `deadline`.
async fn head<E: Executor, S: AsyncRead + Unpin>(
    node: &Node<E>,
    socket: &mut S,
    deadline: Instant,
) -> Option<Head> {
    stage_0(node, deadline, read_head(socket, node.config.max_head_size)).await
}

/// The transport peer (§3.1): the TCP peer, or with `--proxy-protocol` the source of the PROXY
/// v2 header read by `deadline` (§3.2). `None`: no acceptable header in time.
async fn transport_peer<E: Executor>(
    node: &Node<E>,
    socket: &mut E::Stream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<IpAddr> {
    if !node.proxy_protocol {
        return Some(peer.ip());
    }
    let source = stage_0(node, deadline, read_proxy_header(socket)).await?;
    Some(source.ip())
}

/// Serves one connection of the main listener: the transport steps of stage 0 (§3), PROXY
/// header then TLS handshake, all by `deadline`, then [`serve_http`] over the stream they leave.
async fn serve_main<E: Executor>(
    node: Arc<Node<E>>,
    mut socket: E::Stream,
    peer: SocketAddr,
    deadline: Instant,
) {
    let open = node.gauges.open();
    let pending = node.gauges.pending_head();
    let Some(client) = transport_peer(&node, &mut socket, peer, deadline).await else {
        return;
    };
    match node.tls.clone() {
        None => serve_http(node, socket, client, deadline, (open, pending)).await,
        Some(acceptor) => {
            if let Some(tls) = handshake(&node, &acceptor, socket, deadline).await {
                serve_http(node, tls, client, deadline, (open, pending)).await;
            }
        }
    }
}

/// Stage 0's TLS step: the handshake, by the same `deadline` as the head. `None`: it failed
/// (rustls has written its alert, if any), timed out, the node is stopping, or it was a
/// TLS-ALPN-01 validation, now answered. The connection is then closed.
async fn handshake<E: Executor>(
    node: &Node<E>,
    acceptor: &TlsAcceptor,
    socket: E::Stream,
    deadline: Instant,
) -> Option<TlsStream<E::Stream>> {
    let accept = async {
        timeout_at::<E, _>(deadline, acceptor.accept(socket))
            .await?
            .ok()
    };
    let stopped = async {
        node.stopping.wait().await;
        None
    };
    let mut stream = race(accept, stopped).await?;
    match tls::negotiated(stream.get_ref().1.alpn_protocol()) {
        Negotiated::Http => Some(stream),
        Negotiated::AcmeChallenge => {
            let _ = timeout_at::<E, _>(deadline, stream.close()).await;
            None
        }
    }
}

/// Everything after the transport, over plain TCP or TLS alike: the head, the gate's verdict,
/// the response or the 101. An upgraded connection then moves to a task of its own, which
/// holds only what it needs for the rest of its life: this one, with everything before,
/// ends here, so an idle connection carries none of it.
async fn serve_http<E, S>(
    node: Arc<Node<E>>,
    socket: S,
    client: IpAddr,
    deadline: Instant,
    (open, pending): (Held, Held),
) where
    E: Executor,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Some(upgraded) = admit(&node, socket, client, deadline, pending).await {
        let exec = node.exec.clone();
        let Upgraded {
            conn,
            shard,
            slot,
            driver,
        } = upgraded;
        exec.spawn(Carry {
            node,
            conn,
            shard,
            slot: Some(slot),
            driver,
            open: Some(open),
            events: 0,
            pending: None,
        });
    }
}

/// A connection the gate upgraded: its shard knows it, its slot is held.
struct Upgraded<S> {
    conn: ConnKey,
    shard: usize,
    slot: Slot,
    /// `None`: the 101 could not be written.
    driver: Option<ConnDriver<S>>,
}

/// Reads the head, carries out the gate's verdict, and for an upgrade opens the connection in
/// its shard and writes the 101.
async fn admit<E, S>(
    node: &Node<E>,
    mut socket: S,
    client: IpAddr,
    deadline: Instant,
    pending: Held,
) -> Option<Upgraded<S>>
where
    E: Executor,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Head { head, rest } = self::head(node, &mut socket, deadline).await?;
    drop(pending);
    let verdict = node.handle_head(client.to_canonical(), &head);
    drop(head);
    let (response, slot, open) = match verdict {
        Verdict::Drop => return None,
        Verdict::Respond { response, slot } => {
            respond(node, socket, response, slot).await;
            return None;
        }
        Verdict::Upgrade {
            response,
            slot,
            open,
        } => (response, slot, open),
    };
    let conn = ConnKey(node.next_conn.fetch_add(1, Ordering::Relaxed));
    let shard = open.server_id.shard(node.shards.len());
    let queue = Arc::new(ConnQueue::for_role(&open.role));
    // The shard hears of the connection before the client can see its 101, so anything the
    // client does after the 101 (or makes others do) reaches the shard after the claim or
    // registration. Commands issued meanwhile wait in the queue.
    let opened = node.shards[shard].tx.send(ShardMsg::Open {
        conn,
        open,
        queue: queue.clone(),
    });
    if opened.await.is_err() {
        node.release(slot);
        return None;
    }
    let max = node.config.max_message_size;
    let driver = switch_protocols(socket, response)
        .await
        .map(|socket| ConnDriver::new(conn, socket, rest, queue, max, node.asleep.clone()));
    Some(Upgraded {
        conn,
        shard,
        slot,
        driver,
    })
}

/// An upgraded connection's task: runs its driver until the socket is gone, then releases the
/// connection. Written by hand rather than as an `async fn` because it is what every idle
/// connection holds, and a generator keeps a copy of the driver per level of nesting.
struct Carry<E: Executor, S> {
    node: Arc<Node<E>>,
    conn: ConnKey,
    shard: usize,
    /// Released once the socket is gone.
    slot: Option<Slot>,
    /// `None` once the socket is gone (or the 101 could not be written).
    driver: Option<ConnDriver<S>>,
    /// Counts the connection in `open_connections` until its socket is gone.
    open: Option<Held>,
    /// Events since the task last let others on its worker run.
    events: u32,
    /// A message waiting for room in the shard's inbox, or the final `Closed`; boxed because it
    /// is rare, and an idle connection's task should not carry a message's size.
    pending: Option<Box<ShardMsg>>,
}

impl<E: Executor, S> Carry<E, S> {
    fn send(&mut self, msg: ShardMsg) {
        match self.node.shards[self.shard].tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => self.pending = Some(Box::new(msg)),
            Err(TrySendError::Closed(_)) => self.end(Ended::Local),
        }
    }

    /// Sends the pending message once the inbox has room; `Ready` when it is gone (delivered,
    /// or dropped because the shard is gone).
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(msg) = self.pending.take() else {
            return Poll::Ready(());
        };
        let tx = &self.node.shards[self.shard].tx;
        match tx.try_send(*msg) {
            Ok(()) => Poll::Ready(()),
            Err(TrySendError::Full(msg)) => {
                self.pending = Some(Box::new(msg));
                ready!(tx.poll_room(cx));
                // Room now: the caller polls again at once.
                Poll::Ready(())
            }
            Err(TrySendError::Closed(_)) => {
                self.end(Ended::Local);
                Poll::Ready(())
            }
        }
    }

    /// The socket is gone (dropped here): release the slots, tell the shard.
    fn end(&mut self, ended: Ended) {
        self.driver = None;
        self.open = None;
        if let Some(slot) = self.slot.take() {
            self.node.release(slot);
            self.pending = Some(Box::new(ShardMsg::Input(Input::Closed {
                conn: self.conn,
                ended,
            })));
        }
    }
}

impl<E, S> Future for Carry<E, S>
where
    E: Executor,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.driver.is_none() && this.slot.is_some() {
            this.end(Ended::Dropped);
        }
        if let Some(driver) = &mut this.driver {
            driver.begin_poll(cx);
        }
        loop {
            if this.pending.is_some() {
                ready!(this.poll_pending(cx));
                continue;
            }
            let Some(driver) = &mut this.driver else {
                return Poll::Ready(());
            };
            this.events += 1;
            if this.events == FAIR_SHARE {
                this.events = 0;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match ready!(driver.poll_event(cx)) {
                Event::Input(input) => this.send(ShardMsg::Input(input)),
                Event::Written(count) => this.send(ShardMsg::Written {
                    conn: this.conn,
                    count,
                }),
                Event::End(ended) => {
                    driver.close_transport_now();
                    this.end(ended);
                }
            }
        }
    }
}

/// Writes a non-101 response, releases its slots, and lingers (§2.1).
async fn respond<E: Executor, S: AsyncRead + AsyncWrite + Unpin>(
    node: &Node<E>,
    mut socket: S,
    response: Response,
    slot: Option<Slot>,
) {
    let written = socket.write_all(&response.bytes).await;
    if let Some(slot) = slot {
        node.release(slot);
    }
    if written.is_ok() {
        linger(node, socket).await;
    }
}

/// Writes the 101 and starts framing; `None` if the socket failed.
async fn switch_protocols<S: AsyncWrite + Unpin>(mut socket: S, response: Response) -> Option<S> {
    socket.write_all(&response.bytes).await.ok()?;
    socket.flush().await.ok()?;
    Some(socket)
}

/// After a response: shut down the sending side, discard input for up to a second, close
/// (§2.1); over TLS the close sends close_notify first. Shutdown of the node cuts it short.
async fn linger<E: Executor, S: AsyncRead + AsyncWrite + Unpin>(node: &Node<E>, mut socket: S) {
    if socket.close().await.is_err() {
        return;
    }
    let discard = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = socket.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    race(
        async {
            let _ = timeout::<E, _>(RESPONSE_LINGER, discard).await;
        },
        node.stopping.wait(),
    )
    .await;
}

/// The metrics listener (§12): the core's answer to the head, read under stage-0 rules.
async fn serve_metrics<E: Executor>(node: Arc<Node<E>>, mut socket: E::Stream, deadline: Instant) {
    let Some(head) = head(&node, &mut socket, deadline).await else {
        return;
    };
    let answer = answer_metrics(&head.head, || (node.render_metrics)(&node.counters()));
    write_answer(&node, socket, answer).await;
}

/// The http-01 listener (§2.1): the core's answer to the head, under the main listener's
/// stage-0 rules (a PROXY v2 header first with `--acme-http-proxy-protocol`, the head by
/// `deadline`, the head size limit).
async fn serve_acme_http<E: Executor>(
    node: Arc<Node<E>>,
    mut socket: E::Stream,
    deadline: Instant,
) {
    let Some(acme) = node.acme_http.as_ref() else {
        return;
    };
    // The header's source is not used: nothing on this listener is keyed by client address.
    if acme.proxy_protocol
        && stage_0(&node, deadline, read_proxy_header(&mut socket))
            .await
            .is_none()
    {
        return;
    }
    let Some(head) = head(&node, &mut socket, deadline).await else {
        return;
    };
    let answer = answer_acme_http(&head.head, |token| acme.answers.key_authorization(token));
    write_answer(&node, socket, answer).await;
}

/// Writes a listener's answer and lingers (§2.1), or closes writing nothing.
async fn write_answer<E: Executor, S: AsyncRead + AsyncWrite + Unpin>(
    node: &Node<E>,
    mut socket: S,
    answer: Answer,
) {
    if let Answer::Write(bytes) = answer {
        if socket.write_all(&bytes).await.is_ok() {
            linger(node, socket).await;
        }
    }
}

/// Fixed text for a failed `accept` (logs carry no OS text, §15).
fn accept_error(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset => {
            "connection aborted before accept"
        }
        io::ErrorKind::OutOfMemory => "out of memory",
        _ => "accept failed (file descriptors exhausted?)",
    }
}
