//! A passive observer of the inbound WebSocket byte stream.
//!
//! async-tungstenite hands out whole messages only. Two facts the core needs are below that
//! level, so this scanner follows the frame headers of every byte read from the socket (it never
//! copies payloads):
//!
//! - whether a data message has begun and not finished ([`Input::MessageStarted`], the read
//!   deadline of PROTOCOL.md §9), and
//! - the raw code of the peer's close frame (tungstenite rewrites codes it does not allow, and
//!   its list differs from RFC 6455's by 1014).
//!
//! After a framing violation the codec stops reading; the scanner still finds the peer's close
//! frame in the raw bytes, so the connection can end when the close handshake does.
//!
//! [`Input::MessageStarted`]: switchyard_core::Input::MessageStarted

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::io::{AsyncRead, AsyncWrite};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;

/// Frame-header state of one inbound byte stream.
#[derive(Debug, Default, Clone)]
pub struct FrameScanner {
    /// Bytes of the current frame header gathered so far (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame not yet seen; meaningful once the header is complete.
    payload_left: u64,
    /// The current frame's header is complete and its payload is being skipped.
    in_payload: bool,
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    /// Payload offset within the current frame, for decoding a close code.
    payload_seen: u64,
    close_code_bytes: [u8; 2],
    /// A data message has begun (its first frame header was read) and its last frame has not
    /// ended.
    in_message: bool,
    /// The first complete close frame: `Some(code)`, with `None` for a frame without a code.
    close: Option<Option<u16>>,
}

impl FrameScanner {
    /// Follows `bytes`, the next bytes read from the socket.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.in_payload {
                let take = (bytes.len() as u64).min(self.payload_left) as usize;
                if self.opcode == OP_CLOSE && self.close.is_none() {
                    for &b in &bytes[..take] {
                        if self.payload_seen < 2 {
                            let i = self.payload_seen as usize;
                            self.close_code_bytes[i] = b ^ self.mask[i % 4];
                        }
                        self.payload_seen += 1;
                    }
                }
                self.payload_left -= take as u64;
                bytes = &bytes[take..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
                continue;
            }
            let need = self.header_needed();
            let take = (need - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == self.header_needed() {
                self.header_done();
            }
        }
    }

    /// A data message has begun and not finished.
    pub fn in_message(&self) -> bool {
        self.in_message
    }

    /// Every byte seen so far belongs to a complete frame, and no data message is open: a codec
    /// that has returned every frame it read holds no bytes and no partial message.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && !self.in_payload && !self.in_message
    }

    /// The code of the first complete close frame read, `Some(None)` for one without a code.
    pub fn close(&self) -> Option<Option<u16>> {
        self.close
    }

    /// The header length implied by the bytes gathered so far (2 until the length byte is in).
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let masked = self.header[1] & 0x80 != 0;
        let ext = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if masked { 4 } else { 0 }
    }

    fn header_done(&mut self) {
        let h = &self.header;
        self.fin = h[0] & 0x80 != 0;
        self.opcode = h[0] & 0x0F;
        let masked = h[1] & 0x80 != 0;
        let (len, at) = match h[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        self.mask = if masked {
            [h[at], h[at + 1], h[at + 2], h[at + 3]]
        } else {
            [0; 4]
        };
        if matches!(self.opcode, OP_TEXT | OP_BINARY) {
            self.in_message = true;
        }
        self.header_len = 0;
        self.payload_left = len;
        self.payload_seen = 0;
        self.in_payload = true;
        if len == 0 {
            self.frame_done();
        }
    }

    fn frame_done(&mut self) {
        self.in_payload = false;
        match self.opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY if self.fin => self.in_message = false,
            OP_CLOSE if self.close.is_none() => {
                self.close = Some(
                    (self.payload_seen >= 2).then(|| u16::from_be_bytes(self.close_code_bytes)),
                );
            }
            _ => {}
        }
    }
}

/// A socket wrapper that shows every byte read to a [`FrameScanner`].
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    scanner: FrameScanner,
}

impl<S> Watched<S> {
    pub fn new(inner: S) -> Watched<S> {
        Watched {
            inner,
            scanner: FrameScanner::default(),
        }
    }

    pub fn scanner(&self) -> &FrameScanner {
        &self.scanner
    }

    /// Shows bytes read from the socket before the wrapper existed (after the request head).
    pub fn observe(&mut self, bytes: &[u8]) {
        self.scanner.feed(bytes);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.scanner.feed(&buf[..n]);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn feed_bytewise(s: &mut FrameScanner, bytes: &[u8]) {
        for b in bytes {
            s.feed(std::slice::from_ref(b));
        }
    }

    #[test]
    fn whole_message_is_not_left_open() {
        let mut s = FrameScanner::default();
        s.feed(&frame(true, OP_TEXT, b"{}"));
        assert!(!s.in_message());
        let big = vec![b'x'; 70_000];
        feed_bytewise(&mut s, &frame(true, OP_BINARY, &big));
        assert!(!s.in_message());
    }

    #[test]
    fn header_alone_starts_a_message() {
        let mut s = FrameScanner::default();
        let f = frame(true, OP_TEXT, &[b'a'; 300]);
        s.feed(&f[..3]);
        assert!(!s.in_message(), "header incomplete");
        s.feed(&f[3..8]);
        assert!(s.in_message());
        s.feed(&f[8..]);
        assert!(!s.in_message());
    }

    #[test]
    fn fragments_and_interleaved_control_frames() {
        let mut s = FrameScanner::default();
        s.feed(&frame(false, OP_TEXT, b"[1,"));
        assert!(s.in_message());
        s.feed(&frame(true, 0x9, b"ping"));
        assert!(s.in_message());
        s.feed(&frame(false, OP_CONTINUATION, b"2,"));
        assert!(s.in_message());
        s.feed(&frame(true, OP_CONTINUATION, b"3]"));
        assert!(!s.in_message());
        assert_eq!(s.close(), None);
    }

    #[test]
    fn boundary_only_between_whole_frames_outside_a_message() {
        let mut s = FrameScanner::default();
        assert!(s.at_boundary());
        let f = frame(true, 0xA, b"pong");
        s.feed(&f[..1]);
        assert!(!s.at_boundary(), "partial header");
        s.feed(&f[1..7]);
        assert!(!s.at_boundary(), "partial payload");
        s.feed(&f[7..]);
        assert!(s.at_boundary());
        s.feed(&frame(false, OP_TEXT, b"[1,"));
        assert!(!s.at_boundary(), "message open");
        s.feed(&frame(true, OP_CONTINUATION, b"2]"));
        assert!(s.at_boundary());
    }

    #[test]
    fn close_codes() {
        let mut s = FrameScanner::default();
        let mut payload = 1014u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        feed_bytewise(&mut s, &frame(true, OP_CLOSE, &payload));
        assert_eq!(s.close(), Some(Some(1014)));
        // Only the first close counts.
        s.feed(&frame(true, OP_CLOSE, &1000u16.to_be_bytes()));
        assert_eq!(s.close(), Some(Some(1014)));

        let mut s = FrameScanner::default();
        s.feed(&frame(true, OP_CLOSE, b""));
        assert_eq!(s.close(), Some(None));
    }
}
