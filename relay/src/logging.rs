//! Log lines on stderr (PROTOCOL.md §15): one event per line, `text` as `key=value` pairs or
//! `json` as one object, keys `time`, `level`, `msg`, then `node` when set, then the event's
//! fields in the order given.
//!
//! # Convention
//!
//! The event name is the message, the fields carry the rest:
//!
//! ```
//! # let (sid, id) = ("abc", "server-abc-0f3a9c21");
//! tracing::info!(server_id = %sid, conn_id = %id, "server_claimed");
//! ```
//!
//! writes `time=… level=info msg=server_claimed server_id=abc conn_id=server-abc-0f3a9c21`.
//! A field spelled `msg = "server_claimed"` is read the same way, so both forms are safe.
//!
//! Hygiene is enforced here, not at each call site: only keys in [`FIELDS`] are written (any
//! other field is dropped unformatted, so a stray `token` can never leak); a message that is not a
//! snake_case name (free text from a library, say) is written as `msg=unnamed_event`; span
//! fields are not written. Events from other crates pass only at `warn` and above.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;

use crate::cli::{BootError, LogFormat};

/// The field keys that may appear in a log line (§15).
pub const FIELDS: &[&str] = &[
    "server_id",
    "conn_id",
    "binary_conn_id",
    "device_name",
    "remote",
    "binary_version",
    "close_code",
    "reason",
    "kind",
    "outcome",
    "path",
    "err",
    "token_fp",
    "fcm_message_id",
    "duration",
    "from",
    "to",
    "version",
    "listen",
    "mode",
    "runtime",
    "workers",
    "addr",
    "env_var",
    "fix",
    "node",
];

/// The event names of §15, and the three of ACME mode (§15 names none for it; see
/// `docs/decisions.md`, M8).
pub const EVENTS: &[&str] = &[
    "server_claimed",
    "server_id_conflict",
    "server_id_takeover",
    "server_released",
    "grace_expired",
    "phone_registered",
    "phone_register_no_server",
    "phone_register_at_cap",
    "phone_unregistered",
    "frame_dropped",
    "rate_limited",
    "conn_cap_reached",
    "push_wake_sent",
    "push_wake_send_failed",
    "push_wake_dropped",
    "rebalance",
    "listening",
    "shutdown_started",
    "shutdown_complete",
    "drain_incomplete",
    "refusing_to_start",
    "acme_certificate",
    "acme_failed",
    "acme_cert_cache",
];

/// Written as `msg` for an event whose message is not a snake_case name.
pub const UNNAMED_EVENT: &str = "unnamed_event";

pub use switchyard_core::{BINARY_VERSION_MAX, DEVICE_NAME_MAX, loggable as sanitize};

/// Client-supplied fields are sanitised here too, whoever emitted them (§15).
fn sanitized(key: &str, value: String) -> String {
    match key {
        "device_name" => sanitize(&value, DEVICE_NAME_MAX),
        "binary_version" => sanitize(&value, BINARY_VERSION_MAX),
        _ => value,
    }
}

/// The event formatter of both formats.
#[derive(Debug, Clone)]
pub struct LineFormat {
    format: LogFormat,
    node: Option<String>,
    clock: fn() -> SystemTime,
}

impl LineFormat {
    pub fn new(format: LogFormat, node: Option<&str>) -> LineFormat {
        LineFormat {
            format,
            node: node.map(str::to_owned),
            clock: SystemTime::now,
        }
    }

    /// Replaces the wall clock that stamps `time` (for tests).
    pub fn with_clock(self, clock: fn() -> SystemTime) -> LineFormat {
        LineFormat { clock, ..self }
    }

    /// Formats one event as a complete line, newline included.
    fn line(&self, level: &Level, event: &Event<'_>) -> String {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let msg = match fields.msg {
            Some(m) if is_event_name(&m) => m,
            _ => UNNAMED_EVENT.to_owned(),
        };
        let time = rfc3339(
            ((self.clock)())
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let level = level_name(level);
        let mut pairs: Vec<(&str, Value)> = vec![
            ("time", Value::Str(time)),
            ("level", Value::Str(level.to_owned())),
            ("msg", Value::Str(msg)),
        ];
        if let Some(node) = &self.node {
            pairs.push(("node", Value::Str(node.clone())));
        }
        pairs.extend(fields.pairs);

        let mut out = String::with_capacity(160);
        match self.format {
            LogFormat::Text => {
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(key);
                    out.push('=');
                    value.write_text(&mut out);
                }
            }
            LogFormat::Json => {
                out.push('{');
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(&mut out, key);
                    out.push(':');
                    value.write_json(&mut out);
                }
                out.push('}');
            }
        }
        out.push('\n');
        out
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(&self.line(event.metadata().level(), event))
    }
}

/// A subscriber writing `format` lines to `writer`: this crate, the core and push at `info` and
/// above, everything else at `warn` and above.
pub fn subscriber<W>(line: LineFormat, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = Targets::new()
        .with_target("switchyard", Level::INFO)
        .with_target("switchyard_core", Level::INFO)
        .with_target("switchyard_push", Level::INFO)
        .with_default(Level::WARN);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(line)
                .with_writer(writer),
        )
        .with(filter)
}

/// Installs the process-wide subscriber writing to stderr. Fails only if one is already set.
pub fn init(
    format: LogFormat,
    node: Option<&str>,
) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    tracing::subscriber::set_global_default(subscriber(
        LineFormat::new(format, node),
        std::io::stderr,
    ))
}

/// Logs the `refusing_to_start` event for `err` (§14.3, §15).
pub fn refusing_to_start(err: &BootError) {
    tracing::error!(
        reason = err.reason(),
        env_var = err.env_var(),
        err = %err.problem(),
        fix = %err.fix(),
        "refusing_to_start"
    );
}

enum Value {
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
}

impl Value {
    fn write_text(&self, out: &mut String) {
        match self {
            Value::Str(s) => {
                let bare = !s.is_empty()
                    && s.bytes()
                        .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b'=' | b'\\'));
                if bare {
                    out.push_str(s);
                } else {
                    write_json_string(out, s);
                }
            }
            Value::U64(n) => {
                let _ = write!(out, "{n}");
            }
            Value::I64(n) => {
                let _ = write!(out, "{n}");
            }
            Value::F64(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Bool(b) => {
                let _ = write!(out, "{b}");
            }
        }
    }

    fn write_json(&self, out: &mut String) {
        match self {
            Value::Str(s) => write_json_string(out, s),
            Value::F64(n) if !n.is_finite() => write_json_string(out, &n.to_string()),
            Value::U64(_) | Value::I64(_) | Value::F64(_) | Value::Bool(_) => self.write_text(out),
        }
    }
}

fn write_json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a str always serialises"));
}

/// The event's message (or `msg` field) and its allowlisted fields.
#[derive(Default)]
struct Fields {
    msg: Option<String>,
    pairs: Vec<(&'static str, Value)>,
}

impl Fields {
    /// The allowlisted key of `field`, or `None` to drop it. `node` comes from the settings only.
    fn key(field: &Field) -> Option<&'static str> {
        let name = field.name();
        (name != "node" && FIELDS.contains(&name)).then_some(name)
    }

    fn is_msg(field: &Field) -> bool {
        matches!(field.name(), "message" | "msg")
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Fields::is_msg(field) {
            self.msg.get_or_insert_with(|| value.to_owned());
        } else if let Some(key) = Fields::key(field) {
            self.pairs
                .push((key, Value::Str(sanitized(key, value.to_owned()))));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if Fields::is_msg(field) {
            self.msg.get_or_insert_with(|| format!("{value:?}"));
        } else if let Some(key) = Fields::key(field) {
            self.pairs
                .push((key, Value::Str(sanitized(key, format!("{value:?}")))));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if let Some(key) = Fields::key(field) {
            self.pairs.push((key, Value::U64(value)));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Some(key) = Fields::key(field) {
            self.pairs.push((key, Value::I64(value)));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if let Some(key) = Fields::key(field) {
            self.pairs.push((key, Value::F64(value)));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if let Some(key) = Fields::key(field) {
            self.pairs.push((key, Value::Bool(value)));
        }
    }
}

/// A snake_case name: a lower-case letter, then lower-case letters, digits and `_`, ≤ 64 bytes.
fn is_event_name(s: &str) -> bool {
    s.len() <= 64
        && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// `since_epoch` as RFC 3339 UTC with milliseconds, e.g. `2026-05-01T12:00:00.123Z`.
pub fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// 2026-05-01T12:34:56.789Z
    fn fixed_clock() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_777_638_896_789)
    }

    fn capture(format: LogFormat, node: Option<&str>, emit: impl FnOnce()) -> String {
        let buf = Buf::default();
        let line = LineFormat::new(format, node).with_clock(fixed_clock);
        tracing::subscriber::with_default(subscriber(line, buf.clone()), emit);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn clock_and_calendar() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(1_777_638_896_789)),
            "2026-05-01T12:34:56.789Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(4_107_542_399)),
            "2100-02-28T23:59:59.000Z"
        );
    }

    #[test]
    fn text_lines_follow_the_message_convention() {
        let out = capture(LogFormat::Text, None, || {
            let sid = "abc";
            tracing::info!(server_id = %sid, conn_id = "server-abc-0f3a9c21", "server_claimed");
        });
        assert_eq!(
            out,
            "time=2026-05-01T12:34:56.789Z level=info msg=server_claimed server_id=abc \
             conn_id=server-abc-0f3a9c21\n"
        );
    }

    #[test]
    fn json_lines_have_the_same_keys_in_order() {
        let out = capture(LogFormat::Json, None, || {
            tracing::warn!(path = "/v1/client", remote = "192.0.2.7", "rate_limited");
        });
        assert_eq!(
            out,
            "{\"time\":\"2026-05-01T12:34:56.789Z\",\"level\":\"warn\",\"msg\":\"rate_limited\",\
             \"path\":\"/v1/client\",\"remote\":\"192.0.2.7\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["msg"], "rate_limited");
    }

    #[test]
    fn msg_field_is_read_as_the_event_name() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = capture(format, None, || {
                tracing::info!(
                    msg = "phone_registered",
                    conn_id = "client-abc-0123456789abcdef"
                );
            });
            assert!(out.contains("phone_registered"), "{out}");
            assert_eq!(out.matches("phone_registered").count(), 1, "{out}");
        }
    }

    #[test]
    fn numbers_and_booleans_are_bare_in_both_formats() {
        let text = capture(LogFormat::Text, None, || {
            tracing::info!(close_code = 4404u64, workers = 4i64, "phone_unregistered");
        });
        assert!(
            text.ends_with("msg=phone_unregistered close_code=4404 workers=4\n"),
            "{text}"
        );
        let json = capture(LogFormat::Json, None, || {
            tracing::info!(close_code = 4404u64, workers = 4i64, "phone_unregistered");
        });
        assert!(
            json.ends_with("\"close_code\":4404,\"workers\":4}\n"),
            "{json}"
        );
    }

    #[test]
    fn values_with_spaces_or_quotes_are_quoted() {
        let out = capture(LogFormat::Text, None, || {
            let name = sanitize("Bob's \"phone\"\n", DEVICE_NAME_MAX);
            tracing::info!(device_name = %name, err = "", reason = "a=b", "phone_registered");
        });
        assert!(
            out.ends_with(
                "msg=phone_registered device_name=\"Bob's \\\"phone\\\"?\" err=\"\" reason=\"a=b\"\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn fields_outside_the_allowlist_never_appear() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = capture(format, None, || {
                let secret = "s3cr3t-token-value";
                tracing::info!(
                    token = secret,
                    user_agent = %secret,
                    frame = ?secret,
                    server_id = "abc",
                    "phone_registered"
                );
            });
            assert!(!out.contains("s3cr3t"), "{out}");
            assert!(!out.contains("token"), "{out}");
            assert!(!out.contains("user_agent"), "{out}");
            assert!(out.contains("abc"), "{out}");
        }
    }

    #[test]
    fn free_text_messages_are_not_written() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = capture(format, None, || {
                let token = "s3cr3t";
                tracing::error!("could not send with token {token}");
            });
            assert!(!out.contains("s3cr3t"), "{out}");
            assert!(out.contains(UNNAMED_EVENT), "{out}");
        }
    }

    #[test]
    fn node_is_added_from_the_settings_only() {
        let text = capture(LogFormat::Text, Some("n1"), || {
            tracing::info!(node = "forged", listen = "127.0.0.1:8080", "listening");
        });
        assert_eq!(
            text,
            "time=2026-05-01T12:34:56.789Z level=info msg=listening node=n1 listen=127.0.0.1:8080\n"
        );
        let json = capture(LogFormat::Json, Some("n1"), || {
            tracing::info!(listen = "127.0.0.1:8080", "listening");
        });
        assert!(
            json.contains("\"msg\":\"listening\",\"node\":\"n1\",\"listen\""),
            "{json}"
        );
    }

    #[test]
    fn other_crates_pass_only_at_warn() {
        let out = capture(LogFormat::Text, None, || {
            tracing::info!(target: "hyper", "connected");
            tracing::warn!(target: "hyper", "overloaded");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("level=warn msg=overloaded"), "{out}");
    }

    #[test]
    fn refusal_event_carries_reason_env_var_and_fix() {
        let err = BootError::ReferenceVar {
            var: "PYRYCODE_RELAY_PRODUCTION",
        };
        let out = capture(LogFormat::Json, None, || refusing_to_start(&err));
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "refusing_to_start");
        assert_eq!(v["reason"], "invalid_reference_var");
        assert_eq!(v["env_var"], "PYRYCODE_RELAY_PRODUCTION");
        assert!(v["fix"].as_str().unwrap().contains("exactly 1"));
    }

    #[test]
    fn every_event_name_is_a_valid_name() {
        assert!(EVENTS.iter().all(|e| is_event_name(e)));
        assert!(!is_event_name("Server claimed"));
        assert!(!is_event_name(""));
    }

    #[test]
    fn sanitize_truncates_and_replaces() {
        assert_eq!(sanitize("Pixel 8", DEVICE_NAME_MAX), "Pixel 8");
        assert_eq!(sanitize("tab\there\u{7f}", 32), "tab?here?");
        // "é" is two bytes, each replaced.
        assert_eq!(sanitize("café", 32), "caf??");
        assert_eq!(sanitize(&"x".repeat(40), DEVICE_NAME_MAX).len(), 32);
        assert_eq!(sanitize(&"v".repeat(100), BINARY_VERSION_MAX).len(), 64);
        // Truncation counts bytes, so a cut inside a character still yields `?`.
        assert_eq!(sanitize("ab\u{e9}", 3), "ab?");
        assert_eq!(sanitize("", 32), "");
    }
}
