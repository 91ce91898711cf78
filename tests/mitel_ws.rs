//! `kind = "mitel_ws"`: notifications over MQTT over WebSocket, against a
//! real MQTT broker (Mosquitto on 127.0.0.1:1883, started by `.ci/run`)
//! behind a small WebSocket-to-TCP relay, and a mock Mitel API whose
//! `/connections` hands out `ws://127.0.0.1:PORT/mqtt?X-Amz-...` URLs
//! (both in tests/common/mitel_ws.rs).
//!
//! These use real time (the broker is another process), with short
//! back-offs; every wait is bounded.

mod common;

use std::time::Duration;

use common::mitel_ws::{self, MitelApi, Mode, Relay};
use common::{Gateway, TOKEN, fixture};
use serde_json::Value;

const PRINCIPAL: &str = "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11";

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
    mitel_ws::publish(&mitel_ws::tag("publisher"), topic, payload).await;
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
    let tag = mitel_ws::tag("mitel-ws");
    let relay = Relay::start().await;
    let (api, base) = MitelApi::start(relay.port, &tag).await;
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
    let restarted = Relay::start().await;
    api.point_at(restarted.port);
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
    let tag = mitel_ws::tag("mitel-ws");
    let relay = Relay::start_as(Mode::CloseAtOnce).await;
    let (api, base) = MitelApi::start(relay.port, &tag).await;
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
