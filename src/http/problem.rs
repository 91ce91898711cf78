//! RFC 9457 problem documents: every error answer of the gateway.
//!
//! The `detail` is written for the caller and never contains a secret, an
//! expected signature or a token; internal errors get a generic detail and
//! the cause goes to the log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Prefix of every problem `type`; the suffix names the problem.
pub const TYPE_PREFIX: &str = "urn:presence-gateway:problem:";

/// An error answer.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    slug: &'static str,
    detail: String,
    allow: Option<&'static str>,
    retry_after_secs: Option<u32>,
    bearer_challenge: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    /// A problem with this status, short name (`signature-mismatch`) and detail.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            slug,
            detail: detail.into(),
            allow: None,
            retry_after_secs: None,
            bearer_challenge: false,
        }
    }

    /// 404 for a path that names nothing.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 400 for a request the caller must fix.
    pub fn bad_request(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, detail)
    }

    /// 405 with the `Allow` header.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut p = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("this resource only accepts {allow}"),
        );
        p.allow = Some(allow);
        p
    }

    /// 401 for the consumer API, with a `WWW-Authenticate: Bearer` challenge.
    pub fn unauthorized_consumer() -> Self {
        let mut p = Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
        );
        p.bearer_challenge = true;
        p
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(
        slug: &'static str,
        detail: impl Into<String>,
        retry_after_secs: u32,
    ) -> Self {
        let mut p = Self::new(StatusCode::SERVICE_UNAVAILABLE, slug, detail);
        p.retry_after_secs = Some(retry_after_secs);
        p
    }

    /// The same problem with a `Retry-After` header.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 429 with `Retry-After`.
    pub fn too_many_requests(
        slug: &'static str,
        detail: impl Into<String>,
        retry_after_secs: u32,
    ) -> Self {
        let mut p = Self::new(StatusCode::TOO_MANY_REQUESTS, slug, detail);
        p.retry_after_secs = Some(retry_after_secs);
        p
    }

    /// 500 with a generic detail; log the cause before calling this.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the gateway log has the details",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = Body {
            kind: format!("{TYPE_PREFIX}{}", self.slug),
            title,
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, bytes).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.bearer_challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"presence-gateway\""),
            );
        }
        response
    }
}
