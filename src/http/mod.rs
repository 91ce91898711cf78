//! The HTTP surface: router, shared state, request ids, tracing and problem
//! answers. Handlers live in [`webhooks`], [`consumers`] and [`ops`].

pub mod client_addr;
pub mod consumers;
pub mod ops;
pub mod problem;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderName, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::config::Secret;
use crate::presence::Store;
use crate::sources::Sources;
use crate::telemetry::{GlobalStats, Metrics};
use problem::Problem;

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
    trusted_proxies: Vec<IpNet>,
}

/// The parts [`AppState`] is built from.
pub struct StateParts {
    pub sources: Arc<Sources>,
    pub store: Arc<Store>,
    pub global: Arc<GlobalStats>,
    pub consumer_tokens: Vec<Secret>,
    pub max_in_flight: usize,
    pub body_limit: usize,
    pub trusted_proxies: Vec<IpNet>,
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
                trusted_proxies: parts.trusted_proxies,
            }),
        }
    }

    pub fn sources(&self) -> &Sources {
        &self.inner.sources
    }
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn global(&self) -> &GlobalStats {
        &self.inner.global
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
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.inner.trusted_proxies
    }
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }
}

/// Request ids: a per-process random prefix and a counter. Unique, cheap,
/// and no system call per request.
#[derive(Clone)]
struct MakeId {
    prefix: u32,
    counter: Arc<AtomicU64>,
}

impl MakeId {
    fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        MakeId {
            prefix: RandomState::new().hash_one(std::process::id()) as u32,
            counter: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // `pppppppp-nnnnnnnnnnnn`, hex, built on the stack (this runs for
        // every request; `format!` cost more than the rest of the layer).
        let mut buf = [b'-'; 21];
        write_hex(&mut buf[..8], u64::from(self.prefix));
        write_hex(&mut buf[9..], n);
        axum::http::HeaderValue::from_bytes(&buf)
            .ok()
            .map(RequestId::new)
    }
}

/// Writes the low `out.len()` hex digits of `value` into `out`.
fn write_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// The span of one request: method, path (never the query, which may carry
/// tokens) and request id. DEBUG, so that at the default level the hot path
/// builds no span; log events that matter carry the request id themselves.
fn request_span(request: &Request<Body>) -> tracing::Span {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::debug_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id,
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    Problem::internal().into_response()
}

/// The routes, without the cross-cutting layers.
fn routes(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/presence", get(consumers::list))
        .route("/presence/query", post(consumers::query))
        .route("/presence/{source}/{principal}", get(consumers::get_one))
        .route("/sources", get(consumers::sources))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            consumers::require_token,
        ));
    Router::new()
        .route("/webhooks/{source_id}", any(webhooks::receive))
        .nest("/v1", v1)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
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

/// The whole application: routes wrapped in request ids, tracing and panic
/// catching.
///
/// The layers wrap the router from outside, composed as one static tower
/// stack, instead of `Router::layer`: that would box the service and the
/// response body again for every layer on every request, which cost more
/// than verifying and parsing a webhook.
pub fn router(
    state: AppState,
) -> impl Service<Request<Body>, Response = Response, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(Body::new))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeId::new()))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span as fn(&Request<Body>) -> tracing::Span)
                .on_request(())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG),
                ),
        )
        .layer(CatchPanicLayer::custom(
            panic_response as fn(Box<dyn std::any::Any + Send + 'static>) -> Response,
        ))
        .service(routes(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_fixed_width_hex_and_unique() {
        let mut make = MakeId::new();
        let request = Request::new(());
        let a = make.make_request_id(&request).unwrap();
        let b = make.make_request_id(&request).unwrap();
        let a = a.header_value().to_str().unwrap().to_owned();
        let b = b.header_value().to_str().unwrap();
        assert_eq!(a.len(), 21);
        assert_eq!(&a[8..9], "-");
        assert!(
            a.bytes()
                .enumerate()
                .all(|(i, c)| i == 8 || c.is_ascii_hexdigit())
        );
        assert_ne!(a, b);
        assert!(a.ends_with("000000000000") && b.ends_with("000000000001"));
    }
}
