//! For `kind = "mitel_ws"` sources (tests/mitel_ws.rs, and the suites that
//! mix one in): a WebSocket-to-TCP relay in front of the real MQTT broker
//! (Mosquitto on 127.0.0.1:1883, started by `scripts/test`), a mock Mitel
//! API whose `/connections` hands out the relay's `ws://` URL, and a
//! publisher. A test scripts the failures it needs through them: a relay
//! that closes every socket at once ([`Mode::CloseAtOnce`]), a relay killed
//! and replaced ([`Relay::kill`], [`MitelApi::point_at`]), and the record of
//! what each was asked ([`Relay::queries`], [`MitelApi::urls_issued`]).
//!
//! Real time only: the broker is another process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response as WsResponse};
use tokio_util::sync::CancellationToken;

/// The broker the relay forwards to.
pub const BROKER: &str = "127.0.0.1:1883";

/// A tag unique to this test process and `what`: MQTT client ids and
/// topics are shared by every test talking to the one broker.
pub fn tag(what: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "{what}-{:012x}",
        RandomState::new().hash_one(std::process::id()) >> 16
    )
}

/// What a [`Relay`] does with a WebSocket it accepted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pipe it to the broker.
    Pipe,
    /// Close it right away (what missing permissions look like).
    CloseAtOnce,
}

/// A WebSocket (subprotocol `mqtt`) to TCP relay in front of the broker;
/// stops (with every connection through it) when killed or dropped.
pub struct Relay {
    pub port: u16,
    /// Query strings of the upgrade requests it accepted, in order.
    pub queries: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl Relay {
    /// A relay that pipes every socket to the broker.
    pub async fn start() -> Relay {
        Relay::start_as(Mode::Pipe).await
    }

    /// A relay that treats every socket as `mode` says.
    pub async fn start_as(mode: Mode) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let stop = CancellationToken::new();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let (token, seen) = (stop.clone(), Arc::clone(&queries));
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => return },
                    () = token.cancelled() => return,
                };
                tokio::spawn(pipe(stream, mode, token.clone(), Arc::clone(&seen)));
            }
        });
        Relay {
            port,
            queries,
            stop,
        }
    }

    /// Kills the relay and every connection through it (the broker going
    /// away, as the gateway sees it).
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn pipe(
    stream: TcpStream,
    mode: Mode,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<String>>>,
) {
    // tungstenite fixes the callback's error type.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: WsResponse| {
        seen.lock()
            .push(request.uri().query().unwrap_or("").to_owned());
        let asked = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if asked.split(',').any(|p| p.trim() == "mqtt") {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", "mqtt".parse().expect("header"));
        }
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    if mode == Mode::CloseAtOnce {
        return;
    }
    let Ok(tcp) = TcpStream::connect(BROKER).await else {
        return;
    };
    let (mut tcp_rx, mut tcp_tx) = tcp.into_split();
    let (mut ws_tx, mut ws_rx) = ws.split();
    let up = async {
        while let Some(Ok(message)) = ws_rx.next().await {
            if let Message::Binary(bytes) = message
                && tcp_tx.write_all(&bytes).await.is_err()
            {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tcp_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::binary(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
        () = stop.cancelled() => {}
    }
}

/// The mock Mitel API (Authentication and Notifications under one base):
/// token, subscriptions (list, create), connections.
#[derive(Clone)]
pub struct MitelApi {
    pub subscriptions: Arc<Mutex<Vec<Value>>>,
    /// When each WebSocket URL was handed out, in order.
    pub urls_issued: Arc<Mutex<Vec<Instant>>>,
    relay_port: Arc<AtomicU16>,
    tag: String,
}

impl MitelApi {
    /// Starts the mock, handing out URLs of the relay on `relay_port`;
    /// subscription ids (the MQTT topics) carry `tag`. Returns it and its
    /// base URL.
    pub async fn start(relay_port: u16, tag: &str) -> (MitelApi, String) {
        let api = MitelApi {
            subscriptions: Arc::default(),
            urls_issued: Arc::default(),
            relay_port: Arc::new(AtomicU16::new(relay_port)),
            tag: tag.to_owned(),
        };
        let app = Router::new()
            .route("/2017-09-01/token", post(token))
            .route("/2017-09-01/subscriptions", get(list).post(create))
            .route("/2017-09-01/connections", post(connections))
            .with_state(api.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let base = format!("http://{}", listener.local_addr().expect("mock addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (api, base)
    }

    /// Hands out URLs of the relay on `relay_port` from now on (the broker
    /// came back elsewhere).
    pub fn point_at(&self, relay_port: u16) {
        self.relay_port.store(relay_port, Ordering::SeqCst);
    }

    /// The MQTT topic of the presence subscription, once it exists.
    pub fn presence_topic(&self) -> Option<String> {
        self.subscriptions
            .lock()
            .iter()
            .find(|s| s["topic"] == "platform-api-presence")
            .and_then(|s| s["subscriptionId"].as_str().map(str::to_owned))
    }
}

async fn token() -> Response {
    axum::Json(json!({"access_token": "tok-1", "expires_in": 3600})).into_response()
}

async fn list(State(api): State<MitelApi>) -> Response {
    let items = api.subscriptions.lock().clone();
    axum::Json(json!({"count": items.len(), "_embedded": {"items": items}})).into_response()
}

async fn create(State(api): State<MitelApi>, axum::Json(body): axum::Json<Value>) -> Response {
    let mut subs = api.subscriptions.lock();
    let mut sub = body;
    sub["subscriptionId"] = json!(format!("msub-{}-{}", api.tag, subs.len() + 1));
    subs.push(sub.clone());
    (StatusCode::CREATED, axum::Json(sub)).into_response()
}

/// A pre-signed URL of the relay; the `n`th carries the signature `sig{n}`.
async fn connections(State(api): State<MitelApi>, axum::Json(body): axum::Json<Value>) -> Response {
    assert_eq!(body["transport"], "websocket");
    let n = {
        let mut issued = api.urls_issued.lock();
        issued.push(Instant::now());
        issued.len()
    };
    let port = api.relay_port.load(Ordering::SeqCst);
    let url = format!(
        "ws://127.0.0.1:{port}/mqtt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=sig{n}"
    );
    axum::Json(json!({"url": url})).into_response()
}

/// Publishes `payload` on `topic` at the broker over plain MQTT (QoS 1),
/// and waits for the broker's acknowledgement.
pub async fn publish(client_id: &str, topic: &str, payload: String) {
    let options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", 1883);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .await
        .expect("publish");
    let acked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("publisher: {e} (is Mosquitto running on {BROKER}?)"),
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "the broker did not acknowledge the publish");
    let _ = client.disconnect().await;
}
