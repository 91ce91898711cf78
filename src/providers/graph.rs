//! Microsoft Graph presence (`kind = "graph"`): change notification batches
//! and presence resources.
//!
//! A notification request is `{"value":[item, ...]}`. Each item is one of:
//! a lifecycle event (`lifecycleEvent`), a rich notification
//! (`encryptedContent`, decrypted by [`super::graph_rich`]), a notification
//! whose `resourceData` carries the presence, or one that only names the
//! user (`resourceData.id`, else the id in `resource`), whose presence the
//! gateway then reads. Presence resources (from a read, a decrypted item or
//! `resourceData`) are `{"id", "availability", "activity", "statusMessage":
//! {"message": {"content"}}}`.
//!
//! Mapping (DESIGN.md §4): availability words as §2 lists (any case);
//! activity is the snake_case of Graph's activity, and none when it only
//! repeats the availability; `raw_status` is the availability as sent;
//! `status_text` is the status message's content. Graph sends no time of
//! change, so `observed_at` is when the gateway learned it.

use std::borrow::Cow;

use serde::Deserialize;

use super::ParseError;
use super::status::{BuiltinTable, StatusMap};
use crate::presence::model::snake_case;
use crate::presence::{Availability, Millis, PresenceUpdate};

/// Graph's availability words (matched case-insensitively).
pub const STATUS_WORDS: BuiltinTable = &[
    ("Available", Availability::Available),
    ("AvailableIdle", Availability::AvailableIdle),
    ("Away", Availability::Away),
    ("BeRightBack", Availability::BeRightBack),
    ("Busy", Availability::Busy),
    ("BusyIdle", Availability::BusyIdle),
    ("DoNotDisturb", Availability::DoNotDisturb),
    ("Offline", Availability::Offline),
    ("PresenceUnknown", Availability::Unknown),
];

/// Activities that only repeat the availability: no activity of their own.
const PLAIN_ACTIVITIES: &[&str] = &[
    "Available",
    "Away",
    "BeRightBack",
    "Busy",
    "DoNotDisturb",
    "Offline",
    "PresenceUnknown",
];

/// A notification request body.
#[derive(Debug, Deserialize)]
pub struct Batch<'a> {
    #[serde(borrow)]
    pub value: Vec<Item<'a>>,
}

/// One item of a notification request (unknown fields are ignored).
#[derive(Debug, Deserialize)]
pub struct Item<'a> {
    #[serde(rename = "subscriptionId", borrow, default)]
    pub subscription_id: Option<Cow<'a, str>>,
    #[serde(rename = "clientState", borrow, default)]
    pub client_state: Option<Cow<'a, str>>,
    #[serde(rename = "lifecycleEvent", borrow, default)]
    pub lifecycle_event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub resource: Option<Cow<'a, str>>,
    #[serde(rename = "resourceData", borrow, default)]
    pub resource_data: Option<Presence<'a>>,
    #[serde(rename = "encryptedContent", borrow, default)]
    pub encrypted_content: Option<EncryptedContent<'a>>,
}

/// A presence resource, or the `resourceData` of a notification.
#[derive(Debug, Deserialize)]
pub struct Presence<'a> {
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub availability: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub activity: Option<Cow<'a, str>>,
    #[serde(rename = "statusMessage", borrow, default)]
    pub status_message: Option<StatusMessage<'a>>,
}

/// `statusMessage` of a presence.
#[derive(Debug, Deserialize)]
pub struct StatusMessage<'a> {
    #[serde(borrow, default)]
    pub message: Option<ItemBody<'a>>,
}

/// `statusMessage.message`.
#[derive(Debug, Deserialize)]
pub struct ItemBody<'a> {
    #[serde(borrow, default)]
    pub content: Option<Cow<'a, str>>,
}

/// `encryptedContent` of a rich notification.
#[derive(Debug, Deserialize)]
pub struct EncryptedContent<'a> {
    #[serde(borrow)]
    pub data: Cow<'a, str>,
    #[serde(rename = "dataSignature", borrow)]
    pub data_signature: Cow<'a, str>,
    #[serde(rename = "dataKey", borrow)]
    pub data_key: Cow<'a, str>,
    #[serde(rename = "encryptionCertificateId", borrow, default)]
    pub certificate_id: Option<Cow<'a, str>>,
}

/// A lifecycle event Graph announces for a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// The subscription needs `POST .../reauthorize` (or it will be removed).
    ReauthorizationRequired,
    /// The subscription is gone: create it again, then resync.
    SubscriptionRemoved,
    /// Notifications were lost: resync.
    Missed,
}

impl Lifecycle {
    /// The event named by `lifecycleEvent`, if it is one the gateway knows.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "reauthorizationRequired" => Some(Lifecycle::ReauthorizationRequired),
            "subscriptionRemoved" => Some(Lifecycle::SubscriptionRemoved),
            "missed" => Some(Lifecycle::Missed),
            _ => None,
        }
    }
}

/// What one item asks of the gateway.
#[derive(Debug)]
pub enum Kind<'i, 'a> {
    Lifecycle {
        /// `None` for an event name the gateway does not know.
        event: Option<Lifecycle>,
        subscription_id: Option<&'i str>,
    },
    /// Decrypt, then apply.
    Rich(&'i EncryptedContent<'a>),
    /// Apply the presence the item carries.
    Carried(&'i Presence<'a>),
    /// Read this user's presence.
    Read(&'i str),
    /// Nothing the gateway can use.
    Unusable,
}

impl<'a> Item<'a> {
    /// What this item asks of the gateway.
    pub fn kind(&self) -> Kind<'_, 'a> {
        if let Some(event) = &self.lifecycle_event {
            return Kind::Lifecycle {
                event: Lifecycle::from_name(event),
                subscription_id: self.subscription_id.as_deref(),
            };
        }
        if let Some(content) = &self.encrypted_content {
            return Kind::Rich(content);
        }
        if let Some(data) = &self.resource_data {
            if data.availability.is_some() {
                return Kind::Carried(data);
            }
            if let Some(id) = data.id.as_deref().filter(|id| !id.is_empty()) {
                return Kind::Read(id);
            }
        }
        match self.resource.as_deref().and_then(user_in_resource) {
            Some(id) => Kind::Read(id),
            None => Kind::Unusable,
        }
    }
}

/// The user id of `communications/presences('{id}')` (with or without a
/// leading `/`, any case of the collection name).
fn user_in_resource(resource: &str) -> Option<&str> {
    let resource = resource.trim_start_matches('/');
    let prefix = "communications/presences('";
    let head = resource.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let id = resource[prefix.len()..].strip_suffix("')")?;
    (!id.is_empty() && !id.contains('\'')).then_some(id)
}

/// Parses a notification request body.
pub fn parse_batch(body: &[u8]) -> Result<Batch<'_>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|_| ParseError::NotUtf8)?;
    if !text.trim_start().starts_with('{') {
        serde_json::from_str::<serde::de::IgnoredAny>(text)?;
        return Err(ParseError::Shape {
            expected: "object {\"value\": [notification, ...]}",
        });
    }
    Ok(serde_json::from_str(text)?)
}

/// Parses one presence resource (a read's item, a decrypted rich item).
pub fn parse_presence(text: &str) -> Result<Presence<'_>, ParseError> {
    Ok(serde_json::from_str(text)?)
}

/// The update for `principal` from a presence resource.
pub fn presence_update<'a>(
    principal: Cow<'a, str>,
    presence: &Presence<'a>,
    statuses: &StatusMap,
    observed_at: Millis,
) -> Result<PresenceUpdate<'a>, ParseError> {
    let raw = presence
        .availability
        .clone()
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| ParseError::Missing {
            field: "availability",
            tried: "/availability".into(),
        })?;
    let activity = presence
        .activity
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !PLAIN_ACTIVITIES.iter().any(|p| p.eq_ignore_ascii_case(a)))
        .map(|a| Cow::Owned(snake_case(a).into_owned()));
    let status_text = presence
        .status_message
        .as_ref()
        .and_then(|m| m.message.as_ref())
        .and_then(|m| m.content.clone())
        .filter(|c| !c.trim().is_empty());
    Ok(PresenceUpdate {
        principal,
        availability: statuses.map(&raw),
        activity,
        status_text,
        raw_status: Some(raw),
        observed_at: Some(observed_at),
        event_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses() -> StatusMap {
        StatusMap::new(STATUS_WORDS, [])
    }

    #[test]
    fn the_fixture_batch_carries_its_presence() {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/graph-notification.json"
        ))
        .unwrap();
        let batch = parse_batch(&body).unwrap();
        assert_eq!(batch.value.len(), 1);
        let item = &batch.value[0];
        assert_eq!(item.client_state.as_deref(), Some("gw-client-state-6f3b2c"));
        let Kind::Carried(presence) = item.kind() else {
            panic!("{:?}", item.kind());
        };
        let update = presence_update(
            Cow::Borrowed("66825e03-7ef5-42da-9069-724602c31f6b"),
            presence,
            &statuses(),
            Millis(1),
        )
        .unwrap();
        assert_eq!(update.availability, Availability::Busy);
        assert_eq!(update.activity.as_deref(), Some("in_a_meeting"));
        assert_eq!(update.raw_status.as_deref(), Some("Busy"));
    }

    #[test]
    fn every_availability_and_plain_activities() {
        for (word, want) in [
            ("Available", Availability::Available),
            ("availableidle", Availability::AvailableIdle),
            ("Away", Availability::Away),
            ("BeRightBack", Availability::BeRightBack),
            ("BUSY", Availability::Busy),
            ("BusyIdle", Availability::BusyIdle),
            ("DoNotDisturb", Availability::DoNotDisturb),
            ("Offline", Availability::Offline),
            ("PresenceUnknown", Availability::Unknown),
            ("Gardening", Availability::Unknown),
        ] {
            assert_eq!(statuses().map(word), want, "{word}");
        }
        let text = r#"{"id":"u","availability":"Busy","activity":"Busy","statusMessage":{"message":{"content":"back at 3","contentType":"text"}}}"#;
        let p = parse_presence(text).unwrap();
        let u = presence_update(Cow::Borrowed("u"), &p, &statuses(), Millis(1)).unwrap();
        assert_eq!(u.activity, None);
        assert_eq!(u.status_text.as_deref(), Some("back at 3"));
        for (activity, want) in [
            ("InACall", "in_a_call"),
            ("InAConferenceCall", "in_a_conference_call"),
            ("UrgentInterruptionsOnly", "urgent_interruptions_only"),
            ("OutOfOffice", "out_of_office"),
            ("Presenting", "presenting"),
        ] {
            let text = format!(r#"{{"availability":"Busy","activity":"{activity}"}}"#);
            let p = parse_presence(&text).unwrap();
            let u = presence_update(Cow::Borrowed("u"), &p, &statuses(), Millis(1)).unwrap();
            assert_eq!(u.activity.as_deref(), Some(want));
        }
        let missing = parse_presence(r#"{"id":"u"}"#).unwrap();
        assert!(presence_update(Cow::Borrowed("u"), &missing, &statuses(), Millis(1)).is_err());
    }

    #[test]
    fn items_are_classified() {
        let body = br#"{"value":[
            {"clientState":"s","lifecycleEvent":"reauthorizationRequired","subscriptionId":"sub-1"},
            {"clientState":"s","lifecycleEvent":"somethingNew","subscriptionId":"sub-1"},
            {"clientState":"s","resourceData":{"id":"u-1"}},
            {"clientState":"s","resource":"communications/presences('u-2')"},
            {"clientState":"s","encryptedContent":{"data":"d","dataSignature":"s","dataKey":"k"}},
            {"clientState":"s","resource":"users/u-3"}
        ]}"#;
        let batch = parse_batch(body).unwrap();
        let kinds: Vec<String> = batch
            .value
            .iter()
            .map(|i| match i.kind() {
                Kind::Lifecycle {
                    event,
                    subscription_id,
                } => {
                    format!("lifecycle {event:?} {subscription_id:?}")
                }
                Kind::Rich(_) => "rich".into(),
                Kind::Carried(_) => "carried".into(),
                Kind::Read(id) => format!("read {id}"),
                Kind::Unusable => "unusable".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "lifecycle Some(ReauthorizationRequired) Some(\"sub-1\")",
                "lifecycle None Some(\"sub-1\")",
                "read u-1",
                "read u-2",
                "rich",
                "unusable",
            ]
        );
    }

    #[test]
    fn bodies_that_are_no_batch() {
        for body in [
            &b"[]"[..],
            b"{",
            b"{\"value\":{}}",
            b"{}",
            b"\"x\"",
            b"{\"value\":[1]}",
        ] {
            assert!(
                parse_batch(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(parse_batch(&[0xff]), Err(ParseError::NotUtf8)));
    }
}
