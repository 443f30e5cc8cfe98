//! The command line: `switchyard-example-loop [ADDR]` (default `127.0.0.1:8080`) serves the
//! relay on ADDR with PROTOCOL.md's defaults and prints the bound address on stdout.
//! `SWITCHYARD_SEED=<64 hex digits>` fixes the conn-id generator for a reproducible run.

use std::io::{self, ErrorKind};

use switchyard_core::Config;

fn main() -> io::Result<()> {
    let addr = std::env::args().nth(1);
    let listener = std::net::TcpListener::bind(addr.as_deref().unwrap_or("127.0.0.1:8080"))?;
    println!("{}", listener.local_addr()?);
    switchyard_example_loop::run(listener, Config::default(), seed()?)
}

/// The conn-id seed: from `SWITCHYARD_SEED` (hex) for a replayable run, else from the OS.
fn seed() -> io::Result<[u8; 32]> {
    let mut seed = [0; 32];
    let Ok(hex) = std::env::var("SWITCHYARD_SEED") else {
        getrandom::fill(&mut seed).map_err(io::Error::other)?;
        return Ok(seed);
    };
    let invalid = || io::Error::new(ErrorKind::InvalidInput, "SWITCHYARD_SEED: 64 hex digits");
    if hex.len() != 64 {
        return Err(invalid());
    }
    for (byte, pair) in seed.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(seed)
}
