//! Operations endpoints: liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::problem::Problem;
use super::AppState;

/// The OpenMetrics text media type, which Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 once started, 503 while draining.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        Problem::unavailable("not-ready", "the gateway is starting or draining", 1).into_response()
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics().render() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS))],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            Problem::internal().into_response()
        }
    }
}
