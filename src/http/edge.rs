//! The outermost service every request passes: request id, tracing span,
//! panic guard.
//!
//! One hand-written service instead of a stack of generic layers: it runs on
//! the webhook hot path, and the layered version (set id, propagate id, trace,
//! catch panic, plus the body boxing they need) cost about a quarter of what
//! the gateway adds to bare axum. What it guarantees:
//!
//! - every answer carries `x-request-id`: the caller's (a proxy's) when the
//!   request had one, else a fresh `pppppppp-nnnnnnnnnnnn` hex id, which is also
//!   put on the request so handlers can log it;
//! - handlers run inside a `request` span (debug level, so free when debug
//!   logging is off), and a debug line reports status and latency;
//! - a panicking handler is logged and answered with a 500 problem instead of
//!   dropping the connection.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use tower::Service;

use super::REQUEST_ID;
use super::problem::Problem;

/// Wraps the router; see the module documentation.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    ids: MakeId,
}

impl<S> Edge<S> {
    /// Wraps `inner`, with a fresh request-id prefix.
    pub fn new(inner: S) -> Self {
        Edge {
            inner,
            ids: MakeId::new(),
        }
    }
}

impl<S> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let id = match request.headers().get(&REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = self.ids.next();
                request.headers_mut().insert(REQUEST_ID, id.clone());
                id
            }
        };
        let span = request_span(&request);
        let started = (!span.is_disabled()).then(Instant::now);
        let inner = {
            let _entered = span.enter();
            std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request)))
        };
        EdgeFuture {
            inner: inner.ok(),
            id: Some(id),
            span,
            started,
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of [`Edge`]: the router's, with the request id added.
    pub struct EdgeFuture<F> {
        // `None` when the router panicked while being called.
        #[pin]
        inner: Option<F>,
        id: Option<HeaderValue>,
        span: tracing::Span,
        started: Option<Instant>,
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let polled = match this.inner.as_pin_mut() {
            Some(inner) => std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))),
            None => Err(Box::new("panicked in call") as Box<dyn std::any::Any + Send>),
        };
        let mut response = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(response))) => response,
            Err(_panic) => {
                // The payload is not logged: it may quote request data.
                tracing::error!("request handler panicked");
                Problem::internal().into_response()
            }
        };
        if let Some(id) = this.id.take() {
            response.headers_mut().entry(REQUEST_ID).or_insert(id);
        }
        if let Some(started) = this.started {
            tracing::debug!(
                status = response.status().as_u16(),
                latency_us = started.elapsed().as_micros() as u64,
                "request finished"
            );
        }
        Poll::Ready(Ok(response))
    }
}

/// Request ids `pppppppp-nnnnnnnnnnnn`: a random per-process prefix and a
/// counter, in hex.
#[derive(Clone)]
pub(crate) struct MakeId {
    prefix: u32,
    counter: Arc<AtomicU64>,
}

impl MakeId {
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        MakeId {
            prefix: RandomState::new().hash_one(std::process::id()) as u32,
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Built on the stack: this runs for every request, and `format!`
        // cost more than everything else here.
        let mut buf = [b'-'; 21];
        write_hex(&mut buf[..8], u64::from(self.prefix));
        write_hex(&mut buf[9..], n);
        HeaderValue::from_bytes(&buf)
            .unwrap_or_else(|_| unreachable!("hex digits and '-' are valid header bytes"))
    }
}

fn write_hex(out: &mut [u8], mut value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

fn request_span(request: &Request<Body>) -> tracing::Span {
    let span = tracing::debug_span!(
        "request",
        method = tracing::field::Empty,
        path = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let id = request
            .headers()
            .get(&REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        span.record("method", tracing::field::display(request.method()));
        span.record("path", request.uri().path());
        span.record("request_id", id);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn request_ids_are_fixed_width_hex_and_unique() {
        let make = MakeId::new();
        let a = make.next().to_str().unwrap().to_owned();
        let b = make.next();
        let b = b.to_str().unwrap();
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

    #[tokio::test]
    async fn a_panicking_handler_gets_a_500_problem_with_the_request_id() {
        async fn boom() -> Response {
            panic!("handler bug")
        }
        let app = Edge::new(axum::Router::new().route("/", axum::routing::get(boom)));
        let request = Request::builder()
            .uri("/")
            .header(REQUEST_ID, "abc")
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()[REQUEST_ID], "abc");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }

    #[tokio::test]
    async fn a_handler_that_sets_its_own_id_keeps_it() {
        async fn own() -> Response {
            ([(REQUEST_ID, "mine")], "ok").into_response()
        }
        let app = Edge::new(axum::Router::new().route("/", axum::routing::get(own)));
        let request = Request::builder().uri("/").body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID], "mine");
    }
}
