//! Dialling binaries and phones, and the echo binary.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::{TokioAdapter, client_async};
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;

use crate::Error;

pub type Ws = WebSocketStream<TokioAdapter<TcpStream>>;

/// Which side of the relay a client plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Binary,
    Phone,
}

/// Dials `addr` as a binary or phone of `sid`. With `sources > 0` the socket is bound to
/// 127.0.0.(2 + n % sources), so per-address limits and ephemeral ports spread over sources.
pub async fn dial(
    addr: SocketAddr,
    sources: u8,
    n: usize,
    side: Side,
    sid: &str,
) -> Result<Ws, Error> {
    let socket = TcpSocket::new_v4()?;
    if sources > 0 {
        let last = 2 + (n % usize::from(sources)) as u8;
        socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let path = match side {
        Side::Binary => "/v1/server",
        Side::Phone => "/v1/client",
    };
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    let headers = request.headers_mut();
    headers.insert("x-pyrycode-server", HeaderValue::from_str(sid)?);
    headers.insert("user-agent", HeaderValue::from_static("switchyard-bench"));
    match side {
        Side::Binary => headers.insert("x-pyrycode-version", HeaderValue::from_static("bench")),
        Side::Phone => headers.insert("x-pyrycode-token", HeaderValue::from_static("bench")),
    };
    let (ws, _) = client_async(request, stream).await?;
    Ok(ws)
}

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    conn_id: &'a str,
    #[serde(borrow)]
    frame: Option<&'a RawValue>,
}

/// A binary that sends every phone's frame straight back to it. With `raw` (the floor pipe,
/// which has no envelope) it echoes each frame as it came.
pub async fn echo_binary(mut ws: Ws, raw: bool) {
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let reply = if raw {
            text
        } else {
            let Ok(env) = serde_json::from_str::<Envelope<'_>>(&text) else {
                continue;
            };
            let Some(frame) = env.frame else { continue }; // a close notice
            format!(r#"{{"conn_id":"{}","frame":{}}}"#, env.conn_id, frame.get()).into()
        };
        if ws.send(Message::Text(reply)).await.is_err() {
            break;
        }
    }
}

/// Waits for the next text message, answering nothing else (pongs are automatic).
pub async fn next_text(ws: &mut Ws) -> Result<(), Error> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_))) => return Ok(()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Err("the relay closed the connection".into()),
        }
    }
}

/// A JSON string frame of `size` bytes.
pub fn frame(size: usize) -> String {
    format!("\"{}\"", "x".repeat(size.saturating_sub(2)))
}
