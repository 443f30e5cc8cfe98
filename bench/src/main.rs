//! Load generator for a Switchyard (or any pyrycode-compatible) relay: real WebSocket binaries and
//! phones over loopback. Every scenario prints a readable table row and one JSON line.
//!
//! - `throughput`: S server-ids × P phones, closed loop; each binary echoes every envelope back to
//!   its phone. Round trips per second and round-trip time percentiles.
//! - `latency`: the same shape, open loop at a fixed total rate; latency is measured from each
//!   frame's *scheduled* send time, so a stalled relay cannot hide its stall (no coordinated
//!   omission).
//! - `idle`: N binaries and M phones connected and quiet; the relay's resident memory per
//!   connection, read from `/proc/<pid>/status`, after the heartbeat has run.
//! - `churn`: connect + upgrade + one frame + close cycles per second.
//! - `floor`: not a scenario but a server: the bare WebSocket pipe on the relay's own stack
//!   (the relay's executor, socket settings, codec settings and write batching), pairing one
//!   binary with one phone per server-id and copying frames across with no envelope and no
//!   registry. Run the scenarios against it with `--raw` to measure the cost floor of the two
//!   extra hops.

mod client;
mod floor;
mod scenarios;

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load generator for the Switchyard relay")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop echo: round trips per second and RTT percentiles.
    Throughput(scenarios::Load),
    /// Open-loop echo at a fixed total rate: latency percentiles without coordinated omission.
    Latency {
        #[command(flatten)]
        load: scenarios::Load,
        /// Frames per second, summed over all phones.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
    },
    /// Quiet connections: relay RSS per connection.
    Idle {
        #[command(flatten)]
        load: scenarios::Load,
        /// The relay's process id, to read its memory from /proc.
        #[arg(long)]
        relay_pid: u32,
        /// Seconds to hold the connections before measuring (let the heartbeat run).
        #[arg(long, default_value_t = 10)]
        settle: u64,
    },
    /// Connect, upgrade, one frame, close: cycles per second.
    Churn {
        #[command(flatten)]
        load: scenarios::Load,
        /// Concurrent dialling phones.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Serve the bare WebSocket pipe (the cost floor) until interrupted.
    Floor {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// The relay's runtime to run on.
        #[arg(long, value_enum, default_value = "tokio")]
        runtime: floor::Runtime,
    },
}

fn main() {
    let args = Args::parse();
    if let Command::Floor {
        listen,
        threads,
        runtime,
    } = args.command
    {
        if let Err(e) = floor::serve(listen, threads, runtime) {
            eprintln!("switchyard-bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    let threads = match &args.command {
        Command::Throughput(l) | Command::Latency { load: l, .. } => l.threads,
        Command::Idle { load: l, .. } | Command::Churn { load: l, .. } => l.threads,
        Command::Floor { .. } => unreachable!("served above"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match args.command {
            Command::Throughput(load) => scenarios::throughput(load).await,
            Command::Latency { load, rate } => scenarios::latency(load, rate).await,
            Command::Idle {
                load,
                relay_pid,
                settle,
            } => scenarios::idle(load, relay_pid, settle).await,
            Command::Churn { load, concurrency } => scenarios::churn(load, concurrency).await,
            Command::Floor { .. } => unreachable!("served above"),
        }
    });
    if let Err(e) = result {
        eprintln!("switchyard-bench: {e}");
        std::process::exit(1);
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;
