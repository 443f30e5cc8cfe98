//! Rendering of every response the gate gives (PROTOCOL.md §2.2, §2.3, §3). Bodies are fixed
//! texts; nothing from the request is ever echoed.

use bytes::Bytes;

use super::{Load, Response};
use crate::counters::RejectReason;

const TEXT_PLAIN: (&str, &str) = ("Content-Type", "text/plain; charset=utf-8");
const NOSNIFF: (&str, &str) = ("X-Content-Type-Options", "nosniff");
const CLOSE: (&str, &str) = ("Connection", "close");

/// Every answer other than `/healthz` and the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reject {
    /// Stage 1.
    Misdirected,
    /// Route: unknown path (§2.3).
    NotFound,
    /// Stage 2.
    RateLimited,
    /// Stage 3.
    AddressCap,
    /// Stage 4.
    GlobalCap,
    /// Stage 5.
    HeadTooLarge,
    /// Stage 6.
    Headers,
    /// Stage 7: HTTP/1.0, or no `Connection: upgrade` / `Upgrade: websocket`.
    UpgradeRequired,
    /// Stage 7: not `GET`.
    MethodNotAllowed,
    /// Stage 7: `Sec-WebSocket-Version` not `13`.
    WebSocketVersion,
    /// Stage 7: `Sec-WebSocket-Key` missing, repeated or not 16 bytes.
    WebSocketKey,
}

impl Reject {
    fn status(self) -> u16 {
        match self {
            Reject::Misdirected => 421,
            Reject::NotFound => 404,
            Reject::RateLimited => 429,
            Reject::AddressCap | Reject::GlobalCap => 503,
            Reject::HeadTooLarge => 431,
            Reject::Headers | Reject::WebSocketVersion | Reject::WebSocketKey => 400,
            Reject::UpgradeRequired => 426,
            Reject::MethodNotAllowed => 405,
        }
    }

    fn body(self) -> &'static [u8] {
        match self {
            Reject::Misdirected => b"",
            Reject::NotFound => b"404 page not found\n",
            Reject::RateLimited | Reject::AddressCap | Reject::GlobalCap | Reject::Headers => b"\n",
            Reject::HeadTooLarge => b"431 Request Header Fields Too Large",
            Reject::UpgradeRequired => b"upgrade required\n",
            Reject::MethodNotAllowed => b"method not allowed\n",
            Reject::WebSocketVersion => b"unsupported websocket version\n",
            Reject::WebSocketKey => b"invalid websocket key\n",
        }
    }

    /// Headers besides the content headers, `Connection` included.
    fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Reject::UpgradeRequired => {
                &[("Upgrade", "websocket"), ("Connection", "Upgrade, close")]
            }
            Reject::MethodNotAllowed => &[("Allow", "GET"), CLOSE],
            Reject::WebSocketVersion => &[("Sec-WebSocket-Version", "13"), CLOSE],
            Reject::Misdirected
            | Reject::NotFound
            | Reject::RateLimited
            | Reject::AddressCap
            | Reject::GlobalCap
            | Reject::HeadTooLarge
            | Reject::Headers
            | Reject::WebSocketKey => &[CLOSE],
        }
    }

    /// The `connections_rejected_total` reason when the request was for an upgrade route (§12).
    pub(super) fn reason(self) -> Option<RejectReason> {
        match self {
            Reject::Misdirected => Some(RejectReason::Host),
            Reject::NotFound => None,
            Reject::RateLimited => Some(RejectReason::RateLimit),
            Reject::AddressCap => Some(RejectReason::IpCap),
            Reject::GlobalCap => Some(RejectReason::GlobalCap),
            Reject::HeadTooLarge => Some(RejectReason::HeadTooLarge),
            Reject::Headers => Some(RejectReason::Headers),
            Reject::UpgradeRequired
            | Reject::MethodNotAllowed
            | Reject::WebSocketVersion
            | Reject::WebSocketKey => Some(RejectReason::Handshake),
        }
    }

    /// Renders the response; a `HEAD` request gets the headers only.
    pub(super) fn render(self, head_method: bool) -> Response {
        let body = self.body();
        let content: &[(&str, &str)] = if body.is_empty() {
            &[]
        } else {
            &[TEXT_PLAIN, NOSNIFF]
        };
        render(
            self.status(),
            &[content, self.headers()],
            body,
            !head_method,
        )
    }
}

/// The `/healthz` answer (§2.2): 200, or 503 `"draining"` during the drain delay.
pub(super) fn healthz(
    draining: bool,
    version: &str,
    load: Load,
    uptime_seconds: u64,
    head_method: bool,
) -> Response {
    let mut body = Vec::with_capacity(128);
    body.extend_from_slice(br#"{"status":""#);
    body.extend_from_slice(if draining { b"draining" } else { b"ok" });
    body.extend_from_slice(br#"","version":"#);
    write_json_string(&mut body, version);
    body.extend_from_slice(
        format!(
            r#","connected_binaries":{},"connected_phones":{},"uptime_seconds":{}}}"#,
            load.binaries, load.phones, uptime_seconds
        )
        .as_bytes(),
    );
    let headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Cache-Control", "no-store"),
        CLOSE,
    ];
    render(
        if draining { 503 } else { 200 },
        &[&headers],
        &body,
        !head_method,
    )
}

/// The 101 (§3 stage 8): no subprotocol, no extension.
pub(super) fn switching_protocols(accept: &str) -> Response {
    let mut bytes = Vec::with_capacity(160);
    bytes.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    bytes.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    bytes.extend_from_slice(b"Sec-WebSocket-Accept: ");
    bytes.extend_from_slice(accept.as_bytes());
    bytes.extend_from_slice(b"\r\n\r\n");
    Response {
        status: 101,
        bytes: Bytes::from(bytes),
    }
}

/// A response with `Content-Length` last among the headers; the body only if `with_body`.
fn render(status: u16, headers: &[&[(&str, &str)]], body: &[u8], with_body: bool) -> Response {
    let mut bytes = Vec::with_capacity(160 + body.len());
    bytes.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    for (name, value) in headers.iter().copied().flatten() {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    bytes.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    if with_body {
        bytes.extend_from_slice(body);
    }
    Response {
        status,
        bytes: Bytes::from(bytes),
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes `s` as a JSON string (RFC 8259): `"`, `\` and control characters escaped.
fn write_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(br#"\""#),
            '\\' => out.extend_from_slice(br"\\"),
            c if u32::from(c) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", u32::from(c)).as_bytes());
            }
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Response) -> &str {
        std::str::from_utf8(&r.bytes).unwrap()
    }

    #[test]
    fn every_reject_has_connection_close_and_length() {
        for r in [
            Reject::Misdirected,
            Reject::NotFound,
            Reject::RateLimited,
            Reject::AddressCap,
            Reject::GlobalCap,
            Reject::HeadTooLarge,
            Reject::Headers,
            Reject::UpgradeRequired,
            Reject::MethodNotAllowed,
            Reject::WebSocketVersion,
            Reject::WebSocketKey,
        ] {
            let resp = r.render(false);
            let t = text(&resp);
            let (head, body) = t.split_once("\r\n\r\n").unwrap();
            assert_eq!(resp.status, r.status());
            assert!(
                head.starts_with(&format!("HTTP/1.1 {} ", r.status())),
                "{t}"
            );
            assert!(
                head.contains(&format!("\r\nContent-Length: {}", body.len())),
                "{t}"
            );
            assert!(
                head.contains("\r\nConnection: close")
                    || head.contains("Connection: Upgrade, close")
            );
            assert_eq!(head.matches("Connection:").count(), 1, "{t}");
            assert_eq!(body.as_bytes(), r.body());
            if !body.is_empty() {
                assert!(
                    head.contains("\r\nContent-Type: text/plain; charset=utf-8\r\n"),
                    "{t}"
                );
                assert!(
                    head.contains("\r\nX-Content-Type-Options: nosniff\r\n"),
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn every_status_line_carries_its_reason_phrase() {
        for (r, line) in [
            (Reject::Misdirected, "421 Misdirected Request"),
            (Reject::NotFound, "404 Not Found"),
            (Reject::RateLimited, "429 Too Many Requests"),
            (Reject::AddressCap, "503 Service Unavailable"),
            (Reject::GlobalCap, "503 Service Unavailable"),
            (Reject::HeadTooLarge, "431 Request Header Fields Too Large"),
            (Reject::Headers, "400 Bad Request"),
            (Reject::UpgradeRequired, "426 Upgrade Required"),
            (Reject::MethodNotAllowed, "405 Method Not Allowed"),
            (Reject::WebSocketVersion, "400 Bad Request"),
            (Reject::WebSocketKey, "400 Bad Request"),
        ] {
            let resp = r.render(false);
            assert!(
                text(&resp).starts_with(&format!("HTTP/1.1 {line}\r\n")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn misdirected_is_empty() {
        assert_eq!(
            text(&Reject::Misdirected.render(false)),
            "HTTP/1.1 421 Misdirected Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn head_requests_get_no_body() {
        assert_eq!(
            text(&Reject::NotFound.render(true)),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             X-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: 19\r\n\r\n"
        );
    }

    #[test]
    fn json_string_escapes() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"b\\c\u{1}\u{1f} é");
        assert_eq!(out, "\"a\\\"b\\\\c\\u0001\\u001f é\"".as_bytes());
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\u{1}\u{1f} é");
    }
}
