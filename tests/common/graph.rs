//! A mock Microsoft Graph (axum on 127.0.0.1:0) for `kind = "graph"`: the
//! Azure AD token endpoint with refresh tokens per service account that
//! rotate (a used refresh token is refused, as Azure AD may), the
//! subscriptions API (create, list with `@odata.nextLink` paging, renew,
//! delete, reauthorize) with each subscription owned by the account whose
//! token created it, and `getPresencesByUserId` over a presence table.
//!
//! It records every call (method, path, the bearer and the account it
//! belongs to, the JSON body, tokio's time), plays scripted failures per
//! route, can hold a route until the test opens it, answers an expiry
//! shorter than asked when told, can make reads slow, and can run Graph's
//! validation handshake against the gateway when a subscription is created.
//! What Graph would refuse is refused the same way and also noted in
//! [`Graph::problems`], so a test can assert the gateway broke no rule.
//!
//! Its clock is the gateway's kind: wall time at the start plus tokio's
//! elapsed time, so under a paused clock an hour passes for both at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::scripted::Failures;

/// The application (client) id the test configs use.
pub const CLIENT_ID: &str = "app-id";
/// The client secret the test configs use.
pub const CLIENT_SECRET: &str = "app-secret";
/// The `client_state` the test configs use (the fixture's).
pub const CLIENT_STATE: &str = "gw-client-state-6f3b2c";
/// The scope the gateway asks for by default (DESIGN §5).
pub const DEFAULT_SCOPE: &str = "https://graph.microsoft.com/Presence.Read.All offline_access";
/// Where the test configs say Graph posts notifications (never reached:
/// tests post to the gateway themselves, or the mock maps it onto the
/// gateway's address for the validation handshake).
pub const CALLBACK_URL: &str = "https://gw.example.com/webhooks/teams";
/// The lifecycle URL of the test configs that set one.
pub const LIFECYCLE_URL: &str = "https://gw.example.com/webhooks/teams?lifecycle";
/// At most this many ids per subscription and per read (Graph's limit).
pub const MAX_IDS: usize = 650;
/// The longest lifetime Graph grants a presence subscription.
pub const MAX_LIFETIME_MS: i64 = 60 * 60 * 1000;
/// The tenant the notifications name.
pub const TENANT: &str = "84bd8158-6d4d-4958-8b9f-9d6445542f95";

/// The refresh token configured for service account `account` (0-based):
/// `rt-account-1`, `rt-account-2`, ...
pub fn refresh_token(account: usize) -> String {
    format!("rt-account-{}", account + 1)
}

/// The object id of test user `i`: a GUID-shaped string, distinct per `i`.
pub fn user(i: usize) -> String {
    format!("{i:08x}-7ef5-42da-9069-{i:012x}")
}

/// Object ids of test users `0..n`.
pub fn users(n: usize) -> Vec<String> {
    (0..n).map(user).collect()
}

/// The `resource` the gateway must ask for `ids` (DESIGN §4: the filter
/// form, even for one user).
pub fn resource_for(ids: &[String]) -> String {
    let quoted: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    format!(
        "/communications/presences?$filter=id in ({})",
        quoted.join(",")
    )
}

/// The ids a `resource` of the filter form names; `None` for any other
/// form.
pub fn ids_of_resource(resource: &str) -> Option<Vec<String>> {
    let list = resource
        .strip_prefix("/communications/presences?$filter=id in (")?
        .strip_suffix(')')?;
    list.split(',')
        .map(|quoted| {
            quoted
                .trim()
                .strip_prefix('\'')
                .and_then(|q| q.strip_suffix('\''))
                .filter(|id| !id.is_empty() && !id.contains('\''))
                .map(str::to_owned)
        })
        .collect()
}

/// One API call the mock received (token requests are in
/// [`GraphState::token_requests`]).
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The path with its query, as requested.
    pub path: String,
    /// The bearer token ("" without one).
    pub bearer: String,
    /// The service account the bearer was issued to (0-based), if any.
    pub account: Option<usize>,
    /// The JSON body (Null without one or when it is not JSON).
    pub body: Value,
    pub at: tokio::time::Instant,
}

impl Call {
    /// `"METHOD path"`.
    pub fn request(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The ids of a `getPresencesByUserId` call.
    pub fn ids(&self) -> Vec<String> {
        self.body["ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A subscription the mock holds, and the account that owns it.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub owner: usize,
    /// As Graph describes it (`id`, `resource`, `expirationDateTime`, ...).
    pub value: Value,
}

/// One service account's refresh-token chain.
struct Account {
    /// The refresh token that works now.
    current: String,
    /// Refresh tokens already used up (rotated away).
    used: Vec<String>,
    /// Tokens issued so far.
    issued: u32,
}

/// Routes the failures, holds and call filters are named by.
pub mod route {
    pub const TOKEN: &str = "token";
    pub const LIST: &str = "list";
    pub const CREATE: &str = "create";
    pub const RENEW: &str = "renew";
    pub const DELETE: &str = "delete";
    pub const REAUTHORIZE: &str = "reauthorize";
    pub const READ: &str = "read";
}

pub struct GraphState {
    /// Every API call, in order.
    pub calls: Vec<Call>,
    /// The form of every token request, in order.
    pub token_requests: Vec<Vec<(String, String)>>,
    pub subscriptions: Vec<Subscription>,
    /// Presence per user id, as `getPresencesByUserId` answers it (without
    /// `id`); users not in it are `Offline`.
    pub presence: HashMap<String, Value>,
    /// Scripted answers per [`route`].
    pub failures: Failures,
    /// When set, created and renewed subscriptions expire this long after
    /// now, whatever was asked.
    pub answer_lifetime: Option<Duration>,
    /// How long a read takes.
    pub read_delay: Duration,
    /// `expires_in` of issued access tokens.
    pub token_lifetime_secs: u64,
    /// Whether token answers carry a new refresh token (and the used one
    /// stops working).
    pub rotate: bool,
    /// Subscriptions per list page (`None`: all on one page).
    pub page_size: Option<usize>,
    /// When set (the gateway's base URL), a create first runs Graph's
    /// validation handshake against the notification and lifecycle URLs'
    /// paths on that base, and fails like Graph when the echo is wrong.
    pub validate_via: Option<String>,
    /// Whether an account may hold only one subscription (Graph's rule
    /// for presence); a test that lists stale subscriptions turns it off.
    pub one_per_account: bool,
    /// Rules of Graph the gateway broke, in words.
    pub problems: Vec<String>,
    gates: HashMap<&'static str, watch::Receiver<bool>>,
    accounts: Vec<Account>,
    /// Access token → account.
    access: HashMap<String, usize>,
    revoked: HashSet<String>,
    next_id: u32,
    base: String,
    wall_base_ms: i64,
    tokio_base: tokio::time::Instant,
}

impl GraphState {
    /// The mock's time, epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.wall_base_ms + self.tokio_base.elapsed().as_millis() as i64
    }
}

#[derive(Clone)]
pub struct Graph(pub Arc<Mutex<GraphState>>);

impl Graph {
    /// Starts a mock with `accounts` service accounts (refresh tokens
    /// [`refresh_token`]`(0..accounts)`); returns it and its base URL.
    pub async fn start(accounts: usize) -> (Graph, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the mock");
        let base = format!("http://{}", listener.local_addr().expect("mock addr"));
        let graph = Graph(Arc::new(Mutex::new(GraphState {
            calls: Vec::new(),
            token_requests: Vec::new(),
            subscriptions: Vec::new(),
            presence: HashMap::new(),
            failures: Failures::default(),
            answer_lifetime: None,
            read_delay: Duration::ZERO,
            token_lifetime_secs: 3600,
            rotate: true,
            page_size: None,
            validate_via: None,
            one_per_account: true,
            problems: Vec::new(),
            gates: HashMap::new(),
            accounts: (0..accounts)
                .map(|a| Account {
                    current: refresh_token(a),
                    used: Vec::new(),
                    issued: 0,
                })
                .collect(),
            access: HashMap::new(),
            revoked: HashSet::new(),
            next_id: 0,
            base: base.clone(),
            wall_base_ms: jiff::Timestamp::now().as_millisecond(),
            tokio_base: tokio::time::Instant::now(),
        })));
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1.0/subscriptions", post(create).get(list))
            .route("/v1.0/subscriptions/{id}", patch(renew).delete(delete))
            .route("/v1.0/subscriptions/{id}/reauthorize", post(reauthorize))
            .route("/v1.0/communications/getPresencesByUserId", post(read))
            .with_state(graph.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (graph, base)
    }

    /// Queues `status` (with a `Retry-After`) for the next call of `route`.
    pub fn fail(&self, route: &'static str, status: u16, retry_after: Option<u32>) {
        self.0.lock().failures.push(route, status, retry_after);
    }

    /// Holds calls of `route` (recorded, then unanswered) until the
    /// returned sender sends `true`.
    pub fn hold(&self, route: &'static str) -> watch::Sender<bool> {
        let (open, held) = watch::channel(false);
        self.0.lock().gates.insert(route, held);
        open
    }

    /// Sets a user's presence.
    pub fn set(&self, id: &str, availability: &str, activity: &str) {
        self.0.lock().presence.insert(
            id.to_owned(),
            json!({"availability": availability, "activity": activity}),
        );
    }

    /// Sets a user's presence with a status message.
    pub fn set_with_message(&self, id: &str, availability: &str, activity: &str, message: &str) {
        self.0.lock().presence.insert(
            id.to_owned(),
            json!({"availability": availability, "activity": activity,
                   "statusMessage": {"message": {"content": message, "contentType": "text"},
                                     "expiryDateTime": null}}),
        );
    }

    /// Every API call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().calls.clone()
    }

    /// The calls of `method` whose path starts with `path`.
    pub fn calls_to(&self, method: &str, path: &str) -> Vec<Call> {
        self.0
            .lock()
            .calls
            .iter()
            .filter(|c| c.method == method && c.path.starts_with(path))
            .cloned()
            .collect()
    }

    /// `"METHOD path"` of every call, in order (for failure messages).
    pub fn log(&self) -> Vec<String> {
        self.0.lock().calls.iter().map(Call::request).collect()
    }

    /// The `getPresencesByUserId` calls.
    pub fn reads(&self) -> Vec<Call> {
        self.calls_to("POST", "/v1.0/communications/getPresencesByUserId")
    }

    /// The create calls (`POST /v1.0/subscriptions`).
    pub fn creates(&self) -> Vec<Call> {
        self.0
            .lock()
            .calls
            .iter()
            .filter(|c| c.method == "POST" && c.path == "/v1.0/subscriptions")
            .cloned()
            .collect()
    }

    /// The renewal calls (`PATCH /v1.0/subscriptions/{id}`).
    pub fn renewals(&self) -> Vec<Call> {
        self.calls_to("PATCH", "/v1.0/subscriptions/")
    }

    /// The subscriptions the mock holds.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.0.lock().subscriptions.clone()
    }

    /// The ids of the subscriptions the mock holds.
    pub fn subscription_ids(&self) -> Vec<String> {
        self.0
            .lock()
            .subscriptions
            .iter()
            .map(|s| s.value["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Puts a subscription owned by `owner` in place, as if created
    /// earlier; returns its id.
    pub fn add_subscription(&self, owner: usize, resource: &str, notification_url: &str) -> String {
        let mut m = self.0.lock();
        let expires = m.now_ms() + MAX_LIFETIME_MS;
        m.next_id += 1;
        let id = subscription_id(m.next_id);
        m.subscriptions.push(Subscription {
            owner,
            value: json!({
                "id": id, "resource": resource, "changeType": "updated",
                "notificationUrl": notification_url,
                "lifecycleNotificationUrl": notification_url,
                "clientState": CLIENT_STATE, "applicationId": CLIENT_ID,
                "creatorId": account_object_id(owner),
                "expirationDateTime": graph_time(expires),
                "includeResourceData": false,
            }),
        });
        id
    }

    /// Removes subscription `id` (as Graph does when it drops one).
    pub fn remove_subscription(&self, id: &str) {
        self.0.lock().subscriptions.retain(|s| s.value["id"] != id);
    }

    /// Makes every access token issued to `account` so far invalid (the
    /// API answers 401 to it), as a revocation or an expiry would.
    pub fn revoke_access(&self, account: usize) {
        let mut m = self.0.lock();
        let tokens: Vec<String> = m
            .access
            .iter()
            .filter(|(_, a)| **a == account)
            .map(|(t, _)| t.clone())
            .collect();
        m.revoked.extend(tokens);
    }

    /// The refresh token that works now for `account`.
    pub fn current_refresh_token(&self, account: usize) -> String {
        self.0.lock().accounts[account].current.clone()
    }

    /// Every access and refresh token the mock issued or was configured
    /// with (for the test that looks for secrets in logs).
    pub fn all_tokens(&self) -> Vec<String> {
        let m = self.0.lock();
        let mut tokens: Vec<String> = m.access.keys().cloned().collect();
        for account in &m.accounts {
            tokens.push(account.current.clone());
            tokens.extend(account.used.iter().cloned());
        }
        tokens
    }

    /// The form values of every token request, one map per request.
    pub fn token_requests(&self) -> Vec<HashMap<String, String>> {
        self.0
            .lock()
            .token_requests
            .iter()
            .map(|form| form.iter().cloned().collect())
            .collect()
    }

    /// Rules of Graph the gateway broke so far.
    pub fn problems(&self) -> Vec<String> {
        self.0.lock().problems.clone()
    }

    /// The mock's time, epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.0.lock().now_ms()
    }

    /// Records a call; returns its account, or the 401 Graph answers to a
    /// missing or invalid token.
    fn record(
        &self,
        method: &str,
        path: String,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<usize, Box<Response>> {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_owned();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).unwrap_or(Value::Null)
        };
        let mut m = self.0.lock();
        let account = m
            .access
            .get(&bearer)
            .copied()
            .filter(|_| !m.revoked.contains(&bearer));
        m.calls.push(Call {
            method: method.to_owned(),
            path: path.clone(),
            bearer: bearer.clone(),
            account,
            body,
            at: tokio::time::Instant::now(),
        });
        match account {
            Some(account) => Ok(account),
            None => {
                if !m.access.contains_key(&bearer) {
                    m.problems
                        .push(format!("{method} {path}: a token the mock never issued"));
                }
                Err(Box::new(graph_error(
                    StatusCode::UNAUTHORIZED,
                    "InvalidAuthenticationToken",
                    "Access token has expired or is not yet valid.",
                )))
            }
        }
    }

    /// Waits while `route` is held, then plays its scripted failure, if any.
    async fn gate(&self, route: &'static str) -> Option<Response> {
        let held = self.0.lock().gates.get(route).cloned();
        if let Some(mut held) = held {
            let _ = held.wait_for(|open| *open).await;
        }
        self.0.lock().failures.take(route)
    }

    fn problem(&self, text: String) {
        self.0.lock().problems.push(text);
    }
}

/// A Graph-style subscription id.
fn subscription_id(n: u32) -> String {
    format!("7f105c7d-2dc5-4530-97cd-{n:012x}")
}

/// The object id of service account `account`.
fn account_object_id(account: usize) -> String {
    format!("5e0d8b51-0000-4000-8000-{account:012x}")
}

/// Epoch ms as Graph writes times: seven fractional digits, `Z`.
pub fn graph_time(ms: i64) -> String {
    let ts = jiff::Timestamp::from_millisecond(ms).expect("a representable time");
    let millis = ms.rem_euclid(1000);
    format!("{}.{:03}0000Z", ts.strftime("%Y-%m-%dT%H:%M:%S"), millis)
}

/// An RFC 3339 time as epoch ms.
pub fn parse_ms(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

/// Graph's error document.
fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message,
                                     "innerError": {"request-id": "mock"}}})),
    )
        .into_response()
}

async fn token(State(graph): State<Graph>, body: Bytes) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    graph.0.lock().token_requests.push(form.clone());
    if let Some(failure) = graph.gate(route::TOKEN).await {
        return failure;
    }
    let invalid_grant = |why: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant", "error_description": why})),
        )
            .into_response()
    };
    if field("grant_type").as_deref() != Some("refresh_token") {
        graph.problem(format!(
            "token request grant_type {:?}",
            field("grant_type")
        ));
        return invalid_grant("AADSTS70003: unsupported grant type");
    }
    if field("client_id").as_deref() != Some(CLIENT_ID) {
        graph.problem(format!("token request client_id {:?}", field("client_id")));
        return invalid_grant("AADSTS700016: application not found");
    }
    let presented = field("refresh_token").unwrap_or_default();
    let mut m = graph.0.lock();
    let Some(account) = m.accounts.iter().position(|a| a.current == presented) else {
        let reused = m.accounts.iter().any(|a| a.used.contains(&presented));
        m.problems.push(if reused {
            "a refresh token was used again after it was rotated".to_owned()
        } else {
            "a refresh token the mock never issued".to_owned()
        });
        return invalid_grant("AADSTS70000: the provided grant has expired or was revoked");
    };
    let rotate = m.rotate;
    let lifetime = m.token_lifetime_secs;
    let acct = &mut m.accounts[account];
    acct.issued += 1;
    let n = acct.issued;
    let access = format!("at-account-{}-{n}", account + 1);
    let mut answer = json!({"token_type": "Bearer", "scope": field("scope").unwrap_or_default(),
                            "expires_in": lifetime, "ext_expires_in": lifetime,
                            "access_token": access});
    if rotate {
        let next = format!("rt-account-{}-rotated-{n}", account + 1);
        let used = std::mem::replace(&mut acct.current, next.clone());
        acct.used.push(used);
        answer["refresh_token"] = json!(next);
    }
    m.access.insert(access, account);
    axum::Json(answer).into_response()
}

async fn list(
    State(graph): State<Graph>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = match query.get("$skiptoken") {
        Some(skip) => format!("/v1.0/subscriptions?$skiptoken={skip}"),
        None => "/v1.0/subscriptions".to_owned(),
    };
    let account = match graph.record("GET", path, &headers, &[]) {
        Ok(account) => account,
        Err(response) => return *response,
    };
    if let Some(failure) = graph.gate(route::LIST).await {
        return failure;
    }
    let m = graph.0.lock();
    // A delegated token sees the subscriptions of its own account.
    let own: Vec<Value> = m
        .subscriptions
        .iter()
        .filter(|s| s.owner == account)
        .map(|s| s.value.clone())
        .collect();
    let skip: usize = query
        .get("$skiptoken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let size = m.page_size.unwrap_or(usize::MAX);
    let page: Vec<Value> = own.iter().skip(skip).take(size).cloned().collect();
    let mut answer = json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions",
        "value": page,
    });
    if skip.saturating_add(size) < own.len() {
        answer["@odata.nextLink"] = json!(format!(
            "{}/v1.0/subscriptions?$skiptoken={}",
            m.base,
            skip + size
        ));
    }
    axum::Json(answer).into_response()
}

/// Checks an `expirationDateTime` as Graph does: RFC 3339, in the future,
/// at most an hour ahead (a minute of slack for the clocks).
fn check_expiry(graph: &Graph, what: &str, value: &Value) -> Result<i64, Box<Response>> {
    let now = graph.now_ms();
    let asked = value.as_str().and_then(parse_ms);
    match asked {
        Some(at) if at > now && at <= now + MAX_LIFETIME_MS + 60_000 => Ok(at),
        _ => {
            graph.problem(format!("{what}: expirationDateTime {value} (now {now})"));
            Err(Box::new(graph_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequest",
                "Subscription expiration can only be 60 minutes in the future.",
            )))
        }
    }
}

/// The expiry the mock answers for an asked one.
fn answered_expiry(graph: &Graph, asked: i64) -> i64 {
    let m = graph.0.lock();
    match m.answer_lifetime {
        Some(lifetime) => m.now_ms() + lifetime.as_millis() as i64,
        None => asked,
    }
}

async fn create(State(graph): State<Graph>, headers: HeaderMap, body: Bytes) -> Response {
    let account = match graph.record("POST", "/v1.0/subscriptions".into(), &headers, &body) {
        Ok(account) => account,
        Err(response) => return *response,
    };
    if let Some(failure) = graph.gate(route::CREATE).await {
        return failure;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let bad = |graph: &Graph, why: String| {
        graph.problem(format!("create: {why}"));
        graph_error(StatusCode::BAD_REQUEST, "InvalidRequest", &why)
    };
    if body["changeType"] != "updated" {
        return bad(&graph, format!("changeType {}", body["changeType"]));
    }
    let resource = body["resource"].as_str().unwrap_or_default();
    match ids_of_resource(resource) {
        Some(ids) if ids.len() <= MAX_IDS => {}
        Some(ids) => return bad(&graph, format!("{} ids in one subscription", ids.len())),
        None => return bad(&graph, format!("resource {resource:?}")),
    }
    for field in ["notificationUrl", "lifecycleNotificationUrl"] {
        if !body[field]
            .as_str()
            .is_some_and(|u| u.starts_with("https://"))
        {
            return bad(&graph, format!("{field} {} is not https", body[field]));
        }
    }
    let client_state = body["clientState"].as_str().unwrap_or_default();
    if client_state.is_empty() || client_state.chars().count() > 128 {
        return bad(&graph, "clientState missing or over 128 characters".into());
    }
    if body["includeResourceData"] == true
        && (!body["encryptionCertificate"].is_string()
            || !body["encryptionCertificateId"].is_string())
    {
        return bad(&graph, "includeResourceData without a certificate".into());
    }
    let asked = match check_expiry(&graph, "create", &body["expirationDateTime"]) {
        Ok(at) => at,
        Err(response) => return *response,
    };
    {
        let m = graph.0.lock();
        // One presence subscription per account and application.
        if m.one_per_account && m.subscriptions.iter().any(|s| s.owner == account) {
            drop(m);
            graph.problem(format!(
                "create: account {} already holds a subscription",
                account + 1
            ));
            return graph_error(
                StatusCode::FORBIDDEN,
                "ExtensionError",
                "The maximum number of presence subscriptions for this user was reached.",
            );
        }
    }
    let via = graph.0.lock().validate_via.clone();
    if let Some(via) = via {
        for field in ["notificationUrl", "lifecycleNotificationUrl"] {
            let url = body[field].as_str().unwrap_or_default();
            if let Err(why) = validate(&via, url).await {
                graph.problem(format!("validation of {field}: {why}"));
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequest",
                    "Subscription validation request failed. Response must exactly match validationToken query parameter.",
                );
            }
        }
    }
    let expires = answered_expiry(&graph, asked);
    let mut m = graph.0.lock();
    m.next_id += 1;
    let mut value = body;
    value["id"] = json!(subscription_id(m.next_id));
    value["expirationDateTime"] = json!(graph_time(expires));
    value["applicationId"] = json!(CLIENT_ID);
    value["creatorId"] = json!(account_object_id(account));
    // Graph does not answer the certificate itself.
    if let Some(object) = value.as_object_mut() {
        object.remove("encryptionCertificate");
    }
    m.subscriptions.push(Subscription {
        owner: account,
        value: value.clone(),
    });
    (StatusCode::CREATED, axum::Json(value)).into_response()
}

/// Graph's validation handshake: POSTs `url` (its path and query, on
/// `via`) with a `validationToken`; Ok when the answer echoes it as
/// text/plain. (Graph also wants it within 10 s; not timed here, where the
/// clock may be paused.)
async fn validate(via: &str, url: &str) -> Result<(), String> {
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|at| &rest[at..]))
        .unwrap_or("/");
    let token = "Validation: Testing client application reachability for subscription Request-Id: 3b3f9821-ce3f-23d9-879b-00a23f3 + <b>&amp;</b>";
    let encoded: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    let separator = if path.contains('?') { '&' } else { '?' };
    presence_gateway::upstream::install_crypto_provider();
    let response = reqwest::Client::new()
        .post(format!("{via}{path}{separator}validationToken={encoded}"))
        .header("content-type", "text/plain; charset=utf-8")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let text_plain = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    let echo = response.text().await.map_err(|e| e.to_string())?;
    if status != 200 || !text_plain || echo != token {
        return Err(format!(
            "answered {status}, text/plain {text_plain}: {echo:?}"
        ));
    }
    Ok(())
}

/// Finds subscription `id` for `account`: 404 when there is none, 403
/// (and a problem) when another account owns it.
fn owned(graph: &Graph, id: &str, account: usize, what: &str) -> Result<usize, Box<Response>> {
    let m = graph.0.lock();
    match m.subscriptions.iter().position(|s| s.value["id"] == id) {
        None => Err(Box::new(graph_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("The object '{id}' doesn't exist."),
        ))),
        Some(at) if m.subscriptions[at].owner != account => {
            drop(m);
            graph.problem(format!(
                "{what} {id} with the token of account {}",
                account + 1
            ));
            Err(Box::new(graph_error(
                StatusCode::FORBIDDEN,
                "ExtensionError",
                "Operation: Update; the subscription belongs to another user.",
            )))
        }
        Some(at) => Ok(at),
    }
}

async fn renew(
    State(graph): State<Graph>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1.0/subscriptions/{id}");
    let account = match graph.record("PATCH", path, &headers, &body) {
        Ok(account) => account,
        Err(response) => return *response,
    };
    if let Some(failure) = graph.gate(route::RENEW).await {
        return failure;
    }
    if let Err(response) = owned(&graph, &id, account, "renew") {
        return *response;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let asked = match check_expiry(&graph, "renew", &body["expirationDateTime"]) {
        Ok(at) => at,
        Err(response) => return *response,
    };
    let expires = answered_expiry(&graph, asked);
    let mut m = graph.0.lock();
    // Looked up again: the lock was released meanwhile.
    let Some(sub) = m.subscriptions.iter_mut().find(|s| s.value["id"] == id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    sub.value["expirationDateTime"] = json!(graph_time(expires));
    axum::Json(sub.value.clone()).into_response()
}

async fn delete(
    State(graph): State<Graph>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/v1.0/subscriptions/{id}");
    let account = match graph.record("DELETE", path, &headers, &[]) {
        Ok(account) => account,
        Err(response) => return *response,
    };
    if let Some(failure) = graph.gate(route::DELETE).await {
        return failure;
    }
    if let Err(response) = owned(&graph, &id, account, "delete") {
        return *response;
    }
    graph.remove_subscription(&id);
    StatusCode::NO_CONTENT.into_response()
}

async fn reauthorize(
    State(graph): State<Graph>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1.0/subscriptions/{id}/reauthorize");
    let account = match graph.record("POST", path, &headers, &body) {
        Ok(account) => account,
        Err(response) => return *response,
    };
    if let Some(failure) = graph.gate(route::REAUTHORIZE).await {
        return failure;
    }
    match owned(&graph, &id, account, "reauthorize") {
        Ok(_) => StatusCode::OK.into_response(),
        Err(response) => *response,
    }
}

async fn read(State(graph): State<Graph>, headers: HeaderMap, body: Bytes) -> Response {
    let path = "/v1.0/communications/getPresencesByUserId".to_owned();
    if let Err(response) = graph.record("POST", path, &headers, &body) {
        return *response;
    }
    if let Some(failure) = graph.gate(route::READ).await {
        return failure;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(ids) = body["ids"].as_array() else {
        graph.problem(format!("read without ids: {body}"));
        return graph_error(StatusCode::BAD_REQUEST, "BadRequest", "ids is required");
    };
    if ids.is_empty() || ids.len() > MAX_IDS {
        graph.problem(format!("read of {} ids", ids.len()));
        return graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "ids must hold 1 to 650 ids",
        );
    }
    let delay = graph.0.lock().read_delay;
    tokio::time::sleep(delay).await;
    let m = graph.0.lock();
    let value: Vec<Value> =
        ids.iter()
            .filter_map(Value::as_str)
            .map(|id| {
                let mut presence =
                    m.presence.get(id).cloned().unwrap_or_else(
                        || json!({"availability": "Offline", "activity": "Offline"}),
                    );
                presence["id"] = json!(id);
                presence
            })
            .collect();
    axum::Json(json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(presence)",
        "value": value,
    }))
    .into_response()
}

/// A change notification item for `user` from subscription `subscription`
/// with `client_state`; with resource data (`availability`, `activity`)
/// when given, else only the user's id.
pub fn item(
    subscription: &str,
    client_state: &str,
    user: &str,
    presence: Option<(&str, &str)>,
) -> Value {
    let resource = format!("communications/presences('{user}')");
    let mut data = json!({"@odata.type": "#Microsoft.Graph.presence",
                          "@odata.id": resource, "id": user});
    if let Some((availability, activity)) = presence {
        data["availability"] = json!(availability);
        data["activity"] = json!(activity);
    }
    json!({
        "subscriptionId": subscription,
        "clientState": client_state,
        "changeType": "updated",
        "tenantId": TENANT,
        "resource": resource,
        "subscriptionExpirationDateTime": "2026-11-24T11:00:00.0000000Z",
        "resourceData": data,
    })
}

/// A lifecycle notification item.
pub fn lifecycle(event: &str, subscription: &str, client_state: &str) -> Value {
    json!({
        "subscriptionId": subscription,
        "clientState": client_state,
        "lifecycleEvent": event,
        "tenantId": TENANT,
        "organizationId": TENANT,
        "subscriptionExpirationDateTime": "2026-11-24T11:00:00.0000000Z",
    })
}

/// A notification request body: `{"value": items}`.
pub fn batch(items: Vec<Value>) -> String {
    json!({ "value": items }).to_string()
}
