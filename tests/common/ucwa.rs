//! A mock UCWA server (axum on loopback) that keeps a real pending GET open
//! until it has events or its timeout passes, serves contact presence, and
//! can be scripted. It knows one application at a time, as a server knows
//! one per endpoint: a new one replaces the old, whose calls (a pending GET
//! included) answer 404 `ApplicationNotFound`. It counts the pending GETs
//! of each application open at once, so a test can tell how many readers
//! an event channel has.
//! Its time is tokio's: under a paused clock a pending GET's timeout passes
//! at once when nothing else is due.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Notify;

pub const APPS: &str = "/ucwa/oauth/v1/applications";

/// A scripted answer to the next pending GET.
#[derive(Clone, Copy, Debug)]
pub enum Script {
    ApplicationNotFound,
    PGetReplaced,
    ServerError,
    /// Headers sent, then the connection breaks mid-body.
    Drop,
}

#[derive(Default)]
pub struct Mock {
    /// Number of the current application (0: none yet).
    pub app: u32,
    pub subscriptions: Vec<Vec<String>>,
    pub extensions: u32,
    pub presence: HashMap<String, Value>,
    pub fetches: HashMap<String, u32>,
    /// Events for the next pending GET, and whether it says resync.
    pub queued: Vec<Value>,
    pub resync: bool,
    pub script: VecDeque<Script>,
    /// `ack` of every events GET, in order.
    pub acks: Vec<u32>,
    pub tokens_issued: u32,
    pub revoked: Vec<String>,
    /// How long a presence GET takes.
    pub presence_delay: Duration,
    /// Per application: pending GETs open now, and the most open at once.
    pub pending: HashMap<u32, u32>,
    pub max_pending: HashMap<u32, u32>,
    /// The application of every events GET, in order.
    pub polled: Vec<u32>,
}

#[derive(Clone, Default)]
pub struct Ucwa {
    pub state: Arc<Mutex<Mock>>,
    pub wake: Arc<Notify>,
}

impl Ucwa {
    pub fn set(&self, address: &str, availability: &str) {
        self.state.lock().presence.insert(
            address.into(),
            json!({"availability": availability, "activity": "Available",
                   "lastActive": "/Date(1358827096000)/", "deviceType": "Desktop"}),
        );
    }

    pub fn event(&self, address: &str) {
        let app = self.state.lock().app;
        self.push(json!({"link": {"rel": "contactPresence",
                                  "href": format!("{APPS}/{app}/people/{address}/presence")},
                         "in": {"rel": "contact", "href": format!("{APPS}/{app}/people/{address}")},
                         "type": "updated"}));
    }

    pub fn push(&self, event: Value) {
        self.state.lock().queued.push(event);
        self.wake.notify_waiters();
    }

    pub fn fetches(&self, address: &str) -> u32 {
        self.state.lock().fetches.get(address).copied().unwrap_or(0)
    }
}

fn authorized(api: &Ucwa, headers: &HeaderMap) -> bool {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    token.starts_with("tok-") && !api.state.lock().revoked.iter().any(|r| r == token)
}

fn app_gone() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"code": "NotFound", "subcode": "ApplicationNotFound"})),
    )
        .into_response()
}

async fn token(State(api): State<Ucwa>, body: String) -> Response {
    if !body.contains("grant_type=refresh_token") || !body.contains("refresh_token=r1") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut m = api.state.lock();
    m.tokens_issued += 1;
    axum::Json(json!({"access_token": format!("tok-{}", m.tokens_issued), "expires_in": 36000}))
        .into_response()
}

async fn create_app(State(api): State<Ucwa>, headers: HeaderMap) -> Response {
    if !authorized(&api, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = api.state.lock();
    m.app += 1;
    // A pending GET of the replaced application ends (404).
    api.wake.notify_waiters();
    let n = m.app;
    let app = json!({
        "_links": {"self": {"href": format!("{APPS}/{n}")},
                   "events": {"href": format!("{APPS}/{n}/events?ack=1")}},
        "_embedded": {"people": {"_links": {
            "self": {"href": format!("{APPS}/{n}/people")},
            "presenceSubscriptions": {"href": format!("{APPS}/{n}/people/presenceSubscriptions")}}}}
    });
    (StatusCode::CREATED, axum::Json(app)).into_response()
}

async fn subscribe(
    State(api): State<Ucwa>,
    Path(app): Path<u32>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !authorized(&api, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = api.state.lock();
    if app != m.app {
        return app_gone();
    }
    assert!(
        (10..=30).contains(&body["duration"].as_u64().unwrap()),
        "{body}"
    );
    let uris = body["uris"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    m.subscriptions.push(uris);
    let id = m.subscriptions.len();
    let href = format!("{APPS}/{app}/people/presenceSubscriptions/{id}");
    (
        StatusCode::CREATED,
        axum::Json(json!({"id": id.to_string(), "_links": {"self": {"href": href}}})),
    )
        .into_response()
}

async fn extend(
    State(api): State<Ucwa>,
    Path((app, _id)): Path<(u32, u32)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&api, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = api.state.lock();
    if app != m.app {
        return app_gone();
    }
    m.extensions += 1;
    axum::Json(json!({})).into_response()
}

async fn memberships(
    State(api): State<Ucwa>,
    Path((app, id)): Path<(u32, usize)>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if !authorized(&api, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut m = api.state.lock();
    if app != m.app {
        return app_gone();
    }
    let uris = body["uris"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned());
    m.subscriptions[id - 1].extend(uris);
    axum::Json(json!({})).into_response()
}

async fn presence(
    State(api): State<Ucwa>,
    Path((app, address)): Path<(u32, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&api, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let delay = api.state.lock().presence_delay;
    tokio::time::sleep(delay).await;
    let mut m = api.state.lock();
    if app != m.app {
        return app_gone();
    }
    *m.fetches.entry(address.clone()).or_default() += 1;
    match m.presence.get(&address) {
        Some(p) => axum::Json(p.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn events(
    State(api): State<Ucwa>,
    Path(app): Path<u32>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&api, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let ack: u32 = query["ack"].parse().unwrap();
    let timeout: u64 = query["timeout"].parse().unwrap();
    let scripted = {
        let mut m = api.state.lock();
        m.acks.push(ack);
        m.polled.push(app);
        if app != m.app {
            return app_gone();
        }
        m.script.pop_front()
    };
    match scripted {
        Some(Script::ApplicationNotFound) => return app_gone(),
        Some(Script::PGetReplaced) => {
            let body = json!({"code": "Conflict", "subcode": "PGetReplaced"});
            return (StatusCode::CONFLICT, axum::Json(body)).into_response();
        }
        Some(Script::ServerError) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Some(Script::Drop) => {
            let broken = futures_util::stream::iter([
                Ok(axum::body::Bytes::from_static(b"{\"_links\":")),
                Err(std::io::Error::other("connection dropped")),
            ]);
            return axum::body::Body::from_stream(broken).into_response();
        }
        None => {}
    }
    // The pending GET: answer when there are events, or at the timeout
    // (404 if its application was replaced meanwhile). Counted while open,
    // also when the client goes away and the server drops it.
    let _open = Pending::open(&api, app);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let woken = api.wake.notified();
        {
            let mut m = api.state.lock();
            if app != m.app {
                return app_gone();
            }
            if !m.queued.is_empty() || m.resync {
                break;
            }
            drop(std::mem::take(&mut m.queued));
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            break;
        }
    }
    let mut m = api.state.lock();
    let events = std::mem::take(&mut m.queued);
    let mut links = json!({"self": {"href": format!("{APPS}/{app}/events?ack={ack}")},
                           "next": {"href": format!("{APPS}/{app}/events?ack={}", ack + 1)}});
    if std::mem::take(&mut m.resync) {
        links["resync"] = json!({"href": format!("{APPS}/{app}/events?ack={}", ack + 1)});
    }
    axum::Json(json!({"_links": links, "sender": [{"rel": "people", "events": events}]}))
        .into_response()
}

/// One open pending GET of an application, counted in [`Mock::pending`]
/// while it lives.
struct Pending(Ucwa, u32);

impl Pending {
    fn open(api: &Ucwa, app: u32) -> Pending {
        let mut m = api.state.lock();
        let open = m.pending.entry(app).or_default();
        *open += 1;
        let open = *open;
        let max = m.max_pending.entry(app).or_default();
        *max = (*max).max(open);
        Pending(api.clone(), app)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(open) = self.0.state.lock().pending.get_mut(&self.1) {
            *open -= 1;
        }
    }
}

pub async fn start_mock() -> (Ucwa, String) {
    let api = Ucwa::default();
    for (address, availability) in [
        ("sarad@contoso.com", "Online"),
        ("alex@contoso.com", "IdleBusy"),
        ("kim@contoso.com", "Offline"),
    ] {
        api.set(address, availability);
    }
    let app = Router::new()
        .route("/oauth/token", post(token))
        .route(APPS, post(create_app))
        .route(
            &format!("{APPS}/{{app}}/people/presenceSubscriptions"),
            post(subscribe),
        )
        .route(
            &format!("{APPS}/{{app}}/people/presenceSubscriptions/{{id}}"),
            post(extend),
        )
        .route(
            &format!("{APPS}/{{app}}/people/presenceSubscriptions/{{id}}/memberships"),
            post(memberships),
        )
        .route(
            &format!("{APPS}/{{app}}/people/{{address}}/presence"),
            get(presence),
        )
        .route(&format!("{APPS}/{{app}}/events"), get(events))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, base)
}
