//! `kind = "ucwa"` against a mock UCWA server (tests/common/ucwa.rs: axum
//! on loopback) that keeps a real pending GET open until it has events or
//! its timeout passes, serves contact presence, and can be scripted. Under
//! tokio's paused clock, like the subscription scenarios: a pending GET's
//! 15-minute timeout or a subscription's expiry pass at once when nothing
//! else is due.

mod common;

use std::time::Duration;

use common::ucwa::{APPS, Script, start_mock};
use common::{Gateway, TOKEN, settle};
use serde_json::{Value, json};

async fn start_gateway(base: &str) -> Gateway {
    let contacts = r#"["sip:SaraD@contoso.com", "sip:alex@contoso.com", "sip:kim@contoso.com"]"#;
    start_gateway_with(base, contacts).await
}

async fn start_gateway_with(base: &str, contacts: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "sfb"
kind = "ucwa"
api_base = "{base}{APPS}"

[sources.auth]
type = "refresh_token"
refresh_token = "r1"
token_url = "{base}/oauth/token"

[sources.subscription]
contacts = {contacts}
duration_mins = 10
event_timeout_secs = 900
retry_initial_ms = 1000
retry_max_secs = 30
"#
    ))
    .await
}

async fn availability(gw: &Gateway, principal: &str) -> Value {
    gw.get(&format!("/v1/presence/sfb/{principal}")).await.1["availability"].clone()
}

async fn source(gw: &Gateway) -> Value {
    gw.get("/v1/sources").await.1["sources"][0].clone()
}

#[tokio::test(start_paused = true)]
async fn start_up_subscribes_in_one_batch_and_reads_everyone_before_ready() {
    let (api, base) = start_mock().await;
    api.state.lock().presence_delay = Duration::from_secs(3);
    let gw = start_gateway(&base).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let readyz = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503, "not ready while contacts are read");
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle().await;
    let readyz = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);

    let subscriptions = api.state.lock().subscriptions.clone();
    assert_eq!(subscriptions.len(), 1, "one batch");
    assert_eq!(subscriptions[0].len(), 3);
    for address in ["sarad@contoso.com", "alex@contoso.com", "kim@contoso.com"] {
        assert_eq!(api.fetches(address), 1, "{address}");
    }
    assert_eq!(availability(&gw, "sarad@contoso.com").await, "available");
    assert_eq!(availability(&gw, "alex@contoso.com").await, "busy_idle");
    let (_, kim) = gw.get("/v1/presence/sfb/kim@contoso.com").await;
    assert_eq!(kim["availability"], "offline");
    assert_eq!(kim["raw_status"], "Offline");
    assert_eq!(kim["activity"], "available");
    // A read returns current presence: observed when read, not at
    // lastActive (2013), which would make later reads look stale.
    assert!(kim["observed_at"].as_str().unwrap() > "2026", "{kim}");
    let s = source(&gw).await;
    assert_eq!(s["kind"], "ucwa");
    assert_eq!(s["subscriptions"][0]["state"], "active");
    assert!(s["subscriptions"][0]["expires_at"].is_string());
}

#[tokio::test(start_paused = true)]
async fn presence_events_fetch_each_contact_once() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    api.set("sarad@contoso.com", "Busy");
    api.set("alex@contoso.com", "DoNotDisturb");
    // Two events for Sara in one answer: one fetch.
    api.event("sarad@contoso.com");
    api.event("sarad@contoso.com");
    api.event("alex@contoso.com");
    settle().await;
    assert_eq!(availability(&gw, "sarad@contoso.com").await, "busy");
    assert_eq!(
        availability(&gw, "alex@contoso.com").await,
        "do_not_disturb"
    );
    assert_eq!(api.fetches("sarad@contoso.com"), 2);
    assert_eq!(api.fetches("alex@contoso.com"), 2);
    assert_eq!(api.fetches("kim@contoso.com"), 1);
    // The channel moved on: each answer's `next` was followed.
    let acks = api.state.lock().acks.clone();
    assert_eq!(&acks[..2], [1, 2], "{acks:?}");
}

#[tokio::test(start_paused = true)]
async fn the_subscription_is_extended_before_it_expires_and_when_warned() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    // 10 minutes, extended 2 minutes ahead: at 8 minutes.
    tokio::time::sleep(Duration::from_secs(7 * 60 + 50)).await;
    settle().await;
    assert_eq!(api.state.lock().extensions, 0);
    tokio::time::sleep(Duration::from_secs(20)).await;
    settle().await;
    assert_eq!(api.state.lock().extensions, 1);
    // The server warns: extended at once.
    let app = api.state.lock().app;
    api.push(json!({"link": {"rel": "presenceSubscription",
                             "href": format!("{APPS}/{app}/people/presenceSubscriptions/1")},
                    "type": "updated"}));
    settle().await;
    assert_eq!(api.state.lock().extensions, 2);
    assert_eq!(source(&gw).await["subscriptions"][0]["state"], "active");
}

#[tokio::test(start_paused = true)]
async fn resync_rereads_every_contact() {
    let (api, base) = start_mock().await;
    let _gw = start_gateway(&base).await;
    settle().await;
    api.state.lock().resync = true;
    api.wake.notify_waiters();
    settle().await;
    for address in ["sarad@contoso.com", "alex@contoso.com", "kim@contoso.com"] {
        assert_eq!(api.fetches(address), 2, "{address}");
    }
}

#[tokio::test(start_paused = true)]
async fn application_not_found_recreates_the_application_and_subscription() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    api.state
        .lock()
        .script
        .push_back(Script::ApplicationNotFound);
    // Make the pending GET return so that the next one gets the 404.
    api.event("kim@contoso.com");
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle().await;
    let (app, subscriptions) = {
        let m = api.state.lock();
        (m.app, m.subscriptions.len())
    };
    assert_eq!(app, 2, "a new application");
    assert_eq!(subscriptions, 2, "and a new subscription");
    assert_eq!(
        api.fetches("sarad@contoso.com"),
        2,
        "re-read with the new application"
    );
    api.set("sarad@contoso.com", "Away");
    api.event("sarad@contoso.com");
    settle().await;
    assert_eq!(availability(&gw, "sarad@contoso.com").await, "away");
    assert_eq!(source(&gw).await["subscriptions"][0]["reconnects"], 1);
}

#[tokio::test(start_paused = true)]
async fn pget_replaced_stops_the_loop_and_says_so() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    api.state.lock().script.push_back(Script::PGetReplaced);
    api.event("kim@contoso.com");
    settle().await;
    let before = api.state.lock().acks.len();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    settle().await;
    assert_eq!(api.state.lock().acks.len(), before, "no more pending GETs");
    let state = source(&gw).await["subscriptions"][0]["state"].clone();
    assert!(state.as_str().unwrap().contains("PGetReplaced"), "{state}");
}

#[tokio::test(start_paused = true)]
async fn a_5xx_and_a_connection_dropped_mid_get_resume_from_the_last_ack() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    api.event("kim@contoso.com"); // ack 1 answered; the next GET is ack 2
    settle().await;
    {
        let mut m = api.state.lock();
        m.script.push_back(Script::ServerError);
        m.script.push_back(Script::Drop);
    }
    api.event("kim@contoso.com"); // ack 2 answered; ack 3 gets the errors
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    let acks = api.state.lock().acks.clone();
    assert_eq!(&acks[..5], [1, 2, 3, 3, 3], "{acks:?}");
    let s = source(&gw).await;
    assert_eq!(s["subscriptions"][0]["state"], "active", "{s}");
    assert_eq!(s["subscriptions"][0]["reconnects"], 2);
    assert_eq!(api.state.lock().app, 1, "same application");
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_is_refreshed() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    api.state.lock().revoked.push("tok-1".into());
    api.set("alex@contoso.com", "Away");
    api.event("alex@contoso.com");
    settle().await;
    assert_eq!(availability(&gw, "alex@contoso.com").await, "away");
    assert_eq!(api.state.lock().tokens_issued, 2);
}

#[tokio::test(start_paused = true)]
async fn contacts_beyond_one_batch_join_through_memberships() {
    let (api, base) = start_mock().await;
    let mut contacts: Vec<String> = (0..70)
        .map(|i| format!("sip:user{i}@contoso.com"))
        .collect();
    contacts.push("sip:SaraD@contoso.com".into());
    let gw = start_gateway_with(&base, &serde_json::to_string(&contacts).unwrap()).await;
    settle().await;
    let subscriptions = api.state.lock().subscriptions.clone();
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(
        subscriptions[0], contacts,
        "50 with the subscription, 21 as members"
    );
    assert_eq!(availability(&gw, "sarad@contoso.com").await, "available");
    let readyz = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(
        readyz.status(),
        200,
        "contacts the server does not know do not block"
    );
}

/// The event channel applies through the same checks as webhooks: a
/// contact's presence with a status word longer than documented is
/// rejected (counted as bad_payload) and nothing of it is stored.
#[tokio::test(start_paused = true)]
async fn a_status_word_longer_than_documented_is_rejected_and_not_stored() {
    let (api, base) = start_mock().await;
    let gw = start_gateway(&base).await;
    settle().await;
    assert_eq!(availability(&gw, "sarad@contoso.com").await, "available");
    let before = gw.get("/v1/presence/sfb/sarad@contoso.com").await.1;
    api.set("sarad@contoso.com", &"W".repeat(65));
    api.event("sarad@contoso.com");
    settle().await;
    assert_eq!(api.fetches("sarad@contoso.com"), 2);
    assert_eq!(gw.get("/v1/presence/sfb/sarad@contoso.com").await.1, before);
    assert_eq!(gw.counter("sfb", "rejected.bad_payload").await, 1);
    // A word of 64 bytes is kept.
    api.set("sarad@contoso.com", &"W".repeat(64));
    api.event("sarad@contoso.com");
    settle().await;
    let (_, record) = gw.get("/v1/presence/sfb/sarad@contoso.com").await;
    assert_eq!(record["raw_status"].as_str().map(str::len), Some(64));
    assert_eq!(record["availability"], "unknown");
}
