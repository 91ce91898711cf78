//! Extractors whose rejections are problem documents.
//!
//! axum's own extractors answer a bad request with `text/plain` (a path
//! parameter that is not UTF-8 after percent-decoding, a body over the
//! limit). Every error of the gateway is an RFC 9457 document (DESIGN §1),
//! so handlers take these wrappers, or the `Result` of axum's extractor and
//! map the rejection themselves; `tests/malformed.rs` walks every route to
//! hold them to it.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::problem::Problem;

/// Path parameters, like `axum::extract::Path`.
///
/// A path whose parameters do not decode (percent-encoded bytes that are not
/// UTF-8) names nothing the gateway has, since every source id and principal
/// is text: 404, as for any other unknown path, and for webhooks as for an
/// unknown source.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T, S> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(params)) => Ok(PathParams(params)),
            Err(rejection) if rejection.status().is_client_error() => Err(Problem::not_found(
                "no such resource: the path is not valid percent-encoded UTF-8",
            )),
            Err(rejection) => {
                // A route and its extractor disagree: a bug, not the caller's.
                tracing::error!(error = %rejection.body_text(), "path parameters do not fit the route");
                Err(Problem::internal())
            }
        }
    }
}

/// The whole body of a consumer request, at most `LIMIT` bytes.
///
/// A declared `Content-Length` over the limit is refused before anything is
/// read (so a client waiting on `Expect: 100-continue` is not invited to
/// send it); a body that grows past the limit while arriving is cut off.
/// Both are 413.
#[derive(Debug)]
pub struct LimitedBody<const LIMIT: usize>(pub Bytes);

impl<const LIMIT: usize, S> FromRequest<S> for LimitedBody<LIMIT>
where
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Problem> {
        let too_large = || {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("the body exceeds the limit of {LIMIT} bytes"),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > LIMIT as u64) {
            return Err(too_large());
        }
        match axum::body::to_bytes(request.into_body(), LIMIT).await {
            Ok(bytes) => Ok(LimitedBody(bytes)),
            Err(e) if is_length_limit(&e) => Err(too_large()),
            Err(_) => Err(Problem::bad_request(
                "body-unreadable",
                "the request body could not be read",
            )),
        }
    }
}

/// Whether reading a body failed because it passed the limit.
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn read<const LIMIT: usize>(request: Request) -> Result<Bytes, Problem> {
        LimitedBody::<LIMIT>::from_request(request, &())
            .await
            .map(|LimitedBody(b)| b)
    }

    #[tokio::test]
    async fn limited_body_refuses_a_declared_length_over_the_limit_unread() {
        let request = Request::post("/")
            .header(header::CONTENT_LENGTH, "11")
            .body(Body::from("0123456789a"))
            .unwrap();
        let problem = read::<10>(request).await.unwrap_err();
        assert_eq!(problem.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn limited_body_cuts_off_an_undeclared_body_past_the_limit() {
        let chunks = futures_util::stream::iter(
            ["01234", "56789", "a"].map(|s| Ok::<_, std::io::Error>(Bytes::from(s))),
        );
        let request = Request::post("/").body(Body::from_stream(chunks)).unwrap();
        let problem = read::<10>(request).await.unwrap_err();
        assert_eq!(problem.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn limited_body_reads_a_body_up_to_the_limit() {
        let request = Request::post("/").body(Body::from("0123456789")).unwrap();
        assert_eq!(read::<10>(request).await.unwrap(), "0123456789");
    }

    #[tokio::test]
    async fn limited_body_answers_a_broken_body_with_400() {
        let chunks = futures_util::stream::iter([
            Ok(Bytes::from("01")),
            Err(std::io::Error::other("reset")),
        ]);
        let request = Request::post("/").body(Body::from_stream(chunks)).unwrap();
        let problem = read::<10>(request).await.unwrap_err();
        assert_eq!(problem.status(), StatusCode::BAD_REQUEST);
    }
}
