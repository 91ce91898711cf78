//! The HTTP surface: router, shared state, request ids, tracing and problem
//! answers. Handlers live in [`webhooks`], [`consumers`] and [`ops`]; the
//! OpenAPI description of all of them in [`openapi`].

pub mod client_addr;
pub mod consumers;
pub mod edge;
pub mod extract;
pub mod graph;
pub mod listener;
pub mod openapi;
pub mod opens;
pub mod ops;
pub mod people;
pub mod per_client;
pub mod problem;
pub mod server;
pub mod stream;
pub mod webhooks;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;

use crate::config::Secret;
use crate::presence::Store;
use crate::sources::Sources;
use crate::telemetry::{GlobalStats, Metrics};
use axum::http::HeaderName;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, any, get, post};
use edge::Edge;
use ipnet::IpNet;
use problem::Problem;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// The request id header, set on every request and response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Consumer bearer tokens, kept as SHA-256 digests so that comparing a
/// presented token costs the same whatever its length or content.
#[derive(Default)]
pub struct ConsumerAuth {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ConsumerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConsumerAuth([{} redacted])", self.digests.len())
    }
}

impl ConsumerAuth {
    pub fn new(tokens: &[Secret]) -> Self {
        ConsumerAuth {
            digests: tokens
                .iter()
                .map(|t| Sha256::digest(t.expose()).into())
                .collect(),
        }
    }

    /// No tokens configured: the API is open.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `token` is one of the configured tokens (constant time per token).
    pub fn accepts(&self, token: &[u8]) -> bool {
        let presented: [u8; 32] = Sha256::digest(token).into();
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&presented))
            .into()
    }
}

/// Everything a handler needs: cheap to clone, no globals.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    sources: Arc<Sources>,
    store: Arc<Store>,
    global: Arc<GlobalStats>,
    metrics: Metrics,
    consumer_auth: ConsumerAuth,
    ready: AtomicBool,
    in_flight: Semaphore,
    body_limit: usize,
    body_timeout: std::time::Duration,
    per_client: per_client::PerClient,
    trusted_proxies: Vec<IpNet>,
    /// Stream opens per consumer.
    stream_opens: opens::StreamOpens,
    /// Tasks that outlive their HTTP exchange (WebSocket streams): shutdown
    /// waits for them to send their close frames.
    detached: tokio_util::task::TaskTracker,
}

/// The parts [`AppState`] is built from.
pub struct StateParts {
    pub sources: Arc<Sources>,
    pub store: Arc<Store>,
    pub global: Arc<GlobalStats>,
    pub consumer_tokens: Vec<Secret>,
    pub max_in_flight: usize,
    pub body_limit: usize,
    /// How long a webhook body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// Webhook bodies in transit per client address, at most.
    pub max_requests_per_client: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub stream_opens: opens::OpenLimit,
}

impl AppState {
    pub fn new(parts: StateParts) -> Self {
        let metrics = Metrics::new(
            Arc::clone(&parts.sources),
            Arc::clone(&parts.store),
            Arc::clone(&parts.global),
        );
        AppState {
            inner: Arc::new(Shared {
                sources: parts.sources,
                store: parts.store,
                global: parts.global,
                metrics,
                consumer_auth: ConsumerAuth::new(&parts.consumer_tokens),
                ready: AtomicBool::new(false),
                in_flight: Semaphore::new(parts.max_in_flight),
                body_limit: parts.body_limit,
                body_timeout: parts.body_timeout,
                per_client: per_client::PerClient::new(parts.max_requests_per_client),
                trusted_proxies: parts.trusted_proxies,
                stream_opens: opens::StreamOpens::new(parts.stream_opens),
                detached: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    pub fn sources(&self) -> &Sources {
        &self.inner.sources
    }
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn store_arc(&self) -> Arc<Store> {
        Arc::clone(&self.inner.store)
    }
    pub fn global(&self) -> &GlobalStats {
        &self.inner.global
    }
    pub fn global_arc(&self) -> Arc<GlobalStats> {
        Arc::clone(&self.inner.global)
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    pub fn consumer_auth(&self) -> &ConsumerAuth {
        &self.inner.consumer_auth
    }
    pub fn in_flight(&self) -> &Semaphore {
        &self.inner.in_flight
    }
    pub fn body_limit(&self) -> usize {
        self.inner.body_limit
    }
    pub fn body_timeout(&self) -> std::time::Duration {
        self.inner.body_timeout
    }
    /// Webhook requests with a body in transit, per client address.
    pub fn per_client(&self) -> &per_client::PerClient {
        &self.inner.per_client
    }
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.inner.trusted_proxies
    }
    /// How often each consumer may open a stream with a snapshot or replay.
    pub fn stream_opens(&self) -> &opens::StreamOpens {
        &self.inner.stream_opens
    }
    /// Tasks that outlive their HTTP exchange (WebSocket streams).
    pub fn detached(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.detached
    }
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }
}

/// The consumer API, nested under `/v1` behind the token check.
fn v1_routes() -> [(&'static str, MethodRouter<AppState>); 9] {
    [
        ("/people", get(people::list)),
        ("/people/query", post(people::query)),
        ("/people/{id}", get(people::get_one)),
        ("/presence", get(consumers::list)),
        ("/presence/query", post(consumers::query)),
        ("/presence/{source}/{principal}", get(consumers::get_one)),
        ("/sources", get(consumers::sources)),
        ("/stream", get(stream::sse)),
        ("/ws", get(ws::ws)),
    ]
}

/// Everything outside `/v1`.
fn open_routes() -> [(&'static str, MethodRouter<AppState>); 8] {
    [
        ("/webhooks/{source_id}", any(webhooks::receive)),
        ("/healthz", get(ops::healthz)),
        ("/readyz", get(ops::readyz)),
        ("/metrics", get(ops::metrics)),
        ("/", get(ops::dashboard)),
        ("/assets/dashboard.js", get(ops::dashboard_js)),
        ("/assets/dashboard.css", get(ops::dashboard_css)),
        ("/openapi.json", get(openapi::document)),
    ]
}

/// The path template of every route the router serves (`/v1/presence/{source}/{principal}`,
/// ...), taken from the same tables: for tests that must walk them all.
pub fn route_templates() -> Vec<String> {
    let v1 = v1_routes().map(|(path, _)| format!("/v1{path}"));
    let open = open_routes().map(|(path, _)| path.to_owned());
    v1.into_iter().chain(open).collect()
}

fn routes(state: AppState) -> Router {
    let v1 = v1_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router.route(path, handler)
        })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            consumers::require_token,
        ));
    open_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router.route(path, handler)
        })
        .nest("/v1", v1)
        .fallback(|| async { Problem::not_found("no such resource").into_response() })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this method is not allowed on this resource",
            )
            .into_response()
        })
        .with_state(state)
}

/// A state with one Mitel source `m` (key `k`), no tokens, one request in
/// flight at most and a store keeping `history` changes, for unit tests.
#[cfg(test)]
pub(crate) fn test_state(history: usize) -> AppState {
    use crate::presence::store::StoreLimits;
    let text = "[[sources]]\nid = \"m\"\nkind = \"mitel\"\nsigning_keys = [\"k\"]\n";
    let config =
        crate::Config::parse_with_env(text, std::path::Path::new("t.toml"), Vec::new(), |_| None)
            .expect("test config");
    let sources = Arc::new(Sources::new(&config.sources).expect("test sources"));
    let limits = StoreLimits {
        history,
        dedup_window_ms: 0,
        dedup_capacity: 1,
        stream_buffer: 64,
        max_future_skew_ms: 300_000,
    };
    AppState::new(StateParts {
        store: Arc::new(Store::new(&sources.ids(), limits)),
        sources,
        global: Arc::default(),
        consumer_tokens: Vec::new(),
        max_in_flight: 1,
        body_limit: 1024,
        body_timeout: std::time::Duration::from_secs(5),
        max_requests_per_client: 64,
        trusted_proxies: Vec::new(),
        stream_opens: opens::OpenLimit::default(),
    })
}

/// The whole application: routes wrapped in request ids, tracing and panic
/// catching.
///
/// The wrapper sits outside the router instead of `Router::layer`, which
/// would box the service and the response body on every request.
pub fn router(state: AppState) -> Edge<Router> {
    Edge::new(routes(state))
}
