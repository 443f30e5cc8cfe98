//! Load generator for a Switchyard (or any pyrycode-compatible) relay: real WebSocket binaries and
//! phones over loopback.
//!
//! `throughput`: S server-ids × P phones; every phone sends a frame of B bytes and waits for it to
//! come back (closed loop); every binary echoes each envelope to the phone it came from. Reports
//! round trips per second and the round-trip time distribution, as a table and one JSON line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::{TokioAdapter, client_async};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Barrier;
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;

type Ws = WebSocketStream<TokioAdapter<TcpStream>>;

#[derive(Parser)]
#[command(about = "Load generator for the Switchyard relay")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Closed-loop echo: round trips per second and RTT percentiles.
    Throughput(Load),
}

#[derive(clap::Args, Clone)]
struct Load {
    /// The relay's main listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Server-ids, each with one binary.
    #[arg(long, default_value_t = 100)]
    servers: usize,
    /// Phones per server-id.
    #[arg(long, default_value_t = 10)]
    phones: usize,
    /// Bytes per frame (a JSON string of that length).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Spread client sockets over 127.0.0.2 .. 127.0.0.(1+N), so per-address limits apply per
    /// source; 0 uses the kernel's choice.
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    let Scenario::Throughput(load) = args.scenario;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(load.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(throughput(load)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("switchyard-bench: {e}");
            std::process::exit(1);
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn connect(load: &Load, n: usize, path: &str, sid: &str) -> Result<Ws, Error> {
    let socket = TcpSocket::new_v4()?;
    if load.sources > 0 {
        let last = 2 + (n % usize::from(load.sources)) as u8;
        socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))?;
    }
    let stream = socket.connect(load.addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{}{path}", load.addr).into_client_request()?;
    let headers = request.headers_mut();
    headers.insert("x-pyrycode-server", HeaderValue::from_str(sid)?);
    headers.insert("user-agent", HeaderValue::from_static("switchyard-bench"));
    if path == "/v1/server" {
        headers.insert("x-pyrycode-version", HeaderValue::from_static("bench"));
    } else {
        headers.insert("x-pyrycode-token", HeaderValue::from_static("bench"));
    }
    let (ws, _) = client_async(request, stream).await?;
    Ok(ws)
}

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    conn_id: &'a str,
    #[serde(borrow)]
    frame: Option<&'a RawValue>,
}

/// A binary that sends every phone's frame straight back to it.
async fn echo_binary(mut ws: Ws) {
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(env) = serde_json::from_str::<Envelope<'_>>(&text) else {
            continue;
        };
        let Some(frame) = env.frame else { continue }; // a close notice
        let reply = format!(r#"{{"conn_id":"{}","frame":{}}}"#, env.conn_id, frame.get());
        if ws.send(Message::text(reply)).await.is_err() {
            break;
        }
    }
}

/// A phone in a closed loop; returns the round trips it completed inside the measured window.
async fn phone(
    mut ws: Ws,
    frame: Arc<str>,
    start: Arc<Barrier>,
    warmup: Duration,
    measure: Duration,
) -> Result<Histogram<u64>, Error> {
    let mut rtt = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    start.wait().await;
    let begin = Instant::now();
    let (from, to) = (begin + warmup, begin + warmup + measure);
    loop {
        let sent = Instant::now();
        if sent >= to {
            break;
        }
        ws.send(Message::text(frame.to_string())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err("relay closed the phone".into()),
            }
        }
        if sent >= from {
            rtt.record(sent.elapsed().as_nanos() as u64)?;
        }
    }
    let _ = ws.close(None).await;
    Ok(rtt)
}

async fn throughput(load: Load) -> Result<(), Error> {
    let frame: Arc<str> = format!("\"{}\"", "x".repeat(load.size.saturating_sub(2))).into();
    let mut binaries = Vec::new();
    for s in 0..load.servers {
        let ws = connect(&load, s, "/v1/server", &format!("bench-{s}")).await?;
        binaries.push(tokio::spawn(echo_binary(ws)));
    }
    let total = load.servers * load.phones;
    let start = Arc::new(Barrier::new(total));
    let (warmup, measure) = (
        Duration::from_secs(load.warmup),
        Duration::from_secs(load.duration),
    );
    let mut phones = Vec::new();
    for s in 0..load.servers {
        for p in 0..load.phones {
            let n = load.servers + s * load.phones + p;
            let ws = connect(&load, n, "/v1/client", &format!("bench-{s}")).await?;
            phones.push(tokio::spawn(phone(
                ws,
                frame.clone(),
                start.clone(),
                warmup,
                measure,
            )));
        }
    }
    let mut rtt = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for p in phones {
        rtt.add(p.await??)?;
    }
    for b in binaries {
        b.abort();
    }
    let secs = measure.as_secs_f64();
    let us = |q: f64| rtt.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| scenario | servers | phones/server | frame B | round trips/s | p50 µs | p99 µs | p99.9 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| throughput | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        load.servers,
        load.phones,
        load.size,
        rtt.len() as f64 / secs,
        us(0.5),
        us(0.99),
        us(0.999)
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "throughput",
            "servers": load.servers,
            "phones": load.phones,
            "frame_bytes": load.size,
            "seconds": secs,
            "round_trips": rtt.len(),
            "round_trips_per_s": rtt.len() as f64 / secs,
            "p50_us": us(0.5),
            "p99_us": us(0.99),
            "p999_us": us(0.999),
        })
    );
    Ok(())
}
