//! Operations endpoints: liveness, readiness, metrics and the dashboard.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::problem::Problem;
use crate::telemetry::Format;

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 once started, 503 while draining.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if !state.is_ready() {
        return Problem::unavailable("not-ready", "the gateway is starting or draining", 1)
            .into_response();
    }
    // A replica that cannot keep writes (journal failing, Redis away) is
    // taken out of the proxy's rotation until it can again.
    match state.store().check_writable() {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => Problem::unavailable("store-unavailable", e.to_string(), e.retry_after_secs())
            .into_response(),
    }
}

/// The dashboard's files, embedded in the binary.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// The page loads only its own script and style and talks only to this
/// origin; nothing may frame it.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the live dashboard (a static page; its data comes from `/v1`
/// with the consumer token).
pub async fn dashboard() -> Response {
    asset("text/html; charset=utf-8", DASHBOARD_HTML)
}

/// `GET /assets/dashboard.js`.
pub async fn dashboard_js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

/// `GET /assets/dashboard.css`.
pub async fn dashboard_css() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

/// `GET /metrics`: OpenMetrics, or the classic Prometheus text format for
/// a scrape that prefers `text/plain; version=0.0.4`.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    match state.metrics().render(format) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            Problem::internal().into_response()
        }
    }
}

#[cfg(test)]
mod tests {

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use crate::http::{AppState, router};

    fn state() -> AppState {
        crate::http::test_state(0)
    }

    async fn readyz(state: &AppState) -> StatusCode {
        let request = Request::get("/readyz").body(Body::empty()).unwrap();
        router(state.clone())
            .oneshot(request)
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn readyz_follows_the_ready_flag() {
        let state = state();
        assert_eq!(
            readyz(&state).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "starting"
        );
        state.set_ready(true);
        assert_eq!(readyz(&state).await, StatusCode::OK);
        state.set_ready(false);
        assert_eq!(
            readyz(&state).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining"
        );
    }

    #[tokio::test]
    async fn overload_is_503_with_retry_after_and_counted() {
        let state = state();
        let _held = state.in_flight().try_acquire().unwrap();
        let mut request = Request::post("/webhooks/m").body(Body::from("{}")).unwrap();
        let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        request.extensions_mut().insert(axum::extract::ConnectInfo(
            crate::http::listener::Peer::now(peer),
        ));
        let response = router(state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        let source = state.sources().get("m").unwrap();
        assert_eq!(
            source.stats.rejected(crate::sources::Rejection::Overloaded),
            1
        );
        assert!(state.store().is_empty());
    }
}
