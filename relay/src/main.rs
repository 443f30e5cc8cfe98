//! The `switchyard` executable: settings, logging, then the runtime (PROTOCOL.md §13, §14).

use std::process::ExitCode;

use switchyard::{BootError, LogFormat, Settings, logging};

/// mimalloc returns the pages a quiet connection frees (its codec buffers) to the OS, where
/// glibc's malloc keeps them in the heap; see docs/PERFORMANCE.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

fn main() -> ExitCode {
    match Settings::from_args_env(std::env::args_os(), env) {
        Ok(settings) => {
            let _ = logging::init(settings.log_format, settings.node_id.as_deref());
            switchyard::run(settings)
        }
        Err(BootError::HelpOrVersion(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("switchyard: {err}");
            let _ = logging::init(LogFormat::hint(std::env::args_os(), env), None);
            logging::refusing_to_start(&err);
            ExitCode::from(err.exit_code())
        }
    }
}
