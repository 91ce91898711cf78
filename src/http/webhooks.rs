//! `POST /webhooks/{source_id}`: limit, read, verify, hand to the provider,
//! apply.
//!
//! Checks run in the order DESIGN.md §1 fixes, and the first failure decides
//! the answer: route (404), method (405), declared size (413), caller IP
//! (403), the body's arrival (413 when it grows over the limit, 408 when it
//! is not complete within `server.body_timeout_secs` of the request's
//! arrival, 429 when its client already has `server.max_requests_per_client`
//! bodies in transit), load (503), authenticity (401), parsing (400).
//! Nothing is counted or stored before the request has passed all of them,
//! except its one rejection counter; only accepted requests are timed, from
//! their arrival. Stale and duplicate events are answered like accepted
//! ones so that providers do not retry them.
//!
//! The body is in memory before the request takes one of the
//! `server.max_in_flight` slots, which is then held only to verify, parse
//! and apply: a sender that trickles its body holds no capacity that
//! authentic senders need, only its connection, for a bounded time.
//! A body over the limit announced with `Expect: 100-continue` is refused
//! without reading it, so that hyper does not invite it first.

use std::future::Future;
use std::net::IpAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};

use super::client_addr::client_addr;
use super::extract::PathParams;
use super::listener::Peer;
use super::problem::Problem;
use super::{AppState, REQUEST_ID};
use crate::presence::StoreError;
use crate::sources::{ApplyError, Rejection, Source, Verifier};

/// How much of an oversized body is read and thrown away before answering,
/// so the connection closes cleanly and the caller reads the 413 instead of a
/// reset. Anything larger is cut off.
const DRAIN_LIMIT: u64 = 4 * 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A rejected request: the counter it bumps and the answer it gets.
pub(super) struct Rejected {
    reason: Rejection,
    problem: Problem,
    /// The answer ends the connection (a body was left unread).
    close: bool,
}

impl Rejected {
    pub(super) fn new(
        reason: Rejection,
        status: StatusCode,
        slug: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self::problem(reason, Problem::new(status, slug, detail))
    }

    fn problem(reason: Rejection, problem: Problem) -> Self {
        Rejected {
            reason,
            problem,
            close: false,
        }
    }

    /// Answered with `Connection: close`: what is left of the request is
    /// not read, so the connection cannot carry another one.
    fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

/// The webhook endpoint, for every method (so that 404 comes before 405).
pub async fn receive(
    State(state): State<AppState>,
    PathParams(source_id): PathParams<String>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request<Body>,
) -> Response {
    let request_id = request.headers().get(&REQUEST_ID).cloned();
    let request_id = || {
        request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let Some(source) = state.sources().get(&source_id) else {
        state
            .global()
            .unknown_source
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            source = %source_id.escape_debug(),
            request_id = request_id(),
            "webhook for unknown source"
        );
        return Problem::not_found(format!("no source with id {:?}", source_id)).into_response();
    };
    if let Verifier::Graph(_) = &source.verifier
        && request.method() == Method::POST
        && let Some(token) = super::graph::validation_token(request.uri())
    {
        // Graph's validation handshake: answered before any other check.
        return super::graph::validation_answer(token);
    }
    if matches!(source.verifier, Verifier::NoWebhooks) {
        return Problem::not_found(format!(
            "source {source_id:?} fetches its notifications itself (kind {}); it takes no webhooks",
            source.kind.as_str()
        ))
        .into_response();
    }
    // Derived once: used for allow_ips and for the log line of a rejection.
    let client = client_addr(peer.addr.ip(), request.headers(), state.trusted_proxies());
    match handle(&state, source, client, peer.arrived, request).await {
        Ok(response) => {
            source.stats.latency.observe(peer.arrived.elapsed());
            response
        }
        Err(rejected) => {
            source.stats.reject(rejected.reason);
            tracing::info!(
                source = %source.id,
                request_id = request_id(),
                client = %client,
                reason = rejected.reason.as_str(),
                status = rejected.problem.status().as_u16(),
                "webhook rejected"
            );
            let mut response = rejected.problem.into_response();
            if rejected.close {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

async fn handle(
    state: &AppState,
    source: &Source,
    client: IpAddr,
    arrived: Instant,
    request: Request<Body>,
) -> Result<Response, Rejected> {
    if request.method() != Method::POST {
        return Err(Rejected::problem(
            Rejection::MethodNotAllowed,
            Problem::method_not_allowed("POST"),
        ));
    }
    let limit = state.body_limit();
    let (parts, body) = request.into_parts();
    if declared_length(&parts.headers).is_some_and(|len| len > limit as u64) {
        // A client that waits for `100 Continue` is told before it sends
        // anything; any other gets its 413 after what it already sent (up
        // to a bound), so that it reads the answer instead of a reset.
        if !expects_continue(&parts.headers) {
            drain(body).await;
            return Err(too_large(limit));
        }
        return Err(too_large(limit).closing());
    }
    if !source.allow_ips.is_empty() && !source.allow_ips.iter().any(|net| net.contains(&client)) {
        return Err(Rejected::new(
            Rejection::IpNotAllowed,
            StatusCode::FORBIDDEN,
            "ip-not-allowed",
            format!("{client} is not in this source's allow_ips"),
        ));
    }
    let deadline = arrived + state.body_timeout();
    let body = read_body(state, client, deadline, body, limit).await?;
    let Ok(_permit) = state.in_flight().try_acquire() else {
        return Err(Rejected::problem(
            Rejection::Overloaded,
            Problem::unavailable(
                "overloaded",
                "too many webhook requests in progress; retry shortly",
                1,
            ),
        ));
    };

    if let Verifier::Graph(receiver) = &source.verifier {
        return super::graph::notifications(state, source, receiver, &body).await;
    }
    let (verified, proof) = source.verifier.verify(&parts.headers, &body).map_err(|e| {
        let reason = Rejection::from(e);
        Rejected::new(
            reason,
            StatusCode::UNAUTHORIZED,
            reason.slug(),
            verify_detail(source, reason),
        )
    })?;
    let parsed = source.parser.parse(verified, proof).map_err(|e| {
        Rejected::new(
            Rejection::BadPayload,
            StatusCode::BAD_REQUEST,
            "bad-payload",
            e.to_string(),
        )
    })?;

    crate::sources::apply(state.store(), source, &parsed)
        .await
        .map_err(|e| apply_error(source, e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The answer to an authentic notification the store did not keep.
pub(super) fn apply_error(source: &Source, error: ApplyError) -> Rejected {
    match error {
        ApplyError::TooLong(e) => Rejected::new(
            Rejection::BadPayload,
            StatusCode::BAD_REQUEST,
            "field-too-long",
            e.to_string(),
        ),
        // The store logs that it is full (at most once a minute).
        ApplyError::Store(e @ StoreError::Full { .. }) => Rejected::problem(
            Rejection::StoreFull,
            Problem::unavailable("store-full", e.to_string(), e.retry_after_secs()),
        ),
        ApplyError::Store(e) => {
            tracing::warn!(source = %source.id, error = %e, "webhook not kept: the store is unavailable");
            Rejected::problem(
                Rejection::StoreUnavailable,
                Problem::unavailable(
                    "store-unavailable",
                    "the gateway cannot keep this notification right now; retry shortly",
                    e.retry_after_secs(),
                ),
            )
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `Expect: 100-continue` (the only expectation HTTP/1.1 defines).
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn too_large(limit: usize) -> Rejected {
    Rejected::new(
        Rejection::BodyTooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        format!("the body exceeds the limit of {limit} bytes"),
    )
}

/// Why a body could not be read.
enum ReadError {
    TooLarge,
    Broken,
}

/// Reads the whole body, at most `limit` bytes, by `deadline`. A body that
/// arrives in one frame (the usual case) is kept without a copy.
///
/// A body that is not all there at once is counted for its client while it
/// arrives ([`AppState::per_client`]); a client over its limit is refused.
async fn read_body(
    state: &AppState,
    client: IpAddr,
    deadline: Instant,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, Rejected> {
    let read = async {
        let mut first: Option<Bytes> = None;
        let mut joined: Vec<u8> = Vec::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| ReadError::Broken)?.into_data() else {
                continue; // trailers
            };
            total += data.len();
            if total > limit {
                return Err(ReadError::TooLarge);
            }
            match first.take() {
                None if joined.is_empty() => first = Some(data),
                earlier => {
                    if let Some(earlier) = earlier {
                        joined.extend_from_slice(&earlier);
                    }
                    joined.extend_from_slice(&data);
                }
            }
        }
        Ok(first.unwrap_or_else(|| Bytes::from(joined)))
    };
    // A webhook body usually arrives with the headers, so the first poll
    // completes it; only a body still in transit is counted for its client
    // and gets a timer (registering one per request is measurable on the
    // hot path).
    let outcome = {
        let mut read = std::pin::pin!(read);
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(result) => result,
            Poll::Pending => {
                let Some(_slot) = state.per_client().enter(client) else {
                    return Err(Rejected::problem(
                        Rejection::Overloaded,
                        Problem::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            "too-many-requests",
                            "this client has too many requests whose body is still arriving; \
                             retry shortly",
                        )
                        .retry_after(1),
                    )
                    .closing());
                };
                let deadline = tokio::time::Instant::from_std(deadline);
                match tokio::time::timeout_at(deadline, read).await {
                    Ok(result) => result,
                    Err(_) => {
                        return Err(Rejected::new(
                            Rejection::BadPayload,
                            StatusCode::REQUEST_TIMEOUT,
                            "body-timeout",
                            format!(
                                "the body did not arrive within {} s of the request",
                                state.body_timeout().as_secs()
                            ),
                        )
                        .closing());
                    }
                }
            }
        }
    };
    match outcome {
        Ok(bytes) => Ok(bytes),
        Err(ReadError::TooLarge) => {
            drain(body).await;
            Err(too_large(limit))
        }
        Err(ReadError::Broken) => Err(Rejected::new(
            Rejection::BadPayload,
            StatusCode::BAD_REQUEST,
            "body-unreadable",
            "the request body could not be read",
        )
        .closing()),
    }
}

/// Reads and discards what is left of a body, within bounds.
async fn drain(body: Body) {
    let mut body = Limited::new(body, DRAIN_LIMIT as usize);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

fn verify_detail(source: &Source, reason: Rejection) -> String {
    let header = source.verifier.header();
    if let Verifier::Standard(verifier) = &source.verifier {
        return standard_detail(source, verifier.tolerance_secs(), reason);
    }
    match reason {
        Rejection::SignatureMissing => format!("the {header} header is missing or empty"),
        Rejection::SignatureMalformed => {
            format!("the {header} header is not in the expected format")
        }
        Rejection::SignatureExpired => format!("the {header} proof is outside its validity window"),
        _ => match source.verifier {
            Verifier::HmacHex { .. } => format!(
                "the {header} header does not match any key of source {:?}",
                &*source.id
            ),
            Verifier::Correlation { .. } => format!(
                "the {header} header does not name a subscription of source {:?}",
                &*source.id
            ),
            Verifier::Graph(_) => format!(
                "a clientState does not match the one of source {:?}",
                &*source.id
            ),
            Verifier::Standard(_) | Verifier::NoWebhooks => {
                "this source receives no webhooks".to_owned()
            }
        },
    }
}

/// The detail of a Standard Webhooks rejection: which of the three headers
/// to look at, never what was expected.
fn standard_detail(source: &Source, tolerance_secs: u64, reason: Rejection) -> String {
    match reason {
        Rejection::SignatureMissing => {
            "the webhook-id, webhook-timestamp and webhook-signature headers are all required"
                .to_owned()
        }
        Rejection::SignatureMalformed => "webhook-id must be 1 to 256 visible ASCII characters, \
             webhook-timestamp Unix seconds, and webhook-signature must hold a \
             \"v1,<base64 of 32 bytes>\" entry"
            .to_owned(),
        Rejection::SignatureExpired => format!(
            "webhook-timestamp is more than {tolerance_secs} s away from the gateway's clock"
        ),
        _ => format!(
            "no v1 entry of webhook-signature matches a key of source {:?}",
            &*source.id
        ),
    }
}
