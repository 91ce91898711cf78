//! `GET /openapi.json`: the OpenAPI 3.1 description of every HTTP endpoint.
//!
//! The document is `openapi/openapi.json` in the repository, kept by hand
//! and embedded in the binary as it is; this module never builds or edits
//! it at run time. Its tests hold it to the router: every route template
//! of [`super::route_templates`] is a path of the document and the other
//! way round, and the methods each path documents are exactly those the
//! router serves there (every other method is 405). `scripts/schemathesis`
//! checks the answers of the running gateway against it.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("../../openapi/openapi.json");

/// `GET /openapi.json`.
pub async fn document() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        DOCUMENT,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::DOCUMENT;
    use crate::http::{route_templates, router, test_state};

    /// The methods an OpenAPI path item may hold (HEAD aside: axum answers
    /// it for every GET route, and OpenAPI descriptions leave it out).
    const METHODS: [&str; 7] = ["get", "put", "post", "delete", "options", "patch", "trace"];

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi/openapi.json is JSON")
    }

    /// Each path of the document with the methods it documents.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths is an object");
        paths
            .iter()
            .map(|(path, item)| {
                let methods = METHODS
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(|m| m.to_uppercase())
                    .collect();
                (path.clone(), methods)
            })
            .collect()
    }

    /// A concrete path for a template: the test state's source `m` for
    /// source parameters, `x` for any other.
    fn fill(template: &str) -> String {
        template
            .split('/')
            .map(|segment| match segment {
                "{source}" | "{source_id}" => "m",
                s if s.starts_with('{') => "x",
                s => s,
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn document_is_openapi_3_1_json() {
        let doc = document();
        let version = doc["openapi"].as_str().expect("openapi is a string");
        assert!(version.starts_with("3.1."), "openapi: {version}");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(doc["info"]["title"].is_string());
        assert!(doc["components"]["schemas"]["Problem"].is_object());
    }

    /// A `$ref` that names nothing would make generators and checkers stop
    /// at the document.
    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, node: &Value, refs: &mut usize) {
            match node {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        let pointer = target
                            .strip_prefix('#')
                            .unwrap_or_else(|| panic!("external reference {target}"));
                        assert!(doc.pointer(pointer).is_some(), "{target} names nothing");
                        *refs += 1;
                    }
                    map.values().for_each(|v| walk(doc, v, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(doc, v, refs)),
                _ => {}
            }
        }
        let doc = document();
        let mut refs = 0;
        walk(&doc, &doc, &mut refs);
        assert!(refs > 20, "only {refs} references");
    }

    /// Every error answer documented anywhere is a problem document.
    #[test]
    fn every_documented_error_is_a_problem_document() {
        let doc = document();
        let resolve = |v: &Value| -> Value {
            match v.get("$ref").and_then(Value::as_str) {
                Some(target) => doc.pointer(&target[1..]).cloned().unwrap_or(Value::Null),
                None => v.clone(),
            }
        };
        let mut errors = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in METHODS {
                let Some(responses) = item.get(method).map(|op| &op["responses"]) else {
                    continue;
                };
                let responses = responses.as_object().expect("responses");
                assert!(!responses.is_empty(), "{method} {path} has no responses");
                for (status, response) in responses {
                    if !status.starts_with('4') && !status.starts_with('5') {
                        continue;
                    }
                    let response = resolve(response);
                    let schema = &response["content"]["application/problem+json"]["schema"];
                    assert_eq!(
                        schema["$ref"], "#/components/schemas/Problem",
                        "{method} {path} {status}"
                    );
                    errors += 1;
                }
            }
        }
        assert!(errors > 20, "only {errors} error answers");
    }

    #[test]
    fn the_document_has_a_path_for_every_route_and_no_other() {
        let routes: BTreeSet<String> = route_templates().into_iter().collect();
        let paths: BTreeSet<String> = documented().into_keys().collect();
        let undocumented: Vec<_> = routes.difference(&paths).collect();
        let unrouted: Vec<_> = paths.difference(&routes).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes the document lacks: {undocumented:?}; paths no route serves: {unrouted:?}"
        );
    }

    /// The router is asked: a method it does not take on a path is 405
    /// (with `Allow`), any other answer means a handler took it.
    #[tokio::test]
    async fn the_document_has_the_methods_each_route_takes() {
        let state = test_state(16);
        state.set_ready(true);
        for (path, methods) in documented() {
            let target = fill(&path);
            let mut served = BTreeSet::new();
            for method in METHODS {
                let method = method.to_uppercase();
                let mut request = Request::builder()
                    .method(Method::from_bytes(method.as_bytes()).expect("method"))
                    .uri(&target)
                    .body(Body::empty())
                    .expect("request");
                let peer: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
                request.extensions_mut().insert(axum::extract::ConnectInfo(
                    crate::http::listener::Peer::now(peer),
                ));
                let response = router(state.clone())
                    .oneshot(request)
                    .await
                    .expect("infallible");
                if response.status() != StatusCode::METHOD_NOT_ALLOWED {
                    served.insert(method);
                    continue;
                }
                let allow: BTreeSet<String> = response.headers()["allow"]
                    .to_str()
                    .expect("allow is text")
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| m != "HEAD")
                    .collect();
                assert_eq!(allow, methods, "Allow of {method} {target}");
                assert_eq!(
                    response.headers()["content-type"],
                    "application/problem+json",
                    "{method} {target}"
                );
            }
            assert_eq!(served, methods, "methods served at {path} ({target})");
        }
    }

    #[tokio::test]
    async fn openapi_json_serves_the_document() {
        let request = Request::get("/openapi.json")
            .body(Body::empty())
            .expect("request");
        let response = router(test_state(0))
            .oneshot(request)
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        assert_eq!(body, DOCUMENT.as_bytes());
    }
}
