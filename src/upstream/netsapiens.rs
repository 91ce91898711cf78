//! NetSapiens v2 event subscriptions, for the manager.
//!
//! `POST/GET {api_base}/ns-api/v2/subscriptions`, `PUT/DELETE .../{id}`,
//! bearer auth (an API key or a password-grant token). The create body
//! carries `model`, `post-url`, the configured scope (`reseller`, `domain`,
//! `user`), `subscription-geo-support`, `preferred-server` when set and
//! `subscription-expires-datetime` (RFC 3339 UTC); expiry times are read
//! back as RFC 3339 or `YYYY-MM-DD HH:MM:SS` (UTC). A listed subscription is
//! adopted when its model, post-url and configured scope match.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::manager::{IdSink, Remote, Upstream, UpstreamError};
use crate::presence::Millis;
use crate::providers::netsapiens::Model;
use crate::verify::CorrelationIds;

/// What one managed NetSapiens subscription asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub model: String,
    pub post_url: String,
    pub reseller: Option<String>,
    pub domain: Option<String>,
    pub user: Option<String>,
    pub geo_support: bool,
    pub preferred_server: Option<String>,
}

/// The NetSapiens API for one subscription.
pub struct NetSapiens {
    pub api: super::Api,
    pub request: Request,
}

impl NetSapiens {
    fn url(&self, id: Option<&str>) -> String {
        self.api.url("ns-api/v2/subscriptions", id)
    }

    fn matches(&self, item: &Map<String, Value>) -> bool {
        let r = &self.request;
        let field = |name: &str| item.get(name).and_then(Value::as_str);
        let scope_ok = |name: &str, want: &Option<String>| match want {
            Some(want) => field(name) == Some(want.as_str()),
            None => true,
        };
        field("model") == Some(r.model.as_str())
            && field("post-url") == Some(r.post_url.as_str())
            && scope_ok("reseller", &r.reseller)
            && scope_ok("domain", &r.domain)
            && scope_ok("user", &r.user)
    }
}

impl Upstream for NetSapiens {
    async fn find(&self, prefer: Option<&str>) -> Result<Option<Remote>, UpstreamError> {
        let body = self.api.send(Method::GET, &self.url(None), None).await?;
        let items = match body {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(UpstreamError::Rejected(
                    "the subscription list is not a JSON array".into(),
                ));
            }
        };
        let matching = items
            .iter()
            .filter_map(Value::as_object)
            .filter(|item| self.matches(item))
            .filter_map(remote);
        Ok(super::manager::preferred(matching, prefer))
    }

    async fn create(&self, expires_at: Millis) -> Result<Remote, UpstreamError> {
        let r = &self.request;
        let mut body = json!({
            "model": r.model,
            "post-url": r.post_url,
            "subscription-geo-support": if r.geo_support { "yes" } else { "no" },
            "subscription-expires-datetime": rfc3339(expires_at),
        });
        let scope = [
            ("reseller", &r.reseller),
            ("domain", &r.domain),
            ("user", &r.user),
            ("preferred-server", &r.preferred_server),
        ];
        for (key, value) in scope {
            if let (Some(value), Some(map)) = (value, body.as_object_mut()) {
                map.insert(key.into(), Value::String(value.clone()));
            }
        }
        let answer = self
            .api
            .send(Method::POST, &self.url(None), Some(&body))
            .await?;
        answer
            .as_ref()
            .and_then(single_object)
            .and_then(remote)
            .ok_or_else(|| {
                UpstreamError::Rejected("the create answer has no subscription id".into())
            })
    }

    async fn renew(&self, id: &str, expires_at: Millis) -> Result<Remote, UpstreamError> {
        let body = json!({ "subscription-expires-datetime": rfc3339(expires_at) });
        let answer = self
            .api
            .send(Method::PUT, &self.url(Some(id)), Some(&body))
            .await?;
        // Some versions answer with the object, others with nothing.
        Ok(answer
            .as_ref()
            .and_then(single_object)
            .and_then(remote)
            .unwrap_or_else(|| Remote::asked(id, expires_at)))
    }

    async fn delete(&self, id: &str) -> Result<(), UpstreamError> {
        self.api
            .send(Method::DELETE, &self.url(Some(id)), None)
            .await
            .map(drop)
    }
}

/// An object answer, or the first object of an array answer.
fn single_object(value: &Value) -> Option<&Map<String, Value>> {
    match value {
        Value::Object(map) => Some(map),
        Value::Array(items) => items.first().and_then(Value::as_object),
        _ => None,
    }
}

fn remote(item: &Map<String, Value>) -> Option<Remote> {
    let text = |name: &str| match item.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let count = |name: &str| {
        item.get(name).and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    };
    Some(Remote {
        id: text("id").filter(|id| !id.is_empty())?,
        expires_at: text("subscription-expires-datetime").and_then(|t| parse_time(&t)),
        broken: text("status").is_some_and(|s| s.eq_ignore_ascii_case("error")),
        posts_count: count("posts-count"),
        error_count: count("error-count"),
    })
}

/// RFC 3339 UTC, seconds precision: `2026-11-24T10:00:00Z`.
fn rfc3339(at: Millis) -> String {
    jiff::Timestamp::from_millisecond(at.0)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// RFC 3339, or `YYYY-MM-DD HH:MM:SS` in UTC.
fn parse_time(text: &str) -> Option<Millis> {
    Millis::parse_rfc3339(text).or_else(|| {
        let civil = jiff::civil::DateTime::strptime("%Y-%m-%d %H:%M:%S", text).ok()?;
        let at = jiff::tz::TimeZone::UTC.to_timestamp(civil).ok()?;
        Some(Millis(at.as_millisecond()))
    })
}

/// Percent-encodes a path segment (ids are opaque).
pub(super) fn encode_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Keeps a NetSapiens source's accepted correlation ids in step with the
/// subscriptions the manager holds.
pub struct CorrelationSink {
    pub ids: Arc<CorrelationIds<Model>>,
    pub model: Model,
}

impl IdSink for CorrelationSink {
    fn add(&self, id: &str) {
        self.ids.insert(id, self.model);
    }

    fn remove(&self, id: &str) {
        self.ids.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_in_both_formats() {
        let at = Millis(1_795_515_330_000);
        assert_eq!(rfc3339(at), "2026-11-24T10:15:30Z");
        assert_eq!(parse_time("2026-11-24T10:15:30Z"), Some(at));
        assert_eq!(parse_time("2026-11-24 10:15:30"), Some(at));
        assert_eq!(parse_time("soon"), None);
    }

    #[test]
    fn remote_reads_the_documented_fields() {
        let item = json!({"id": "sub-1", "status": "error", "posts-count": "12",
                          "error-count": 3, "subscription-expires-datetime": "2026-11-24 10:15:30"});
        let r = remote(item.as_object().unwrap()).unwrap();
        assert_eq!(r.id, "sub-1");
        assert!(r.broken);
        assert_eq!((r.posts_count, r.error_count), (Some(12), Some(3)));
        assert_eq!(r.expires_at, Some(Millis(1_795_515_330_000)));
        assert!(remote(json!({"status": "active"}).as_object().unwrap()).is_none());
    }

    #[test]
    fn ids_are_encoded_as_one_path_segment() {
        assert_eq!(encode_segment("sub-1_a.b~c"), "sub-1_a.b~c");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
