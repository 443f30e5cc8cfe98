//! Reading an HTTP request head off a fresh connection, within the size limit of stage 5.
//!
//! The time limit (stage 0, `header_timeout`) is the caller's: it races [`read_head`] against
//! the executor's timer.

use std::io;

use futures_util::io::{AsyncRead, AsyncReadExt};

/// What [`read_head`] read.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// A complete head ending in CRLFCRLF, or exactly the first `max_head_size` bytes of one
    /// that had not ended by then: what [`Gate::handle_head`](switchyard_core::Gate) takes.
    pub head: Vec<u8>,
    /// Bytes read after the head (a client that did not wait for the 101).
    pub rest: Vec<u8>,
}

const CHUNK: usize = 2048;

/// Reads until the end of the request head or `max_head_size` bytes. `Ok(None)`: the peer ended
/// the connection first.
///
/// Never reads past `max_head_size` and never holds a buffer larger than it, however the head
/// trickles in: that is the memory a connection awaiting its head costs (decision A2).
pub async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_head_size: usize,
) -> io::Result<Option<Head>> {
    let mut buf = Vec::with_capacity(CHUNK.min(max_head_size.max(4)));
    loop {
        let searched = buf.len().saturating_sub(3);
        let old = buf.len();
        let room = CHUNK.min(max_head_size.saturating_sub(old)).max(1);
        if buf.capacity() < old + room {
            // Doubling keeps a trickled head linear; the limit caps it.
            let target = (buf.capacity() * 2).clamp(old + room, max_head_size.max(old + room));
            buf.reserve_exact(target - old);
        }
        buf.resize(old + room, 0);
        let n = reader.read(&mut buf[old..]).await?;
        buf.truncate(old + n);
        if n == 0 {
            return Ok(None);
        }
        if let Some(end) = find_end(&buf[searched..]).map(|i| searched + i) {
            if end <= max_head_size {
                let rest = buf.split_off(end);
                return Ok(Some(Head { head: buf, rest }));
            }
        }
        if buf.len() >= max_head_size {
            let rest = buf.split_off(max_head_size);
            return Ok(Some(Head { head: buf, rest }));
        }
    }
}

/// The index just past the first CRLFCRLF.
fn find_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::io::Cursor;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The reader is a cursor: every poll is ready at once.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    fn read(bytes: &[u8], max: usize) -> Option<Head> {
        block_on(read_head(&mut Cursor::new(bytes.to_vec()), max)).unwrap()
    }

    #[test]
    fn complete_head_and_rest() {
        let h = read(b"GET / HTTP/1.1\r\nA: b\r\n\r\n\x81\x80", 100).unwrap();
        assert_eq!(h.head, b"GET / HTTP/1.1\r\nA: b\r\n\r\n");
        assert_eq!(h.rest, b"\x81\x80");
    }

    #[test]
    fn oversized_head_is_cut_at_the_limit() {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(5000, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        let h = read(&req, 4096).unwrap();
        assert_eq!(h.head.len(), 4096);
        assert_eq!(h.head[..], req[..4096]);
        // Exactly at the limit is a complete head.
        let h = read(&req, req.len()).unwrap();
        assert_eq!(h.head, req);
        assert!(h.rest.is_empty());
        // One byte short: cut.
        let h = read(&req, req.len() - 1).unwrap();
        assert_eq!(h.head.len(), req.len() - 1);
    }

    /// Hands out one byte per read, as a slowloris client sends.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let i = self.1;
            let n = usize::from(i < self.0.len() && !out.is_empty());
            if n == 1 {
                out[0] = self.0[i];
                self.1 += 1;
            }
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn buffer_never_outgrows_the_limit() {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(20_000, b'a');
        for max in [4096, 5000, 16384] {
            let h = block_on(read_head(&mut Trickle(req.clone(), 0), max))
                .unwrap()
                .unwrap();
            assert_eq!(h.head[..], req[..max]);
            assert!(h.head.capacity() <= max, "{} > {max}", h.head.capacity());
            let h = read(&req, max).unwrap();
            assert!(h.head.capacity() <= max, "{} > {max}", h.head.capacity());
        }
    }

    #[test]
    fn end_of_stream_before_the_head_ends() {
        assert_eq!(read(b"GET / HTTP/1.1\r\n", 100), None);
        assert_eq!(read(b"", 100), None);
    }
}
