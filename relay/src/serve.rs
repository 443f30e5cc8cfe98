//! Runs a node on the chosen runtime until a signal-driven shutdown (PROTOCOL.md §13).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use switchyard_core::Config;
use switchyard_push::{FcmSettings, KeyError, Pusher, SigningKey};
use switchyard_runtime::tls::{Alpn, server_config};
use switchyard_runtime::{AcmeHttp, Executor, Handle, Options, PushSink};

use crate::acme::{self, Prepared};
use crate::cli::{ListenAddr, ProcessIdentity, Push, Runtime, Settings, Tls};
use crate::metrics::{MetricsOptions, render};
use crate::tls::{RELOAD_INTERVAL, WatchError, Watcher, watch};

/// Exit code 1: a listener could not be bound, or the node cannot run as configured (§13).
const EXIT_LISTENER: u8 = 1;
/// Exit code 2: configuration refused (§14.3).
const EXIT_CONFIG: u8 = 2;

/// Starts the node, serves until SIGTERM or SIGINT, drains, and returns the exit code.
pub fn run(settings: Settings) -> ExitCode {
    let listen = match resolve(&settings.listen) {
        Ok(addr) => addr,
        Err(e) => {
            let listen = display(&settings.listen);
            tracing::error!(
                listen = listen.as_str(),
                err = bind_error(&e),
                "refusing_to_start"
            );
            return ExitCode::from(EXIT_LISTENER);
        }
    };
    // Signals are caught from here on: one arriving while the node starts is not lost, and once
    // shutdown has begun further signals are ignored rather than killing the process.
    let signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(_) => {
            tracing::error!(err = "cannot install signal handlers", "refusing_to_start");
            return ExitCode::from(EXIT_LISTENER);
        }
    };
    let push = match settings
        .push
        .as_ref()
        .map(|p| pusher(p, &settings.config))
        .transpose()
    {
        Ok(push) => push,
        Err(_) => {
            // The key was parsed at boot; this is only reachable if that check is bypassed.
            tracing::error!(
                reason = "fcm_credentials",
                err = "the push credentials' private key is not a usable RSA key",
                "refusing_to_start"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Checked at boot already; loaded again here, so a pair broken since is refused the same way.
    let (tls, _watcher) = match tls_files(&settings.tls) {
        Ok(Some((config, watcher))) => (Some(config), Some(watcher)),
        Ok(None) => (None, None),
        Err(WatchError::Pair(e)) => {
            tracing::error!(reason = "tls_file", err = e.text(), "refusing_to_start");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(WatchError::Thread) => {
            tracing::error!(
                err = "cannot start the TLS file watcher",
                "refusing_to_start"
            );
            return ExitCode::from(EXIT_LISTENER);
        }
    };
    let acme = match &settings.tls {
        Tls::Acme(a) => match prepare_acme(a) {
            Ok(parts) => Some(parts),
            Err(code) => return code,
        },
        Tls::Off | Tls::Files { .. } => None,
    };
    let acme_http = match (&settings.tls, &acme) {
        (Tls::Acme(a), Some(parts)) => match (&a.http_listen, &parts.http01) {
            (Some(listen), Some(answers)) => match resolve(listen) {
                Ok(listen) => Some(AcmeHttp {
                    listen,
                    proxy_protocol: a.http_proxy_protocol,
                    answers: answers.clone(),
                }),
                Err(e) => {
                    tracing::error!(listen = %listen, err = bind_error(&e), "refusing_to_start");
                    return ExitCode::from(EXIT_LISTENER);
                }
            },
            _ => None,
        },
        _ => None,
    };
    let metrics = MetricsOptions::from_settings(&settings);
    let options = Options {
        listen,
        metrics_listen: settings.metrics_listen,
        workers: settings.workers.get(),
        config: settings.config.clone(),
        seed: None,
        render_metrics: Arc::new(move |c| render(c, &metrics)),
        push,
        proxy_protocol: settings.proxy_protocol,
        tls: tls.or_else(|| acme.as_ref().map(|a| a.tls.clone())),
        acme_http,
    };
    let started = match settings.runtime {
        Runtime::Tokio => {
            switchyard_tokio::start(options).map(|h| serve(&settings, h, signals, acme))
        }
        Runtime::Smol => {
            switchyard_smol::start(options).map(|h| serve(&settings, h, signals, acme))
        }
    };
    match started {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(
                listen = %listen,
                err = bind_error(&e),
                "refusing_to_start"
            );
            ExitCode::from(EXIT_LISTENER)
        }
    }
}

/// Serves on a started node until SIGTERM or SIGINT, then drains.
fn serve<E: Executor>(
    settings: &Settings,
    handle: Handle<E>,
    mut signals: Signals,
    acme: Option<acme::AcmeParts>,
) -> ExitCode {
    let metrics_addr = handle
        .metrics_addr()
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    // The ACME state starts once the listeners are bound, so a validation finds them.
    let acme = match acme.map(acme::AcmeParts::run).transpose() {
        Ok(runner) => runner,
        Err(_) => {
            tracing::error!(err = "cannot start the ACME thread", "refusing_to_start");
            handle.shutdown();
            handle.wait();
            return ExitCode::from(EXIT_LISTENER);
        }
    };
    tracing::info!(
        listen = %handle.local_addr(),
        addr = metrics_addr.as_str(),
        mode = mode(settings),
        runtime = settings.runtime.as_str(),
        workers = settings.workers.get(),
        version = settings.config.version.as_str(),
        "listening"
    );
    if settings.push.is_none() {
        tracing::info!(
            reason = "push_off",
            err = "push wake is off: no FCM credentials",
            "push_wake_dropped"
        );
    }
    for signal in signals.forever() {
        match signal {
            SIGHUP => handle.rebalance(),
            _ => break,
        }
    }
    tracing::info!("shutdown_started");
    let delay = settings.config.drain_delay;
    if !delay.is_zero() {
        handle.start_draining();
        std::thread::sleep(delay);
    }
    handle.shutdown();
    if let Some(acme) = acme {
        acme.stop();
    }
    handle.wait();
    tracing::info!("shutdown_complete");
    drop(signals);
    ExitCode::SUCCESS
}

/// The push sender for validated push settings (§11), with `config`'s in-flight cap.
pub fn pusher(push: &Push, config: &Config) -> Result<Arc<dyn PushSink>, KeyError> {
    let account = &push.credentials;
    let fcm = FcmSettings {
        client_email: account.client_email.clone(),
        private_key_id: account.private_key_id.clone(),
        private_key: SigningKey::from_pem(account.private_key.expose())?,
        endpoint: push.endpoint.clone(),
        token_url: push.token_url.clone(),
        project_id: push.project_id.clone(),
        timeout: push.timeout,
    };
    Ok(Arc::new(Pusher::new(fcm, config)))
}

/// The main listener's layers for the `listening` line, outermost first: `proxy+` when every
/// connection must begin with a PROXY v2 header (§3.2), then `tls`, `acme` (TLS with ACME
/// certificates) or `http`.
fn mode(settings: &Settings) -> &'static str {
    match (settings.proxy_protocol, &settings.tls) {
        (false, Tls::Off) => "http",
        (false, Tls::Files { .. }) => "tls",
        (false, Tls::Acme(_)) => "acme",
        (true, Tls::Off) => "proxy+http",
        (true, Tls::Files { .. }) => "proxy+tls",
        (true, Tls::Acme(_)) => "proxy+acme",
    }
}

/// The main listener's TLS configuration and the thread that reloads its files, for
/// `--tls-cert`/`--tls-key`; `None` for plain HTTP.
fn tls_files(
    tls: &Tls,
) -> Result<Option<(Arc<switchyard_runtime::rustls::ServerConfig>, Watcher)>, WatchError> {
    let Tls::Files { cert, key } = tls else {
        return Ok(None);
    };
    let (certs, watcher) = watch(cert.clone(), key.clone(), RELOAD_INTERVAL)?;
    Ok(Some((Arc::new(server_config(certs, Alpn::Http)), watcher)))
}

/// Checks the CA file (exit 2, a refused configuration) and the certificate cache (exit 1 if
/// unusable, §13), and builds the ACME state.
fn prepare_acme(acme: &crate::Acme) -> Result<acme::AcmeParts, ExitCode> {
    let roots = match &acme.ca_file {
        None => None,
        Some(path) => match acme::load_ca_file(path) {
            Ok(roots) => Some(roots),
            Err(_) => {
                tracing::error!(
                    reason = "acme_ca_file",
                    err = "--acme-ca-file holds no usable CA certificate",
                    "refusing_to_start"
                );
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        },
    };
    match acme::prepare_cache(&acme.cert_cache, ProcessIdentity::current().euid) {
        Ok(Prepared::Ready) => {}
        Ok(Prepared::Tightened) => {
            tracing::warn!(
                outcome = "tightened",
                err = "the certificate cache directory was open to others; set to mode 0700",
                "acme_cert_cache"
            );
        }
        Err(problem) => {
            tracing::error!(
                reason = "cert_cache",
                err = problem.text(),
                "refusing_to_start"
            );
            return Err(ExitCode::from(EXIT_LISTENER));
        }
    }
    Ok(acme::build(acme, roots))
}

fn resolve(listen: &ListenAddr) -> io::Result<SocketAddr> {
    match listen {
        ListenAddr::Ip(addr) => Ok(*addr),
        ListenAddr::Host { host, port } => (host.as_str(), *port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable)),
    }
}

fn display(listen: &ListenAddr) -> String {
    match listen {
        ListenAddr::Ip(addr) => addr.to_string(),
        ListenAddr::Host { host, port } => format!("{host}:{port}"),
    }
}

/// Fixed text for a bind failure (§15: `err` is relay-chosen text).
fn bind_error(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address in use",
        io::ErrorKind::AddrNotAvailable => "address not available",
        io::ErrorKind::PermissionDenied => "permission denied",
        _ => "cannot listen",
    }
}
