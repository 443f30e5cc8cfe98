//! The two listeners besides the main one: metrics (PROTOCOL.md §12) and ACME http-01 (§2.1).
//! Neither goes through the [`Gate`](crate::Gate): a head read under the main listener's stage-0
//! rules comes in, the bytes to write (or "close writing nothing") come out. The runtime supplies
//! only what the core cannot know: the rendered metrics and the pending key authorizations.

use crate::gate::Response;

/// `Content-Type` of `/metrics` (§12).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The path prefix of http-01 challenges (RFC 8555 §8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// What a listener does with a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Write these bytes, then linger (§2.1).
    Write(Vec<u8>),
    /// Not an HTTP/1.x request: close writing nothing.
    Drop,
}

/// The metrics listener: `GET /metrics` (query ignored) → 200 with `render()`'s exposition;
/// any other request → §2.3's 404. `render` is called only for the 200.
pub fn answer_metrics(head: &[u8], render: impl FnOnce() -> String) -> Answer {
    match request_line(head) {
        None => Answer::Drop,
        Some(RequestLine {
            complete: true,
            method: "GET",
            path: "/metrics",
        }) => Answer::Write(ok(METRICS_CONTENT_TYPE, render().as_bytes(), false)),
        Some(_) => not_found(),
    }
}

/// The http-01 listener: `GET` or `HEAD` of a challenge path whose token has a key
/// authorization waiting (`key_authorization(token)`) → 200 with it as the body (none for
/// `HEAD`); anything else → §2.3's 404, never a redirect. A token is one non-empty path segment
/// of base64url characters, as ACME issues them; `key_authorization` sees no other.
pub fn answer_acme_http(
    head: &[u8],
    key_authorization: impl FnOnce(&str) -> Option<String>,
) -> Answer {
    let Some(line) = request_line(head) else {
        return Answer::Drop;
    };
    let token = line
        .path
        .strip_prefix(ACME_CHALLENGE_PREFIX)
        .filter(|t| !t.is_empty() && t.bytes().all(is_base64url));
    let head_only = match (line.complete, line.method) {
        (true, "GET") => false,
        (true, "HEAD") => true,
        _ => return not_found(),
    };
    match token.and_then(key_authorization) {
        Some(key_auth) => Answer::Write(ok(
            "application/octet-stream",
            key_auth.as_bytes(),
            head_only,
        )),
        None => not_found(),
    }
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn not_found() -> Answer {
    Answer::Write(Response::not_found().bytes.to_vec())
}

/// A 200 with `body` (its length announced, the body itself left out for `HEAD`).
fn ok(content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// The parts of a head that both listeners route on.
struct RequestLine<'h> {
    /// The head ended within the limit (CRLFCRLF seen, every header line valid).
    complete: bool,
    method: &'h str,
    /// The request-target without its query.
    path: &'h str,
}

/// `None`: not an HTTP/1.x request.
fn request_line(head: &[u8]) -> Option<RequestLine<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let complete = match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => true,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => false,
        Err(_) => return None,
    };
    let (method, path) = (req.method?, req.path?);
    let path = path.split('?').next().unwrap_or(path);
    Some(RequestLine {
        complete,
        method,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
X-Content-Type-Options: nosniff\r\n\
Connection: close\r\n\
Content-Length: 19\r\n\
\r\n\
404 page not found\n";

    fn metrics(head: &[u8]) -> Answer {
        answer_metrics(head, || "# EOF\n".to_owned())
    }

    fn written(answer: Answer) -> Vec<u8> {
        match answer {
            Answer::Write(bytes) => bytes,
            Answer::Drop => panic!("dropped"),
        }
    }

    #[test]
    fn metrics_get_renders_the_exposition() {
        let expected = b"HTTP/1.1 200 OK\r\n\
Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
Connection: close\r\nContent-Length: 6\r\n\r\n# EOF\n";
        assert_eq!(written(metrics(b"GET /metrics HTTP/1.1\r\n\r\n")), expected);
        assert_eq!(
            written(metrics(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")),
            expected
        );
    }

    #[test]
    fn metrics_anything_else_is_the_404_and_renders_nothing() {
        for head in [
            &b"POST /metrics HTTP/1.1\r\n\r\n"[..],
            b"GET /metrics/ HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nX: a",
        ] {
            let answer = answer_metrics(head, || panic!("rendered for {head:?}"));
            assert_eq!(written(answer), NOT_FOUND);
        }
        assert_eq!(metrics(b"\x01\x02\r\n\r\n"), Answer::Drop);
    }

    #[test]
    fn the_404_is_the_gates() {
        assert_eq!(&Response::not_found().bytes[..], NOT_FOUND);
    }

    fn acme(head: &[u8]) -> Answer {
        answer_acme_http(head, |token| {
            ["aB-_9", "t"]
                .contains(&token)
                .then(|| format!("{token}.thumb"))
        })
    }

    #[test]
    fn acme_challenges_answer_their_key_authorization() {
        assert_eq!(
            written(acme(
                b"GET /.well-known/acme-challenge/aB-_9 HTTP/1.1\r\nHost: x\r\n\r\n"
            )),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
Connection: close\r\nContent-Length: 11\r\n\r\naB-_9.thumb"
        );
        assert_eq!(
            written(acme(
                b"HEAD /.well-known/acme-challenge/t?q=1 HTTP/1.1\r\n\r\n"
            )),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
Connection: close\r\nContent-Length: 7\r\n\r\n"
        );
    }

    #[test]
    fn acme_anything_else_is_the_404() {
        for head in [
            // A well-formed token nobody is waiting for.
            &b"GET /.well-known/acme-challenge/other HTTP/1.1\r\n\r\n"[..],
            b"GET /.well-known/acme-challenge/ HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge/a/b HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge/a.b HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge HTTP/1.1\r\n\r\n",
            b"POST /.well-known/acme-challenge/t HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge/t HTTP/1.1\r\nX: a",
        ] {
            assert_eq!(
                written(acme(head)),
                NOT_FOUND,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(acme(b"\x16\x03\x01\r\n\r\n"), Answer::Drop);
    }

    #[test]
    fn acme_asks_only_for_well_formed_tokens() {
        for head in [
            &b"GET /.well-known/acme-challenge/a.b HTTP/1.1\r\n\r\n"[..],
            b"GET /.well-known/acme-challenge/ HTTP/1.1\r\n\r\n",
            b"GET /x/aB HTTP/1.1\r\n\r\n",
        ] {
            let answer = answer_acme_http(head, |t| panic!("asked for {t:?}"));
            assert_eq!(written(answer), NOT_FOUND);
        }
        for token in ["-", "_", "Z9"] {
            let head = format!("GET {ACME_CHALLENGE_PREFIX}{token} HTTP/1.1\r\n\r\n");
            let mut asked = None;
            let _ = answer_acme_http(head.as_bytes(), |t| {
                asked = Some(t.to_owned());
                None
            });
            assert_eq!(asked.as_deref(), Some(token));
        }
    }
}
