//! Managed NetSapiens subscriptions against a mock NetSapiens API (a small
//! axum app on loopback) that issues tokens, keeps subscriptions, fails on
//! request, and posts events to the gateway like the real cluster.
//!
//! These run with tokio's clock paused: the gateway, the mock and the test
//! share one runtime, loopback I/O completes within its system calls, and
//! tokio moves the clock forward only when every task waits for a timer, so
//! a renewal an hour away happens at once and exactly when it is due.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use common::scripted::Failures;
use common::{Gateway, TOKEN, settle, webhook_listener};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(Default)]
struct Mock {
    subscriptions: Vec<Value>,
    next_id: u32,
    tokens_issued: u32,
    /// Tokens the API no longer accepts.
    revoked: Vec<String>,
    failures: Failures,
    /// (method, path) of every API call, in order.
    log: Vec<(String, String)>,
    /// `expires_in` of issued tokens (0: 1800).
    token_lifetime: u32,
    /// When set, list calls are answered only once it holds true.
    list_gate: Option<tokio::sync::watch::Receiver<bool>>,
}

#[derive(Clone, Default)]
struct MockApi(Arc<Mutex<Mock>>);

impl MockApi {
    fn fail(&self, method: &'static str, status: u16, retry_after: Option<u32>) {
        self.0.lock().failures.push(method, status, retry_after);
    }

    fn calls(&self) -> Vec<String> {
        self.0
            .lock()
            .log
            .iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect()
    }

    fn ids(&self) -> Vec<String> {
        self.0
            .lock()
            .subscriptions
            .iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn subscription(&self, i: usize) -> Value {
        self.0.lock().subscriptions[i].clone()
    }
}

/// Logs the call, checks the bearer token, and plays a scripted failure.
fn gate(
    api: &MockApi,
    method: &'static str,
    path: String,
    headers: &HeaderMap,
) -> Option<Response> {
    let mut m = api.0.lock();
    m.log.push((method.to_owned(), path));
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token.starts_with("tok-") || m.revoked.iter().any(|r| r == token) {
        return Some(StatusCode::UNAUTHORIZED.into_response());
    }
    m.failures.take(method)
}

async fn token(State(api): State<MockApi>, body: String) -> Response {
    let mut m = api.0.lock();
    m.log.push(("POST".into(), "/ns-api/v2/tokens".into()));
    for field in [
        "grant_type=password",
        "client_id=gw",
        "username=admin%40acme",
        "password=pw",
    ] {
        if !body.contains(field) {
            return (StatusCode::BAD_REQUEST, format!("missing {field}")).into_response();
        }
    }
    m.tokens_issued += 1;
    let token = format!("tok-{}", m.tokens_issued);
    let expires_in = if m.token_lifetime == 0 {
        1800
    } else {
        m.token_lifetime
    };
    axum::Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in}))
        .into_response()
}

async fn list(State(api): State<MockApi>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&api, "GET", "/ns-api/v2/subscriptions".into(), &headers) {
        return r;
    }
    let held = api.0.lock().list_gate.clone();
    if let Some(mut held) = held {
        let _ = held.wait_for(|open| *open).await;
    }
    axum::Json(Value::Array(api.0.lock().subscriptions.clone())).into_response()
}

async fn create(
    State(api): State<MockApi>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = gate(&api, "POST", "/ns-api/v2/subscriptions".into(), &headers) {
        return r;
    }
    let mut m = api.0.lock();
    let duplicate = m.subscriptions.iter().any(|s| {
        s["model"] == body["model"]
            && s["post-url"] == body["post-url"]
            && s["domain"] == body["domain"]
    });
    if duplicate {
        return StatusCode::CONFLICT.into_response();
    }
    m.next_id += 1;
    let mut sub = body.clone();
    sub["id"] = json!(format!("sub-mock-{}", m.next_id));
    sub["status"] = json!("active");
    sub["posts-count"] = json!(0);
    sub["error-count"] = json!(0);
    m.subscriptions.push(sub.clone());
    (StatusCode::CREATED, axum::Json(sub)).into_response()
}

async fn renew(
    State(api): State<MockApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(r) = gate(
        &api,
        "PUT",
        format!("/ns-api/v2/subscriptions/{id}"),
        &headers,
    ) {
        return r;
    }
    let mut m = api.0.lock();
    match m.subscriptions.iter_mut().find(|s| s["id"] == id.as_str()) {
        Some(sub) => {
            sub["subscription-expires-datetime"] = body["subscription-expires-datetime"].clone();
            axum::Json(sub.clone()).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn delete(
    State(api): State<MockApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(
        &api,
        "DELETE",
        format!("/ns-api/v2/subscriptions/{id}"),
        &headers,
    ) {
        return r;
    }
    let mut m = api.0.lock();
    let before = m.subscriptions.len();
    m.subscriptions.retain(|s| s["id"] != id.as_str());
    if m.subscriptions.len() == before {
        StatusCode::NOT_FOUND.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

/// Starts the mock API on loopback; returns it and its base URL.
async fn start_mock() -> (MockApi, String) {
    let api = MockApi::default();
    let app = Router::new()
        .route("/ns-api/v2/tokens", post(token))
        .route("/ns-api/v2/subscriptions", get(list).post(create))
        .route("/ns-api/v2/subscriptions/{id}", put(renew).delete(delete))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, base)
}

/// A gateway whose source `ns` manages a presence and a call subscription
/// at the mock. The callback URL is the gateway's own webhook URL, so the
/// mock can post to it; the listener is bound first to know the port.
async fn start_gateway(api_base: &str, extra: &str) -> (Gateway, String) {
    let (listener, callback) = webhook_listener("ns").await;
    (
        start_gateway_on(api_base, listener, &callback, extra).await,
        callback,
    )
}

/// A gateway as [`start_gateway`] starts it, serving `listener` (whose
/// webhook URL of source `ns` is `callback`).
async fn start_gateway_on(
    api_base: &str,
    listener: TcpListener,
    callback: &str,
    extra: &str,
) -> Gateway {
    Gateway::start_on_listener(&config(api_base, callback, extra), listener).await
}

/// The config of [`start_gateway_on`].
fn config(api_base: &str, callback: &str, extra: &str) -> String {
    format!(
        r#"
[server]
shutdown_grace_secs = 5

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "{api_base}"

[sources.auth]
type = "password"
client_id = "gw"
client_secret = "s3cret"
username = "admin@acme"
password = "pw"

[sources.subscription]
callback_url = "{callback}"
model = ["presence", "call"]
domain = "acme.example"
lifetime_secs = 3600
renew_before_secs = 600
retry_initial_ms = 1000
retry_max_secs = 60
{extra}
"#
    )
}

/// Posts `body` to `url` with the correlation id, like the cluster does.
async fn cluster_post(gw: &Gateway, url: &str, id: &str, body: &Value) -> u16 {
    gw.client
        .post(url)
        .header("X-Correlation-ID", id)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An expiry for a subscription the provider already has: far beyond
/// anything a test waits for, whatever today's date (RFC 3339, UTC, which
/// NetSapiens also answers with).
fn a_day_from_now() -> String {
    let now = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(now + 86_400)
        .expect("a representable time")
        .to_string()
}

fn presence(user: &str, word: &str) -> Value {
    json!([{"user": user, "domain": "acme.example", "presence": word, "message": "", "time": "2026-11-24 10:00:00"}])
}

#[tokio::test(start_paused = true)]
async fn from_an_empty_provider_to_presence_in_the_store() {
    let (api, base) = start_mock().await;
    let (gw, callback) = start_gateway(&base, "").await;
    settle().await;
    assert_eq!(api.ids(), ["sub-mock-1", "sub-mock-2"]);
    let created = api.subscription(0);
    assert_eq!(created["model"], "presence");
    assert_eq!(created["post-url"], callback.as_str());
    assert_eq!(created["domain"], "acme.example");
    assert_eq!(created["subscription-geo-support"], "yes");
    assert!(
        created["subscription-expires-datetime"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(api.subscription(1)["model"], "call");

    // The cluster posts presence with the presence subscription's id...
    assert_eq!(
        cluster_post(&gw, &callback, "sub-mock-1", &presence("1001", "inuse")).await,
        204
    );
    let (status, record) = gw.get("/v1/presence/ns/1001@acme.example").await;
    assert_eq!(
        (status, record["availability"].as_str()),
        (200, Some("busy"))
    );
    // ...and calls with the call subscription's: the id decides the model.
    let call = json!([{"orig_callid": "c-1", "orig_user": "1001", "orig_domain": "acme.example",
                       "term_user": "2002", "term_domain": "acme.example", "remove": "no"}]);
    assert_eq!(cluster_post(&gw, &callback, "sub-mock-2", &call).await, 204);
    let (_, record) = gw.get("/v1/presence/ns/1001@acme.example").await;
    assert_eq!(record["activity"], "in_a_call");
    // An id the provider never issued is refused.
    assert_eq!(
        cluster_post(&gw, &callback, "sub-mock-3", &presence("1001", "open")).await,
        401
    );

    let (_, sources) = gw.get("/v1/sources").await;
    let subs = &sources["sources"][0]["subscriptions"];
    assert_eq!(subs.as_array().unwrap().len(), 2, "{subs}");
    assert_eq!(subs[0]["state"], "active");
    assert_eq!(subs[0]["kind"], "presence");
    assert!(subs[0]["expires_at"].is_string());
    assert!(subs[0]["next_action_at"].is_string());
    let shown = subs[0]["id"].as_str().unwrap();
    assert!(
        shown.starts_with("sha256:") && !sources.to_string().contains("sub-mock-1"),
        "{subs}"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            "presence_gateway_subscription_state{{source=\"ns\",kind=\"presence\",subscription=\"{shown}\",state=\"active\"}} 1"
        )),
        "{metrics}"
    );
    assert_eq!(api.0.lock().tokens_issued, 1, "one token for every call");
}

#[tokio::test(start_paused = true)]
async fn adopts_what_exists_renews_before_expiry_and_refreshes_the_token() {
    let (api, base) = start_mock().await;
    api.0.lock().subscriptions.push(json!({
        "id": "sub-existing", "model": "presence", "post-url": "PLACEHOLDER",
        "domain": "acme.example", "status": "active", "posts-count": 7, "error-count": 1,
        "subscription-expires-datetime": a_day_from_now()
    }));
    // The existing one points at the gateway, so it is adopted.
    let (listener, callback) = webhook_listener("ns").await;
    api.0.lock().subscriptions[0]["post-url"] = json!(callback.clone());
    let gw = start_gateway_on(&base, listener, &callback, "").await;
    settle().await;
    assert_eq!(
        api.ids(),
        ["sub-existing", "sub-mock-1"],
        "presence adopted, call created"
    );
    assert_eq!(
        cluster_post(&gw, &callback, "sub-existing", &presence("1001", "away")).await,
        204
    );
    let (_, sources) = gw.get("/v1/sources").await;
    assert_eq!(sources["sources"][0]["subscriptions"][0]["posts_count"], 7);

    // The created one expires in an hour: renewed ten minutes before.
    let puts = |api: &MockApi| api.calls().iter().filter(|c| c.starts_with("PUT")).count();
    tokio::time::sleep(Duration::from_secs(49 * 60)).await;
    settle().await;
    assert_eq!(puts(&api), 0);
    tokio::time::sleep(Duration::from_secs(60)).await;
    settle().await;
    assert!(
        api.calls()
            .contains(&"PUT /ns-api/v2/subscriptions/sub-mock-1".to_owned())
    );
    // The first token (1800 s) ran out meanwhile: a second one was fetched.
    assert_eq!(api.0.lock().tokens_issued, 2);
}

#[tokio::test(start_paused = true)]
async fn a_revoked_token_is_replaced_mid_run() {
    let (api, base) = start_mock().await;
    api.0.lock().token_lifetime = 7200;
    let (gw, _) = start_gateway(&base, "").await;
    settle().await;
    api.0.lock().revoked.push("tok-1".into());
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    settle().await;
    let calls = api.calls();
    let put = calls
        .iter()
        .position(|c| c.starts_with("PUT"))
        .expect("renewed");
    // The PUT with the revoked token gets 401; one new token is fetched and
    // both subscriptions are renewed with it.
    let token = put
        + calls[put..]
            .iter()
            .position(|c| c == "POST /ns-api/v2/tokens")
            .expect("new token");
    for id in ["sub-mock-1", "sub-mock-2"] {
        let renewed = format!("PUT /ns-api/v2/subscriptions/{id}");
        assert!(calls[token..].contains(&renewed), "{id}: {calls:?}");
    }
    assert_eq!(api.0.lock().tokens_issued, 2, "{calls:?}");
    let (_, sources) = gw.get("/v1/sources").await;
    assert_eq!(sources["sources"][0]["subscriptions"][0]["state"], "active");
    assert_eq!(sources["sources"][0]["subscriptions"][1]["state"], "active");
}

#[tokio::test(start_paused = true)]
async fn server_errors_and_429_back_off_during_create() {
    let (api, base) = start_mock().await;
    api.fail("GET", 500, None);
    api.fail("GET", 429, Some(30));
    let (gw, _) = start_gateway(&base, "").await;
    settle().await;
    let (_, sources) = gw.get("/v1/sources").await;
    let sub = &sources["sources"][0]["subscriptions"][0];
    assert!(
        sub["state"].as_str().unwrap().starts_with("failed: "),
        "{sub}"
    );
    assert!(api.ids().is_empty() || api.ids().len() == 1);
    // 500 → retry within 0.5–1 s → 429 asking for 30 s → then success.
    tokio::time::sleep(Duration::from_secs(29)).await;
    settle().await;
    assert!(
        api.ids().len() < 2,
        "not before Retry-After: {:?}",
        api.calls()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(api.ids().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn server_errors_and_429_back_off_during_renewal() {
    let (api, base) = start_mock().await;
    let (gw, callback) = start_gateway(&base, "").await;
    settle().await;
    // Both renewals are due at 50 min: one gets a 503 (retried within a
    // second), the other a 429 asking for 20 s.
    api.fail("PUT", 503, None);
    api.fail("PUT", 429, Some(20));
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    settle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle().await;
    let states = |sources: &Value| -> Vec<String> {
        sources["sources"][0]["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let (_, sources) = gw.get("/v1/sources").await;
    assert!(
        states(&sources).iter().any(|s| s.contains("429")),
        "waiting out Retry-After: {sources}"
    );
    // Meanwhile the ids still authenticate.
    assert_eq!(
        cluster_post(&gw, &callback, "sub-mock-1", &presence("1001", "open")).await,
        204
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    settle().await;
    let (_, sources) = gw.get("/v1/sources").await;
    assert_eq!(states(&sources), ["active", "active"], "{:?}", api.calls());
    let puts = api.calls().iter().filter(|c| c.starts_with("PUT")).count();
    assert_eq!(puts, 4, "{:?}", api.calls());
}

#[tokio::test(start_paused = true)]
async fn a_vanished_subscription_is_recreated_and_its_old_id_refused() {
    let (api, base) = start_mock().await;
    let (gw, callback) = start_gateway(&base, "").await;
    settle().await;
    // Someone deletes the presence subscription at the provider.
    api.0
        .lock()
        .subscriptions
        .retain(|s| s["id"] != "sub-mock-1");
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    settle().await;
    assert!(
        api.ids().contains(&"sub-mock-3".to_owned()),
        "{:?}",
        api.calls()
    );
    assert_eq!(
        cluster_post(&gw, &callback, "sub-mock-1", &presence("1001", "open")).await,
        401
    );
    assert_eq!(
        cluster_post(&gw, &callback, "sub-mock-3", &presence("1001", "open")).await,
        204
    );
}

#[tokio::test(start_paused = true)]
async fn delete_on_shutdown_removes_them_and_their_ids() {
    let (api, base) = start_mock().await;
    let (gw, _) = start_gateway(&base, "delete_on_shutdown = true").await;
    settle().await;
    assert_eq!(api.ids().len(), 2);
    gw.stop().await;
    assert!(api.ids().is_empty(), "{:?}", api.calls());
}

/// Real time: a held list call must not time out while the test looks.
#[tokio::test]
async fn not_ready_until_the_subscriptions_are_adopted_then_their_ids_authenticate() {
    let (api, base) = start_mock().await;
    let (open_list, held) = tokio::sync::watch::channel(false);
    api.0.lock().list_gate = Some(held);
    let (listener, callback) = webhook_listener("ns").await;
    api.0.lock().subscriptions.push(json!({
        "id": "sub-existing", "model": "presence", "post-url": callback,
        "domain": "acme.example", "status": "active",
        "subscription-expires-datetime": a_day_from_now()
    }));
    let gw = start_gateway_on(&base, listener, &callback, "").await;

    let lists = |api: &MockApi| api.calls().iter().filter(|c| c.starts_with("GET")).count();
    let within = Duration::from_secs(10);
    common::wait_until("both managers list", within, || async { lists(&api) == 2 }).await;
    assert_eq!(gw.readyz().await, 503, "not ready while the list is held");

    open_list.send_replace(true);
    common::wait_until("ready", within, || async { gw.readyz().await == 200 }).await;
    // The cluster's next post, with the adopted subscription's id.
    assert_eq!(
        cluster_post(&gw, &callback, "sub-existing", &presence("1001", "away")).await,
        204
    );
    assert_eq!(api.ids(), ["sub-existing", "sub-mock-1"]);
}
