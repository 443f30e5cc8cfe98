//! The cost floor: a bare WebSocket pipe on the relay's own stack (tokio + async-tungstenite).
//!
//! A binary (`/v1/server`) and the first phone (`/v1/client`) naming the same
//! `x-pyrycode-server` are paired and frames are copied across unchanged: no envelope, no
//! registry, no limits. What the relay does beyond this is its overhead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_tungstenite::tokio::accept_hdr_async;
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tungstenite::handshake::server::{Request, Response};

use crate::Error;
use crate::client::Ws;

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Ws>>>>;

pub async fn serve(listen: SocketAddr) -> Result<(), Error> {
    let listener = TcpListener::bind(listen).await?;
    println!("floor listening on {}", listener.local_addr()?);
    let waiting: Waiting = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let mut route = (String::new(), String::new());
            #[allow(clippy::result_large_err)] // the signature is tungstenite's `Callback`
            let callback = |req: &Request, resp: Response| {
                let sid = req
                    .headers()
                    .get("x-pyrycode-server")
                    .and_then(|v| v.to_str().ok());
                route = (
                    req.uri().path().to_owned(),
                    sid.unwrap_or_default().to_owned(),
                );
                Ok(resp)
            };
            let Ok(ws) = accept_hdr_async(stream, callback).await else {
                return;
            };
            let (path, sid) = route;
            if path == "/v1/server" {
                let (tx, rx) = oneshot::channel();
                waiting.lock().expect("lock").insert(sid, tx);
                if let Ok(phone) = rx.await {
                    pipe(ws, phone).await;
                }
            } else {
                let binary = waiting.lock().expect("lock").remove(&sid);
                if let Some(tx) = binary {
                    let _ = tx.send(ws);
                }
            }
        });
    }
}

/// Copies frames both ways until either side ends.
async fn pipe(a: Ws, b: Ws) {
    let (mut a_tx, mut a_rx) = a.split();
    let (mut b_tx, mut b_rx) = b.split();
    let ab = async {
        while let Some(Ok(m)) = a_rx.next().await {
            if m.is_text() && b_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    let ba = async {
        while let Some(Ok(m)) = b_rx.next().await {
            if m.is_text() && a_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = ab => {}
        () = ba => {}
    }
}
