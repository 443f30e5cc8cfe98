//! Runs the example binary and talks to it as a real binary and real phones would: plain blocking
//! tungstenite clients with the §4 headers. Every socket has a read timeout, so a failure fails
//! instead of hanging.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const TIMEOUT: Duration = Duration::from_secs(5);
const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// The example relay as a child process, killed when the test ends (or panics).
struct Example {
    child: Child,
    addr: SocketAddr,
}

impl Example {
    fn start() -> Example {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-example-loop"))
            .arg("127.0.0.1:0")
            .env("SWITCHYARD_SEED", SEED)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the example");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the address");
        let addr = line
            .trim()
            .parse()
            .expect("the first line is the bound address");
        Example { child, addr }
    }

    fn connect(&self, path: &str, headers: &[(&str, &str)]) -> WebSocket<TcpStream> {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let mut request = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .expect("request");
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        let (ws, response) = tungstenite::client::client(request, stream).expect("handshake");
        assert_eq!(response.status(), 101);
        ws
    }

    fn binary(&self, server_id: &str) -> WebSocket<TcpStream> {
        let headers = [
            ("X-Pyrycode-Server", server_id),
            ("X-Pyrycode-Version", "0.9.0"),
            ("User-Agent", "pyry-daemon/0.9.0"),
        ];
        self.connect("/v1/server", &headers)
    }

    fn phone(&self, server_id: &str) -> WebSocket<TcpStream> {
        let headers = [
            ("x-pyrycode-server", server_id),
            ("x-pyrycode-token", "opaque-token"),
            ("user-agent", "pyry-phone/1.0"),
        ];
        self.connect("/v1/client", &headers)
    }

    /// One plain HTTP request; the whole answer, up to the relay's close.
    fn http(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        stream.write_all(request.as_bytes()).expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the answer");
        answer
    }

    fn healthz(&self) -> String {
        let answer = self.http("GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer.contains("Content-Type: application/json; charset=utf-8\r\n"),
            "{answer}"
        );
        let (_, body) = answer.split_once("\r\n\r\n").expect("head and body");
        body.to_owned()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next data message as text, skipping heartbeat frames.
fn next_text(ws: &mut WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().expect("a message") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Splits `{"conn_id":"client-<sid>-<16 hex>","frame":<frame>}` into its conn id and frame,
/// checking every byte of the envelope around them.
fn envelope(text: &str, server_id: &str) -> (String, String) {
    let prefix = format!(r#"{{"conn_id":"client-{server_id}-"#);
    let rest = text
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("envelope: {text}"));
    let (hex, rest) = rest.split_at(16);
    assert!(
        hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{text}"
    );
    let frame = rest
        .strip_prefix(r#"","frame":"#)
        .and_then(|f| f.strip_suffix('}'))
        .unwrap_or_else(|| panic!("envelope: {text}"));
    (format!("client-{server_id}-{hex}"), frame.to_owned())
}

#[test]
fn binary_and_phones_exchange_frames() {
    let relay = Example::start();
    assert!(
        relay.healthz().starts_with(
            r#"{"status":"ok","version":"0.1.0","connected_binaries":0,"connected_phones":0,"uptime_seconds":"#
        ),
        "idle healthz"
    );

    let mut binary = relay.binary("abc");
    let mut alice = relay.phone("abc");
    let mut bob = relay.phone("abc");

    // Phone → binary: wrapped byte for byte, outer whitespace trimmed, the frame untouched.
    alice
        .send(Message::text(" {\"t\":\"hi\", \"n\": [1, 2]}\n"))
        .expect("send");
    let (alice_id, frame) = envelope(&next_text(&mut binary), "abc");
    assert_eq!(frame, r#"{"t":"hi", "n": [1, 2]}"#);
    bob.send(Message::text("\"bob here\"")).expect("send");
    let (bob_id, frame) = envelope(&next_text(&mut binary), "abc");
    assert_eq!(frame, r#""bob here""#);
    assert_ne!(alice_id, bob_id);

    let body = relay.healthz();
    assert!(
        body.contains(r#""connected_binaries":1,"connected_phones":2,"#),
        "{body}"
    );

    // Binary → phone: only the named phone gets the frame. Bob's next message is the one meant
    // for him, so Alice's did not reach him first.
    let to_alice = format!(r#"{{"conn_id":"{alice_id}","frame":{{"t":"yo"}}}}"#);
    binary.send(Message::text(to_alice)).expect("send");
    assert_eq!(next_text(&mut alice), r#"{"t":"yo"}"#);
    let to_bob = format!(r#"{{"conn_id":"{bob_id}","frame":[true]}}"#);
    binary.send(Message::text(to_bob)).expect("send");
    assert_eq!(next_text(&mut bob), "[true]");

    // A phone for a server-id nobody holds is turned away after the 101.
    let mut stray = relay.phone("nobody");
    match stray.read().expect("close frame") {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4404);
            assert_eq!(frame.reason.as_str(), "no server with that id");
        }
        other => panic!("expected close 4404, got {other:?}"),
    }

    // A phone that leaves is announced to its binary with its close code.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    alice.close(Some(bye)).expect("close");
    loop {
        match alice.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    let notice = format!(r#"{{"conn_id":"{alice_id}","close_code":1000}}"#);
    assert_eq!(next_text(&mut binary), notice);
}

#[test]
fn unknown_path_is_404() {
    let relay = Example::start();
    let answer = relay.http("GET /nope HTTP/1.1\r\nHost: relay\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    assert!(answer.ends_with("404 page not found\n"), "{answer}");
}
