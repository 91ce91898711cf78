//! `kind = "mitel_ws"`: notifications over MQTT over WebSocket, against a
//! real MQTT broker (Mosquitto on 127.0.0.1:1883, started by `.ci/run`)
//! behind a small WebSocket-to-TCP relay, and a mock Mitel API whose
//! `/connections` hands out `ws://127.0.0.1:PORT/mqtt?X-Amz-...` URLs.
//!
//! These use real time (the broker is another process), with short
//! back-offs; every wait is bounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::{Gateway, TOKEN, fixture};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response as WsResponse};
use tokio_util::sync::CancellationToken;

const BROKER: &str = "127.0.0.1:1883";
const PRINCIPAL: &str = "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11";

/// A per-test tag: MQTT client ids and topics are shared by every test
/// talking to the one broker.
fn tag() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "{:012x}",
        RandomState::new().hash_one(std::process::id()) >> 16
    )
}

/// How the relay treats a WebSocket it accepted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Pipe it to the broker.
    Relay,
    /// Close it right away (what missing permissions look like).
    CloseAtOnce,
}

/// A WebSocket (subprotocol `mqtt`) to TCP relay in front of the broker.
struct Relay {
    port: u16,
    stop: CancellationToken,
    /// Query strings of the requests it accepted.
    queries: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    async fn start(mode: Mode) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
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
            stop,
            queries,
        }
    }

    /// Kills the relay and every connection through it.
    fn kill(&self) {
        self.stop.cancel();
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
                .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
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

/// The mock Mitel API: token, subscriptions, connections.
#[derive(Clone)]
struct MockApi {
    subscriptions: Arc<Mutex<Vec<Value>>>,
    relay_port: Arc<AtomicU16>,
    /// When each WebSocket URL was handed out.
    urls_issued: Arc<Mutex<Vec<Instant>>>,
    tag: String,
}

async fn token() -> Response {
    axum::Json(json!({"access_token": "tok-1", "expires_in": 3600})).into_response()
}

async fn list(State(api): State<MockApi>) -> Response {
    let items = api.subscriptions.lock().clone();
    axum::Json(json!({"count": items.len(), "_embedded": {"items": items}})).into_response()
}

async fn create(State(api): State<MockApi>, axum::Json(body): axum::Json<Value>) -> Response {
    let mut subs = api.subscriptions.lock();
    let mut sub = body;
    sub["subscriptionId"] = json!(format!("msub-{}-{}", api.tag, subs.len() + 1));
    subs.push(sub.clone());
    (StatusCode::CREATED, axum::Json(sub)).into_response()
}

async fn connections(State(api): State<MockApi>, axum::Json(body): axum::Json<Value>) -> Response {
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

async fn start_mock(relay_port: u16, tag: &str) -> (MockApi, String) {
    let api = MockApi {
        subscriptions: Arc::default(),
        relay_port: Arc::new(AtomicU16::new(relay_port)),
        urls_issued: Arc::default(),
        tag: tag.to_owned(),
    };
    let app = Router::new()
        .route("/2017-09-01/token", post(token))
        .route("/2017-09-01/subscriptions", get(list).post(create))
        .route("/2017-09-01/connections", post(connections))
        .with_state(api.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, base)
}

async fn start_gateway(base: &str, client_id: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "mitel-ws"
kind = "mitel_ws"
api_base = "{base}"
auth_base = "{base}"

[sources.auth]
type = "client_credentials"
client_id = "gw"
client_secret = "s3cret"

[sources.subscription]
client_id = "{client_id}"
media = true
retry_initial_ms = 100
retry_max_secs = 1
"#
    ))
    .await
}

/// Publishes `payload` on `topic` at the broker, over plain MQTT.
async fn publish(topic: &str, payload: String) {
    let options = rumqttc::MqttOptions::new(format!("publisher-{}", tag()), "127.0.0.1", 1883);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
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

/// Waits (at most 10 s) until `check` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn mqtt_state(gw: &Gateway) -> String {
    let (_, sources) = gw.get("/v1/sources").await;
    sources["sources"][0]["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "mqtt")
        .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

async fn record(gw: &Gateway) -> Value {
    gw.get(&format!("/v1/presence/mitel-ws/{PRINCIPAL}"))
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_over_mqtt_reach_the_store_and_survive_a_broker_restart() {
    let tag = tag();
    let relay = Relay::start(Mode::Relay).await;
    let (api, base) = start_mock(relay.port, &tag).await;
    let client_id = format!("gw-{tag}");
    let gw = start_gateway(&base, &client_id).await;

    // Subscriptions with the websocket transport and the client id.
    eventually("two subscriptions", || async {
        api.subscriptions.lock().len() == 2
    })
    .await;
    let subs = api.subscriptions.lock().clone();
    assert!(
        subs.iter()
            .all(|s| s["transport"] == "websocket" && s["deviceId"] == client_id.as_str())
    );
    let presence_topic = subs[0]["subscriptionId"].as_str().unwrap().to_owned();
    let media_topic = subs[1]["subscriptionId"].as_str().unwrap().to_owned();
    eventually("MQTT connected", || async {
        mqtt_state(&gw).await == "connected"
    })
    .await;
    assert!(
        relay.queries.lock()[0].contains("X-Amz-Signature=sig1"),
        "query string kept"
    );

    // Each message goes through the same normalization as a webhook.
    publish(&presence_topic, fixture("mitel-presence.json")).await;
    eventually("presence stored", || async {
        record(&gw).await["availability"] == "busy"
    })
    .await;
    // ... and through the same checks: a principal longer than documented
    // is rejected and not stored.
    let long = fixture("mitel-presence.json").replace(PRINCIPAL, &"p".repeat(257));
    publish(&presence_topic, long).await;
    eventually("the long principal rejected", || async {
        gw.counter("mitel-ws", "rejected.bad_payload").await == 1
    })
    .await;
    assert_eq!(gw.snapshot().await.records.len(), 1);
    publish(&media_topic, fixture("mitel-media-call.json")).await;
    eventually("call state", || async {
        record(&gw).await["activity"] == "ringing"
    })
    .await;

    // The broker goes away; it comes back elsewhere: a fresh URL is used.
    relay.kill();
    let restarted = Relay::start(Mode::Relay).await;
    api.relay_port.store(restarted.port, Ordering::SeqCst);
    eventually("reconnected", || async {
        !restarted.queries.lock().is_empty() && mqtt_state(&gw).await == "connected"
    })
    .await;
    assert!(api.urls_issued.lock().len() >= 2);
    let later = fixture("mitel-presence.json")
        .replace("\"Busy\"", "\"Away\"")
        .replace("1764000930123", "1764000999999")
        .replace(
            "0b7c2d44-8f1a-4e3b-a6d2-93c1e5f7b208",
            "0b7c2d44-8f1a-4e3b-a6d2-93c1e5f7b209",
        );
    publish(&presence_topic, later).await;
    eventually("presence after the restart", || async {
        record(&gw).await["availability"] == "away"
    })
    .await;
    assert_eq!(
        api.subscriptions.lock().len(),
        2,
        "subscriptions were reused"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closed_right_after_connect_is_reported_not_hammered() {
    let tag = tag();
    let relay = Relay::start(Mode::CloseAtOnce).await;
    let (api, base) = start_mock(relay.port, &tag).await;
    let gw = start_gateway(&base, &format!("gw-closed-{tag}")).await;
    eventually("the failure reported", || async {
        let state = mqtt_state(&gw).await;
        state.starts_with("failed: ") && state.contains("permissions")
    })
    .await;
    // Backed off, not a tight loop: each delay is at least half of 100 ms
    // doubling to 1 s, so the fifth URL comes no sooner than 50 + 100 +
    // 200 + 400 ms after the first (a slow machine only adds to that).
    eventually("five attempts", || async {
        api.urls_issued.lock().len() >= 5
    })
    .await;
    let issued = api.urls_issued.lock().clone();
    let backed_off = issued[4] - issued[0];
    assert!(
        backed_off >= Duration::from_millis(750),
        "5 URLs within {backed_off:?}: {issued:?}"
    );
    let problem = gw.post_webhook("mitel-ws", "{}", None).await;
    assert_eq!(problem.status(), 404, "no webhooks for a socket source");
}
