//! A Server-Sent Events client for the black-box suites: opens
//! `/v1/stream` over real HTTP and parses its events.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::{Gateway, TOKEN};

/// One received SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub event: String,
    pub id: Option<u64>,
    pub data: Value,
}

pub type Body =
    std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<axum::body::Bytes, String>> + Send>>;

/// An open event stream.
pub struct Client {
    pub body: Body,
    pub buffer: String,
}

impl Client {
    pub async fn open(gw: &Gateway, query: &str, last_event_id: Option<u64>) -> Client {
        Client::open_as(gw, TOKEN, query, last_event_id).await
    }

    /// A stream opened with `token`.
    pub async fn open_as(
        gw: &Gateway,
        token: &str,
        query: &str,
        last_event_id: Option<u64>,
    ) -> Client {
        let url = gw.url(&format!("/v1/stream{query}"));
        Client::open_url(&gw.client, &url, token, last_event_id).await
    }

    /// A stream of any gateway (also one run as a process) at `url`.
    pub async fn open_url(
        client: &reqwest::Client,
        url: &str,
        token: &str,
        last_event_id: Option<u64>,
    ) -> Client {
        let mut request = client.get(url).bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("stream");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Client {
            body: Box::pin(
                response
                    .bytes_stream()
                    .map(|r| r.map_err(|e| e.to_string())),
            ),
            buffer: String::new(),
        }
    }

    /// A stream on a socket with a 4 KiB receive buffer, through which the
    /// test stops reading: the gateway's writes block after a few events.
    pub async fn open_small_window(gw: &Gateway, query: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(gw.addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = http::Request::get(format!("/v1/stream{query}"))
            .header("host", gw.addr.to_string())
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Empty::<axum::body::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let frames = http_body_util::BodyStream::new(response.into_body());
        Client {
            body: Box::pin(frames.filter_map(|frame| async move {
                match frame {
                    Ok(frame) => frame.into_data().ok().map(Ok),
                    Err(e) => Some(Err(e.to_string())),
                }
            })),
            buffer: String::new(),
        }
    }

    /// Every event until the stream ends (reading as fast as it can).
    pub async fn drain(&mut self) -> Vec<Sse> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }

    /// The next event (keep-alive comments skipped), within 5 s.
    pub async fn next(&mut self) -> Option<Sse> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut e = Sse {
                        event: "message".into(),
                        id: None,
                        data: Value::Null,
                    };
                    let mut any = false;
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            e.event = v.trim().into();
                            any = true;
                        } else if let Some(v) = line.strip_prefix("id:") {
                            e.id = v.trim().parse().ok();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            e.data = serde_json::from_str(v.trim()).expect("JSON data");
                            any = true;
                        }
                    }
                    if any {
                        return Some(e);
                    }
                    continue;
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                    _ => return None,
                }
            }
        })
        .await
        .expect("an event within 5 s")
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next().await.expect("stream ended"));
        }
        out
    }
}
