//! The WebSocket handshake checks of stage 7 (PROTOCOL.md §3, RFC 6455 §4.2) and the accept key.

use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use sha1::{Digest, Sha1};

use super::head::{Head, Presence};
use super::response::Reject;

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Standard alphabet with canonical padding; non-zero trailing bits are tolerated, as Go's
/// `base64.StdEncoding` (the reference relay's decoder) tolerates them.
const KEY_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// Runs the checks in order; on success gives the `Sec-WebSocket-Accept` value.
pub(super) fn check(head: &Head<'_>) -> Result<String, Reject> {
    if head.minor_version < 1
        || !has_token(head, "connection", b"upgrade")
        || !has_token(head, "upgrade", b"websocket")
    {
        return Err(Reject::UpgradeRequired);
    }
    if head.method != "GET" {
        return Err(Reject::MethodNotAllowed);
    }
    if head.presence("sec-websocket-version") != Presence::Once(b"13") {
        return Err(Reject::WebSocketVersion);
    }
    match head.presence("sec-websocket-key") {
        Presence::Once(key) if is_valid_key(key) => Ok(accept_key(key)),
        Presence::Once(_) | Presence::Absent | Presence::Repeated => Err(Reject::WebSocketKey),
    }
}

/// `Sec-WebSocket-Accept` for `key`: base64 of the SHA-1 of the key and the RFC 6455 GUID.
pub(super) fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    STANDARD.encode(sha1.finalize())
}

/// Base64 of exactly 16 bytes: 24 characters ending `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24 && KEY_ENGINE.decode(key).is_ok_and(|bytes| bytes.len() == 16)
}

/// Whether any line of header `name` lists `token` (comma-separated, ASCII case-insensitive).
fn has_token(head: &Head<'_>, name: &str, token: &[u8]) -> bool {
    head.values(name)
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|t| super::head::trim(t).eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::super::head::{Parsed, parse};
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn run(request_line: &str, headers: &str) -> Result<String, Reject> {
        let head = format!("{request_line}\r\n{headers}\r\n");
        match parse(head.as_bytes(), 16384) {
            Parsed::Complete(h) => check(&h),
            other => panic!("{other:?}"),
        }
    }

    fn good(extra: &str) -> String {
        format!(
            "Connection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {KEY}\r\n{extra}"
        )
    }

    #[test]
    fn rfc_6455_example_accept() {
        assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(
            run("GET / HTTP/1.1", &good("")).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_required() {
        assert_eq!(
            run("GET / HTTP/1.0", &good("")),
            Err(Reject::UpgradeRequired)
        );
        let no_conn = good("").replace("Connection: keep-alive, Upgrade\r\n", "");
        assert_eq!(
            run("GET / HTTP/1.1", &no_conn),
            Err(Reject::UpgradeRequired)
        );
        let no_up = good("").replace("Upgrade: WebSocket\r\n", "");
        assert_eq!(run("GET / HTTP/1.1", &no_up), Err(Reject::UpgradeRequired));
        let wrong = good("").replace("Upgrade: WebSocket", "Upgrade: websocket2, h2c");
        assert_eq!(run("GET / HTTP/1.1", &wrong), Err(Reject::UpgradeRequired));
        // Tokens may sit on any line of the header.
        let split = good("").replace(
            "Connection: keep-alive, Upgrade",
            "Connection: x\r\nConnection: upgrade ",
        );
        assert!(run("GET / HTTP/1.1", &split).is_ok());
        // 426 comes before 405.
        assert_eq!(
            run("POST / HTTP/1.0", &good("")),
            Err(Reject::UpgradeRequired)
        );
    }

    #[test]
    fn method_then_version_then_key() {
        assert_eq!(
            run("POST / HTTP/1.1", &good("")),
            Err(Reject::MethodNotAllowed)
        );
        assert_eq!(
            run("get / HTTP/1.1", &good("")),
            Err(Reject::MethodNotAllowed)
        );
        let v8 = good("").replace("Version: 13", "Version: 8");
        assert_eq!(run("POST / HTTP/1.1", &v8), Err(Reject::MethodNotAllowed));
        assert_eq!(run("GET / HTTP/1.1", &v8), Err(Reject::WebSocketVersion));
        let twice = good("Sec-WebSocket-Version: 13\r\n");
        assert_eq!(run("GET / HTTP/1.1", &twice), Err(Reject::WebSocketVersion));
        let listed = good("").replace("Version: 13", "Version: 13, 8");
        assert_eq!(
            run("GET / HTTP/1.1", &listed),
            Err(Reject::WebSocketVersion)
        );
        let bad_key = good("")
            .replace(KEY, "AAAA")
            .replace("Version: 13", "Version: 7");
        assert_eq!(
            run("GET / HTTP/1.1", &bad_key),
            Err(Reject::WebSocketVersion)
        );
    }

    #[test]
    fn key_must_be_16_bytes_once() {
        let with_key = |k: &str| good("").replace(KEY, k);
        for bad in [
            "AAECAwQFBgcICQoLDA0O",     // 15 bytes
            "AAECAwQFBgcICQoLDA0ODxA=", // 17 bytes
            "AAECAwQFBgcICQoLDA0ODw",   // 16 bytes, unpadded
            "AAECAwQFBgcICQoLDA0ODw=",
            "AAECAwQFBgcICQoLDA0ODw===",
            "AAECAwQFBgcICQoLDA0OD!==",
            "AAECAwQFBgcICQoLDA0OD-==",
            "",
        ] {
            assert_eq!(
                run("GET / HTTP/1.1", &with_key(bad)),
                Err(Reject::WebSocketKey),
                "{bad}"
            );
        }
        assert!(run("GET / HTTP/1.1", &with_key("AAECAwQFBgcICQoLDA0ODw==")).is_ok());
        let no_key = good("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
        assert_eq!(run("GET / HTTP/1.1", &no_key), Err(Reject::WebSocketKey));
        let twice = good(&format!("Sec-WebSocket-Key: {KEY}\r\n"));
        assert_eq!(run("GET / HTTP/1.1", &twice), Err(Reject::WebSocketKey));
    }
}
