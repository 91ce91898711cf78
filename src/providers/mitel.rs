//! Mitel CloudLink notifications (`kind = "mitel"`).
//!
//! One envelope per webhook: `{topic, subject, content{...}, ...}`. Only
//! `platform-api-presence` carries presence; other topics are acknowledged and
//! counted as ignored. The presence fields inside `content` are not documented
//! by Mitel, so the defaults below are tried in order and every one can be
//! replaced in `[sources.fields]`.

use std::borrow::Cow;

use super::fields::{Defaults, FieldOverrides, Fields, FieldsError};
use super::netsapiens::CallFieldOverrides;
use super::status::{BuiltinTable, StatusMap};
use super::{ParseError, Parsed, body_text};
use crate::presence::{Availability, CallState, CallUpdate};
use crate::verify::Verified;

/// The presence topic of the Notifications API.
pub const PRESENCE_TOPIC: &str = "platform-api-presence";

/// Default field locations (PROVIDERS.md, Mitel section).
pub const DEFAULTS: Defaults = Defaults {
    principal: &["/subject", "/content/principalId"],
    status: &[
        "/content/presence",
        "/content/availability",
        "/content/status",
    ],
    activity: &["/content/activity"],
    note: &["/content/note", "/content/statusMessage"],
    timestamp: &["/content/timestamp"],
    event_id: &["/content/eventId"],
};

/// Mitel's status words (matched case-insensitively).
pub const STATUS_WORDS: BuiltinTable = &[
    ("Available", Availability::Available),
    ("Busy", Availability::Busy),
    ("Away", Availability::Away),
    ("BeRightBack", Availability::BeRightBack),
    ("DoNotDisturb", Availability::DoNotDisturb),
    ("Offline", Availability::Offline),
];

/// The calls topic of the Notifications API.
pub const MEDIA_TOPIC: &str = "platform-api-media";

/// Parser of one Mitel source.
#[derive(Debug)]
pub struct MitelParser {
    fields: Fields,
    topic: usize,
    statuses: StatusMap,
    call_principal: Vec<usize>,
    call_id: Vec<usize>,
    call_state: Vec<usize>,
}

/// A media event's state word as a call state; `Ok(None)` when the call
/// ended, `Err(())` for a word that says neither.
fn call_state(word: &str) -> Result<Option<CallState>, ()> {
    let word = word
        .trim()
        .to_ascii_lowercase()
        .replace(['_', '-', ' '], "");
    Ok(Some(match word.as_str() {
        "ringing" | "alerting" | "offered" | "dialing" | "initiated" => CallState::Ringing,
        "connected" | "answered" | "active" | "established" | "talking" => CallState::Connected,
        "held" | "hold" | "onhold" => CallState::Held,
        "disconnected" | "released" | "ended" | "idle" | "cleared" | "terminated" => {
            return Ok(None);
        }
        _ => return Err(()),
    }))
}

impl MitelParser {
    /// A parser with the source's field overrides and status map.
    pub fn new(
        overrides: &FieldOverrides,
        call_overrides: &CallFieldOverrides,
        statuses: StatusMap,
    ) -> Result<Self, FieldsError> {
        let mut fields = Fields::compile(&DEFAULTS, overrides)?;
        let topic = fields.add_extra("/topic")?;
        let c = call_overrides;
        let call_principal = fields.add_list(
            "call principal",
            &["/content/principalId", "/publisher/principalId"],
            c.principal.as_ref(),
        )?;
        let call_id = fields.add_list("call_id", &["/content/callId"], c.call_id.as_ref())?;
        let call_state = fields.add_list("state", &["/content/state"], c.state.as_ref())?;
        Ok(MitelParser {
            fields,
            topic,
            statuses,
            call_principal,
            call_id,
            call_state,
        })
    }

    /// Parses one envelope.
    pub fn parse<'a>(&self, body: Verified<'a>) -> Result<Parsed<'a>, ParseError> {
        let text = body_text(body)?;
        if !text.trim_start().starts_with('{') {
            // Still report invalid JSON as such, not as a shape problem.
            serde_json::from_str::<serde::de::IgnoredAny>(text)?;
            return Err(ParseError::Shape {
                expected: "object (one notification envelope)",
            });
        }
        let found = self.fields.extract(text)?;
        let topic = found
            .get(self.topic)
            .and_then(super::extract::as_str)
            .ok_or_else(|| ParseError::Missing {
                field: "topic",
                tried: "/topic".into(),
            })?;
        if topic == MEDIA_TOPIC {
            return self.media(&found);
        }
        if topic != PRESENCE_TOPIC {
            return Ok(Parsed {
                ignored: 1,
                ..Parsed::default()
            });
        }
        let principal = principal_id(self.fields.principal(&found)?);
        if principal.is_empty() {
            return Err(ParseError::Missing {
                field: "principal",
                tried: "the last segment of /subject".into(),
            });
        }
        let update = self.fields.update(&found, principal, &self.statuses)?;
        Ok(Parsed {
            updates: vec![update],
            ..Parsed::default()
        })
    }
}

impl MitelParser {
    /// A `platform-api-media` envelope: one principal's call changed state.
    /// A state word that is neither ringing, connected, held nor ended is
    /// acknowledged and counted as ignored.
    fn media<'a>(&self, found: &super::extract::Found<'a>) -> Result<Parsed<'a>, ParseError> {
        let f = &self.fields;
        let principal =
            principal_id(f.required_text("call principal", &self.call_principal, found)?);
        let call_id = f.required_text("call_id", &self.call_id, found)?;
        let word = f.required_text("state", &self.call_state, found)?;
        let Ok(state) = call_state(&word) else {
            return Ok(Parsed {
                ignored: 1,
                ..Parsed::default()
            });
        };
        Ok(Parsed {
            calls: vec![CallUpdate {
                principal,
                call_id,
                state,
                observed_at: None,
            }],
            ..Parsed::default()
        })
    }
}

/// `/presentities/{id}` (or any path) → `{id}`; a plain id stays as it is.
fn principal_id(value: Cow<'_, str>) -> Cow<'_, str> {
    if !value.starts_with('/') {
        return value;
    }
    match value {
        Cow::Borrowed(s) => Cow::Borrowed(s.rsplit('/').next().unwrap_or_default()),
        Cow::Owned(s) => Cow::Owned(s.rsplit('/').next().unwrap_or_default().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Millis;
    use crate::providers::fields::OneOrMany;

    const FIXTURE: &str = include_str!("../../tests/fixtures/mitel-presence.json");
    const MEDIA: &str = include_str!("../../tests/fixtures/mitel-media-call.json");

    fn parser(overrides: FieldOverrides, custom: &[(&str, Availability)]) -> MitelParser {
        MitelParser::new(
            &overrides,
            &CallFieldOverrides::default(),
            StatusMap::new(STATUS_WORDS, custom.iter().copied()),
        )
        .unwrap()
    }

    fn parse<'a>(p: &MitelParser, body: &'a str) -> Result<Parsed<'a>, ParseError> {
        p.parse(Verified::assume_verified_for_tests(body.as_bytes()))
    }

    #[test]
    fn parses_the_fixture() {
        let p = parser(FieldOverrides::default(), &[]);
        let parsed = parse(&p, FIXTURE).unwrap();
        assert_eq!(parsed.ignored, 0);
        let u = &parsed.updates[0];
        assert_eq!(u.principal, "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11");
        assert_eq!(u.availability, Availability::Busy);
        assert_eq!(u.status_text.as_deref(), Some("On a call"));
        assert_eq!(u.raw_status.as_deref(), Some("Busy"));
        assert_eq!(u.observed_at, Some(Millis(1_764_000_930_123)));
        assert_eq!(
            u.event_id.as_deref(),
            Some("0b7c2d44-8f1a-4e3b-a6d2-93c1e5f7b208")
        );
        assert!(
            matches!(u.principal, Cow::Borrowed(_)),
            "no copy of the principal"
        );
    }

    #[test]
    fn other_topics_are_ignored() {
        let p = parser(FieldOverrides::default(), &[]);
        let other = MEDIA.replace(MEDIA_TOPIC, "platform-api-conversations");
        let parsed = parse(&p, &other).unwrap();
        assert!(parsed.updates.is_empty() && parsed.calls.is_empty());
        assert_eq!(parsed.ignored, 1);
    }

    #[test]
    fn media_events_become_call_updates() {
        let p = parser(FieldOverrides::default(), &[]);
        let parsed = parse(&p, MEDIA).unwrap();
        assert!(parsed.updates.is_empty());
        let call = &parsed.calls[0];
        assert_eq!(call.principal, "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11");
        assert_eq!(call.call_id, "f4e3d2c1");
        assert_eq!(call.state, Some(CallState::Ringing));
        for (word, state) in [
            ("Connected", Ok(Some(CallState::Connected))),
            ("on-hold", Ok(Some(CallState::Held))),
            ("DISCONNECTED", Ok(None)),
            ("transferring", Err(())),
        ] {
            assert_eq!(call_state(word), state, "{word}");
        }
        let unknown = MEDIA.replace("\"ringing\"", "\"parked\"");
        assert_eq!(parse(&p, &unknown).unwrap().ignored, 1);
        let no_call = MEDIA.replace("\"callId\"", "\"other\"");
        let err = parse(&p, &no_call).unwrap_err().to_string();
        assert!(err.contains("no call_id found at /content/callId"), "{err}");
    }

    #[test]
    fn falls_back_through_default_pointers() {
        let p = parser(FieldOverrides::default(), &[]);
        let body = r#"{"topic":"platform-api-presence","content":{"principalId":"u1","status":"away","statusMessage":"lunch"}}"#;
        let u = &parse(&p, body).unwrap().updates[0];
        assert_eq!(u.principal, "u1");
        assert_eq!(u.availability, Availability::Away);
        assert_eq!(u.status_text.as_deref(), Some("lunch"));
        assert_eq!(u.observed_at, None);
        assert_eq!(u.event_id, None);
    }

    #[test]
    fn custom_fields_and_status_map() {
        let overrides = FieldOverrides {
            status: Some(OneOrMany::One("/content/state/code".into())),
            timestamp: Some(OneOrMany::Many(vec!["/notification/createdOn".into()])),
            activity: Some(OneOrMany::One("/content/state/activity".into())),
            ..FieldOverrides::default()
        };
        let p = parser(overrides, &[("OnThePhone", Availability::Busy)]);
        let body = r#"{"topic":"platform-api-presence","subject":"/presentities/u2","content":{"state":{"code":"onthephone","activity":"InACall"}},"notification":{"createdOn":"2026-11-24T10:15:30.140Z"}}"#;
        let u = &parse(&p, body).unwrap().updates[0];
        assert_eq!(u.principal, "u2");
        assert_eq!(u.availability, Availability::Busy);
        assert_eq!(u.activity.as_deref(), Some("in_a_call"));
        assert_eq!(
            u.observed_at,
            Millis::parse_rfc3339("2026-11-24T10:15:30.140Z")
        );
    }

    #[test]
    fn rejects_bad_shapes_with_useful_messages() {
        let p = parser(FieldOverrides::default(), &[]);
        let cases = [
            ("[]", "expected a JSON object"),
            ("{", "not valid JSON"),
            ("nope", "not valid JSON"),
            (r#"{"subject":"/presentities/u"}"#, "no topic"),
            (
                r#"{"topic":"platform-api-presence","content":{"presence":"Busy"}}"#,
                "no principal",
            ),
            (
                r#"{"topic":"platform-api-presence","subject":"/presentities/u"}"#,
                "no status found at /content/presence, /content/availability, /content/status",
            ),
            (
                r#"{"topic":"platform-api-presence","subject":"/presentities/u","content":{"presence":"Busy","timestamp":"yesterday"}}"#,
                "timestamp at /content/timestamp",
            ),
            (
                r#"{"topic":"platform-api-presence","subject":"/presentities/u","content":{"presence":{"x":1}}}"#,
                "status at /content/presence is not a string",
            ),
        ];
        for (body, message) in cases {
            let err = parse(&p, body).unwrap_err().to_string();
            assert!(err.contains(message), "{body}: {err}");
        }
        let not_utf8 = p.parse(Verified::assume_verified_for_tests(b"{\"a\":\"\xff\"}"));
        assert!(matches!(not_utf8, Err(ParseError::NotUtf8)));
    }
}
