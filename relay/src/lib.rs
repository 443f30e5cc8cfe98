//! The command-line front of Switchyard: settings from flags and environment
//! (PROTOCOL.md §14), the `/metrics` text (§12) and log lines (§15). The I/O runtime that drives
//! `switchyard-core` plugs in at [`run`].

pub mod cli;
pub mod logging;
pub mod metrics;
mod serve;
pub mod tls;

use std::process::ExitCode;

pub use cli::{
    Acme, BootError, ListenAddr, LogFormat, Origin, ProcessIdentity, Push, Runtime, Secret,
    ServiceAccount, Settings, Tls,
};
pub use metrics::{MetricsOptions, render};
pub use serve::pusher;

/// Runs the relay until a signal-driven shutdown and returns the process exit code (§13).
pub fn run(settings: Settings) -> ExitCode {
    serve::run(settings)
}
