//! Managed Mitel CloudLink subscriptions against a mock Authentication and
//! Notifications API (a small axum app on loopback), under tokio's paused
//! clock like the NetSapiens scenarios: the periodic checks an hour apart
//! happen at once and exactly on time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use common::scripted::Failures;
use common::{Gateway, MITEL_KEY, TOKEN, fixture, settle, sign, webhook_listener};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const OLD_KEY: &str = "0d5c3c4e-old-application-id";
const ALL: &str = "/presentities/[^/]+$";

#[derive(Default)]
struct Mock {
    subscriptions: Vec<Value>,
    next_id: u32,
    tokens_issued: u32,
    token_lifetime: u32,
    failures: Failures,
    log: Vec<String>,
}

#[derive(Clone, Default)]
struct MockApi(Arc<Mutex<Mock>>);

impl MockApi {
    fn fail(&self, method: &'static str, status: u16, retry_after: Option<u32>) {
        self.0.lock().failures.push(method, status, retry_after);
    }

    fn calls(&self) -> Vec<String> {
        self.0.lock().log.clone()
    }

    fn subscriptions(&self) -> Vec<Value> {
        self.0.lock().subscriptions.clone()
    }

    fn filters(&self) -> Vec<(String, String)> {
        self.subscriptions()
            .iter()
            .map(|s| {
                (
                    s["topic"].as_str().unwrap_or_default().to_owned(),
                    s["subjectFilter"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

fn gate(api: &MockApi, call: String, headers: &HeaderMap, method: &str) -> Option<Response> {
    let mut m = api.0.lock();
    m.log.push(call);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer tok-"));
    if !authorized {
        return Some(StatusCode::UNAUTHORIZED.into_response());
    }
    m.failures.take(method)
}

async fn token(State(api): State<MockApi>, body: String) -> Response {
    let mut m = api.0.lock();
    m.log.push("POST /2017-09-01/token".into());
    for field in [
        "grant_type=client_credentials",
        "client_id=gw",
        "client_secret=s3cret",
        "account_id=acc-10042",
    ] {
        if !body.contains(field) {
            return (StatusCode::BAD_REQUEST, format!("missing {field}")).into_response();
        }
    }
    m.tokens_issued += 1;
    let lifetime = if m.token_lifetime == 0 {
        3600
    } else {
        m.token_lifetime
    };
    axum::Json(json!({"access_token": format!("tok-{}", m.tokens_issued), "expires_in": lifetime}))
        .into_response()
}

async fn list(State(api): State<MockApi>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(
        &api,
        "GET /2017-09-01/subscriptions".into(),
        &headers,
        "GET",
    ) {
        return r;
    }
    let items = api.0.lock().subscriptions.clone();
    axum::Json(json!({"count": items.len(), "_embedded": {"items": items}})).into_response()
}

async fn create(
    State(api): State<MockApi>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = gate(
        &api,
        "POST /2017-09-01/subscriptions".into(),
        &headers,
        "POST",
    ) {
        return r;
    }
    let mut m = api.0.lock();
    m.next_id += 1;
    let mut sub = body;
    sub["subscriptionId"] = json!(format!("msub-{}", m.next_id));
    m.subscriptions.push(sub.clone());
    (StatusCode::CREATED, axum::Json(sub)).into_response()
}

async fn remove(
    State(api): State<MockApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let call = format!("DELETE /2017-09-01/subscriptions/{id}");
    if let Some(r) = gate(&api, call, &headers, "DELETE") {
        return r;
    }
    let mut m = api.0.lock();
    let before = m.subscriptions.len();
    m.subscriptions
        .retain(|s| s["subscriptionId"] != id.as_str());
    if m.subscriptions.len() == before {
        StatusCode::NOT_FOUND.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

async fn start_mock() -> (MockApi, String) {
    let api = MockApi::default();
    let app = Router::new()
        .route("/2017-09-01/token", post(token))
        .route("/2017-09-01/subscriptions", get(list).post(create))
        .route("/2017-09-01/subscriptions/{id}", delete(remove))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, base)
}

/// A gateway whose source `mitel` manages its subscriptions at the mock
/// (both APIs on the same mock server), checked every 5 minutes, serving
/// `listener` (whose URL `callback` is).
async fn start_gateway(
    base: &str,
    listener: TcpListener,
    callback: &str,
    keys: &str,
    extra: &str,
) -> Gateway {
    let config = format!(
        r#"
[server]
shutdown_grace_secs = 5

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = [{keys}]
api_base = "{base}"
auth_base = "{base}"

[sources.auth]
type = "client_credentials"
client_id = "gw"
client_secret = "s3cret"
account_id = "acc-10042"

[sources.subscription]
callback_url = "{callback}"
check_interval_secs = 300
retry_initial_ms = 1000
retry_max_secs = 60
{extra}
"#
    );
    Gateway::start_on_listener(&config, listener).await
}

async fn sources(gw: &Gateway) -> Value {
    gw.get("/v1/sources").await.1["sources"][0].clone()
}

#[tokio::test(start_paused = true)]
async fn creates_presence_and_media_subscriptions_and_receives_both() {
    let (api, base) = start_mock().await;
    let (listener, callback) = webhook_listener("mitel").await;
    let keys = format!("\"{MITEL_KEY}\"");
    let gw = start_gateway(&base, listener, &callback, &keys, "media = true").await;
    settle().await;
    let subs = api.subscriptions();
    assert_eq!(subs.len(), 2, "{:?}", api.calls());
    let presence = &subs[0];
    assert_eq!(presence["applicationId"], MITEL_KEY);
    assert_eq!(presence["deviceId"], callback.as_str());
    assert_eq!(presence["transport"], "webhook");
    assert_eq!(presence["topic"], "platform-api-presence");
    assert_eq!(presence["subjectFilter"], ALL);
    assert_eq!(presence["methodFilter"], "PUT");
    assert_eq!(subs[1]["topic"], "platform-api-media");

    // Mitel posts signed notifications to the deviceId.
    let body = fixture("mitel-presence.json");
    gw.post_signed("mitel", MITEL_KEY, &body).await;
    let body = fixture("mitel-media-call.json");
    gw.post_signed("mitel", MITEL_KEY, &body).await;
    let (_, record) = gw
        .get("/v1/presence/mitel/2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11")
        .await;
    assert_eq!(
        (record["availability"].as_str(), record["activity"].as_str()),
        (Some("busy"), Some("ringing"))
    );

    let source = sources(&gw).await;
    let listed = source["subscriptions"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["kind"], "presence");
    assert_eq!(listed[0]["state"], "active");
    assert_eq!(
        listed[0]["id"], "msub-1",
        "Mitel subscription ids are not secrets"
    );
    assert_eq!(listed[1]["kind"], "media");
    assert!(
        !source.to_string().contains(MITEL_KEY),
        "the applicationId is a secret"
    );
}

#[tokio::test(start_paused = true)]
async fn per_principal_subscriptions_without_method_filter() {
    let (api, base) = start_mock().await;
    let (listener, callback) = webhook_listener("mitel").await;
    let keys = format!("\"{MITEL_KEY}\"");
    let extra = "principals = [\"u1\", \"u2\"]\nmethod_filter = \"\"";
    let _gw = start_gateway(&base, listener, &callback, &keys, extra).await;
    settle().await;
    let filters: Vec<String> = api.filters().into_iter().map(|(_, f)| f).collect();
    assert_eq!(filters, ["/presentities/u1", "/presentities/u2"]);
    assert!(api.subscriptions()[0].get("methodFilter").is_none());
}

#[tokio::test(start_paused = true)]
async fn adopts_a_matching_subscription_and_recreates_a_vanished_one() {
    let (api, base) = start_mock().await;
    let (listener, callback) = webhook_listener("mitel").await;
    api.0.lock().subscriptions.push(json!({
        "subscriptionId": "existing", "applicationId": MITEL_KEY, "deviceId": callback,
        "transport": "webhook", "topic": "platform-api-presence", "subjectFilter": ALL,
    }));
    let keys = format!("\"{MITEL_KEY}\"");
    let gw = start_gateway(&base, listener, &callback, &keys, "").await;
    settle().await;
    assert_eq!(api.subscriptions().len(), 1, "adopted: {:?}", api.calls());
    assert_eq!(sources(&gw).await["subscriptions"][0]["id"], "existing");

    // Someone deletes it; the next check (5 min) notices and recreates it.
    api.0.lock().subscriptions.clear();
    tokio::time::sleep(Duration::from_secs(299)).await;
    settle().await;
    assert!(api.subscriptions().is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(api.subscriptions().len(), 1);
    assert_eq!(sources(&gw).await["subscriptions"][0]["id"], "msub-1");
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_and_429_is_waited_out() {
    let (api, base) = start_mock().await;
    api.0.lock().token_lifetime = 600;
    api.fail("POST", 429, Some(45));
    let (listener, callback) = webhook_listener("mitel").await;
    let keys = format!("\"{MITEL_KEY}\"");
    let gw = start_gateway(&base, listener, &callback, &keys, "").await;
    settle().await;
    let state = sources(&gw).await["subscriptions"][0]["state"].clone();
    assert!(state.as_str().unwrap().contains("429"), "{state}");
    tokio::time::sleep(Duration::from_secs(44)).await;
    settle().await;
    assert!(api.subscriptions().is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(api.subscriptions().len(), 1);
    // The 600 s token is replaced before it runs out, for the later checks.
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    settle().await;
    assert!(api.0.lock().tokens_issued >= 2, "{:?}", api.calls());
    assert_eq!(sources(&gw).await["subscriptions"][0]["state"], "active");
}

#[tokio::test(start_paused = true)]
async fn key_rotation_new_subscriptions_use_the_new_key_old_ones_keep_verifying() {
    let (api, base) = start_mock().await;
    let (listener, callback) = webhook_listener("mitel").await;
    // The provider still has the subscription made with the old key.
    api.0.lock().subscriptions.push(json!({
        "subscriptionId": "old-sub", "applicationId": OLD_KEY, "deviceId": callback,
        "transport": "webhook", "topic": "platform-api-presence", "subjectFilter": ALL,
    }));
    let keys = format!("\"{MITEL_KEY}\", \"{OLD_KEY}\"");
    let gw = start_gateway(&base, listener, &callback, &keys, "").await;
    settle().await;
    let subs = api.subscriptions();
    assert_eq!(subs.len(), 2, "not adopted: signed with another key");
    assert_eq!(subs[1]["applicationId"], MITEL_KEY);
    // Notifications of the old subscription still verify, as do new ones.
    for key in [OLD_KEY, MITEL_KEY] {
        let body = fixture("mitel-presence.json");
        let response = gw
            .post_webhook("mitel", body.clone(), Some(&sign(key, body.as_bytes())))
            .await;
        assert_eq!(response.status(), 204, "{key}");
    }
}

#[tokio::test(start_paused = true)]
async fn delete_on_shutdown_removes_its_subscriptions() {
    let (api, base) = start_mock().await;
    let (listener, callback) = webhook_listener("mitel").await;
    let keys = format!("\"{MITEL_KEY}\"");
    let gw = start_gateway(
        &base,
        listener,
        &callback,
        &keys,
        "media = true\ndelete_on_shutdown = true",
    )
    .await;
    settle().await;
    assert_eq!(api.subscriptions().len(), 2);
    gw.stop().await;
    assert!(api.subscriptions().is_empty(), "{:?}", api.calls());
}
