//! The command line and the environment (PROTOCOL.md §14): every flag, its `SWITCHYARD_*`
//! variable, the reference variables, and the boot refusals of §14.3 that need no listener.
//!
//! clap parses the syntax (names, aliases, `--name value` / `--name=value`, `--help`,
//! `--version`) and keeps every value as text. One typed layer below then reads each setting from
//! the flag, else `SWITCHYARD_<NAME>`, else a reference variable, else the default, so a bad value
//! gets the same message whichever source gave it, and the message names that source. The
//! environment is a lookup closure, never the process environment, so tests need no `set_var`.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use switchyard_core::Config;

/// `--acme-directory` default: Let's Encrypt production.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// `--fcm-endpoint` default (§11).
pub const DEFAULT_FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
/// Token URL used when neither `--fcm-token-url` nor the credentials' `token_uri` gives one.
pub const DEFAULT_FCM_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// `--push-timeout` default (§11).
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// `--listen` default.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// `--metrics-listen` default.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

const PRODUCTION_VAR: &str = "PYRYCODE_RELAY_PRODUCTION";
const SINGLE_INSTANCE_VAR: &str = "PYRYCODE_RELAY_SINGLE_INSTANCE";
const CREDENTIALS_VAR: &str = "PYRYCODE_RELAY_FCM_CREDENTIALS";
const FLY_APP_VAR: &str = "FLY_APP_NAME";
/// Bit of `CAP_NET_BIND_SERVICE` in a capability mask.
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

const LISTEN_EXPECTED: &str = "IP:PORT, [IPv6]:PORT, HOST:PORT or :PORT with a port of 1-65535";
const PATH_EXPECTED: &str = "a non-empty path";

const ENV_HELP: &str = "\
Every flag --foo-bar can also be set as the environment variable SWITCHYARD_FOO_BAR; the flag wins.
In the environment a boolean is 1/true or 0/false.
Reference variables (used when neither the flag nor SWITCHYARD_* is set):
  PYRYCODE_RELAY_PRODUCTION=1         same as --production
  PYRYCODE_RELAY_SINGLE_INSTANCE=1    required when FLY_APP_NAME is set
  PYRYCODE_RELAY_FCM_CREDENTIALS      the service-account JSON itself (not a path)
Durations: a whole number with ms, s or m (500ms, 30s, 2m). Sizes: bytes, or with KiB or MiB (256KiB).";

/// The flags of §14.2 as typed on the command line, values still text.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "WebSocket rendezvous relay for the pyrycode mobile protocol",
    after_help = ENV_HELP
)]
struct Flags {
    /// Main listener, IP:port or host:port [default: 127.0.0.1:8080]
    #[arg(long, visible_alias = "https-listen", value_name = "ADDR")]
    listen: Option<String>,
    /// Main listener, plain HTTP only: --tls-cert, --tls-key and --domain are refused with it
    #[arg(long, value_name = "ADDR")]
    insecure_listen: Option<String>,
    /// Metrics listener, IP literal and port; "" disables [default: 127.0.0.1:9090]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// PEM certificate chain for TLS on the main listener (needs --tls-key); re-read when it changes
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<String>,
    /// PEM private key for TLS on the main listener (needs --tls-cert); re-read when it changes
    #[arg(long, value_name = "PATH")]
    tls_key: Option<String>,
    /// Host name(s) for the Host check; without --tls-cert also ACME for them (repeatable or comma list)
    #[arg(long, value_name = "DOMAIN")]
    domain: Vec<String>,
    /// ACME account contact(s), e.g. mailto:ops@example.com (repeatable or comma list)
    #[arg(long, value_name = "URI")]
    acme_contact: Vec<String>,
    /// ACME directory URL [default: https://acme-v02.api.letsencrypt.org/directory]
    #[arg(long, value_name = "URL")]
    acme_directory: Option<String>,
    /// http-01 challenge listener, ACME mode only; "" = TLS-ALPN-01 only [default: ""]
    #[arg(long, visible_alias = "http-listen", value_name = "ADDR")]
    acme_http_listen: Option<String>,
    /// PEM CA certificate(s) trusted for the ACME directory's HTTPS instead of the public roots
    /// (a private ACME server); off by default
    #[arg(long, value_name = "PATH")]
    acme_ca_file: Option<String>,
    /// ACME certificate cache directory [default: $HOME/.switchyard/certs]
    #[arg(long, value_name = "DIR")]
    cert_cache: Option<String>,
    /// Require a PROXY v2 header on the main listener
    #[arg(long, visible_alias = "https-proxy-protocol")]
    proxy_protocol: bool,
    /// Require a PROXY v2 header on the http-01 listener
    #[arg(long)]
    acme_http_proxy_protocol: bool,
    /// Take the client address from X-Forwarded-For
    #[arg(long, visible_alias = "trust-x-forwarded-for")]
    trust_forwarded_for: bool,
    /// I/O runtime: tokio or smol [default: tokio]
    #[arg(long, value_name = "NAME")]
    runtime: Option<String>,
    /// Worker threads, at least 1 [default: CPU count]
    #[arg(long, value_name = "N")]
    workers: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Global WebSocket connection cap, at least 1 [default: 10000]
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// WebSocket connections per client address, at least 1 [default: 256]
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<String>,
    /// Phones per server-id, at least 1 [default: 16]
    #[arg(long, value_name = "N")]
    max_phones_per_server: Option<String>,
    /// Inbound message limit [default: 256KiB]
    #[arg(long, value_name = "SIZE")]
    max_message_size: Option<String>,
    /// Request head limit [default: 16KiB]
    #[arg(long, value_name = "SIZE")]
    max_head_size: Option<String>,
    /// Phone outbox budget [default: 4MiB]
    #[arg(long, value_name = "SIZE")]
    phone_outbox_bytes: Option<String>,
    /// Binary outbox budget [default: 16MiB]
    #[arg(long, value_name = "SIZE")]
    binary_outbox_bytes: Option<String>,
    /// Upgrade attempts per client address in a burst [default: 20]
    #[arg(long, value_name = "N")]
    rate_burst: Option<String>,
    /// Time to earn back one upgrade attempt [default: 6s]
    #[arg(long, value_name = "DURATION")]
    rate_refill: Option<String>,
    /// Ping period [default: 30s]
    #[arg(long, value_name = "DURATION")]
    ping_interval: Option<String>,
    /// Pong deadline after each ping [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pong_timeout: Option<String>,
    /// Per-message read deadline [default: 30s]
    #[arg(long, value_name = "DURATION")]
    read_timeout: Option<String>,
    /// TCP accept to end of request head [default: 5s]
    #[arg(long, value_name = "DURATION")]
    header_timeout: Option<String>,
    /// Per-message write deadline [default: 10s]
    #[arg(long, value_name = "DURATION")]
    write_timeout: Option<String>,
    /// Liveness probe of an incumbent binary [default: 10s]
    #[arg(long, value_name = "DURATION")]
    probe_timeout: Option<String>,
    /// Grace window of a gone binary; may be 0s [default: 30s]
    #[arg(long, value_name = "DURATION")]
    grace: Option<String>,
    /// Close handshake deadline [default: 5s]
    #[arg(long, value_name = "DURATION")]
    close_timeout: Option<String>,
    /// /healthz answers 503 this long before draining; may be 0s [default: 0s]
    #[arg(long, value_name = "DURATION")]
    drain_delay: Option<String>,
    /// Shutdown drain deadline [default: 10s]
    #[arg(long, value_name = "DURATION")]
    drain_timeout: Option<String>,
    /// Path of the FCM service-account JSON; push is on only with credentials
    #[arg(long, value_name = "PATH")]
    fcm_credentials: Option<String>,
    /// FCM endpoint [default: https://fcm.googleapis.com]
    #[arg(long, value_name = "URL")]
    fcm_endpoint: Option<String>,
    /// OAuth token URL [default: the credentials' token_uri, else https://oauth2.googleapis.com/token]
    #[arg(long, value_name = "URL")]
    fcm_token_url: Option<String>,
    /// FCM project id [default: the credentials' project_id]
    #[arg(long, value_name = "ID")]
    fcm_project_id: Option<String>,
    /// Push wakes per server-id in a burst [default: 6]
    #[arg(long, value_name = "N")]
    push_burst: Option<String>,
    /// Time to earn back one push wake [default: 10s]
    #[arg(long, value_name = "DURATION")]
    push_refill: Option<String>,
    /// Push sends in flight per node [default: 32]
    #[arg(long, value_name = "N")]
    push_max_in_flight: Option<String>,
    /// Deadline of each push HTTP call [default: 10s]
    #[arg(long, value_name = "DURATION")]
    push_timeout: Option<String>,
    /// Node name added to every log line and to /metrics; "" = off [default: ""]
    #[arg(long, value_name = "NAME")]
    node_id: Option<String>,
    /// Production checks: no plain non-loopback listener, not root, loopback metrics
    #[arg(long)]
    production: bool,
}

/// The I/O runtime (`--runtime`); both give identical wire behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    #[default]
    Tokio,
    Smol,
}

impl Runtime {
    pub const fn as_str(self) -> &'static str {
        match self {
            Runtime::Tokio => "tokio",
            Runtime::Smol => "smol",
        }
    }
}

impl FromStr for Runtime {
    type Err = ();
    fn from_str(s: &str) -> Result<Runtime, ()> {
        match s {
            "tokio" => Ok(Runtime::Tokio),
            "smol" => Ok(Runtime::Smol),
            _ => Err(()),
        }
    }
}

/// The log line format (`--log-format`, §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub const fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    /// Best-effort guess of the wanted format when the settings were refused, so the
    /// `refusing_to_start` line matches what a log pipeline expects.
    pub fn hint<I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> LogFormat
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.into().to_string_lossy().into_owned())
            .collect();
        let from_flag = args.iter().enumerate().find_map(|(i, a)| {
            if a == "--log-format" {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix("--log-format=").map(str::to_owned)
            }
        });
        from_flag
            .or_else(|| env("SWITCHYARD_LOG_FORMAT"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    }
}

impl FromStr for LogFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<LogFormat, ()> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(()),
        }
    }
}

/// A listener address: an IP literal with port, or a host name with port (bound by the runtime,
/// exit 1 when that fails). Go-style `:PORT` means every IPv4 interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Ip(SocketAddr),
    Host { host: String, port: u16 },
}

impl ListenAddr {
    /// Parses `IP:PORT`, `[IPv6]:PORT`, `host:PORT` or `:PORT`; port 0 is refused (§14.3 item 6).
    pub fn parse(s: &str) -> Option<ListenAddr> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return (sa.port() != 0).then_some(ListenAddr::Ip(sa));
        }
        let (host, port) = s.rsplit_once(':')?;
        let port = parse_digits::<u16>(port).filter(|p| *p != 0)?;
        if host.is_empty() {
            return Some(ListenAddr::Ip(SocketAddr::new(
                Ipv4Addr::UNSPECIFIED.into(),
                port,
            )));
        }
        is_host_name(host).then(|| ListenAddr::Host {
            host: host.to_owned(),
            port,
        })
    }

    /// True only for an IP literal in the loopback range; a host name is never assumed loopback.
    pub fn is_loopback(&self) -> bool {
        match self {
            ListenAddr::Ip(sa) => sa.ip().to_canonical().is_loopback(),
            ListenAddr::Host { .. } => false,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            ListenAddr::Ip(sa) => sa.port(),
            ListenAddr::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Ip(sa) => sa.fmt(f),
            ListenAddr::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How the main listener speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain HTTP/1.1.
    Off,
    /// Static PEM files, re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// Certificates from an ACME directory for `Config::domains`.
    Acme(Acme),
}

/// ACME mode: `--domain` without `--tls-cert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// Lower-case, as in `Config::domains`.
    pub domains: Vec<String>,
    /// Contact URIs; a bare address gets `mailto:`.
    pub contacts: Vec<String>,
    pub directory: String,
    /// The http-01 listener; `None` = TLS-ALPN-01 only.
    pub http_listen: Option<ListenAddr>,
    pub http_proxy_protocol: bool,
    pub cert_cache: PathBuf,
    /// `--acme-ca-file`: the only roots trusted for the directory's HTTPS; `None` = the public
    /// web PKI roots.
    pub ca_file: Option<PathBuf>,
}

/// A value that must never reach a log line or an error message. `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The fields of a Google service-account key that push needs (§11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    /// PEM, PKCS#8 or PKCS#1; checked at boot to be an RSA key the signer accepts.
    pub private_key: Secret,
    pub private_key_id: Option<String>,
    pub token_uri: Option<String>,
    pub project_id: Option<String>,
}

/// Push wake settings; present only when credentials are configured (§11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub credentials: ServiceAccount,
    /// Without a trailing `/`.
    pub endpoint: String,
    /// `--fcm-token-url`, else the credentials' `token_uri`, else the Google default.
    pub token_url: String,
    /// `--fcm-project-id`, else the credentials' `project_id`.
    pub project_id: String,
    pub timeout: Duration,
}

/// The effective uid and capability mask of this process, for the production checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// `None` when it cannot be read (then production mode refuses to start).
    pub euid: Option<u32>,
    /// `CapEff`; `None` where the platform has no capabilities.
    pub effective_caps: Option<u64>,
}

impl ProcessIdentity {
    /// Reads `/proc/self/status`.
    pub fn current() -> ProcessIdentity {
        match std::fs::read_to_string("/proc/self/status") {
            Ok(text) => ProcessIdentity::from_proc_status(&text),
            Err(_) => ProcessIdentity {
                euid: None,
                effective_caps: None,
            },
        }
    }

    /// Parses the `Uid:` (real, effective, saved, fs) and `CapEff:` lines of a
    /// `/proc/<pid>/status` text.
    pub fn from_proc_status(text: &str) -> ProcessIdentity {
        let mut id = ProcessIdentity {
            euid: None,
            effective_caps: None,
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                id.euid = rest.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            } else if let Some(rest) = line.strip_prefix("CapEff:") {
                id.effective_caps = u64::from_str_radix(rest.trim(), 16).ok();
            }
        }
        id
    }
}

/// Everything the process needs to start: the core's [`Config`] and the runtime's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Limits and timers for the core; `domains` lower-case, `push_enabled` iff [`Settings::push`].
    pub config: Config,
    pub listen: ListenAddr,
    /// `None` when disabled with `""`.
    pub metrics_listen: Option<SocketAddr>,
    pub tls: Tls,
    /// `--proxy-protocol` on the main listener.
    pub proxy_protocol: bool,
    pub runtime: Runtime,
    pub workers: NonZeroUsize,
    pub log_format: LogFormat,
    /// `None` when `""`.
    pub node_id: Option<String>,
    pub production: bool,
    pub push: Option<Push>,
}

/// Where a refused value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The flag, by its canonical name (`--listen` also for `--https-listen`).
    Flag(String),
    /// An environment variable, by name.
    Env(String),
}

impl Origin {
    fn env_var(&self) -> Option<&str> {
        match self {
            Origin::Flag(_) => None,
            Origin::Env(name) => Some(name),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(name) | Origin::Env(name) => f.write_str(name),
        }
    }
}

/// What is wrong with a TLS file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFileProblem {
    Unreadable,
    /// No PEM block of the expected kind.
    NotPem,
    /// The certificate is not X.509 that rustls can parse.
    BadCertificate,
    /// A private key ring cannot sign with.
    UnsupportedKey,
    /// The key's public key is not the certificate's.
    KeyMismatch,
}

/// What is wrong with the push credentials (§14.3 item 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsProblem {
    Unreadable,
    NotJsonObject,
    NotServiceAccount,
    NoClientEmail,
    BadPrivateKey,
    NoProjectId,
}

/// Which production rule refused the start (§14.3 item 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductionRefusal {
    PlainNonLoopback { listen: String },
    Root,
    Capabilities,
    IdentityUnknown,
    MetricsNotLoopback,
}

/// Why the process will not start. Every variant but [`BootError::HelpOrVersion`] exits 2;
/// `Display` is one line naming the flag or variable and the fix, and never echoes a value that
/// could be secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootError {
    /// `--help` or `--version`: print the text to stdout and exit 0.
    HelpOrVersion(String),
    /// Unknown flag, missing value, a flag given twice.
    Usage(String),
    /// A value that does not parse or is out of range.
    InvalidValue {
        origin: Origin,
        expected: &'static str,
    },
    /// A reference variable set to anything but `1`.
    ReferenceVar {
        var: &'static str,
    },
    /// `FLY_APP_NAME` set without `PYRYCODE_RELAY_SINGLE_INSTANCE=1`.
    FlyWithoutSingleInstance,
    /// `--listen` and `--insecure-listen` (or their variables) both given.
    ListenConflict,
    /// A TLS setting combined with `--insecure-listen`.
    InsecureWithTls {
        origin: Origin,
    },
    /// One of `--tls-cert`/`--tls-key` without the other.
    TlsPairIncomplete {
        given: Origin,
        missing: &'static str,
    },
    TlsFile {
        origin: Origin,
        problem: TlsFileProblem,
    },
    /// `--acme-http-listen` outside ACME mode.
    AcmeHttpWithoutAcme,
    /// `--acme-ca-file` outside ACME mode.
    AcmeCaWithoutAcme,
    /// ACME mode with no `--cert-cache` and no `HOME`.
    CertCacheUnset,
    Credentials {
        origin: Origin,
        problem: CredentialsProblem,
    },
    Production(ProductionRefusal),
}

impl BootError {
    /// The process exit code: 0 for help and version, 2 for every refusal (§13).
    pub fn exit_code(&self) -> u8 {
        match self {
            BootError::HelpOrVersion(_) => 0,
            _ => 2,
        }
    }

    /// A short fixed name of the refusal, for the `reason` field of `refusing_to_start`.
    pub fn reason(&self) -> &'static str {
        match self {
            BootError::HelpOrVersion(_) => "help_or_version",
            BootError::Usage(_) => "usage",
            BootError::InvalidValue { .. } => "invalid_value",
            BootError::ReferenceVar { .. } => "invalid_reference_var",
            BootError::FlyWithoutSingleInstance => "fly_not_single_instance",
            BootError::ListenConflict => "listen_conflict",
            BootError::InsecureWithTls { .. } => "insecure_listen_with_tls",
            BootError::TlsPairIncomplete { .. } => "tls_pair_incomplete",
            BootError::TlsFile { .. } => "tls_file",
            BootError::AcmeHttpWithoutAcme => "acme_http_without_acme",
            BootError::AcmeCaWithoutAcme => "acme_ca_without_acme",
            BootError::CertCacheUnset => "cert_cache_unset",
            BootError::Credentials { .. } => "fcm_credentials",
            BootError::Production(ProductionRefusal::PlainNonLoopback { .. }) => {
                "production_plain_listener"
            }
            BootError::Production(ProductionRefusal::Root) => "production_root",
            BootError::Production(ProductionRefusal::Capabilities) => "production_capabilities",
            BootError::Production(ProductionRefusal::IdentityUnknown) => "production_identity",
            BootError::Production(ProductionRefusal::MetricsNotLoopback) => "production_metrics",
        }
    }

    /// The environment variable at fault, when one is.
    pub fn env_var(&self) -> Option<&str> {
        match self {
            BootError::InvalidValue { origin, .. }
            | BootError::InsecureWithTls { origin }
            | BootError::TlsPairIncomplete { given: origin, .. }
            | BootError::TlsFile { origin, .. }
            | BootError::Credentials { origin, .. } => origin.env_var(),
            BootError::ReferenceVar { var } => Some(var),
            BootError::FlyWithoutSingleInstance => Some(SINGLE_INSTANCE_VAR),
            BootError::CertCacheUnset => Some("HOME"),
            _ => None,
        }
    }

    /// What is wrong, without the fix.
    pub fn problem(&self) -> String {
        match self {
            BootError::HelpOrVersion(_) => "help or version requested".to_owned(),
            BootError::Usage(msg) => msg.clone(),
            BootError::InvalidValue { origin, .. } => format!("invalid value for {origin}"),
            BootError::ReferenceVar { var } => format!("{var} is set to something other than 1"),
            BootError::FlyWithoutSingleInstance => format!(
                "{FLY_APP_VAR} is set but {SINGLE_INSTANCE_VAR} is not 1 (the registry is in \
                 memory, one per machine)"
            ),
            BootError::ListenConflict => "both --listen and --insecure-listen are given".to_owned(),
            BootError::InsecureWithTls { origin } => {
                format!("--insecure-listen is plain HTTP but {origin} asks for TLS")
            }
            BootError::TlsPairIncomplete { given, missing } => {
                format!("{given} is given without {missing}")
            }
            BootError::TlsFile {
                origin,
                problem: TlsFileProblem::Unreadable,
            } => {
                format!("the file named by {origin} cannot be read")
            }
            BootError::TlsFile {
                origin,
                problem: TlsFileProblem::NotPem,
            } => {
                format!("the file named by {origin} holds no PEM block of the expected kind")
            }
            BootError::TlsFile {
                origin,
                problem: TlsFileProblem::BadCertificate,
            } => {
                format!("the certificate named by {origin} cannot be parsed")
            }
            BootError::TlsFile {
                origin,
                problem: TlsFileProblem::UnsupportedKey,
            } => format!(
                "the private key named by {origin} is not a usable RSA, ECDSA or Ed25519 key"
            ),
            BootError::TlsFile {
                origin,
                problem: TlsFileProblem::KeyMismatch,
            } => format!(
                "the private key named by {origin} does not belong to the certificate named by \
                 --tls-cert"
            ),
            BootError::AcmeHttpWithoutAcme => {
                "--acme-http-listen is set but ACME mode is off".to_owned()
            }
            BootError::AcmeCaWithoutAcme => "--acme-ca-file is set but ACME mode is off".to_owned(),
            BootError::CertCacheUnset => {
                "ACME mode needs a certificate cache but HOME is not set".to_owned()
            }
            BootError::Credentials { origin, problem } => {
                let what = match problem {
                    CredentialsProblem::Unreadable => "cannot be read",
                    CredentialsProblem::NotJsonObject => "are not a JSON object",
                    CredentialsProblem::NotServiceAccount => {
                        "have a type other than service_account"
                    }
                    CredentialsProblem::NoClientEmail => "have no client_email",
                    CredentialsProblem::BadPrivateKey => {
                        "have no private_key that is an RSA key in PEM (PKCS#8 or PKCS#1)"
                    }
                    CredentialsProblem::NoProjectId => "have no project_id",
                };
                format!("the push credentials from {origin} {what}")
            }
            BootError::Production(p) => match p {
                ProductionRefusal::PlainNonLoopback { listen } => format!(
                    "production mode: the main listener {listen} is plain HTTP on a non-loopback \
                     address"
                ),
                ProductionRefusal::Root => "production mode: running as root".to_owned(),
                ProductionRefusal::Capabilities => {
                    "production mode: effective capabilities beyond CAP_NET_BIND_SERVICE".to_owned()
                }
                ProductionRefusal::IdentityUnknown => {
                    "production mode: the effective uid cannot be read from /proc/self/status"
                        .to_owned()
                }
                ProductionRefusal::MetricsNotLoopback => {
                    "production mode: --metrics-listen is not a loopback address".to_owned()
                }
            },
        }
    }

    /// How to fix it.
    pub fn fix(&self) -> String {
        match self {
            BootError::HelpOrVersion(_) => String::new(),
            BootError::Usage(_) => "see switchyard --help".to_owned(),
            BootError::InvalidValue { expected, .. } => format!("expected {expected}"),
            BootError::ReferenceVar { var } => format!("unset {var} or set it to exactly 1"),
            BootError::FlyWithoutSingleInstance => {
                format!("run a single machine and set {SINGLE_INSTANCE_VAR}=1")
            }
            BootError::ListenConflict => "give only one of them".to_owned(),
            BootError::InsecureWithTls { origin } => {
                format!("drop {origin}, or use --listen instead of --insecure-listen")
            }
            BootError::TlsPairIncomplete { missing, .. } => {
                format!("give {missing} as well, or neither")
            }
            BootError::TlsFile {
                problem: TlsFileProblem::Unreadable,
                ..
            } => "check the path and its permissions".to_owned(),
            BootError::TlsFile {
                origin,
                problem: TlsFileProblem::NotPem | TlsFileProblem::BadCertificate,
            } if origin.to_string().contains("ACME_CA_FILE")
                || origin.to_string().contains("acme-ca-file") =>
            {
                "give a file of PEM CA certificates (X.509)".to_owned()
            }
            BootError::TlsFile {
                problem: TlsFileProblem::NotPem,
                ..
            } => "give a PEM certificate chain to --tls-cert and a PEM private key to --tls-key"
                .to_owned(),
            BootError::TlsFile {
                problem: TlsFileProblem::BadCertificate,
                ..
            } => "give a PEM certificate chain, leaf first, to --tls-cert".to_owned(),
            BootError::TlsFile {
                problem: TlsFileProblem::UnsupportedKey,
                ..
            } => "give a PEM private key (PKCS#8, PKCS#1 or SEC1) to --tls-key".to_owned(),
            BootError::TlsFile {
                problem: TlsFileProblem::KeyMismatch,
                ..
            } => "give the key the certificate was issued for".to_owned(),
            BootError::AcmeHttpWithoutAcme => {
                "give --domain without --tls-cert, or drop --acme-http-listen".to_owned()
            }
            BootError::AcmeCaWithoutAcme => {
                "give --domain without --tls-cert, or drop --acme-ca-file".to_owned()
            }
            BootError::CertCacheUnset => "give --cert-cache DIR".to_owned(),
            BootError::Credentials {
                problem: CredentialsProblem::NoProjectId,
                ..
            } => "give --fcm-project-id, or use a key that has project_id".to_owned(),
            BootError::Credentials { .. } => {
                "give a Firebase service-account key (JSON) with an RSA private key".to_owned()
            }
            BootError::Production(p) => match p {
                ProductionRefusal::PlainNonLoopback { .. } => {
                    "add --tls-cert/--tls-key or --domain, listen on loopback, or drop production \
                     mode"
                        .to_owned()
                }
                ProductionRefusal::Root => "run as an unprivileged user".to_owned(),
                ProductionRefusal::Capabilities => {
                    "drop them (e.g. --cap-drop=ALL --cap-add=NET_BIND_SERVICE)".to_owned()
                }
                ProductionRefusal::IdentityUnknown => {
                    "run on Linux with /proc mounted, or drop production mode".to_owned()
                }
                ProductionRefusal::MetricsNotLoopback => {
                    "use a loopback address such as 127.0.0.1:9090, or \"\" to disable".to_owned()
                }
            },
        }
    }
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::HelpOrVersion(text) => f.write_str(text.trim_end()),
            _ => write!(f, "{}; {}", self.problem(), self.fix()),
        }
    }
}

impl std::error::Error for BootError {}

impl Settings {
    /// Builds the settings from `args` (program name first, as `std::env::args_os()` gives them)
    /// and the environment lookup `env`, reading the process identity from `/proc` only if
    /// production mode is on.
    pub fn from_args_env<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, BootError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Settings::from_args_env_identity(args, env, ProcessIdentity::current)
    }

    /// As [`Settings::from_args_env`], with the process identity supplied (for tests).
    pub fn from_args_env_identity<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
        identity: impl FnOnce() -> ProcessIdentity,
    ) -> Result<Settings, BootError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let flags = Flags::try_parse_from(args).map_err(clap_error)?;
        Resolver { env: &env }.resolve(flags, identity)
    }
}

fn clap_error(e: clap::Error) -> BootError {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            BootError::HelpOrVersion(e.render().to_string())
        }
        ErrorKind::UnknownArgument => {
            // The argument as typed may carry `=value`, or be a stray value: never echo those.
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(s)) => s.split('=').next().unwrap_or_default(),
                _ => "",
            };
            if arg.starts_with('-') && arg.len() <= 64 {
                BootError::Usage(format!("unknown flag {arg}"))
            } else {
                BootError::Usage("unexpected argument".to_owned())
            }
        }
        _ => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or_default();
            BootError::Usage(line.strip_prefix("error: ").unwrap_or(line).to_owned())
        }
    }
}

/// A raw value and where it came from.
struct Sourced {
    origin: Origin,
    raw: String,
}

struct Resolver<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

/// `SWITCHYARD_MAX_CONNECTIONS` for `max-connections`.
fn env_name(long: &str) -> String {
    format!("SWITCHYARD_{}", long.to_ascii_uppercase().replace('-', "_"))
}

impl Resolver<'_> {
    /// The flag's value, else `SWITCHYARD_<NAME>`.
    fn pick(&self, long: &'static str, flag: Option<String>) -> Option<Sourced> {
        if let Some(raw) = flag {
            return Some(Sourced {
                origin: Origin::Flag(format!("--{long}")),
                raw,
            });
        }
        let name = env_name(long);
        (self.env)(&name).map(|raw| Sourced {
            origin: Origin::Env(name),
            raw,
        })
    }

    /// Picks and parses one value; `parse` returns `None` for a bad one.
    fn value<T>(
        &self,
        long: &'static str,
        flag: Option<String>,
        expected: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, BootError> {
        match self.pick(long, flag) {
            None => Ok(None),
            Some(s) => match parse(&s.raw) {
                Some(v) => Ok(Some(v)),
                None => Err(BootError::InvalidValue {
                    origin: s.origin,
                    expected,
                }),
            },
        }
    }

    /// A bare boolean flag, else `SWITCHYARD_<NAME>` as `1`/`true`/`0`/`false`.
    fn flag_bool(&self, long: &'static str, flag: bool) -> Result<Option<bool>, BootError> {
        if flag {
            return Ok(Some(true));
        }
        let name = env_name(long);
        match (self.env)(&name).as_deref() {
            None => Ok(None),
            Some("1" | "true") => Ok(Some(true)),
            Some("0" | "false") => Ok(Some(false)),
            Some(_) => Err(BootError::InvalidValue {
                origin: Origin::Env(name),
                expected: "1, true, 0 or false",
            }),
        }
    }

    /// A list flag (repeatable, each a comma list), else a comma list in `SWITCHYARD_<NAME>`;
    /// `""` adds nothing. Returns where the list came from, if anywhere.
    fn list(
        &self,
        long: &'static str,
        flag: Vec<String>,
        expected: &'static str,
        item: impl Fn(&str) -> Option<String>,
    ) -> Result<(Option<Origin>, Vec<String>), BootError> {
        let (origin, raws) = if flag.is_empty() {
            let name = env_name(long);
            match (self.env)(&name) {
                None => return Ok((None, Vec::new())),
                Some(raw) => (Origin::Env(name), vec![raw]),
            }
        } else {
            (Origin::Flag(format!("--{long}")), flag)
        };
        let mut out: Vec<String> = Vec::new();
        for part in raws
            .iter()
            .filter(|r| !r.is_empty())
            .flat_map(|r| r.split(','))
        {
            let v = item(part.trim()).ok_or_else(|| BootError::InvalidValue {
                origin: origin.clone(),
                expected,
            })?;
            if !out.contains(&v) {
                out.push(v);
            }
        }
        Ok((Some(origin), out))
    }

    fn duration(
        &self,
        long: &'static str,
        flag: Option<String>,
        default: Duration,
        zero_ok: bool,
    ) -> Result<Duration, BootError> {
        let expected = if zero_ok {
            "a whole number with ms, s or m, e.g. 30s"
        } else {
            "a whole number above 0 with ms, s or m, e.g. 30s"
        };
        let parsed = self.value(long, flag, expected, |s| {
            parse_duration(s).filter(|d| zero_ok || !d.is_zero())
        })?;
        Ok(parsed.unwrap_or(default))
    }

    fn size(
        &self,
        long: &'static str,
        flag: Option<String>,
        default: usize,
    ) -> Result<usize, BootError> {
        let parsed = self.value(
            long,
            flag,
            "a size above 0 in bytes, or with KiB or MiB, e.g. 256KiB",
            |s| {
                parse_size(s)
                    .filter(|n| *n > 0)
                    .and_then(|n| usize::try_from(n).ok())
            },
        )?;
        Ok(parsed.unwrap_or(default))
    }

    fn count<T: FromStr + PartialOrd + From<u8>>(
        &self,
        long: &'static str,
        flag: Option<String>,
        default: T,
    ) -> Result<T, BootError> {
        let parsed = self.value(long, flag, "a whole number of at least 1", |s| {
            parse_digits::<T>(s).filter(|n| *n >= T::from(1))
        })?;
        Ok(parsed.unwrap_or(default))
    }

    fn url(&self, long: &'static str, flag: Option<String>) -> Result<Option<String>, BootError> {
        self.value(long, flag, "an http:// or https:// URL", |s| {
            let rest = s
                .strip_prefix("https://")
                .or_else(|| s.strip_prefix("http://"))?;
            let ok = !rest.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
            ok.then(|| s.to_owned())
        })
    }

    fn resolve(
        &self,
        mut f: Flags,
        identity: impl FnOnce() -> ProcessIdentity,
    ) -> Result<Settings, BootError> {
        let reference_production = self.reference_vars()?;
        let (listen, insecure) = self.listen(&mut f)?;
        let metrics_listen = self
            .value(
                "metrics-listen",
                f.metrics_listen.take(),
                "an IP literal and port of 1-65535, e.g. 127.0.0.1:9090 (host names are refused), \
                 or \"\" to disable",
                |s| match s {
                    "" => Some(None),
                    _ => s
                        .parse::<SocketAddr>()
                        .ok()
                        .filter(|sa| sa.port() != 0)
                        .map(Some),
                },
            )?
            .unwrap_or(Some(DEFAULT_METRICS_LISTEN));
        let (domains, tls) = self.tls(&mut f, insecure)?;
        let proxy_protocol = self
            .flag_bool("proxy-protocol", f.proxy_protocol)?
            .unwrap_or(false);
        let runtime = self
            .value("runtime", f.runtime.take(), "tokio or smol", |s| {
                s.parse().ok()
            })?
            .unwrap_or_default();
        let workers = self
            .value(
                "workers",
                f.workers.take(),
                "a whole number of at least 1",
                |s| parse_digits::<usize>(s).and_then(NonZeroUsize::new),
            )?
            .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN));
        let log_format = self
            .value("log-format", f.log_format.take(), "text or json", |s| {
                s.parse().ok()
            })?
            .unwrap_or_default();
        let mut config = self.config(&mut f, domains)?;
        let push = self.push(&mut f)?;
        config.push_enabled = push.is_some();
        let node_id = self
            .value(
                "node-id",
                f.node_id.take(),
                "1-64 characters of A-Z, a-z, 0-9, '.', '_', '-', or \"\" for off",
                |s| match s {
                    "" => Some(None),
                    _ => is_node_id(s).then(|| Some(s.to_owned())),
                },
            )?
            .flatten();
        let production = self
            .flag_bool("production", f.production)?
            .unwrap_or(reference_production);

        let settings = Settings {
            config,
            listen,
            metrics_listen,
            tls,
            proxy_protocol,
            runtime,
            workers,
            log_format,
            node_id,
            production,
            push,
        };
        if settings.production {
            check_production(&settings, identity())?;
        }
        Ok(settings)
    }

    /// §14.3 items 3 and 4, checked whatever overrides the variables. Returns whether
    /// `PYRYCODE_RELAY_PRODUCTION` asks for production mode.
    fn reference_vars(&self) -> Result<bool, BootError> {
        let exactly_one = |var: &'static str| match (self.env)(var).as_deref() {
            None => Ok(false),
            Some("1") => Ok(true),
            Some(_) => Err(BootError::ReferenceVar { var }),
        };
        let production = exactly_one(PRODUCTION_VAR)?;
        let single_instance = exactly_one(SINGLE_INSTANCE_VAR)?;
        if (self.env)(FLY_APP_VAR).is_some_and(|v| !v.is_empty()) && !single_instance {
            return Err(BootError::FlyWithoutSingleInstance);
        }
        Ok(production)
    }

    /// The main listener from `--listen` or `--insecure-listen` (flags before variables), and
    /// whether it came from the latter.
    fn listen(&self, f: &mut Flags) -> Result<(ListenAddr, bool), BootError> {
        let (picked, insecure) = match (f.listen.take(), f.insecure_listen.take()) {
            (Some(_), Some(_)) => return Err(BootError::ListenConflict),
            (Some(v), None) => (self.pick("listen", Some(v)), false),
            (None, Some(v)) => (self.pick("insecure-listen", Some(v)), true),
            (None, None) => match (
                self.pick("listen", None),
                self.pick("insecure-listen", None),
            ) {
                (Some(_), Some(_)) => return Err(BootError::ListenConflict),
                (Some(s), None) => (Some(s), false),
                (None, s) => {
                    let insecure = s.is_some();
                    (s, insecure)
                }
            },
        };
        let listen = match picked {
            None => ListenAddr::Ip(DEFAULT_LISTEN),
            Some(s) => ListenAddr::parse(&s.raw).ok_or(BootError::InvalidValue {
                origin: s.origin,
                expected: LISTEN_EXPECTED,
            })?,
        };
        Ok((listen, insecure))
    }

    /// The domains (lower-case) and the TLS mode: files, ACME, or off.
    fn tls(&self, f: &mut Flags, insecure: bool) -> Result<(Vec<String>, Tls), BootError> {
        let cert = self.pick("tls-cert", f.tls_cert.take());
        let key = self.pick("tls-key", f.tls_key.take());
        let (domains_origin, domains) = self.list(
            "domain",
            std::mem::take(&mut f.domain),
            "host names separated by commas, e.g. relay.example.com",
            |s| {
                let d = s.to_ascii_lowercase();
                is_host_name(&d).then_some(d)
            },
        )?;
        if insecure {
            let tls_origin = cert
                .as_ref()
                .or(key.as_ref())
                .map(|s| s.origin.clone())
                .or_else(|| domains_origin.filter(|_| !domains.is_empty()));
            if let Some(origin) = tls_origin {
                return Err(BootError::InsecureWithTls { origin });
            }
        }
        let files = match (cert, key) {
            (None, None) => None,
            (Some(cert), None) => {
                return Err(BootError::TlsPairIncomplete {
                    given: cert.origin,
                    missing: "--tls-key",
                });
            }
            (None, Some(key)) => {
                return Err(BootError::TlsPairIncomplete {
                    given: key.origin,
                    missing: "--tls-cert",
                });
            }
            (Some(cert), Some(key)) => {
                for s in [&cert, &key] {
                    if s.raw.is_empty() {
                        return Err(BootError::InvalidValue {
                            origin: s.origin.clone(),
                            expected: PATH_EXPECTED,
                        });
                    }
                }
                let paths = (PathBuf::from(&cert.raw), PathBuf::from(&key.raw));
                // Loaded exactly as the listener will load it (§14.3 item 2).
                if let Err(e) = crate::tls::load_pair(&paths.0, &paths.1) {
                    let origin = match e.file {
                        crate::tls::TlsFile::Cert => cert.origin,
                        crate::tls::TlsFile::Key => key.origin,
                    };
                    return Err(BootError::TlsFile {
                        origin,
                        problem: e.problem,
                    });
                }
                Some(paths)
            }
        };

        // The ACME flags are checked even when ACME mode is off.
        let (_, contacts) = self.list(
            "acme-contact",
            std::mem::take(&mut f.acme_contact),
            "contact URIs separated by commas, e.g. mailto:ops@example.com",
            |s| {
                if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    None
                } else if s.contains(':') {
                    Some(s.to_owned())
                } else {
                    Some(format!("mailto:{s}"))
                }
            },
        )?;
        let directory = self
            .url("acme-directory", f.acme_directory.take())?
            .unwrap_or_else(|| DEFAULT_ACME_DIRECTORY.to_owned());
        let http_listen = self
            .value(
                "acme-http-listen",
                f.acme_http_listen.take(),
                LISTEN_EXPECTED,
                |s| match s {
                    "" => Some(None),
                    _ => ListenAddr::parse(s).map(Some),
                },
            )?
            .flatten();
        let cert_cache = self.value("cert-cache", f.cert_cache.take(), PATH_EXPECTED, |s| {
            (!s.is_empty()).then(|| PathBuf::from(s))
        })?;
        let http_proxy_protocol = self
            .flag_bool("acme-http-proxy-protocol", f.acme_http_proxy_protocol)?
            .unwrap_or(false);
        let ca_file = match self.pick("acme-ca-file", f.acme_ca_file.take()) {
            Some(s) => {
                if s.raw.is_empty() {
                    return Err(BootError::InvalidValue {
                        origin: s.origin,
                        expected: PATH_EXPECTED,
                    });
                }
                let path = PathBuf::from(s.raw);
                crate::acme::load_ca_file(&path).map_err(|problem| BootError::TlsFile {
                    origin: s.origin,
                    problem,
                })?;
                Some(path)
            }
            None => None,
        };

        let acme_mode = files.is_none() && !domains.is_empty();
        if http_listen.is_some() && !acme_mode {
            return Err(BootError::AcmeHttpWithoutAcme);
        }
        if ca_file.is_some() && !acme_mode {
            return Err(BootError::AcmeCaWithoutAcme);
        }
        let tls = match files {
            Some((cert, key)) => Tls::Files { cert, key },
            None if acme_mode => {
                let cert_cache = match cert_cache {
                    Some(dir) => dir,
                    None => match (self.env)("HOME").filter(|h| !h.is_empty()) {
                        Some(home) => PathBuf::from(home).join(".switchyard").join("certs"),
                        None => return Err(BootError::CertCacheUnset),
                    },
                };
                Tls::Acme(Acme {
                    domains: domains.clone(),
                    contacts,
                    directory,
                    http_listen,
                    http_proxy_protocol,
                    cert_cache,
                    ca_file,
                })
            }
            None => Tls::Off,
        };
        Ok((domains, tls))
    }

    /// The core's limits and timers; `push_enabled` is left off for the caller to set.
    fn config(&self, f: &mut Flags, domains: Vec<String>) -> Result<Config, BootError> {
        let d = Config::default();
        let timer = |long, flag: &mut Option<String>, default| {
            self.duration(long, flag.take(), default, false)
        };
        Ok(Config {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            domains,
            trust_forwarded_for: self
                .flag_bool("trust-forwarded-for", f.trust_forwarded_for)?
                .unwrap_or(false),
            max_connections: self.count(
                "max-connections",
                f.max_connections.take(),
                d.max_connections,
            )?,
            max_connections_per_ip: self.count(
                "max-connections-per-ip",
                f.max_connections_per_ip.take(),
                d.max_connections_per_ip,
            )?,
            max_phones_per_server: self.count(
                "max-phones-per-server",
                f.max_phones_per_server.take(),
                d.max_phones_per_server,
            )?,
            max_message_size: self.size(
                "max-message-size",
                f.max_message_size.take(),
                d.max_message_size,
            )?,
            max_head_size: self.size("max-head-size", f.max_head_size.take(), d.max_head_size)?,
            phone_outbox_bytes: self.size(
                "phone-outbox-bytes",
                f.phone_outbox_bytes.take(),
                d.phone_outbox_bytes,
            )?,
            binary_outbox_bytes: self.size(
                "binary-outbox-bytes",
                f.binary_outbox_bytes.take(),
                d.binary_outbox_bytes,
            )?,
            rate_burst: self.count("rate-burst", f.rate_burst.take(), d.rate_burst)?,
            rate_refill: timer("rate-refill", &mut f.rate_refill, d.rate_refill)?,
            ping_interval: timer("ping-interval", &mut f.ping_interval, d.ping_interval)?,
            pong_timeout: timer("pong-timeout", &mut f.pong_timeout, d.pong_timeout)?,
            read_timeout: timer("read-timeout", &mut f.read_timeout, d.read_timeout)?,
            header_timeout: timer("header-timeout", &mut f.header_timeout, d.header_timeout)?,
            write_timeout: timer("write-timeout", &mut f.write_timeout, d.write_timeout)?,
            probe_timeout: timer("probe-timeout", &mut f.probe_timeout, d.probe_timeout)?,
            grace: self.duration("grace", f.grace.take(), d.grace, true)?,
            close_timeout: timer("close-timeout", &mut f.close_timeout, d.close_timeout)?,
            drain_delay: self.duration("drain-delay", f.drain_delay.take(), d.drain_delay, true)?,
            drain_timeout: timer("drain-timeout", &mut f.drain_timeout, d.drain_timeout)?,
            push_enabled: false,
            push_burst: self.count("push-burst", f.push_burst.take(), d.push_burst)?,
            push_refill: timer("push-refill", &mut f.push_refill, d.push_refill)?,
            push_max_in_flight: self.count(
                "push-max-in-flight",
                f.push_max_in_flight.take(),
                d.push_max_in_flight,
            )?,
        })
    }

    /// Push settings when credentials are configured (§11): the `--fcm-credentials` path (flag,
    /// then variable), else the JSON in `PYRYCODE_RELAY_FCM_CREDENTIALS`. The other push flags are
    /// checked either way.
    fn push(&self, f: &mut Flags) -> Result<Option<Push>, BootError> {
        let endpoint = self.url("fcm-endpoint", f.fcm_endpoint.take())?;
        let token_url = self.url("fcm-token-url", f.fcm_token_url.take())?;
        let project_id = self.value(
            "fcm-project-id",
            f.fcm_project_id.take(),
            "a non-empty project id without spaces or '/'",
            |s| is_project_id(s).then(|| s.to_owned()),
        )?;
        let timeout = self.duration(
            "push-timeout",
            f.push_timeout.take(),
            DEFAULT_PUSH_TIMEOUT,
            false,
        )?;

        let (origin, text) = match self.pick("fcm-credentials", f.fcm_credentials.take()) {
            Some(s) if s.raw.is_empty() => {
                return Err(BootError::InvalidValue {
                    origin: s.origin,
                    expected: PATH_EXPECTED,
                });
            }
            Some(s) => match std::fs::read_to_string(&s.raw) {
                Ok(text) => (s.origin, text),
                Err(_) => {
                    return Err(BootError::Credentials {
                        origin: s.origin,
                        problem: CredentialsProblem::Unreadable,
                    });
                }
            },
            None => match (self.env)(CREDENTIALS_VAR) {
                Some(text) => (Origin::Env(CREDENTIALS_VAR.to_owned()), text),
                None => return Ok(None),
            },
        };
        let refuse = |problem| BootError::Credentials {
            origin: origin.clone(),
            problem,
        };
        let credentials = parse_service_account(&text).map_err(refuse)?;
        let project_id = project_id
            .or_else(|| credentials.project_id.clone())
            .ok_or_else(|| refuse(CredentialsProblem::NoProjectId))?;
        let token_url = token_url
            .or_else(|| credentials.token_uri.clone())
            .unwrap_or_else(|| DEFAULT_FCM_TOKEN_URL.to_owned());
        let endpoint = endpoint
            .as_deref()
            .unwrap_or(DEFAULT_FCM_ENDPOINT)
            .trim_end_matches('/')
            .to_owned();
        Ok(Some(Push {
            credentials,
            endpoint,
            token_url,
            project_id,
            timeout,
        }))
    }
}

/// §14.3 item 5.
fn check_production(s: &Settings, id: ProcessIdentity) -> Result<(), BootError> {
    if s.tls == Tls::Off && !s.listen.is_loopback() {
        return Err(BootError::Production(ProductionRefusal::PlainNonLoopback {
            listen: s.listen.to_string(),
        }));
    }
    if s.metrics_listen
        .is_some_and(|m| !m.ip().to_canonical().is_loopback())
    {
        return Err(BootError::Production(ProductionRefusal::MetricsNotLoopback));
    }
    match id.euid {
        None => return Err(BootError::Production(ProductionRefusal::IdentityUnknown)),
        Some(0) => return Err(BootError::Production(ProductionRefusal::Root)),
        Some(_) => {}
    }
    if id
        .effective_caps
        .is_some_and(|caps| caps & !CAP_NET_BIND_SERVICE != 0)
    {
        return Err(BootError::Production(ProductionRefusal::Capabilities));
    }
    Ok(())
}

/// Parses a service-account key and checks the fields §14.3 item 7 names, the private key by
/// parsing it as the JWT signer will.
pub fn parse_service_account(text: &str) -> Result<ServiceAccount, CredentialsProblem> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| CredentialsProblem::NotJsonObject)?;
    let obj = value.as_object().ok_or(CredentialsProblem::NotJsonObject)?;
    let string = |key: &str| {
        obj.get(key)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    if string("type") != Some("service_account") {
        return Err(CredentialsProblem::NotServiceAccount);
    }
    let client_email = string("client_email").ok_or(CredentialsProblem::NoClientEmail)?;
    let private_key = string("private_key").ok_or(CredentialsProblem::BadPrivateKey)?;
    if switchyard_push::SigningKey::from_pem(private_key).is_err() {
        return Err(CredentialsProblem::BadPrivateKey);
    }
    Ok(ServiceAccount {
        client_email: client_email.to_owned(),
        private_key: Secret::new(private_key.to_owned()),
        private_key_id: string("private_key_id").map(str::to_owned),
        token_uri: string("token_uri").map(str::to_owned),
        project_id: string("project_id").map(str::to_owned),
    })
}

/// Parses a duration: a whole number with unit `ms`, `s` or `m` (§14.1).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = s.split_at(split);
    let n = parse_digits::<u64>(digits)?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

/// Parses a size: bytes, optionally with suffix `KiB` or `MiB` (§14.1).
pub fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n = parse_digits::<u64>(digits)?;
    match unit {
        "" => Some(n),
        "KiB" => n.checked_mul(1024),
        "MiB" => n.checked_mul(1024 * 1024),
        _ => None,
    }
}

/// Parses a non-empty run of ASCII digits (no sign, no spaces).
fn parse_digits<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A DNS host name: dot-separated labels of letters, digits and `-`, not starting or ending
/// with `-`, at most 253 bytes.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_node_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_project_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const USER: ProcessIdentity = ProcessIdentity {
        euid: Some(1000),
        effective_caps: Some(0),
    };

    fn parse_with(
        args: &[&str],
        env: &[(&str, &str)],
        id: ProcessIdentity,
    ) -> Result<Settings, BootError> {
        let argv = std::iter::once("switchyard").chain(args.iter().copied());
        let lookup = |k: &str| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        };
        Settings::from_args_env_identity(argv, lookup, || id)
    }

    fn ok(args: &[&str], env: &[(&str, &str)]) -> Settings {
        parse_with(args, env, USER).unwrap_or_else(|e| panic!("{args:?} {env:?}: {e}"))
    }

    fn err(args: &[&str], env: &[(&str, &str)]) -> BootError {
        match parse_with(args, env, USER) {
            Ok(s) => panic!("{args:?} {env:?} was accepted: {s:?}"),
            Err(e) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "one line: {line}");
                assert_eq!(e.exit_code(), 2);
                e
            }
        }
    }

    fn flag(name: &str) -> Origin {
        Origin::Flag(name.to_owned())
    }

    fn var(name: &str) -> Origin {
        Origin::Env(name.to_owned())
    }

    fn invalid_origin(e: BootError) -> Origin {
        match e {
            BootError::InvalidValue { origin, .. } => origin,
            other => panic!("not InvalidValue: {other:?}"),
        }
    }

    /// Writes `contents` to a new file of its own (tests run in parallel).
    fn tmp_file(name: &str, contents: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("switchyard-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{n}-{name}"));
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    }

    /// A self-signed certificate and its key, made now: PEM texts.
    fn pem_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn tls_pair() -> (String, String) {
        let (cert, key) = pem_pair();
        (tmp_file("cert.pem", &cert), tmp_file("key.pem", &key))
    }

    /// A test-only RSA key (`push/testdata/`).
    const TEST_KEY: &str = include_str!("../../push/testdata/test-only-key-pkcs8.pem");

    /// A line of [`TEST_KEY`]'s body, which no message may echo.
    fn key_material() -> &'static str {
        TEST_KEY.lines().nth(1).unwrap()
    }

    fn service_account(extra: &str) -> String {
        let key = serde_json::Value::from(TEST_KEY).to_string();
        format!(
            r#"{{"type":"service_account","client_email":"relay@p.iam.gserviceaccount.com",
               "private_key":{key},
               "private_key_id":"kid1"{extra}}}"#
        )
    }

    // Defaults.

    #[test]
    fn no_arguments_give_the_protocol_defaults() {
        let s = ok(&[], &[]);
        assert_eq!(s.config, Config::default());
        assert_eq!(s.listen, ListenAddr::Ip("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(s.tls, Tls::Off);
        assert!(!s.proxy_protocol);
        assert_eq!(s.runtime, Runtime::Tokio);
        assert_eq!(s.workers, std::thread::available_parallelism().unwrap());
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.node_id, None);
        assert!(!s.production);
        assert_eq!(s.push, None);
    }

    #[test]
    fn help_and_version_exit_zero() {
        for arg in ["--help", "--version", "-h", "-V"] {
            let e = parse_with(&[arg], &[], USER).unwrap_err();
            assert!(matches!(e, BootError::HelpOrVersion(_)), "{arg}: {e:?}");
            assert_eq!(e.exit_code(), 0);
        }
        let BootError::HelpOrVersion(help) = parse_with(&["--help"], &[], USER).unwrap_err() else {
            unreachable!()
        };
        assert!(help.contains("--max-connections-per-ip"));
        assert!(help.contains("SWITCHYARD_FOO_BAR"));
        let BootError::HelpOrVersion(version) = parse_with(&["--version"], &[], USER).unwrap_err()
        else {
            unreachable!()
        };
        assert_eq!(
            version.trim(),
            format!("switchyard {}", env!("CARGO_PKG_VERSION"))
        );
    }

    // Every limit and timer, by flag and by variable.

    #[test]
    fn every_limit_and_timer_maps_into_config() {
        let args = [
            "--max-connections=11",
            "--max-connections-per-ip",
            "12",
            "--max-phones-per-server=13",
            "--max-message-size=1KiB",
            "--max-head-size=2048",
            "--phone-outbox-bytes=1MiB",
            "--binary-outbox-bytes=3MiB",
            "--rate-burst=14",
            "--rate-refill=500ms",
            "--ping-interval=1s",
            "--pong-timeout=2s",
            "--read-timeout=3s",
            "--header-timeout=4s",
            "--write-timeout=5s",
            "--probe-timeout=6s",
            "--grace=2m",
            "--close-timeout=7s",
            "--drain-delay=8s",
            "--drain-timeout=9s",
            "--push-burst=15",
            "--push-refill=16s",
            "--push-max-in-flight=17",
            "--trust-forwarded-for",
            "--domain=Relay.Example.COM",
            "--tls-cert",
        ];
        let (cert, key) = tls_pair();
        let mut argv: Vec<&str> = args.to_vec();
        argv.extend([cert.as_str(), "--tls-key", key.as_str()]);
        let c = ok(&argv, &[]).config;
        let want = Config {
            domains: vec!["relay.example.com".to_owned()],
            trust_forwarded_for: true,
            max_connections: 11,
            max_connections_per_ip: 12,
            max_phones_per_server: 13,
            max_message_size: 1024,
            max_head_size: 2048,
            phone_outbox_bytes: 1 << 20,
            binary_outbox_bytes: 3 << 20,
            rate_burst: 14,
            rate_refill: Duration::from_millis(500),
            ping_interval: Duration::from_secs(1),
            pong_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(3),
            header_timeout: Duration::from_secs(4),
            write_timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(6),
            grace: Duration::from_secs(120),
            close_timeout: Duration::from_secs(7),
            drain_delay: Duration::from_secs(8),
            drain_timeout: Duration::from_secs(9),
            push_enabled: false,
            push_burst: 15,
            push_refill: Duration::from_secs(16),
            push_max_in_flight: 17,
            ..Config::default()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn every_flag_has_its_switchyard_variable() {
        let (cert, key) = tls_pair();
        let env = [
            ("SWITCHYARD_LISTEN", "127.0.0.2:8081"),
            ("SWITCHYARD_METRICS_LISTEN", "[::1]:9091"),
            ("SWITCHYARD_TLS_CERT", cert.as_str()),
            ("SWITCHYARD_TLS_KEY", key.as_str()),
            ("SWITCHYARD_DOMAIN", "a.example, B.example"),
            ("SWITCHYARD_PROXY_PROTOCOL", "true"),
            ("SWITCHYARD_TRUST_FORWARDED_FOR", "1"),
            ("SWITCHYARD_RUNTIME", "smol"),
            ("SWITCHYARD_WORKERS", "3"),
            ("SWITCHYARD_LOG_FORMAT", "json"),
            ("SWITCHYARD_MAX_CONNECTIONS", "1"),
            ("SWITCHYARD_MAX_CONNECTIONS_PER_IP", "2"),
            ("SWITCHYARD_MAX_PHONES_PER_SERVER", "3"),
            ("SWITCHYARD_MAX_MESSAGE_SIZE", "4KiB"),
            ("SWITCHYARD_MAX_HEAD_SIZE", "5KiB"),
            ("SWITCHYARD_PHONE_OUTBOX_BYTES", "6MiB"),
            ("SWITCHYARD_BINARY_OUTBOX_BYTES", "7MiB"),
            ("SWITCHYARD_RATE_BURST", "8"),
            ("SWITCHYARD_RATE_REFILL", "9s"),
            ("SWITCHYARD_PING_INTERVAL", "10s"),
            ("SWITCHYARD_PONG_TIMEOUT", "11s"),
            ("SWITCHYARD_READ_TIMEOUT", "12s"),
            ("SWITCHYARD_HEADER_TIMEOUT", "13s"),
            ("SWITCHYARD_WRITE_TIMEOUT", "14s"),
            ("SWITCHYARD_PROBE_TIMEOUT", "15s"),
            ("SWITCHYARD_GRACE", "0s"),
            ("SWITCHYARD_CLOSE_TIMEOUT", "16s"),
            ("SWITCHYARD_DRAIN_DELAY", "17s"),
            ("SWITCHYARD_DRAIN_TIMEOUT", "18s"),
            ("SWITCHYARD_PUSH_BURST", "19"),
            ("SWITCHYARD_PUSH_REFILL", "20s"),
            ("SWITCHYARD_PUSH_MAX_IN_FLIGHT", "21"),
            ("SWITCHYARD_NODE_ID", "node-7"),
            ("SWITCHYARD_PRODUCTION", "true"),
        ];
        let s = ok(&[], &env);
        assert_eq!(s.listen, ListenAddr::Ip("127.0.0.2:8081".parse().unwrap()));
        assert_eq!(s.metrics_listen, Some("[::1]:9091".parse().unwrap()));
        assert_eq!(
            s.tls,
            Tls::Files {
                cert: cert.into(),
                key: key.into()
            }
        );
        assert!(s.proxy_protocol);
        assert_eq!(s.runtime, Runtime::Smol);
        assert_eq!(s.workers.get(), 3);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.node_id.as_deref(), Some("node-7"));
        assert!(s.production);
        let c = s.config;
        assert_eq!(c.domains, ["a.example", "b.example"]);
        assert!(c.trust_forwarded_for);
        assert_eq!(
            (
                c.max_connections,
                c.max_connections_per_ip,
                c.max_phones_per_server
            ),
            (1, 2, 3)
        );
        assert_eq!(
            (
                c.max_message_size,
                c.max_head_size,
                c.phone_outbox_bytes,
                c.binary_outbox_bytes
            ),
            (4 << 10, 5 << 10, 6 << 20, 7 << 20)
        );
        assert_eq!((c.rate_burst, c.rate_refill), (8, Duration::from_secs(9)));
        let timers = [
            c.ping_interval,
            c.pong_timeout,
            c.read_timeout,
            c.header_timeout,
            c.write_timeout,
            c.probe_timeout,
            c.grace,
            c.close_timeout,
            c.drain_delay,
            c.drain_timeout,
        ];
        let secs = [10, 11, 12, 13, 14, 15, 0, 16, 17, 18].map(Duration::from_secs);
        assert_eq!(timers, secs);
        assert_eq!(
            (c.push_burst, c.push_refill, c.push_max_in_flight),
            (19, Duration::from_secs(20), 21)
        );
    }

    #[test]
    fn acme_and_fcm_variables() {
        let creds = tmp_file("sa-env.json", &service_account(r#","project_id":"p1""#));
        let s = ok(
            &[],
            &[
                ("SWITCHYARD_DOMAIN", "relay.example.com"),
                (
                    "SWITCHYARD_ACME_CONTACT",
                    "ops@example.com,mailto:b@example.com",
                ),
                ("SWITCHYARD_ACME_DIRECTORY", "https://ca.internal/dir"),
                ("SWITCHYARD_ACME_HTTP_LISTEN", ":8081"),
                ("SWITCHYARD_ACME_HTTP_PROXY_PROTOCOL", "1"),
                ("SWITCHYARD_CERT_CACHE", "/var/cache/sy"),
                ("SWITCHYARD_FCM_CREDENTIALS", creds.as_str()),
                ("SWITCHYARD_FCM_ENDPOINT", "http://127.0.0.1:7000/"),
                ("SWITCHYARD_FCM_TOKEN_URL", "http://127.0.0.1:7001/token"),
                ("SWITCHYARD_FCM_PROJECT_ID", "p2"),
                ("SWITCHYARD_PUSH_TIMEOUT", "3s"),
            ],
        );
        assert_eq!(
            s.tls,
            Tls::Acme(Acme {
                domains: vec!["relay.example.com".into()],
                contacts: vec![
                    "mailto:ops@example.com".into(),
                    "mailto:b@example.com".into()
                ],
                directory: "https://ca.internal/dir".into(),
                http_listen: Some(ListenAddr::Ip("0.0.0.0:8081".parse().unwrap())),
                http_proxy_protocol: true,
                cert_cache: "/var/cache/sy".into(),
                ca_file: None,
            })
        );
        let push = s.push.unwrap();
        assert!(s.config.push_enabled);
        assert_eq!(push.endpoint, "http://127.0.0.1:7000");
        assert_eq!(push.token_url, "http://127.0.0.1:7001/token");
        assert_eq!(push.project_id, "p2");
        assert_eq!(push.timeout, Duration::from_secs(3));
    }

    // Precedence: flag, SWITCHYARD_*, reference variable, default.

    #[test]
    fn flag_wins_over_variable_item_76() {
        let env = [("SWITCHYARD_MAX_CONNECTIONS", "1")];
        assert_eq!(ok(&[], &env).config.max_connections, 1);
        assert_eq!(
            ok(&["--max-connections", "5"], &env).config.max_connections,
            5
        );
        // A bad variable that a flag overrides is never read.
        let env = [("SWITCHYARD_MAX_CONNECTIONS", "zero")];
        assert_eq!(
            ok(&["--max-connections", "5"], &env).config.max_connections,
            5
        );
        let env = [("SWITCHYARD_LISTEN", "127.0.0.9:1")];
        let s = ok(&["--listen", "127.0.0.1:2"], &env);
        assert_eq!(s.listen.to_string(), "127.0.0.1:2");
    }

    #[test]
    fn production_precedence() {
        let reference = ("PYRYCODE_RELAY_PRODUCTION", "1");
        assert!(!ok(&[], &[]).production);
        assert!(ok(&[], &[reference]).production);
        assert!(!ok(&[], &[reference, ("SWITCHYARD_PRODUCTION", "0")]).production);
        assert!(!ok(&[], &[reference, ("SWITCHYARD_PRODUCTION", "false")]).production);
        assert!(ok(&["--production"], &[("SWITCHYARD_PRODUCTION", "0")]).production);
    }

    #[test]
    fn boolean_variables_take_only_1_true_0_false() {
        for v in ["1", "true"] {
            assert!(ok(&[], &[("SWITCHYARD_PROXY_PROTOCOL", v)]).proxy_protocol);
        }
        for v in ["0", "false"] {
            assert!(!ok(&[], &[("SWITCHYARD_PROXY_PROTOCOL", v)]).proxy_protocol);
        }
        for v in ["", "yes", "TRUE", "2", " 1"] {
            let e = err(&[], &[("SWITCHYARD_TRUST_FORWARDED_FOR", v)]);
            assert_eq!(
                invalid_origin(e),
                var("SWITCHYARD_TRUST_FORWARDED_FOR"),
                "{v:?}"
            );
        }
        // A bare flag takes no value.
        assert!(matches!(err(&["--production=1"], &[]), BootError::Usage(_)));
    }

    #[test]
    fn credentials_precedence() {
        let flag_path = tmp_file(
            "sa-flag.json",
            &service_account(r#","project_id":"from-flag""#),
        );
        let env_path = tmp_file(
            "sa-var.json",
            &service_account(r#","project_id":"from-var""#),
        );
        let inline = service_account(r#","project_id":"from-reference""#);
        let all = [
            ("SWITCHYARD_FCM_CREDENTIALS", env_path.as_str()),
            ("PYRYCODE_RELAY_FCM_CREDENTIALS", inline.as_str()),
        ];
        let project = |s: Settings| s.push.unwrap().project_id;
        assert_eq!(
            project(ok(&["--fcm-credentials", &flag_path], &all)),
            "from-flag"
        );
        assert_eq!(project(ok(&[], &all)), "from-var");
        assert_eq!(project(ok(&[], &all[1..])), "from-reference");
    }

    // Aliases of §14.2.

    #[test]
    fn listen_aliases() {
        let s = ok(&["--https-listen", "127.0.0.1:8443"], &[]);
        assert_eq!(s.listen.to_string(), "127.0.0.1:8443");
        let s = ok(&["--insecure-listen", ":8080"], &[]);
        assert_eq!(s.listen, ListenAddr::Ip("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(s.tls, Tls::Off);
        let s = ok(&[], &[("SWITCHYARD_INSECURE_LISTEN", "127.0.0.1:9")]);
        assert_eq!(s.listen.to_string(), "127.0.0.1:9");
    }

    #[test]
    fn insecure_listen_forbids_tls() {
        let (cert, key) = tls_pair();
        let e = err(
            &[
                "--insecure-listen",
                ":8080",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            &[],
        );
        assert_eq!(
            e,
            BootError::InsecureWithTls {
                origin: flag("--tls-cert")
            }
        );
        let e = err(
            &["--insecure-listen", ":8080"],
            &[("SWITCHYARD_TLS_KEY", key.as_str())],
        );
        assert_eq!(
            e,
            BootError::InsecureWithTls {
                origin: var("SWITCHYARD_TLS_KEY")
            }
        );
        let e = err(
            &["--insecure-listen", ":8080", "--domain", "a.example"],
            &[("SWITCHYARD_DOMAIN", "b.example")],
        );
        assert_eq!(
            e,
            BootError::InsecureWithTls {
                origin: flag("--domain")
            }
        );
        let e = err(
            &["--insecure-listen", ":8080"],
            &[("SWITCHYARD_DOMAIN", "a.example")],
        );
        assert_eq!(
            e,
            BootError::InsecureWithTls {
                origin: var("SWITCHYARD_DOMAIN")
            }
        );
        // An empty list is no list.
        ok(
            &["--insecure-listen", ":8080"],
            &[("SWITCHYARD_DOMAIN", "")],
        );
        let e = err(&["--insecure-listen", ":8080", "--listen", ":8081"], &[]);
        assert_eq!(e, BootError::ListenConflict);
        let env = [
            ("SWITCHYARD_LISTEN", ":1"),
            ("SWITCHYARD_INSECURE_LISTEN", ":2"),
        ];
        assert_eq!(err(&[], &env), BootError::ListenConflict);
        // A flag settles it: the variables are not consulted.
        assert_eq!(ok(&["--listen", ":3"], &env).listen.port(), 3);
    }

    #[test]
    fn other_aliases() {
        assert!(
            ok(&["--trust-x-forwarded-for"], &[])
                .config
                .trust_forwarded_for
        );
        assert!(ok(&["--https-proxy-protocol"], &[]).proxy_protocol);
        let s = ok(
            &["--domain", "a.example", "--http-listen", "0.0.0.0:80"],
            &[("HOME", "/h")],
        );
        let Tls::Acme(acme) = s.tls else {
            panic!("not ACME: {:?}", s.tls)
        };
        assert_eq!(
            acme.http_listen,
            Some(ListenAddr::Ip("0.0.0.0:80".parse().unwrap()))
        );
        assert_eq!(acme.cert_cache, Path::new("/h/.switchyard/certs"));
        assert_eq!(acme.directory, DEFAULT_ACME_DIRECTORY);
    }

    #[test]
    fn acme_ca_file_flag_and_env() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("ca");
        let ca = tmp_file("ca.pem", &ca.cert.pem());
        let acme_of = |s: Settings| match s.tls {
            Tls::Acme(a) => a,
            other => panic!("not ACME: {other:?}"),
        };
        let home = [("HOME", "/h")];
        let a = acme_of(ok(&["--domain", "a.example"], &home));
        assert_eq!(a.ca_file, None, "off by default");
        let a = acme_of(ok(&["--domain", "a.example", "--acme-ca-file", &ca], &home));
        assert_eq!(a.ca_file.as_deref(), Some(Path::new(&ca)));
        let env = [("HOME", "/h"), ("SWITCHYARD_ACME_CA_FILE", ca.as_str())];
        let a = acme_of(ok(&["--domain", "a.example"], &env));
        assert_eq!(a.ca_file.as_deref(), Some(Path::new(&ca)));

        // Outside ACME mode, missing, or holding no certificate: refused.
        let e = err(&["--acme-ca-file", &ca], &home);
        assert_eq!(e, BootError::AcmeCaWithoutAcme);
        assert_eq!(e.reason(), "acme_ca_without_acme");
        let e = err(
            &[
                "--domain",
                "a.example",
                "--acme-ca-file",
                "/nonexistent/ca.pem",
            ],
            &home,
        );
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--acme-ca-file"),
                problem: TlsFileProblem::Unreadable
            }
        );
        let key = tmp_file(
            "key.pem",
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        );
        let e = err(
            &["--domain", "a.example"],
            &[("HOME", "/h"), ("SWITCHYARD_ACME_CA_FILE", key.as_str())],
        );
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: var("SWITCHYARD_ACME_CA_FILE"),
                problem: TlsFileProblem::NotPem
            }
        );
        assert!(e.fix().contains("PEM CA certificates"), "{}", e.fix());
        let junk = tmp_file(
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = err(&["--domain", "a.example", "--acme-ca-file", &junk], &home);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--acme-ca-file"),
                problem: TlsFileProblem::BadCertificate
            }
        );
    }

    // Boot refusals of §14.3.

    #[test]
    fn counts_below_one_are_refused_item_74() {
        for f in [
            "--max-connections",
            "--max-connections-per-ip",
            "--max-phones-per-server",
            "--rate-burst",
            "--push-burst",
            "--push-max-in-flight",
            "--workers",
        ] {
            for v in ["0", "-1", "+1", "1.5", "", "ten", "99999999999999999999"] {
                let e = err(&[&format!("{f}={v}")], &[]);
                assert_eq!(invalid_origin(e), flag(f), "{f}={v}");
            }
        }
        assert_eq!(
            ok(&["--max-connections", "1"], &[]).config.max_connections,
            1
        );
        // u32 range.
        let e = err(&["--max-connections=4294967296"], &[]);
        assert_eq!(invalid_origin(e), flag("--max-connections"));
    }

    #[test]
    fn zero_durations_only_for_grace_and_drain_delay() {
        for f in [
            "--rate-refill",
            "--ping-interval",
            "--pong-timeout",
            "--read-timeout",
            "--header-timeout",
            "--write-timeout",
            "--probe-timeout",
            "--close-timeout",
            "--drain-timeout",
            "--push-refill",
            "--push-timeout",
        ] {
            for v in ["0s", "0ms", "0m", "30", "1h", "-1s", "1.5s", "s"] {
                let e = err(&[&format!("{f}={v}")], &[]);
                assert_eq!(invalid_origin(e), flag(f), "{f} {v}");
            }
        }
        let s = ok(&["--grace", "0s", "--drain-delay", "0ms"], &[]);
        assert_eq!(
            (s.config.grace, s.config.drain_delay),
            (Duration::ZERO, Duration::ZERO)
        );
        let e = err(&[], &[("SWITCHYARD_PING_INTERVAL", "0s")]);
        assert_eq!(invalid_origin(e), var("SWITCHYARD_PING_INTERVAL"));
    }

    #[test]
    fn sizes_must_be_positive() {
        for f in [
            "--max-message-size",
            "--max-head-size",
            "--phone-outbox-bytes",
            "--binary-outbox-bytes",
        ] {
            for v in ["0", "0KiB", "1KB", "1kib", "1 KiB", "-1", "1.5MiB", "MiB"] {
                let e = err(&[&format!("{f}={v}")], &[]);
                assert_eq!(invalid_origin(e), flag(f), "{f} {v}");
            }
        }
    }

    #[test]
    fn runtime_and_log_format_sets() {
        assert_eq!(ok(&["--runtime", "smol"], &[]).runtime, Runtime::Smol);
        assert_eq!(ok(&["--runtime=tokio"], &[]).runtime, Runtime::Tokio);
        assert_eq!(
            ok(&["--log-format", "json"], &[]).log_format,
            LogFormat::Json
        );
        assert_eq!(
            invalid_origin(err(&["--runtime", "async-std"], &[])),
            flag("--runtime")
        );
        assert_eq!(
            invalid_origin(err(&["--runtime", "Tokio"], &[])),
            flag("--runtime")
        );
        assert_eq!(
            invalid_origin(err(&["--log-format", "logfmt"], &[])),
            flag("--log-format")
        );
        let e = err(&[], &[("SWITCHYARD_LOG_FORMAT", "JSON")]);
        assert_eq!(invalid_origin(e), var("SWITCHYARD_LOG_FORMAT"));
    }

    #[test]
    fn unknown_repeated_and_stray_arguments() {
        let e = err(&["--max-conections", "5"], &[]);
        assert_eq!(e, BootError::Usage("unknown flag --max-conections".into()));
        // The value after `=` is never echoed.
        let e = err(&["--fcm-credential=s3cret"], &[]);
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = err(&["s3cret"], &[]);
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(matches!(
            err(&["--listen", ":1", "--listen", ":2"], &[]),
            BootError::Usage(_)
        ));
        assert!(matches!(err(&["--listen"], &[]), BootError::Usage(_)));
    }

    #[test]
    fn metrics_address_must_be_an_ip_literal_item_74() {
        for v in [
            "localhost:9090",
            "metrics.internal:9090",
            "127.0.0.1",
            "127.0.0.1:0",
            ":9090",
            "127.0.0.1:65536",
        ] {
            let e = err(&["--metrics-listen", v], &[]);
            assert_eq!(invalid_origin(e), flag("--metrics-listen"), "{v}");
        }
        assert_eq!(ok(&["--metrics-listen", ""], &[]).metrics_listen, None);
        assert_eq!(
            ok(&[], &[("SWITCHYARD_METRICS_LISTEN", "")]).metrics_listen,
            None
        );
        let s = ok(&["--metrics-listen=0.0.0.0:9100"], &[]);
        assert_eq!(s.metrics_listen, Some("0.0.0.0:9100".parse().unwrap()));
    }

    #[test]
    fn listener_ports_must_be_1_to_65535() {
        for v in [
            "127.0.0.1:0",
            ":0",
            "host:0",
            "host:65536",
            "host",
            "",
            "a b:80",
            "[::1]",
        ] {
            let e = err(&["--listen", v], &[]);
            assert_eq!(invalid_origin(e), flag("--listen"), "{v:?}");
        }
        let e = err(
            &["--domain", "a.example", "--acme-http-listen", ":0"],
            &[("HOME", "/h")],
        );
        assert_eq!(invalid_origin(e), flag("--acme-http-listen"));
    }

    #[test]
    fn tls_pair_is_both_or_neither_item_74() {
        let (cert, key) = tls_pair();
        let e = err(&["--tls-cert", &cert], &[]);
        assert_eq!(
            e,
            BootError::TlsPairIncomplete {
                given: flag("--tls-cert"),
                missing: "--tls-key"
            }
        );
        assert_eq!(
            e.to_string(),
            "--tls-cert is given without --tls-key; give --tls-key as well, or neither"
        );
        let e = err(&[], &[("SWITCHYARD_TLS_KEY", key.as_str())]);
        assert_eq!(
            e,
            BootError::TlsPairIncomplete {
                given: var("SWITCHYARD_TLS_KEY"),
                missing: "--tls-cert"
            }
        );
        assert_eq!(e.env_var(), Some("SWITCHYARD_TLS_KEY"));
        let e = err(&["--tls-key", &key], &[("SWITCHYARD_TLS_CERT", "")]);
        assert_eq!(invalid_origin(e), var("SWITCHYARD_TLS_CERT"));
        let s = ok(&["--tls-cert", &cert, "--tls-key", &key], &[]);
        assert_eq!(
            s.tls,
            Tls::Files {
                cert: cert.clone().into(),
                key: key.clone().into()
            }
        );
    }

    #[test]
    fn tls_pair_must_load_and_match() {
        let (cert, key) = tls_pair();
        let (_, other_key) = tls_pair();
        let e = err(&["--tls-cert", &cert, "--tls-key", &other_key], &[]);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--tls-key"),
                problem: TlsFileProblem::KeyMismatch
            }
        );
        assert_eq!(
            e.to_string(),
            "the private key named by --tls-key does not belong to the certificate named by \
             --tls-cert; give the key the certificate was issued for"
        );
        assert!(!e.to_string().contains(&other_key));
        let e = err(
            &[],
            &[
                ("SWITCHYARD_TLS_CERT", &cert),
                ("SWITCHYARD_TLS_KEY", &other_key),
            ],
        );
        assert_eq!(e.env_var(), Some("SWITCHYARD_TLS_KEY"));
        let garbage = tmp_file(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let e = err(&["--tls-cert", &garbage, "--tls-key", &key], &[]);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--tls-cert"),
                problem: TlsFileProblem::BadCertificate
            }
        );
        let bad_key = tmp_file(
            "bad-key.pem",
            "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
        );
        let e = err(&["--tls-cert", &cert, "--tls-key", &bad_key], &[]);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--tls-key"),
                problem: TlsFileProblem::UnsupportedKey
            }
        );
        // Half-written: the certificate cut inside its PEM block.
        let text = std::fs::read_to_string(&cert).unwrap();
        let half = tmp_file("half.pem", &text[..text.len() / 2]);
        let e = err(&["--tls-cert", &half, "--tls-key", &key], &[]);
        assert_eq!(e.reason(), "tls_file");
    }

    #[test]
    fn tls_files_must_be_readable_pem() {
        let (cert, key) = tls_pair();
        let missing = "/nonexistent/switchyard/cert.pem";
        let e = err(&["--tls-cert", missing, "--tls-key", &key], &[]);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--tls-cert"),
                problem: TlsFileProblem::Unreadable
            }
        );
        // A key where the certificate should be, and the other way round.
        let e = err(&["--tls-cert", &key, "--tls-key", &key], &[]);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--tls-cert"),
                problem: TlsFileProblem::NotPem
            }
        );
        let e = err(&["--tls-cert", &cert, "--tls-key", &cert], &[]);
        assert_eq!(
            e,
            BootError::TlsFile {
                origin: flag("--tls-key"),
                problem: TlsFileProblem::NotPem
            }
        );
    }

    #[test]
    fn reference_variables_must_be_exactly_1_item_74() {
        for name in [
            "PYRYCODE_RELAY_PRODUCTION",
            "PYRYCODE_RELAY_SINGLE_INSTANCE",
        ] {
            for v in ["true", "", "0", "yes", "1 ", "01"] {
                let e = err(&[], &[(name, v)]);
                assert_eq!(e, BootError::ReferenceVar { var: name }, "{name}={v:?}");
                assert_eq!(e.env_var(), Some(name));
            }
        }
        // Checked even when a flag or SWITCHYARD_* would override it.
        let e = err(&["--production"], &[("PYRYCODE_RELAY_PRODUCTION", "true")]);
        assert_eq!(
            e,
            BootError::ReferenceVar {
                var: "PYRYCODE_RELAY_PRODUCTION"
            }
        );
        ok(&[], &[("PYRYCODE_RELAY_SINGLE_INSTANCE", "1")]);
    }

    #[test]
    fn fly_needs_single_instance_item_74() {
        let e = err(&[], &[("FLY_APP_NAME", "relay")]);
        assert_eq!(e, BootError::FlyWithoutSingleInstance);
        ok(
            &[],
            &[
                ("FLY_APP_NAME", "relay"),
                ("PYRYCODE_RELAY_SINGLE_INSTANCE", "1"),
            ],
        );
        ok(&[], &[("FLY_APP_NAME", "")]);
    }

    #[test]
    fn production_refuses_plain_non_loopback_listener_item_74() {
        for listen in [
            "0.0.0.0:8080",
            ":8080",
            "10.0.0.1:8080",
            "relay.internal:8080",
        ] {
            let e = err(&["--production", "--listen", listen], &[]);
            assert!(
                matches!(
                    e,
                    BootError::Production(ProductionRefusal::PlainNonLoopback { .. })
                ),
                "{listen}: {e:?}"
            );
        }
        let e = err(
            &["--insecure-listen", ":8080"],
            &[("PYRYCODE_RELAY_PRODUCTION", "1")],
        );
        assert_eq!(e.reason(), "production_plain_listener");
        // Loopback, TLS files, or ACME are fine.
        ok(&["--production", "--listen", "127.0.0.1:8080"], &[]);
        ok(&["--production", "--listen", "[::1]:8080"], &[]);
        let (cert, key) = tls_pair();
        ok(
            &[
                "--production",
                "--listen",
                "0.0.0.0:8443",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            &[],
        );
        ok(
            &[
                "--production",
                "--listen",
                "0.0.0.0:443",
                "--domain",
                "a.example",
            ],
            &[("HOME", "/h")],
        );
        // Without production a plain public listener is allowed (§17 row 17).
        ok(&["--listen", "0.0.0.0:8080"], &[]);
    }

    #[test]
    fn production_refuses_non_loopback_metrics() {
        let e = err(&["--production", "--metrics-listen", "0.0.0.0:9090"], &[]);
        assert_eq!(
            e,
            BootError::Production(ProductionRefusal::MetricsNotLoopback)
        );
        ok(&["--production", "--metrics-listen", ""], &[]);
        ok(&["--metrics-listen", "0.0.0.0:9090"], &[]);
    }

    #[test]
    fn production_refuses_root_and_extra_capabilities_item_74() {
        let root = ProcessIdentity {
            euid: Some(0),
            effective_caps: Some(u64::MAX >> 23),
        };
        let e = parse_with(&["--production"], &[], root).unwrap_err();
        assert_eq!(e, BootError::Production(ProductionRefusal::Root));
        let caps = ProcessIdentity {
            euid: Some(1000),
            effective_caps: Some(CAP_NET_BIND_SERVICE | 1),
        };
        let e = parse_with(&["--production"], &[], caps).unwrap_err();
        assert_eq!(e, BootError::Production(ProductionRefusal::Capabilities));
        let bind_only = ProcessIdentity {
            euid: Some(1000),
            effective_caps: Some(CAP_NET_BIND_SERVICE),
        };
        parse_with(&["--production"], &[], bind_only).unwrap();
        let unknown = ProcessIdentity {
            euid: None,
            effective_caps: None,
        };
        let e = parse_with(&["--production"], &[], unknown).unwrap_err();
        assert_eq!(e, BootError::Production(ProductionRefusal::IdentityUnknown));
        // Root is fine outside production (§17 row 17); the identity is not even read.
        parse_with(&[], &[], root).unwrap();
    }

    #[test]
    fn process_identity_from_proc_status() {
        let status = "Name:\tswitchyard\nUid:\t1000\t1001\t1000\t1000\nGid:\t1\t1\t1\t1\n\
                      CapEff:\t0000000000000400\n";
        let id = ProcessIdentity::from_proc_status(status);
        assert_eq!(
            id,
            ProcessIdentity {
                euid: Some(1001),
                effective_caps: Some(1 << 10)
            }
        );
        assert_eq!(
            ProcessIdentity::from_proc_status(""),
            ProcessIdentity {
                euid: None,
                effective_caps: None
            }
        );
        // The real one parses on Linux.
        if cfg!(target_os = "linux") {
            assert!(ProcessIdentity::current().euid.is_some());
        }
    }

    #[test]
    fn acme_http_listen_needs_acme_mode() {
        let e = err(&["--acme-http-listen", ":80"], &[]);
        assert_eq!(e, BootError::AcmeHttpWithoutAcme);
        let (cert, key) = tls_pair();
        let args = [
            "--domain",
            "a.example",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--http-listen",
            ":80",
        ];
        assert_eq!(err(&args, &[]), BootError::AcmeHttpWithoutAcme);
        // "" is off.
        ok(&["--acme-http-listen", ""], &[]);
    }

    #[test]
    fn acme_mode_needs_a_cert_cache() {
        assert_eq!(
            err(&["--domain", "a.example"], &[]),
            BootError::CertCacheUnset
        );
        assert_eq!(
            err(&["--domain", "a.example"], &[("HOME", "")]),
            BootError::CertCacheUnset
        );
        let s = ok(&["--domain", "a.example", "--cert-cache", "/c"], &[]);
        let Tls::Acme(acme) = s.tls else { panic!() };
        assert_eq!(acme.cert_cache, Path::new("/c"));
        let e = err(&["--acme-directory", "ftp://x"], &[]);
        assert_eq!(invalid_origin(e), flag("--acme-directory"));
    }

    #[test]
    fn domains_repeat_split_lower_case_and_dedupe() {
        let (cert, key) = tls_pair();
        let s = ok(
            &[
                "--domain",
                "A.example,b.example",
                "--domain",
                "c.EXAMPLE",
                "--domain=a.example",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            &[("SWITCHYARD_DOMAIN", "ignored.example")],
        );
        assert_eq!(s.config.domains, ["a.example", "b.example", "c.example"]);
        assert!(matches!(s.tls, Tls::Files { .. }));
        for bad in [
            "a.example,",
            "a..example",
            "a.example:443",
            "*.example",
            "-a.example",
            "a b",
        ] {
            let e = err(&[&format!("--domain={bad}")], &[("HOME", "/h")]);
            assert_eq!(invalid_origin(e), flag("--domain"), "{bad}");
        }
    }

    #[test]
    fn node_id_values() {
        assert_eq!(
            ok(&["--node-id", "eu-1.a_b"], &[]).node_id.as_deref(),
            Some("eu-1.a_b")
        );
        assert_eq!(ok(&["--node-id", ""], &[]).node_id, None);
        for bad in ["a b", "a\"b", "ä", &"n".repeat(65)] {
            assert_eq!(
                invalid_origin(err(&["--node-id", bad], &[])),
                flag("--node-id"),
                "{bad}"
            );
        }
    }

    // Push credentials (§14.3 item 7).

    #[test]
    fn valid_credentials_turn_push_on() {
        let path = tmp_file(
            "sa-ok.json",
            &service_account(r#","project_id":"proj","token_uri":"https://tok.example/t""#),
        );
        let s = ok(&["--fcm-credentials", &path], &[]);
        assert!(s.config.push_enabled);
        let push = s.push.unwrap();
        assert_eq!(push.project_id, "proj");
        assert_eq!(push.token_url, "https://tok.example/t");
        assert_eq!(push.endpoint, DEFAULT_FCM_ENDPOINT);
        assert_eq!(push.timeout, DEFAULT_PUSH_TIMEOUT);
        assert_eq!(
            push.credentials.client_email,
            "relay@p.iam.gserviceaccount.com"
        );
        assert_eq!(push.credentials.private_key_id.as_deref(), Some("kid1"));
        assert!(
            push.credentials
                .private_key
                .expose()
                .contains(key_material())
        );
        assert!(!format!("{push:?}").contains(key_material()));
        // Flags override what the key says.
        let s = ok(
            &[
                "--fcm-credentials",
                &path,
                "--fcm-project-id",
                "other",
                "--fcm-token-url",
                "http://127.0.0.1:1/t",
            ],
            &[],
        );
        let push = s.push.unwrap();
        assert_eq!(
            (push.project_id.as_str(), push.token_url.as_str()),
            ("other", "http://127.0.0.1:1/t")
        );
        // Without token_uri: the Google default.
        let path = tmp_file(
            "sa-no-uri.json",
            &service_account(r#","project_id":"proj""#),
        );
        assert_eq!(
            ok(&["--fcm-credentials", &path], &[])
                .push
                .unwrap()
                .token_url,
            DEFAULT_FCM_TOKEN_URL
        );
    }

    #[test]
    fn invalid_credentials_are_refused_without_echo_item_74() {
        let secret = key_material();
        let cases: Vec<(String, CredentialsProblem)> = vec![
            (
                format!("not json {secret}"),
                CredentialsProblem::NotJsonObject,
            ),
            (format!("[\"{secret}\"]"), CredentialsProblem::NotJsonObject),
            (
                service_account(r#","project_id":"p""#)
                    .replace("service_account", "authorized_user"),
                CredentialsProblem::NotServiceAccount,
            ),
            (
                service_account(r#","project_id":"p""#)
                    .replace("relay@p.iam.gserviceaccount.com", ""),
                CredentialsProblem::NoClientEmail,
            ),
            (
                service_account(r#","project_id":"p""#).replace("PRIVATE KEY", "CERTIFICATE"),
                CredentialsProblem::BadPrivateKey,
            ),
            // PEM armour around something that is not an RSA key.
            (
                service_account(r#","project_id":"p""#).replace(
                    secret,
                    &format!("{}{secret}", "A".repeat(4))
                        .chars()
                        .take(secret.len())
                        .collect::<String>(),
                ),
                CredentialsProblem::BadPrivateKey,
            ),
            (
                service_account(r#","project_id":"p""#).replace(
                    &serde_json::Value::from(TEST_KEY).to_string(),
                    &serde_json::Value::from(include_str!(
                        "../../push/testdata/test-only-key-ec.pem"
                    ))
                    .to_string(),
                ),
                CredentialsProblem::BadPrivateKey,
            ),
            (service_account(""), CredentialsProblem::NoProjectId),
            (
                service_account(r#","project_id":"""#),
                CredentialsProblem::NoProjectId,
            ),
        ];
        for (text, problem) in cases {
            let e = err(&[], &[("PYRYCODE_RELAY_FCM_CREDENTIALS", text.as_str())]);
            assert_eq!(
                e,
                BootError::Credentials {
                    origin: var("PYRYCODE_RELAY_FCM_CREDENTIALS"),
                    problem
                },
                "{text}"
            );
            assert!(!e.to_string().contains(secret), "{e}");
            assert!(!format!("{e:?}").contains(secret), "{e:?}");
            assert_eq!(e.env_var(), Some("PYRYCODE_RELAY_FCM_CREDENTIALS"));
        }
        let e = err(&[], &[("PYRYCODE_RELAY_FCM_CREDENTIALS", "")]);
        assert!(matches!(
            e,
            BootError::Credentials {
                problem: CredentialsProblem::NotJsonObject,
                ..
            }
        ));
        let e = err(&["--fcm-credentials", "/nonexistent/sa.json"], &[]);
        assert_eq!(
            e,
            BootError::Credentials {
                origin: flag("--fcm-credentials"),
                problem: CredentialsProblem::Unreadable
            }
        );
        // A project id from the flag rescues a key without one.
        let path = tmp_file("sa-no-project.json", &service_account(""));
        ok(&["--fcm-credentials", &path, "--fcm-project-id", "p"], &[]);
    }

    #[test]
    fn bad_fcm_urls_are_refused() {
        assert_eq!(
            invalid_origin(err(&["--fcm-endpoint", "fcm.googleapis.com"], &[])),
            flag("--fcm-endpoint")
        );
        let e = err(&[], &[("SWITCHYARD_FCM_TOKEN_URL", "https://")]);
        assert_eq!(invalid_origin(e), var("SWITCHYARD_FCM_TOKEN_URL"));
    }

    // Value syntax.

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("007s"), Some(Duration::from_secs(7)));
        for bad in [
            "", "30", "s", "1.5s", "-1s", "+1s", "1 s", "1S", "1sec", "1h", "1us", "1m30s", " 1s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration(&format!("{}m", u64::MAX)), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16384"), Some(16384));
        assert_eq!(parse_size("16KiB"), Some(16384));
        assert_eq!(parse_size("4MiB"), Some(4 << 20));
        assert_eq!(parse_size("0"), Some(0));
        for bad in [
            "", "KiB", "1KB", "1kib", "1MB", "1GiB", "1.5KiB", "-1", "1 KiB", "1KiBs",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
        assert_eq!(parse_size(&format!("{}MiB", u64::MAX)), None);
    }

    #[test]
    fn listen_addresses() {
        let ip = |s: &str| Some(ListenAddr::Ip(s.parse().unwrap()));
        assert_eq!(ListenAddr::parse("127.0.0.1:8080"), ip("127.0.0.1:8080"));
        assert_eq!(ListenAddr::parse("[::1]:8080"), ip("[::1]:8080"));
        assert_eq!(ListenAddr::parse(":8080"), ip("0.0.0.0:8080"));
        assert_eq!(
            ListenAddr::parse("localhost:8080"),
            Some(ListenAddr::Host {
                host: "localhost".into(),
                port: 8080
            })
        );
        assert!(ListenAddr::parse("[::1]:8080").unwrap().is_loopback());
        assert!(
            ListenAddr::parse("[::ffff:127.0.0.1]:8080")
                .unwrap()
                .is_loopback()
        );
        assert!(!ListenAddr::parse("localhost:8080").unwrap().is_loopback());
        for bad in [
            "", "8080", ":", "::1:8080", "host:", "host:x", "ho st:80", "host:+80",
        ] {
            assert_eq!(ListenAddr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn log_format_hint() {
        let none = |_: &str| None;
        assert_eq!(
            LogFormat::hint(["sy", "--log-format", "json"], none),
            LogFormat::Json
        );
        assert_eq!(
            LogFormat::hint(["sy", "--log-format=json"], none),
            LogFormat::Json
        );
        assert_eq!(
            LogFormat::hint(["sy"], |_: &str| Some("json".to_owned())),
            LogFormat::Json
        );
        assert_eq!(
            LogFormat::hint(["sy", "--log-format=bad"], none),
            LogFormat::Text
        );
    }

    #[test]
    fn errors_name_the_source_and_the_fix() {
        let e = err(&["--max-connections", "0"], &[]);
        assert_eq!(
            e.to_string(),
            "invalid value for --max-connections; expected a whole number of at least 1"
        );
        let e = err(&[], &[("SWITCHYARD_MAX_CONNECTIONS", "0")]);
        assert!(
            e.to_string()
                .starts_with("invalid value for SWITCHYARD_MAX_CONNECTIONS;")
        );
        assert_eq!(e.env_var(), Some("SWITCHYARD_MAX_CONNECTIONS"));
        let e = err(&["--metrics-listen", "localhost:9090"], &[]);
        assert!(e.to_string().contains("host names are refused"), "{e}");
        let e = err(&[], &[("PYRYCODE_RELAY_PRODUCTION", "true")]);
        assert_eq!(
            e.to_string(),
            "PYRYCODE_RELAY_PRODUCTION is set to something other than 1; unset \
             PYRYCODE_RELAY_PRODUCTION or set it to exactly 1"
        );
        // Values are not echoed.
        let e = err(&[], &[("SWITCHYARD_NODE_ID", "has space")]);
        assert!(!e.to_string().contains("has space"), "{e}");
    }
}
