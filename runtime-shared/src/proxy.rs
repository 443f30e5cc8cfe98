//! Reading a PROXY protocol v2 header off a fresh connection (PROTOCOL.md §3.2), as the core's
//! [`judge_proxy_header`] directs.
//!
//! Each read asks for at most the bytes the core still needs, so nothing after the header is
//! consumed: the request head (or, later, a TLS handshake) is read from the socket untouched. The
//! time limit is the caller's, shared with the rest of stage 0.

use std::io;
use std::net::SocketAddr;

use futures_util::io::{AsyncRead, AsyncReadExt};
use switchyard_core::{PROXY_FIXED_LEN, ProxyHeader, judge_proxy_header};

/// Reads one PROXY v2 header and returns its source address. `Ok(None)`: the header was refused
/// or the peer ended the connection first; either way the connection is closed writing nothing.
pub async fn read_proxy_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> io::Result<Option<SocketAddr>> {
    let mut buf = Vec::with_capacity(PROXY_FIXED_LEN);
    loop {
        match judge_proxy_header(&buf) {
            ProxyHeader::Incomplete { needed } => {
                let old = buf.len();
                buf.resize(needed, 0);
                let n = reader.read(&mut buf[old..]).await?;
                buf.truncate(old + n);
                if n == 0 {
                    return Ok(None);
                }
            }
            ProxyHeader::Accepted { source, .. } => return Ok(Some(source)),
            ProxyHeader::Rejected(_) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A reader that hands out at most `step` bytes per read and counts what it handed out.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step).min(self.bytes.len() - self.at);
            let at = self.at;
            buf[..n].copy_from_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    fn read(bytes: &[u8], step: usize) -> (Option<SocketAddr>, usize) {
        let mut r = Trickle {
            bytes: bytes.to_vec(),
            at: 0,
            step,
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let got = {
            let mut f = std::pin::pin!(read_proxy_header(&mut r));
            loop {
                if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                    break v.unwrap();
                }
            }
        };
        (got, r.at)
    }

    fn tcp4_header() -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0f".to_vec();
        h.extend([198, 51, 100, 9, 10, 0, 0, 1, 0x30, 0x39, 0x01, 0xbb]);
        h.extend([0x04, 0, 0]); // a NOOP TLV
        h
    }

    #[test]
    fn reads_the_header_and_not_a_byte_more() {
        let mut stream = tcp4_header();
        let len = stream.len();
        stream.extend(b"GET /healthz HTTP/1.1\r\n\r\n");
        for step in [1, 3, 16, 4096] {
            let (source, consumed) = read(&stream, step);
            assert_eq!(
                source,
                Some("198.51.100.9:12345".parse().unwrap()),
                "{step}"
            );
            assert_eq!(consumed, len, "step {step}");
        }
    }

    #[test]
    fn refusals_and_early_ends_are_none() {
        let (got, consumed) = read(b"GET /healthz HTTP/1.1\r\n\r\n", 4096);
        assert_eq!(got, None);
        assert!(consumed <= PROXY_FIXED_LEN);
        let h = tcp4_header();
        assert_eq!(read(&h[..h.len() - 1], 4096).0, None);
        assert_eq!(read(b"", 1).0, None);
    }
}
