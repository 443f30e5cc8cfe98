//! Real HTTP servers on loopback standing in for the OAuth2 token endpoint and FCM, for the push
//! scenarios. Each is a std `TcpListener` with a thread per connection: it records every request
//! and answers what the scenario's reply function says, or holds the connection unanswered.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// One request as the double read it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }
}

/// What the double does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answers with this status, extra headers and body.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Keeps the connection open and never answers (until the double is dropped).
    Stall,
}

impl Reply {
    pub fn json(status: u16, body: impl Into<String>) -> Reply {
        Reply::Respond {
            status,
            headers: vec![("Content-Type", "application/json".to_owned())],
            body: body.into(),
        }
    }
}

type ReplyFn = dyn Fn(&Request, usize) -> Reply + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Request>>,
    reply: Mutex<Arc<ReplyFn>>,
    stop: AtomicBool,
}

/// A running double; dropping it stops it and releases stalled connections.
pub struct HttpDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl HttpDouble {
    /// Starts a double answering request `n` (0-based, counted over all connections) with
    /// `reply(&request, n)`.
    pub fn start(reply: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> HttpDouble {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a double");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            reply: Mutex::new(Arc::new(reply)),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = s.clone();
                        thread::spawn(move || serve(stream, &s));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HttpDouble { addr, shared }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the reply function.
    pub fn set_reply(&self, reply: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) {
        *self.shared.reply.lock().unwrap() = Arc::new(reply);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }
}

impl Drop for HttpDouble {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// A URL on which nothing listens: connections are refused.
pub fn refused_url(path: &str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address");
    drop(l);
    format!("http://{addr}{path}")
}

/// Serves requests on one connection until it ends or the double stops.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf, &shared.stop) else {
            return;
        };
        let reply = shared.reply.lock().unwrap().clone();
        let n = {
            let mut requests = shared.requests.lock().unwrap();
            requests.push(request.clone());
            requests.len() - 1
        };
        match reply(&request, n) {
            Reply::Respond {
                status,
                headers,
                body,
            } => {
                let mut out = format!("HTTP/1.1 {status} Double\r\n");
                for (name, value) in headers {
                    out.push_str(&format!("{name}: {value}\r\n"));
                }
                out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
                if stream.write_all(out.as_bytes()).is_err() {
                    return;
                }
            }
            Reply::Stall => {
                while !shared.stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(10));
                }
                return;
            }
        }
    }
}

/// Reads one request (head and `Content-Length` body); `None` at EOF, on error or on stop.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, stop: &AtomicBool) -> Option<Request> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(stream, buf, &mut chunk, stop)?;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    while buf.len() < head_end + length {
        fill(stream, buf, &mut chunk, stop)?;
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn fill(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    stop: &AtomicBool,
) -> Option<()> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        match stream.read(chunk) {
            Ok(0) => return None,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Some(());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
}
