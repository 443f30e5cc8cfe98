//! The metrics listener's two answers (PROTOCOL.md §2.3, §12). Everything on the main listener
//! is the gate's.

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

/// Routes one head read by [`read_head`](crate::head::read_head) on the metrics listener.
pub fn metrics_route(head: &[u8]) -> MetricsRoute {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let complete = match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => true,
        Ok(httparse::Status::Partial) => false,
        Err(httparse::Error::TooManyHeaders) => false,
        Err(_) => return MetricsRoute::Drop,
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return MetricsRoute::Drop;
    };
    let path = path.split('?').next().unwrap_or(path);
    if complete && method == "GET" && path == "/metrics" {
        MetricsRoute::Metrics
    } else {
        MetricsRoute::NotFound
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
