//! UCWA (Skype for Business) resources: contact presence and event-channel
//! responses, read into what the gateway keeps.
//!
//! UCWA has no webhooks: the gateway reads an event channel and, for every
//! `contactPresence` event, GETs that contact's presence. This module only
//! understands the JSON of those answers; the loop that fetches them lives
//! with the other upstream code. Facts: PROVIDERS.md (UCWA section).

use std::borrow::Cow;

use serde::Deserialize;

use super::ParseError;
use super::status::BuiltinTable;
use crate::presence::{Availability, Millis, PresenceUpdate};

/// UCWA availability values.
pub const STATUS_WORDS: BuiltinTable = &[
    ("Online", Availability::Available),
    ("IdleOnline", Availability::AvailableIdle),
    ("Away", Availability::Away),
    ("BeRightBack", Availability::BeRightBack),
    ("Busy", Availability::Busy),
    ("IdleBusy", Availability::BusyIdle),
    ("DoNotDisturb", Availability::DoNotDisturb),
    ("Offline", Availability::Offline),
];

/// A `contactPresence` resource.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContactPresence<'a> {
    #[serde(borrow)]
    availability: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    activity: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    last_active: Option<Cow<'a, str>>,
}

/// The principal a UCWA address names: the SIP address without its `sip:`
/// scheme, lowercased (`sip:SaraD@contoso.com` → `sarad@contoso.com`). A
/// resource path (`.../people/sarad@contoso.com/presence`) gives the same.
pub fn principal(address: &str) -> String {
    let address = address.trim();
    let address = match address.find("/people/") {
        Some(at) => {
            let rest = &address[at + "/people/".len()..];
            rest.split('/').next().unwrap_or(rest)
        }
        None => address,
    };
    let bare = address
        .get(..4)
        .filter(|scheme| scheme.eq_ignore_ascii_case("sip:"))
        .map_or(address, |_| &address[4..]);
    bare.to_ascii_lowercase()
}

/// `"/Date(1358827096000)/"` (how UCWA writes times) → epoch ms.
pub fn parse_date(text: &str) -> Option<Millis> {
    let inner = text.trim().strip_prefix("/Date(")?.strip_suffix(")/")?;
    // An offset may follow the milliseconds (`1358827096000+0100`); the
    // number itself is UTC.
    let end = inner
        .char_indices()
        .skip(1)
        .find(|(_, c)| matches!(c, '+' | '-'))
        .map_or(inner.len(), |(i, _)| i);
    inner[..end].parse().ok().map(Millis)
}

/// A contact's presence as a presence update for `principal`.
///
/// `lastActive` becomes `observed_at` only when `fallback_observed` is
/// absent ("when newer information is not available"): it is when the user
/// was last active, not when the presence changed.
pub fn presence_update<'a>(
    principal: &'a str,
    body: &'a str,
    statuses: &super::StatusMap,
    fallback_observed: Option<Millis>,
) -> Result<PresenceUpdate<'a>, ParseError> {
    let p: ContactPresence<'a> = serde_json::from_str(body)?;
    let raw = p
        .availability
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| ParseError::Missing {
            field: "availability",
            tried: "availability".into(),
        })?;
    let activity =
        p.activity.filter(|a| !a.trim().is_empty()).map(
            |a| match crate::presence::model::snake_case(&a) {
                Cow::Owned(s) => Cow::Owned(s),
                Cow::Borrowed(_) => a,
            },
        );
    let observed_at = fallback_observed.or_else(|| p.last_active.as_deref().and_then(parse_date));
    Ok(PresenceUpdate {
        principal: Cow::Borrowed(principal),
        availability: statuses.map(&raw),
        activity,
        status_text: None,
        raw_status: Some(raw),
        observed_at,
        event_id: None,
    })
}

/// What one event-channel answer asks the reader to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// The next pending GET (`_links.next`), relative or absolute.
    pub next: Option<String>,
    /// Presence resources to read: `contactPresence` events, each once.
    pub presence: Vec<String>,
    /// `presenceSubscription` updates: a subscription is about to expire.
    pub subscription_updates: Vec<String>,
    /// A `resync` link: events were missed, re-read everything.
    pub resync: bool,
}

#[derive(Deserialize)]
struct Link {
    href: String,
}

#[derive(Deserialize)]
struct EventLink {
    rel: String,
    href: String,
}

#[derive(Deserialize)]
struct Event {
    link: EventLink,
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct Sender {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "_links", default)]
    links: std::collections::BTreeMap<String, Link>,
    #[serde(default)]
    sender: Vec<Sender>,
}

/// Reads an event-channel answer.
pub fn events(body: &str) -> Result<Events, ParseError> {
    let answer: Answer = serde_json::from_str(body)?;
    let mut out = Events {
        next: answer.links.get("next").map(|l| l.href.clone()),
        resync: answer.links.contains_key("resync"),
        ..Events::default()
    };
    for event in answer.sender.iter().flat_map(|s| &s.events) {
        match (event.link.rel.as_str(), event.kind.as_str()) {
            ("contactPresence", "added" | "updated")
                if !out.presence.contains(&event.link.href) =>
            {
                out.presence.push(event.link.href.clone());
            }
            ("presenceSubscription", "updated") => {
                out.subscription_updates.push(event.link.href.clone());
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::StatusMap;

    const PRESENCE: &str = include_str!("../../tests/fixtures/ucwa-contact-presence.json");
    const EVENTS: &str = include_str!("../../tests/fixtures/ucwa-events.json");

    fn statuses() -> StatusMap {
        StatusMap::new(STATUS_WORDS, [])
    }

    #[test]
    fn contact_presence_fixture() {
        let u = presence_update("sarad@contoso.com", PRESENCE, &statuses(), None).unwrap();
        assert_eq!(u.availability, Availability::Offline);
        assert_eq!(u.raw_status.as_deref(), Some("Offline"));
        assert_eq!(u.observed_at, Some(Millis(1_358_827_096_000)));
        // Newer information wins over lastActive.
        let u = presence_update("x", PRESENCE, &statuses(), Some(Millis(5))).unwrap();
        assert_eq!(u.observed_at, Some(Millis(5)));
    }

    #[test]
    fn every_documented_availability_maps() {
        let cases = [
            ("Online", Availability::Available),
            ("IdleOnline", Availability::AvailableIdle),
            ("Away", Availability::Away),
            ("BeRightBack", Availability::BeRightBack),
            ("Busy", Availability::Busy),
            ("IdleBusy", Availability::BusyIdle),
            ("DoNotDisturb", Availability::DoNotDisturb),
            ("Offline", Availability::Offline),
            ("Lunch", Availability::Unknown),
        ];
        for (word, expected) in cases {
            let body = format!(r#"{{"availability":"{word}","activity":"InAMeeting"}}"#);
            let u = presence_update("p", &body, &statuses(), None).unwrap();
            assert_eq!(u.availability, expected, "{word}");
            assert_eq!(u.activity.as_deref(), Some("in_a_meeting"));
        }
        let err = presence_update("p", r#"{"activity":"Busy"}"#, &statuses(), None).unwrap_err();
        assert!(err.to_string().contains("availability"), "{err}");
    }

    #[test]
    fn principals_from_addresses_and_links() {
        assert_eq!(principal("sip:SaraD@contoso.com"), "sarad@contoso.com");
        assert_eq!(principal("SIP:sarad@contoso.com"), "sarad@contoso.com");
        assert_eq!(
            principal("/ucwa/oauth/v1/applications/101/people/sarad@contoso.com/presence"),
            "sarad@contoso.com"
        );
        assert_eq!(principal("alex@contoso.com"), "alex@contoso.com");
    }

    #[test]
    fn dates() {
        assert_eq!(
            parse_date("/Date(1358827096000)/"),
            Some(Millis(1_358_827_096_000))
        );
        assert_eq!(
            parse_date("/Date(1358827096000+0100)/"),
            Some(Millis(1_358_827_096_000))
        );
        assert_eq!(parse_date("/Date(-5)/"), Some(Millis(-5)));
        assert_eq!(parse_date("yesterday"), None);
    }

    #[test]
    fn event_channel_fixture_and_special_links() {
        let e = events(EVENTS).unwrap();
        assert_eq!(
            e.next.as_deref(),
            Some("/ucwa/oauth/v1/applications/101/events?ack=6")
        );
        assert_eq!(
            e.presence,
            ["/ucwa/oauth/v1/applications/101/people/sarad@contoso.com/presence"]
        );
        assert!(!e.resync && e.subscription_updates.is_empty());

        let body = r#"{"_links":{"next":{"href":"/e?ack=9"},"resync":{"href":"/e?ack=9"}},
            "sender":[{"rel":"people","events":[
              {"link":{"rel":"contactPresence","href":"/p/a/presence"},"type":"updated"},
              {"link":{"rel":"contactPresence","href":"/p/a/presence"},"type":"updated"},
              {"link":{"rel":"presenceSubscription","href":"/s/1"},"type":"updated"},
              {"link":{"rel":"contactNote","href":"/p/a/note"},"type":"updated"}]}]}"#;
        let e = events(body).unwrap();
        assert!(e.resync);
        assert_eq!(e.presence, ["/p/a/presence"], "coalesced");
        assert_eq!(e.subscription_updates, ["/s/1"]);
        assert!(events("{").is_err());
    }
}
