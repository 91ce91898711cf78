//! A mock NetSapiens subscriptions API (axum on 127.0.0.1:0): keeps
//! subscriptions, logs every call with the API key it carried, answers 401
//! to any other key, and can hold list calls until the test opens them.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// The API key the mock accepts unless told otherwise.
pub const NS_API_KEY: &str = "ns-api-key";

/// One call the mock answered (or refused).
#[derive(Clone, Debug)]
pub struct Call {
    /// `"METHOD path"`.
    pub request: String,
    /// The bearer token it carried ("" without one).
    pub key: String,
    pub at: Instant,
}

pub struct NsMock {
    pub subscriptions: Vec<Value>,
    next_id: u32,
    /// Every call, in order.
    pub calls: Vec<Call>,
    /// The API keys that authenticate.
    keys: Vec<String>,
    /// When set, list calls are answered only once it holds true.
    pub list_gate: Option<tokio::sync::watch::Receiver<bool>>,
}

#[derive(Clone)]
pub struct NsApi(pub Arc<Mutex<NsMock>>);

impl Default for NsApi {
    fn default() -> Self {
        NsApi::with_keys(&[NS_API_KEY])
    }
}

impl NsApi {
    /// A mock that accepts each of `keys`.
    pub fn with_keys(keys: &[&str]) -> NsApi {
        NsApi(Arc::new(Mutex::new(NsMock {
            subscriptions: Vec::new(),
            next_id: 0,
            calls: Vec::new(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            list_gate: None,
        })))
    }

    /// Calls whose `"METHOD path"` starts with `prefix`.
    pub fn calls(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .calls
            .iter()
            .filter(|c| c.request.starts_with(prefix))
            .count()
    }

    /// Every call so far.
    pub fn all_calls(&self) -> Vec<Call> {
        self.0.lock().calls.clone()
    }

    /// `"METHOD path"` of every call, in order.
    pub fn log(&self) -> Vec<String> {
        self.0
            .lock()
            .calls
            .iter()
            .map(|c| c.request.clone())
            .collect()
    }

    pub fn ids(&self) -> Vec<String> {
        self.0
            .lock()
            .subscriptions
            .iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Logs the call; false when the API key is not one the mock accepts.
    fn authorized(&self, request: String, headers: &HeaderMap) -> bool {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        let mut m = self.0.lock();
        let ok = m.keys.contains(&key);
        m.calls.push(Call {
            request,
            key,
            at: Instant::now(),
        });
        ok
    }

    /// Starts the mock on 127.0.0.1 port 0; returns its base URL.
    pub async fn serve(&self) -> String {
        let app = Router::new()
            .route("/ns-api/v2/subscriptions", get(list).post(create))
            .route("/ns-api/v2/subscriptions/{id}", put(renew).delete(delete))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the mock");
        let base = format!("http://{}", listener.local_addr().expect("mock addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }
}

/// Starts a mock that accepts [`NS_API_KEY`]; returns it and its base URL.
pub async fn start_ns_mock() -> (NsApi, String) {
    let api = NsApi::default();
    let base = api.serve().await;
    (api, base)
}

async fn list(State(api): State<NsApi>, headers: HeaderMap) -> Response {
    if !api.authorized("GET /ns-api/v2/subscriptions".into(), &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let gate = api.0.lock().list_gate.clone();
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
    axum::Json(Value::Array(api.0.lock().subscriptions.clone())).into_response()
}

async fn create(
    State(api): State<NsApi>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !api.authorized("POST /ns-api/v2/subscriptions".into(), &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = api.0.lock();
    m.next_id += 1;
    let mut sub = body;
    sub["id"] = json!(format!("sub-mock-{}", m.next_id));
    sub["status"] = json!("active");
    m.subscriptions.push(sub.clone());
    (StatusCode::CREATED, axum::Json(sub)).into_response()
}

async fn renew(
    State(api): State<NsApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !api.authorized(format!("PUT /ns-api/v2/subscriptions/{id}"), &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
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

async fn delete(State(api): State<NsApi>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !api.authorized(format!("DELETE /ns-api/v2/subscriptions/{id}"), &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
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
