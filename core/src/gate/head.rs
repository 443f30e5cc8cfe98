//! Request-head parsing (stage 0 of PROTOCOL.md §3) and header look-ups (§4).

use httparse::Status;

use super::route::Route;

/// Header lines parsed without allocating; a head with more is parsed again with room for all.
const INLINE_HEADERS: usize = 64;

/// How a head the runtime read turned out.
#[derive(Debug)]
pub(super) enum Parsed<'a> {
    /// A whole head within the size limit.
    Complete(Head<'a>),
    /// A head larger than the limit: its request line, or `None` when the request line did not
    /// end within the limit.
    Oversized(Option<RequestLine>),
    /// Not HTTP/1.x: the connection is closed without a response.
    Invalid,
}

/// A complete request head that parsed as HTTP/1.x.
#[derive(Debug)]
pub(super) struct Head<'a> {
    pub(super) method: &'a str,
    /// The request-target as sent, query included.
    pub(super) target: &'a [u8],
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(super) minor_version: u8,
    fields: Vec<Field<'a>>,
}

/// One header line; the value without leading and trailing spaces and tabs.
#[derive(Debug)]
struct Field<'a> {
    name: &'a str,
    value: &'a [u8],
}

/// What the request line of an oversized head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RequestLine {
    pub(super) route: Route,
    pub(super) head_method: bool,
}

/// How often a header appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence<'a> {
    Absent,
    Once(&'a [u8]),
    Repeated,
}

/// Parses `bytes`: a complete head of at most `limit` bytes, or at least `limit` bytes of a head
/// that had not ended by then.
///
/// An oversized head is judged on its first `limit` bytes: invalid if they already break HTTP/1.x,
/// otherwise by its request line alone.
pub(super) fn parse(bytes: &[u8], limit: usize) -> Parsed<'_> {
    let oversized = bytes.len() > limit;
    let read = bytes.get(..limit).unwrap_or(bytes);
    match run_httparse(read) {
        // httparse refuses a field value holding a control byte other than HTAB (RFC 9110
        // §5.5); `control_bytes_invalidate` pins that.
        Ok(Outcome::Complete { len, head }) if !oversized && len == read.len() => {
            Parsed::Complete(head)
        }
        // The head ended before the bytes the runtime framed as its head (bare-LF framing):
        // the two would disagree about where the request ends.
        Ok(Outcome::Complete { .. }) => Parsed::Invalid,
        Ok(Outcome::Partial) if read.len() >= limit => Parsed::Oversized(request_line(read)),
        Ok(Outcome::Partial) | Err(_) => Parsed::Invalid,
    }
}

impl<'a> Head<'a> {
    /// Values of every line of header `name` (ASCII case-insensitive), in order, trimmed.
    pub(super) fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.fields
            .iter()
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }

    pub(super) fn presence(&self, name: &str) -> Presence<'a> {
        let mut values = self.values(name);
        match (values.next(), values.next()) {
            (None, _) => Presence::Absent,
            (Some(v), None) => Presence::Once(v),
            (Some(_), Some(_)) => Presence::Repeated,
        }
    }

    /// `HEAD` requests get a response without its body (RFC 9110 §9.3.2).
    pub(super) fn head_method(&self) -> bool {
        self.method == "HEAD"
    }
}

enum Outcome<'a> {
    Complete { len: usize, head: Head<'a> },
    Partial,
}

fn run_httparse(buf: &[u8]) -> Result<Outcome<'_>, httparse::Error> {
    let mut inline = [httparse::EMPTY_HEADER; INLINE_HEADERS];
    match parse_with(buf, &mut inline) {
        Err(httparse::Error::TooManyHeaders) => {
            // Every header line ends with an LF, so this is room for all of them.
            let lines = buf.iter().filter(|&&b| b == b'\n').count();
            let mut all = vec![httparse::EMPTY_HEADER; lines];
            parse_with(buf, &mut all)
        }
        other => other,
    }
}

fn parse_with<'a>(
    buf: &'a [u8],
    storage: &mut [httparse::Header<'a>],
) -> Result<Outcome<'a>, httparse::Error> {
    let mut req = httparse::Request::new(storage);
    let len = match req.parse(buf)? {
        Status::Complete(len) => len,
        Status::Partial => return Ok(Outcome::Partial),
    };
    let (Some(method), Some(path), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(httparse::Error::Token);
    };
    let fields = req
        .headers
        .iter()
        .map(|h| Field {
            name: h.name,
            value: trim(h.value),
        })
        .collect();
    Ok(Outcome::Complete {
        len,
        head: Head {
            method,
            target: path.as_bytes(),
            minor_version,
            fields,
        },
    })
}

/// The request line of a head that did not end within the limit, if the line itself did.
/// Leading empty lines are skipped, as httparse does.
fn request_line(read: &[u8]) -> Option<RequestLine> {
    let mut start = 0;
    loop {
        match read.get(start..) {
            Some([b'\r', b'\n', ..]) => start += 2,
            Some([b'\n', ..]) => start += 1,
            _ => break,
        }
    }
    let lf = read.get(start..)?.iter().position(|&b| b == b'\n')?;
    let mut line = read.get(..start + lf + 1)?.to_vec();
    line.extend_from_slice(b"\r\n");
    let mut no_headers: [httparse::Header<'_>; 0] = [];
    let mut req = httparse::Request::new(&mut no_headers);
    match req.parse(&line) {
        Ok(Status::Complete(_)) => Some(RequestLine {
            route: Route::of(req.path?.as_bytes()),
            head_method: req.method == Some("HEAD"),
        }),
        Ok(Status::Partial) | Err(_) => None,
    }
}

/// Removes leading and trailing spaces and tabs (§4).
pub(super) fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> Head<'_> {
        match parse(bytes, 16384) {
            Parsed::Complete(h) => h,
            other => panic!("not complete: {other:?}"),
        }
    }

    #[test]
    fn parses_fields_trimmed_and_case_insensitive() {
        let h =
            complete(b"GET /v1/server?x=1 HTTP/1.1\r\nHost:  a \r\nx-a: 1\r\nX-A:\t2\t\r\n\r\n");
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, b"/v1/server?x=1");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.presence("host"), Presence::Once(b"a"));
        assert_eq!(h.presence("X-a"), Presence::Repeated);
        assert_eq!(h.presence("y"), Presence::Absent);
        assert_eq!(
            h.values("x-A").collect::<Vec<_>>(),
            vec![&b"1"[..], &b"2"[..]]
        );
    }

    #[test]
    fn many_header_lines_are_parsed() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..1000 {
            head.extend_from_slice(format!("h{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let h = complete(&head);
        assert_eq!(h.presence("h999"), Presence::Once(b"999"));
    }

    #[test]
    fn smallest_header_lines_fit_the_retry() {
        let mut head = b"GET / HTTP/1.1\n".to_vec();
        while head.len() < 16380 {
            head.extend_from_slice(b"a:\n");
        }
        head.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&head, 16384), Parsed::Complete(_)));
    }

    #[test]
    fn control_bytes_invalidate() {
        for b in (0u8..0x20).filter(|&b| b != b'\t').chain([0x7F]) {
            let mut head = b"GET / HTTP/1.1\r\nX: a".to_vec();
            head.push(b);
            head.extend_from_slice(b"b\r\n\r\n");
            assert!(
                matches!(parse(&head, 16384), Parsed::Invalid),
                "byte {b:#x}"
            );
        }
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nX: a\tb\xC3\xA9\r\n\r\n", 16384),
            Parsed::Complete(_)
        ));
    }

    #[test]
    fn invalid_heads() {
        for bad in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n",
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1\r\n: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nA b: v\r\n\r\n",
            b"GET / HTTP/1.1\r\n\n\r\n",
            b"",
            b"\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad, 16384), Parsed::Invalid),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_request_line() {
        let limit = 64;
        let mut head = b"GET /v1/client HTTP/1.1\r\nX: ".to_vec();
        head.resize(limit + 1, b'a');
        assert_eq!(
            parse(&head, limit).oversized(),
            Some(Some(RequestLine {
                route: Route::of(b"/v1/client"),
                head_method: false
            }))
        );
        // Exactly the limit without the end of the head counts as oversized too.
        assert!(matches!(
            parse(&head[..limit], limit),
            Parsed::Oversized(Some(_))
        ));
        let mut long_target = b"GET /".to_vec();
        long_target.resize(limit + 10, b'a');
        assert_eq!(parse(&long_target, limit).oversized(), Some(None));
        let mut leading = b"\r\n\nHEAD /healthz HTTP/1.0\n".to_vec();
        leading.resize(limit + 1, b'a');
        assert_eq!(
            parse(&leading, limit).oversized(),
            Some(Some(RequestLine {
                route: Route::of(b"/healthz"),
                head_method: true
            }))
        );
    }

    #[test]
    fn oversized_with_invalid_bytes_is_invalid() {
        let mut head = b"GET /v1/client HTTP/1.1\r\nX: \x01".to_vec();
        head.resize(100, b'a');
        assert!(matches!(parse(&head, 64), Parsed::Invalid));
    }

    #[test]
    fn trim_spaces_and_tabs_only() {
        assert_eq!(trim(b" \t a b\t "), b"a b");
        assert_eq!(trim(b"  "), b"");
        assert_eq!(trim(b"\x0ba"), b"\x0ba");
    }

    impl Parsed<'_> {
        fn oversized(&self) -> Option<Option<RequestLine>> {
            match self {
                Parsed::Oversized(line) => Some(*line),
                Parsed::Complete(_) | Parsed::Invalid => None,
            }
        }
    }
}
