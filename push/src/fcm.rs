//! The two HTTP calls of a wake (PROTOCOL.md §11): an access token from the token URL, cached,
//! then FCM HTTP v1 `messages:send`. Blocking; run on a push thread, never on a worker.

use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use switchyard_core::PushOutcome;
use ureq::Agent;
use ureq::http::Response;

use crate::key::Signer;

/// At most this much of a reply is read (§11).
pub const MAX_REPLY: u64 = 4096;
/// A cached access token is replaced this long before it expires (§11).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The `@type` of the FCM error detail that carries `errorCode`.
const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

/// How one wake ended, with what may be logged about it (§15: fixed text, and only the
/// enum-shaped `error.status` and `errorCode` of an FCM reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: PushOutcome,
    /// Relay-chosen fixed text; empty for `sent`.
    pub err: &'static str,
    /// FCM's `error.status`, when it is an upper-case identifier.
    pub status: Option<String>,
    /// The FcmError detail's `errorCode`, when it is an upper-case identifier.
    pub error_code: Option<String>,
    /// The last segment of the reply's `name` for `sent`, when it looks like a message id.
    pub message_id: Option<String>,
}

impl Report {
    pub fn failed(outcome: PushOutcome, err: &'static str) -> Report {
        Report {
            outcome,
            err,
            status: None,
            error_code: None,
            message_id: None,
        }
    }

    pub fn cancelled() -> Report {
        Report::failed(PushOutcome::SendFailed, "cancelled by shutdown")
    }
}

/// Where the calls go.
#[derive(Debug, Clone)]
pub struct Urls {
    pub token: String,
    /// `<endpoint>/v1/projects/<project-id>/messages:send`.
    pub send: String,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

/// The FCM client: one HTTP agent (connections are pooled), the signer, and the access token
/// shared by every send.
pub struct Client {
    agent: Agent,
    signer: Signer,
    urls: Urls,
    /// Held across a refresh, so one thread fetches and the others wait for its token.
    cache: Mutex<Option<Cached>>,
}

impl Client {
    pub fn new(signer: Signer, urls: Urls, timeout: Duration) -> Client {
        let agent: Agent = Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .proxy(None)
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            agent,
            signer,
            urls,
            cache: Mutex::new(None),
        }
    }

    /// Performs one wake for the device `token`. `cancelled` is checked before each call.
    pub fn send(&self, token: &str, cancelled: &AtomicBool) -> Report {
        let access = match self.access_token(cancelled) {
            Ok(access) => access,
            Err(report) => return report,
        };
        if cancelled.load(Ordering::Acquire) {
            return Report::cancelled();
        }
        let response = self
            .agent
            .post(&self.urls.send)
            .header("Authorization", format!("Bearer {access}"))
            .content_type("application/json")
            .send(message_body(token));
        let mut response = match response {
            Ok(r) => r,
            Err(e) => return Report::failed(PushOutcome::SendFailed, transport_error(&e)),
        };
        let status = response.status().as_u16();
        let body = read_reply(&mut response);
        if (200..300).contains(&status) {
            return Report {
                message_id: message_id(&body),
                ..Report::failed(PushOutcome::Sent, "")
            };
        }
        if status == 401 {
            // The cached token was refused: fetch a new one next time.
            *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        let error = FcmError::parse(&body);
        let (outcome, err) = if error.unregistered {
            (PushOutcome::Unregistered, "device token unregistered")
        } else {
            (PushOutcome::SendFailed, status_error(status))
        };
        Report {
            outcome,
            err,
            status: error.status,
            error_code: error.error_code,
            message_id: None,
        }
    }

    /// The cached access token, or a new one from the token URL.
    fn access_token(&self, cancelled: &AtomicBool) -> Result<String, Report> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        if let Some(c) = cache.as_ref().filter(|c| started < c.refresh_at) {
            return Ok(c.token.clone());
        }
        if cancelled.load(Ordering::Acquire) {
            return Err(Report::cancelled());
        }
        let failed = |err| Report::failed(PushOutcome::TokenFetchFailed, err);
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let assertion = self.signer.assertion(&self.urls.token, iat);
        // §11's form, verbatim: the grant type's `:` are left as they are, and a JWT needs no
        // escaping (base64url and `.`).
        let form =
            format!("grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion={assertion}");
        let mut response = self
            .agent
            .post(&self.urls.token)
            .content_type("application/x-www-form-urlencoded")
            .send(form)
            .map_err(|e| failed(transport_error(&e)))?;
        let status = response.status().as_u16();
        let body = read_reply(&mut response);
        if !(200..300).contains(&status) {
            return Err(failed(status_error(status)));
        }
        let reply: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| failed("token reply is not JSON"))?;
        let token = reply
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| failed("token reply has no usable access_token"))?
            .to_owned();
        // Without a usable `expires_in` the token serves this send only.
        let lifetime = reply
            .get("expires_in")
            .and_then(|e| e.as_u64())
            .map_or(Duration::ZERO, Duration::from_secs);
        *cache = (lifetime > REFRESH_MARGIN).then(|| Cached {
            token: token.clone(),
            refresh_at: started + (lifetime - REFRESH_MARGIN),
        });
        Ok(token)
    }
}

/// `{"message":{"token":"<token>","android":{"priority":"HIGH"}}}`: no notification, no data.
pub fn message_body(token: &str) -> String {
    let token = serde_json::Value::from(token).to_string();
    format!(r#"{{"message":{{"token":{token},"android":{{"priority":"HIGH"}}}}}}"#)
}

/// Reads at most [`MAX_REPLY`] bytes of the body; a read error ends it early.
fn read_reply(response: &mut Response<ureq::Body>) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(MAX_REPLY)
        .read_to_end(&mut body);
    body
}

/// The FCM error reply fields that decide the outcome and may be logged.
#[derive(Debug, Default, PartialEq, Eq)]
struct FcmError {
    unregistered: bool,
    status: Option<String>,
    error_code: Option<String>,
}

impl FcmError {
    fn parse(body: &[u8]) -> FcmError {
        let Ok(reply) = serde_json::from_slice::<serde_json::Value>(body) else {
            return FcmError::default();
        };
        let error = &reply["error"];
        let fcm_codes: Vec<&str> = error["details"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["@type"] == FCM_ERROR_TYPE)
            .filter_map(|d| d["errorCode"].as_str())
            .collect();
        let unregistered = fcm_codes.contains(&"UNREGISTERED");
        let error_code = if unregistered {
            Some("UNREGISTERED")
        } else {
            fcm_codes.first().copied()
        };
        FcmError {
            unregistered,
            status: error["status"].as_str().and_then(enum_shaped),
            error_code: error_code.and_then(enum_shaped),
        }
    }
}

/// `Some` for an upper-case identifier such as `NOT_FOUND`; anything else could be free text.
fn enum_shaped(s: &str) -> Option<String> {
    let ok = (1..=64).contains(&s.len())
        && s.as_bytes()[0].is_ascii_uppercase()
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    ok.then(|| s.to_owned())
}

/// The id part of a send reply's `name` (`projects/<p>/messages/<id>`).
fn message_id(body: &[u8]) -> Option<String> {
    let reply: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = reply["name"].as_str()?.rsplit('/').next()?;
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":%_.-".contains(&b));
    ok.then(|| id.to_owned())
}

/// Fixed text for a non-2xx status.
fn status_error(status: u16) -> &'static str {
    match status {
        300..=399 => "redirect refused",
        401 | 403 => "not authorised",
        404 => "not found",
        429 => "rate limited",
        400..=499 => "request refused",
        500..=599 => "server error",
        _ => "unexpected status",
    }
}

/// Fixed text for a failed call (§15: no OS or library text).
fn transport_error(e: &ureq::Error) -> &'static str {
    use std::io::ErrorKind;
    match e {
        ureq::Error::Timeout(_) => "timed out",
        ureq::Error::HostNotFound => "host not found",
        ureq::Error::ConnectionFailed => "connection failed",
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out",
            ErrorKind::ConnectionRefused => "connection refused",
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "connection reset",
            ErrorKind::UnexpectedEof => "connection closed early",
            _ => "i/o error",
        },
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => "tls error",
        ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => "redirect refused",
        ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..) => "bad http reply",
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => "bad url",
        _ => "request failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_exact_and_escaped() {
        assert_eq!(
            message_body("tok-1"),
            r#"{"message":{"token":"tok-1","android":{"priority":"HIGH"}}}"#
        );
        assert_eq!(
            message_body(r#"a"b\c"#),
            r#"{"message":{"token":"a\"b\\c","android":{"priority":"HIGH"}}}"#
        );
    }

    #[test]
    fn unregistered_needs_the_fcm_error_detail() {
        let reply = |details: &str| {
            format!(
                r#"{{"error":{{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":{details}}}}}"#
            )
        };
        let unreg = FcmError::parse(
            reply(r#"[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]"#)
                .as_bytes(),
        );
        assert_eq!(
            unreg,
            FcmError {
                unregistered: true,
                status: Some("NOT_FOUND".into()),
                error_code: Some("UNREGISTERED".into()),
            }
        );
        // The code under another @type, or no details, is not enough.
        for details in [
            r#"[{"@type":"type.googleapis.com/google.rpc.BadRequest","errorCode":"UNREGISTERED"}]"#,
            "[]",
            "null",
        ] {
            let e = FcmError::parse(reply(details).as_bytes());
            assert!(!e.unregistered, "{details}");
            assert_eq!(e.status.as_deref(), Some("NOT_FOUND"));
            assert_eq!(e.error_code, None);
        }
        // Free text is never taken for an enum.
        let e = FcmError::parse(
            br#"{"error":{"status":"Not found: token abc","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"bad code"}]}}"#,
        );
        assert_eq!(e, FcmError::default());
        assert_eq!(FcmError::parse(b"<html>"), FcmError::default());
    }

    #[test]
    fn message_ids_are_checked() {
        assert_eq!(
            message_id(br#"{"name":"projects/p/messages/0:1500415314455276%31bd1c96"}"#).as_deref(),
            Some("0:1500415314455276%31bd1c96")
        );
        assert_eq!(message_id(br#"{"name":"projects/p/messages/a b"}"#), None);
        assert_eq!(message_id(br#"{}"#), None);
    }
}
