//! Mitel CloudLink Notifications API subscriptions, for the manager.
//!
//! `POST/GET {api_base}/2017-09-01/subscriptions`, `DELETE .../{id}`, bearer
//! token from the Authentication API. A subscription is `{applicationId,
//! deviceId, transport, topic, subjectFilter, methodFilter}`; the
//! `applicationId` is the source's first signing key (the webhook HMAC key),
//! the `deviceId` the gateway's webhook URL. Mitel subscriptions do not
//! expire: "renewing" one means listing the subscriptions and checking that
//! it is still there (every `check_interval_secs`); a missing one is
//! recreated. A listed subscription is adopted when topic, subjectFilter,
//! deviceId and applicationId all match, so after a key rotation (new key
//! first) new subscriptions use the new key while the old ones, signed with
//! the old key, keep verifying until they are gone.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::manager::{Remote, Upstream, UpstreamError};
use crate::config::Secret;
use crate::presence::Millis;

/// The all-users subject filter of presence subscriptions.
pub const ALL_PRESENTITIES: &str = "/presentities/[^/]+$";

/// What one managed Mitel subscription asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub application_id: Secret,
    /// The webhook URL, or (websocket transport) the MQTT client id.
    pub device_id: String,
    /// `webhook` or `websocket`.
    pub transport: &'static str,
    pub topic: String,
    pub subject_filter: String,
    pub method_filter: Option<String>,
}

/// The Notifications API for one subscription.
pub struct Mitel {
    pub api: super::Api,
    pub request: Request,
}

impl Mitel {
    fn url(&self, id: Option<&str>) -> String {
        self.api.url("2017-09-01/subscriptions", id)
    }

    fn matches(&self, item: &Map<String, Value>) -> bool {
        let r = &self.request;
        let field = |name: &str| item.get(name).and_then(Value::as_str);
        let application_id = field("applicationId").unwrap_or_default();
        field("topic") == Some(r.topic.as_str())
            && field("subjectFilter") == Some(r.subject_filter.as_str())
            && field("deviceId") == Some(r.device_id.as_str())
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                application_id.as_bytes(),
                r.application_id.expose(),
            ))
    }

    /// `POST .../connections {"transport":"websocket"}`: a pre-signed
    /// WebSocket URL for MQTT, valid for about a minute. The field's name is
    /// not documented: the first `ws://` or `wss://` string of the answer.
    pub async fn websocket_url(&self) -> Result<String, UpstreamError> {
        let base = self.api.base.trim_end_matches('/');
        let url = format!("{base}/2017-09-01/connections");
        let body = json!({"transport": "websocket"});
        let answer = self.api.send(Method::POST, &url, Some(&body)).await?;
        fn find(value: &Value) -> Option<&str> {
            match value {
                Value::String(s) if s.starts_with("ws://") || s.starts_with("wss://") => Some(s),
                Value::Object(map) => map.values().find_map(find),
                Value::Array(items) => items.iter().find_map(find),
                _ => None,
            }
        }
        answer
            .as_ref()
            .and_then(find)
            .map(str::to_owned)
            .ok_or_else(|| {
                UpstreamError::Rejected("the connections answer has no ws(s):// URL".into())
            })
    }

    /// Every listed subscription (`{count, _embedded: {items}}` or a bare array).
    async fn list(&self) -> Result<Vec<Map<String, Value>>, UpstreamError> {
        let body = self.api.send(Method::GET, &self.url(None), None).await?;
        let items = match body {
            Some(Value::Array(items)) => items,
            Some(Value::Object(mut map)) => match map
                .remove("_embedded")
                .and_then(|mut e| e.get_mut("items").map(Value::take))
            {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            },
            _ => {
                return Err(UpstreamError::Rejected(
                    "the subscription list is not JSON".into(),
                ));
            }
        };
        Ok(items
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(map) => Some(map),
                _ => None,
            })
            .collect())
    }
}

fn remote(item: &Map<String, Value>) -> Option<Remote> {
    let id = item
        .get("subscriptionId")
        .or_else(|| item.get("id"))?
        .as_str()?;
    (!id.is_empty()).then(|| Remote {
        id: id.to_owned(),
        expires_at: None,
        broken: false,
        posts_count: None,
        error_count: None,
    })
}

impl Upstream for Mitel {
    async fn find(&self, prefer: Option<&str>) -> Result<Option<Remote>, UpstreamError> {
        let items = self.list().await?;
        let matching = items
            .iter()
            .filter(|item| self.matches(item))
            .filter_map(remote);
        Ok(super::manager::preferred(matching, prefer))
    }

    async fn create(&self, _expires_at: Millis) -> Result<Remote, UpstreamError> {
        let r = &self.request;
        let mut body = json!({
            "applicationId": String::from_utf8_lossy(r.application_id.expose()),
            "deviceId": r.device_id,
            "transport": r.transport,
            "topic": r.topic,
            "subjectFilter": r.subject_filter,
        });
        if let (Some(filter), Some(map)) = (&r.method_filter, body.as_object_mut()) {
            map.insert("methodFilter".into(), Value::String(filter.clone()));
        }
        let answer = self
            .api
            .send(Method::POST, &self.url(None), Some(&body))
            .await?;
        answer
            .as_ref()
            .and_then(Value::as_object)
            .and_then(remote)
            .ok_or_else(|| {
                UpstreamError::Rejected("the create answer has no subscriptionId".into())
            })
    }

    /// Mitel subscriptions do not expire: checks that `id` is still listed.
    async fn renew(&self, id: &str, _expires_at: Millis) -> Result<Remote, UpstreamError> {
        self.list()
            .await?
            .iter()
            .filter_map(remote)
            .find(|r| r.id == id)
            .ok_or(UpstreamError::NotFound)
    }

    async fn delete(&self, id: &str) -> Result<(), UpstreamError> {
        self.api
            .send(Method::DELETE, &self.url(Some(id)), None)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_subscription_ids_in_both_spellings() {
        let a = json!({"subscriptionId": "s-1", "topic": "platform-api-presence"});
        assert_eq!(remote(a.as_object().unwrap()).unwrap().id, "s-1");
        let b = json!({"id": "s-2"});
        assert_eq!(remote(b.as_object().unwrap()).unwrap().id, "s-2");
        assert!(remote(json!({"subscriptionId": ""}).as_object().unwrap()).is_none());
    }
}
