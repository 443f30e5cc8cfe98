//! The four scenarios. Each connects its binaries first (so every phone finds its binary), then
//! its phones, then measures.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::{Barrier, Mutex};
use tokio::task::JoinHandle;
use tungstenite::Message;

use crate::Error;
use crate::client::{self, Side, Ws};

#[derive(clap::Args, Clone, Debug)]
pub struct Load {
    /// The relay's (or the floor's) main listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Server-ids, each with one binary.
    #[arg(long, default_value_t = 100)]
    pub servers: usize,
    /// Phones per server-id.
    #[arg(long, default_value_t = 10)]
    pub phones: usize,
    /// Bytes per frame (a JSON string of that length).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Spread client sockets over 127.0.0.2 .. 127.0.0.(1+N); 0 lets the kernel choose.
    #[arg(long, default_value_t = 16)]
    pub sources: u8,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The target is the floor pipe: frames carry no envelope, one phone per binary.
    #[arg(long)]
    pub raw: bool,
    /// A label for the target in the output ("switchyard-tokio", "floor", ...).
    #[arg(long, default_value = "relay")]
    pub target: String,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds")
}

/// Connects every binary (echoing) and every phone; returns the phones, in server order.
async fn connect(load: &Load) -> Result<(Vec<JoinHandle<()>>, Vec<Ws>), Error> {
    if load.raw && load.phones != 1 {
        return Err(
            "--raw (the floor pipe) pairs one phone with each binary: use --phones 1".into(),
        );
    }
    let mut binaries = Vec::new();
    for s in 0..load.servers {
        let ws = client::dial(
            load.addr,
            load.sources,
            s,
            Side::Binary,
            &format!("bench-{s}"),
        )
        .await?;
        binaries.push(tokio::spawn(client::echo_binary(ws, load.raw)));
    }
    let mut phones = Vec::new();
    for s in 0..load.servers {
        for p in 0..load.phones {
            let n = load.servers + s * load.phones + p;
            phones.push(
                client::dial(
                    load.addr,
                    load.sources,
                    n,
                    Side::Phone,
                    &format!("bench-{s}"),
                )
                .await?,
            );
        }
    }
    Ok((binaries, phones))
}

fn report(scenario: &str, load: &Load, extra: serde_json::Value, columns: &[(&str, String)]) {
    let head: Vec<&str> = columns.iter().map(|(k, _)| *k).collect();
    let row: Vec<&str> = columns.iter().map(|(_, v)| v.as_str()).collect();
    println!("| scenario | target | {} |", head.join(" | "));
    println!("|---|---|{}", "---|".repeat(head.len()));
    println!("| {scenario} | {} | {} |", load.target, row.join(" | "));
    let mut line = json!({
        "scenario": scenario,
        "target": load.target,
        "servers": load.servers,
        "phones": load.phones,
        "frame_bytes": load.size,
    });
    if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
        line.extend(extra.clone());
    }
    println!("{line}");
}

fn quantiles(h: &Histogram<u64>) -> (f64, f64, f64) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    (us(0.5), us(0.99), us(0.999))
}

/// Closed loop: each phone sends, waits for its echo, repeats.
pub async fn throughput(load: Load) -> Result<(), Error> {
    let (binaries, phones) = connect(&load).await?;
    let frame: Arc<str> = client::frame(load.size).into();
    let start = Arc::new(Barrier::new(phones.len()));
    let (warmup, measure) = (
        Duration::from_secs(load.warmup),
        Duration::from_secs(load.duration),
    );
    let tasks: Vec<_> = phones
        .into_iter()
        .map(|mut ws| {
            let (frame, start) = (frame.clone(), start.clone());
            tokio::spawn(async move {
                let mut rtt = histogram();
                start.wait().await;
                let begin = Instant::now();
                let (from, to) = (begin + warmup, begin + warmup + measure);
                loop {
                    let sent = Instant::now();
                    if sent >= to {
                        break;
                    }
                    ws.send(Message::text(frame.to_string())).await?;
                    client::next_text(&mut ws).await?;
                    if sent >= from {
                        rtt.record(sent.elapsed().as_nanos() as u64)?;
                    }
                }
                let _ = ws.close(None).await;
                Ok::<_, Error>(rtt)
            })
        })
        .collect();
    // Marks the measured window on stderr, for a profiler to zero and dump its counts by.
    let marks = tokio::spawn(async move {
        let begin = Instant::now();
        tokio::time::sleep_until((begin + warmup).into()).await;
        eprintln!("measure: start");
        tokio::time::sleep_until((begin + warmup + measure).into()).await;
        eprintln!("measure: end");
    });
    let mut rtt = histogram();
    for t in tasks {
        rtt.add(t.await??)?;
    }
    marks.abort();
    binaries.iter().for_each(JoinHandle::abort);
    let rate = rtt.len() as f64 / measure.as_secs_f64();
    let (p50, p99, p999) = quantiles(&rtt);
    report(
        "throughput",
        &load,
        json!({"round_trips": rtt.len(), "seconds": measure.as_secs_f64(), "round_trips_per_s": rate,
               "p50_us": p50, "p99_us": p99, "p999_us": p999}),
        &[
            (
                "servers × phones",
                format!("{} × {}", load.servers, load.phones),
            ),
            ("frame B", load.size.to_string()),
            ("round trips/s", format!("{rate:.0}")),
            ("p50 µs", format!("{p50:.0}")),
            ("p99 µs", format!("{p99:.0}")),
            ("p99.9 µs", format!("{p999:.0}")),
        ],
    );
    Ok(())
}

/// Open loop: phones send on a fixed schedule; latency counts from the scheduled time.
pub async fn latency(load: Load, rate: u64) -> Result<(), Error> {
    let (binaries, phones) = connect(&load).await?;
    let per_phone = rate as f64 / phones.len().max(1) as f64;
    let interval = Duration::from_secs_f64(1.0 / per_phone.max(0.001));
    let frame: Arc<str> = client::frame(load.size).into();
    let (warmup, measure) = (
        Duration::from_secs(load.warmup),
        Duration::from_secs(load.duration),
    );
    let begin = Instant::now() + Duration::from_millis(200);
    let sent_total = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = phones
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let frame = frame.clone();
            let sent_total = sent_total.clone();
            // Stagger phones across one interval so the total rate is smooth.
            let first = begin + interval.mul_f64(i as f64 / rate.max(1) as f64 * per_phone);
            tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let schedule = Arc::new(Mutex::new(VecDeque::<Instant>::new()));
                let end = begin + warmup + measure;
                let sender = {
                    let schedule = schedule.clone();
                    async move {
                        let mut k = 0u32;
                        loop {
                            let at = first + interval * k;
                            if at >= end {
                                break;
                            }
                            tokio::time::sleep_until(at.into()).await;
                            schedule.lock().await.push_back(at);
                            if tx.send(Message::text(frame.to_string())).await.is_err() {
                                break;
                            }
                            sent_total.fetch_add(1, Ordering::Relaxed);
                            k += 1;
                        }
                        tx
                    }
                };
                let receiver = async {
                    let mut lat = histogram();
                    let deadline = end + Duration::from_secs(5);
                    loop {
                        let next = tokio::time::timeout_at(deadline.into(), rx.next()).await;
                        let Ok(Some(Ok(msg))) = next else { break };
                        if !msg.is_text() {
                            continue;
                        }
                        let Some(at) = schedule.lock().await.pop_front() else {
                            continue;
                        };
                        if at >= begin + warmup {
                            lat.record(at.elapsed().as_nanos() as u64).ok();
                        }
                        if at + interval >= end && schedule.lock().await.is_empty() {
                            break;
                        }
                    }
                    lat
                };
                let (mut tx, lat) = tokio::join!(sender, receiver);
                let _ = tx.close(None).await;
                lat
            })
        })
        .collect();
    let mut lat = histogram();
    for t in tasks {
        lat.add(t.await?)?;
    }
    binaries.iter().for_each(JoinHandle::abort);
    let (p50, p99, p999) = quantiles(&lat);
    let max = lat.max() as f64 / 1000.0;
    report(
        "latency",
        &load,
        json!({"rate_per_s": rate, "measured": lat.len(), "sent": sent_total.load(Ordering::Relaxed),
               "p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": max}),
        &[
            (
                "servers × phones",
                format!("{} × {}", load.servers, load.phones),
            ),
            ("rate/s", rate.to_string()),
            ("p50 µs", format!("{p50:.0}")),
            ("p99 µs", format!("{p99:.0}")),
            ("p99.9 µs", format!("{p999:.0}")),
            ("max µs", format!("{max:.0}")),
        ],
    );
    Ok(())
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS line")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("bad VmRSS line")?
        .parse()?)
}

/// Quiet connections: relay memory per connection after the heartbeat has run.
pub async fn idle(load: Load, pid: u32, settle: u64) -> Result<(), Error> {
    let before = rss_kib(pid)?;
    let (binaries, phones) = connect(&load).await?;
    // Idle clients still answer pings: each keeps reading in a task that holds no buffer of ours.
    let readers: Vec<_> = phones
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = rss_kib(pid)?;
    let conns = (load.servers + load.servers * load.phones) as u64;
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / conns.max(1) as f64;
    readers.iter().for_each(JoinHandle::abort);
    binaries.iter().for_each(JoinHandle::abort);
    report(
        "idle",
        &load,
        json!({"connections": conns, "rss_before_kib": before, "rss_after_kib": after,
               "bytes_per_connection": per_conn, "settle_s": settle}),
        &[
            ("connections", conns.to_string()),
            ("RSS before KiB", before.to_string()),
            ("RSS after KiB", after.to_string()),
            ("bytes/connection", format!("{per_conn:.0}")),
        ],
    );
    Ok(())
}

/// Connect, upgrade, one round trip, close, as fast as `concurrency` dialers can.
pub async fn churn(load: Load, concurrency: usize) -> Result<(), Error> {
    let (binaries, phones) = connect(&Load {
        phones: 0,
        ..load.clone()
    })
    .await?;
    drop(phones);
    let frame: Arc<str> = client::frame(load.size).into();
    let (warmup, measure) = (
        Duration::from_secs(load.warmup),
        Duration::from_secs(load.duration),
    );
    let begin = Instant::now();
    let (from, to) = (begin + warmup, begin + warmup + measure);
    let cycles = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|w| {
            let (load, frame, cycles, failures) = (
                load.clone(),
                frame.clone(),
                cycles.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut n = w;
                while Instant::now() < to {
                    let sid = format!("bench-{}", n % load.servers.max(1));
                    let one = async {
                        let mut ws =
                            client::dial(load.addr, load.sources, n, Side::Phone, &sid).await?;
                        ws.send(Message::text(frame.to_string())).await?;
                        client::next_text(&mut ws).await?;
                        ws.close(None).await?;
                        Ok::<_, Error>(())
                    };
                    let ok = one.await.is_ok();
                    if Instant::now() >= from {
                        if ok {
                            cycles.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += concurrency;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    binaries.iter().for_each(JoinHandle::abort);
    let done = cycles.load(Ordering::Relaxed);
    let rate = done as f64 / measure.as_secs_f64();
    report(
        "churn",
        &load,
        json!({"cycles": done, "failures": failures.load(Ordering::Relaxed), "cycles_per_s": rate,
               "concurrency": concurrency}),
        &[
            ("concurrency", concurrency.to_string()),
            ("cycles/s", format!("{rate:.0}")),
            ("failures", failures.load(Ordering::Relaxed).to_string()),
        ],
    );
    Ok(())
}
