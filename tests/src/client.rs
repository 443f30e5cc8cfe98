//! Blocking clients over std sockets: raw HTTP, and WebSocket peers built on tungstenite's
//! client role. Runtime-neutral by construction.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Bytes, Message, WebSocket};

/// The longest anything expected may take to show up.
pub const WAIT: Duration = Duration::from_secs(5);

/// A valid `Sec-WebSocket-Key` (base64 of 16 bytes).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An HTTP response read to EOF.
#[derive(Debug, Clone)]
pub struct Http {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Http {
    /// Parses a complete response; `None` for anything else (e.g. zero bytes).
    pub fn parse(bytes: &[u8]) -> Option<Http> {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&bytes[..end]).ok()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
            .collect();
        Some(Http {
            status,
            headers,
            body: bytes[end + 4..].to_vec(),
        })
    }

    /// The value of the first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }
}

/// Options for a TCP connection to the relay.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp {
    /// Source address (another loopback address is another client, §3.1).
    pub from: Option<IpAddr>,
    /// `SO_RCVBUF`, set before connecting, for a client that stops reading.
    pub recv_buffer: Option<usize>,
}

impl Tcp {
    pub fn from(ip: [u8; 4]) -> Tcp {
        Tcp {
            from: Some(IpAddr::V4(Ipv4Addr::from(ip))),
            ..Tcp::default()
        }
    }

    pub fn connect(self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(ip) = self.from {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        if let Some(size) = self.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        socket.connect_timeout(&addr.into(), WAIT)?;
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        Ok(stream)
    }
}

/// Writes `request` and reads until the relay closes (or [`WAIT`] passes).
pub fn raw_with(tcp: Tcp, addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = tcp.connect(addr).expect("connect");
    // The relay may answer and close before reading everything; that is fine.
    let _ = s.write_all(request);
    read_to_end(&mut s)
}

pub fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    raw_with(Tcp::default(), addr, request)
}

fn read_to_end(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the relay did not close within {WAIT:?}; read so far: {out:?}")
            }
            Err(_) => return out,
        }
    }
}

/// Sends `request` and parses the answer.
pub fn http(addr: SocketAddr, request: &[u8]) -> Http {
    let bytes = raw(addr, request);
    Http::parse(&bytes).unwrap_or_else(|| panic!("not an HTTP response: {bytes:?}"))
}

pub fn get(addr: SocketAddr, path: &str) -> Http {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes(),
    )
}

/// The headers of a binary (§4.1).
pub fn binary_headers(sid: &str) -> Vec<(String, String)> {
    headers(&[
        ("X-Pyrycode-Server", sid),
        ("X-Pyrycode-Version", "0.9.1"),
        ("User-Agent", "pyrycode-binary/0.9.1"),
    ])
}

/// The headers of a phone (§4.2), lower-case as the app sends them.
pub fn phone_headers(sid: &str) -> Vec<(String, String)> {
    headers(&[
        ("x-pyrycode-server", sid),
        ("x-pyrycode-token", "opaque-token"),
        ("user-agent", "pyrycode-phone/1.0"),
        ("x-pyrycode-device-name", "test phone"),
    ])
}

pub fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

/// A WebSocket upgrade request: the handshake headers, then `extra`.
pub fn upgrade_request(method: &str, path: &str, extra: &[(String, String)]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
    );
    for (n, v) in extra {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// What a dial got.
#[derive(Debug)]
pub enum Dialed {
    Upgraded(Box<Ws>, Http),
    Rejected(Http),
    /// Closed writing nothing.
    Nothing,
}

impl Dialed {
    pub fn ws(self) -> Ws {
        match self {
            Dialed::Upgraded(ws, _) => *ws,
            other => panic!("expected a 101, got {other:?}"),
        }
    }

    pub fn rejected(self) -> Http {
        match self {
            Dialed::Rejected(h) => h,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Dialed::Upgraded(_, h) | Dialed::Rejected(h) => Some(h.status),
            Dialed::Nothing => None,
        }
    }
}

/// Sends raw request bytes and reads the response head byte by byte, so nothing after it is
/// consumed; a 101 becomes a WebSocket client.
pub fn dial_raw(tcp: Tcp, addr: SocketAddr, request: &[u8]) -> Dialed {
    dial_over(Conn::Plain(tcp.connect(addr).expect("connect")), request)
}

/// As [`dial_raw`], over a connection already made (plain or TLS).
pub fn dial_over(mut s: Conn, request: &[u8]) -> Dialed {
    let _ = s.write_all(request);
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no response within {WAIT:?}")
            }
            Err(_) => break,
        }
    }
    if head.is_empty() {
        return Dialed::Nothing;
    }
    let mut resp = Http::parse(&head).unwrap_or_else(|| panic!("bad response head {head:?}"));
    if resp.status == 101 {
        return Dialed::Upgraded(Box::new(Ws::over(s)), resp);
    }
    resp.body = read_to_end(&mut s);
    Dialed::Rejected(resp)
}

pub fn dial(addr: SocketAddr, path: &str, headers: &[(String, String)]) -> Dialed {
    dial_raw(Tcp::default(), addr, &upgrade_request("GET", path, headers))
}

/// A binary on `/v1/server` that must be admitted.
pub fn binary(addr: SocketAddr, sid: &str) -> Ws {
    dial(addr, "/v1/server", &binary_headers(sid)).ws()
}

/// A phone on `/v1/client` that must get its 101.
pub fn phone(addr: SocketAddr, sid: &str) -> Ws {
    dial(addr, "/v1/client", &phone_headers(sid)).ws()
}

/// Anything read from a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame: its code and reason (`None` for a frame without a code).
    Close(Option<(u16, String)>),
    /// The connection ended without (further) frames.
    Gone,
}

/// A client's connection: plain TCP, or TLS over it (rustls, blocking).
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref(),
        }
    }

    /// The TLS session, if any.
    pub fn tls(&self) -> Option<&ClientConnection> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(s) => Some(&s.conn),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Connects and completes a TLS handshake for [`pki::SERVER_NAME`](crate::pki::SERVER_NAME).
/// `Err`: the handshake failed (the relay refused it or closed).
pub fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<Conn> {
    tls_connect_after(addr, config, &[])
}

/// A TLS connection whose TCP stream begins with `preamble` (a PROXY header) before the
/// ClientHello.
pub fn tls_connect_after(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    preamble: &[u8],
) -> std::io::Result<Conn> {
    let mut tcp = Tcp::default().connect(addr)?;
    tcp.write_all(preamble)?;
    let name = ServerName::try_from(crate::pki::SERVER_NAME).expect("server name");
    let session = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(session, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(Conn::Tls(Box::new(stream)))
}

/// An HTTPS request over a new connection: the bytes read and whether the relay ended the TLS
/// session cleanly (close_notify before TCP's end).
pub fn https_raw(addr: SocketAddr, config: Arc<ClientConfig>, request: &[u8]) -> (Vec<u8>, bool) {
    let mut s = tls_connect(addr, config).expect("TLS handshake");
    s.write_all(request).expect("write over TLS");
    let mut out = Vec::new();
    let mut buf = [0; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the relay did not close within {WAIT:?}; read so far: {out:?}")
            }
            Err(_) => return (out, false),
        }
    }
}

/// A blocking WebSocket client.
#[derive(Debug)]
pub struct Ws {
    ws: WebSocket<Conn>,
}

impl Ws {
    pub fn client(stream: TcpStream) -> Ws {
        Ws::over(Conn::Plain(stream))
    }

    pub fn over(conn: Conn) -> Ws {
        // Binaries must accept envelopes above the relay's own inbound limit (§7.5).
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        Ws {
            ws: WebSocket::from_raw_socket(conn, Role::Client, Some(config)),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        self.ws.get_ref().tcp()
    }

    pub fn conn(&self) -> &Conn {
        self.ws.get_ref()
    }

    /// After the close handshake: reads the transport to its end; `true` if it ended cleanly
    /// (over TLS: close_notify before TCP's end).
    pub fn transport_ends_cleanly(&mut self) -> bool {
        let conn = self.ws.get_mut();
        let _ = conn.tcp().set_read_timeout(Some(WAIT));
        let mut buf = [0; 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    pub fn send(&mut self, text: &str) {
        self.send_message(Message::text(text));
    }

    /// Sends TEXT; `false` once the connection is gone.
    pub fn try_send(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).is_ok()
    }

    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.send_message(Message::binary(bytes.to_vec()));
    }

    pub fn send_message(&mut self, m: Message) {
        self.ws.send(m).expect("send");
    }

    /// Sends one frame of a TEXT message; `fin` ends it.
    pub fn send_fragment(&mut self, first: bool, payload: &[u8], fin: bool) {
        assert!(self.try_send_fragment(first, payload, fin), "send frame");
    }

    /// As [`send_fragment`](Ws::send_fragment); `false` once the connection is gone.
    pub fn try_send_fragment(&mut self, first: bool, payload: &[u8], fin: bool) -> bool {
        let op = if first {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(Bytes::copy_from_slice(payload), op, fin);
        self.ws.send(Message::Frame(frame)).is_ok()
    }

    /// Sends a close frame with `code` (any value, even one not allowed on the wire).
    pub fn send_close(&mut self, code: Option<u16>) {
        let frame = code.map(|c| CloseFrame {
            code: CloseCode::from(c),
            reason: "".into(),
        });
        let _ = self.ws.close(frame);
    }

    /// The next frame of any kind within `within`; `None` if nothing came.
    pub fn next(&mut self, within: Duration) -> Option<Msg> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self.ws.get_ref().tcp().set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(Msg::Text(t.as_str().to_owned())),
                Ok(Message::Binary(b)) => return Some(Msg::Binary(b.to_vec())),
                Ok(Message::Ping(p)) => return Some(Msg::Ping(p.to_vec())),
                Ok(Message::Pong(p)) => return Some(Msg::Pong(p.to_vec())),
                Ok(Message::Close(f)) => {
                    return Some(Msg::Close(
                        f.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())),
                    ));
                }
                Ok(Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return Some(Msg::Gone),
            }
        }
    }

    /// The next data frame, close or end within `within`, answering pings meanwhile.
    pub fn recv_within(&mut self, within: Duration) -> Option<Msg> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left)? {
                Msg::Ping(_) | Msg::Pong(_) => {}
                m => return Some(m),
            }
        }
    }

    pub fn recv(&mut self) -> Msg {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("nothing received within {WAIT:?}"))
    }

    /// The next message, which must be TEXT.
    pub fn text(&mut self) -> String {
        match self.recv() {
            Msg::Text(t) => t,
            other => panic!("expected a TEXT message, got {other:?}"),
        }
    }

    /// The next message, which must be a close frame with a code.
    pub fn expect_close(&mut self) -> (u16, String) {
        match self.recv() {
            Msg::Close(Some(c)) => c,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Asserts nothing but pings and pongs arrive for `d` (pings are answered).
    pub fn silent(&mut self, d: Duration) {
        if let Some(m) = self.recv_within(d) {
            panic!("expected silence, got {m:?}");
        }
    }

    /// Reads until the relay ends the connection (after its close frame).
    pub fn wait_gone(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                None => panic!("connection still open after {WAIT:?}"),
                Some(Msg::Gone) => return,
                Some(_) => {}
            }
        }
    }

    /// Closes with `code` and waits for the relay's answer; returns the code it echoed.
    pub fn close(&mut self, code: Option<u16>) -> Option<(u16, String)> {
        self.send_close(code);
        loop {
            match self.recv() {
                Msg::Close(c) => return c,
                Msg::Gone => panic!("no close reply"),
                _ => {}
            }
        }
    }

    /// Drops TCP with a reset (SO_LINGER 0), no close frame.
    pub fn reset(self) {
        let _ = SockRef::from(self.stream()).set_linger(Some(Duration::ZERO));
    }
}

/// Polls `check` until it holds or [`WAIT`] passes.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
