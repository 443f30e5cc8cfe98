//! The answers of the metrics and ACME http-01 listeners (PROTOCOL.md §2.1, §2.3, §12).
//! Everything on the main listener is the gate's.

/// `Content-Type` of `/metrics` (§12).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the metrics listener does with a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsRoute {
    /// `GET /metrics`: render the counters.
    Metrics,
    /// Any other request: 404.
    NotFound,
    /// Not an HTTP/1.x request: close writing nothing.
    Drop,
}

/// The parts of a head read by [`read_head`](crate::head::read_head) that both listeners route
/// on.
struct RequestLine<'h> {
    /// The head ended within the limit (CRLFCRLF seen, every header line valid).
    complete: bool,
    method: &'h str,
    /// The request-target without its query.
    path: &'h str,
}

/// `None`: not an HTTP/1.x request (close writing nothing).
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

/// Routes one head read by [`read_head`](crate::head::read_head) on the metrics listener.
pub fn metrics_route(head: &[u8]) -> MetricsRoute {
    match request_line(head) {
        None => MetricsRoute::Drop,
        Some(RequestLine {
            complete: true,
            method: "GET",
            path: "/metrics",
        }) => MetricsRoute::Metrics,
        Some(_) => MetricsRoute::NotFound,
    }
}

/// The 200 answer to `GET /metrics`.
pub fn metrics_response(body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {METRICS_CONTENT_TYPE}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// The path prefix of http-01 challenges (RFC 8555 §8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// What the http-01 listener does with a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeRoute {
    /// `GET` or `HEAD` of a challenge path: answer with the token's key authorization if an
    /// authorization is waiting for it, else 404.
    Challenge { token: String, head_only: bool },
    /// Any other request: 404.
    NotFound,
    /// Not an HTTP/1.x request: close writing nothing.
    Drop,
}

/// Routes one head read by [`read_head`](crate::head::read_head) on the http-01 listener.
/// A token is one non-empty path segment of base64url characters, as ACME issues them.
pub fn acme_route(head: &[u8]) -> AcmeRoute {
    let Some(line) = request_line(head) else {
        return AcmeRoute::Drop;
    };
    let token = line.path.strip_prefix(ACME_CHALLENGE_PREFIX).filter(|t| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    match (line.complete, line.method, token) {
        (true, "GET" | "HEAD", Some(token)) => AcmeRoute::Challenge {
            token: token.to_owned(),
            head_only: line.method == "HEAD",
        },
        _ => AcmeRoute::NotFound,
    }
}

/// The 200 answer to a challenge: the key authorization as the body (RFC 8555 §8.3).
pub fn acme_response(key_authorization: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        key_authorization.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(key_authorization.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |h: &[u8]| metrics_route(h);
        assert_eq!(r(b"GET /metrics HTTP/1.1\r\n\r\n"), MetricsRoute::Metrics);
        assert_eq!(
            r(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            MetricsRoute::Metrics
        );
        assert_eq!(r(b"POST /metrics HTTP/1.1\r\n\r\n"), MetricsRoute::NotFound);
        assert_eq!(r(b"GET /metrics/ HTTP/1.1\r\n\r\n"), MetricsRoute::NotFound);
        assert_eq!(r(b"GET /healthz HTTP/1.1\r\n\r\n"), MetricsRoute::NotFound);
        assert_eq!(r(b"GET /metrics HTTP/1.1\r\nX: a"), MetricsRoute::NotFound);
        assert_eq!(r(b"\x01\x02\r\n\r\n"), MetricsRoute::Drop);
    }

    #[test]
    fn acme_routes() {
        let r = |h: &[u8]| acme_route(h);
        let challenge = |t: &str, head_only| AcmeRoute::Challenge {
            token: t.to_owned(),
            head_only,
        };
        assert_eq!(
            r(b"GET /.well-known/acme-challenge/aB-_9 HTTP/1.1\r\nHost: x\r\n\r\n"),
            challenge("aB-_9", false)
        );
        assert_eq!(
            r(b"HEAD /.well-known/acme-challenge/t?q=1 HTTP/1.1\r\n\r\n"),
            challenge("t", true)
        );
        for nf in [
            &b"GET /.well-known/acme-challenge/ HTTP/1.1\r\n\r\n"[..],
            b"GET /.well-known/acme-challenge/a/b HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge/a.b HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge HTTP/1.1\r\n\r\n",
            b"POST /.well-known/acme-challenge/t HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"GET /.well-known/acme-challenge/t HTTP/1.1\r\nX: a",
        ] {
            assert_eq!(
                r(nf),
                AcmeRoute::NotFound,
                "{}",
                String::from_utf8_lossy(nf)
            );
        }
        assert_eq!(r(b"\x16\x03\x01\r\n\r\n"), AcmeRoute::Drop);
    }

    #[test]
    fn acme_answers() {
        assert_eq!(
            acme_response("tok.thumb", false),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\
Content-Length: 9\r\n\r\ntok.thumb"
        );
        assert!(acme_response("tok.thumb", true).ends_with(b"Content-Length: 9\r\n\r\n"));
    }

    #[test]
    fn not_found_is_the_gates() {
        use switchyard_core::{Config, Gate, Load, Response, Verdict};
        let expected: &[u8] = b"HTTP/1.1 404 Not Found\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
X-Content-Type-Options: nosniff\r\n\
Connection: close\r\n\
Content-Length: 19\r\n\
\r\n\
404 page not found\n";
        assert_eq!(&Response::not_found().bytes[..], expected);
        let now = std::time::Instant::now();
        let mut gate = Gate::new(Config::default(), now);
        let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        match gate.handle_head(now, [127, 0, 0, 1].into(), head, Load::default()) {
            Verdict::Respond { response, slot } => {
                assert!(slot.is_none());
                assert_eq!(&response.bytes[..], expected);
            }
            other => panic!("{other:?}"),
        }
    }
}
