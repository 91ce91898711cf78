//! Standard Webhooks senders (`kind = "standard"`).
//!
//! The Standard Webhooks payload is one JSON object with a `type`, a
//! `timestamp` and a `data` object whose schema is the sender's own. The
//! default locations follow `fixtures/standard-presence.json` (DESIGN.md §5):
//! type `/type`, principal `/data/user_id`, status `/data/status`, activity
//! `/data/activity`, note `/data/message`, timestamp `/data/changed_at` (RFC
//! 3339 or epoch milliseconds); `[sources.fields]` (including `type`) and
//! `[sources.status_map]` adapt any other schema. The event id is the
//! verified `webhook-id` header, never a body field, so a retry that the
//! sender signs again with a new timestamp is still a duplicate.
//!
//! Only events whose type is in the source's `event_types` carry presence;
//! others are acknowledged and counted as ignored. An empty `event_types`
//! takes every event, and then no type is needed.

use std::borrow::Cow;

use super::fields::{Defaults, FieldOverrides, Fields, FieldsError};
use super::status::{BuiltinTable, StatusMap};
use super::{ParseError, Parsed, body_text};
use crate::presence::Availability;
use crate::verify::Verified;

/// Default field locations (DESIGN.md §5, `standard`).
pub const DEFAULTS: Defaults = Defaults {
    principal: &["/data/user_id"],
    status: &["/data/status"],
    activity: &["/data/activity"],
    note: &["/data/message"],
    timestamp: &["/data/changed_at"],
    // The `webhook-id` header is the event id.
    event_id: &[],
};

/// Where the event type is, unless `[sources.fields] type` says otherwise.
pub const DEFAULT_TYPE: &[&str] = &["/type"];

/// The event types taken when `event_types` is not configured.
pub const DEFAULT_EVENT_TYPES: &[&str] = &["presence.updated"];

/// Words common among senders beyond the model's own names (`available`,
/// `away`, `busy`, `do_not_disturb`, `offline`, ... in any spelling).
pub const STATUS_WORDS: BuiltinTable = &[
    ("online", Availability::Available),
    ("dnd", Availability::DoNotDisturb),
];

/// Parser of one Standard Webhooks source.
#[derive(Debug)]
pub struct StandardParser {
    fields: Fields,
    kind: Vec<usize>,
    /// Types that carry presence; empty: every event does.
    event_types: Vec<Box<str>>,
    statuses: StatusMap,
}

impl StandardParser {
    /// A parser with the source's field overrides, event types and status map.
    pub fn new(
        overrides: &FieldOverrides,
        event_types: &[String],
        statuses: StatusMap,
    ) -> Result<Self, FieldsError> {
        let mut fields = Fields::compile(&DEFAULTS, overrides)?;
        let kind = fields.add_list("type", DEFAULT_TYPE, overrides.kind.as_ref())?;
        Ok(StandardParser {
            fields,
            kind,
            event_types: event_types.iter().map(|t| t.as_str().into()).collect(),
            statuses,
        })
    }

    /// Parses one verified payload; `event_id` is its `webhook-id`.
    pub fn parse<'a>(
        &self,
        body: Verified<'a>,
        event_id: Option<&'a str>,
    ) -> Result<Parsed<'a>, ParseError> {
        let text = body_text(body)?;
        if !text.trim_start().starts_with('{') {
            // Still report invalid JSON as such, not as a shape problem.
            serde_json::from_str::<serde::de::IgnoredAny>(text)?;
            return Err(ParseError::Shape {
                expected: "object (one Standard Webhooks event)",
            });
        }
        let found = self.fields.extract(text)?;
        if !self.event_types.is_empty() {
            let kind = self.fields.required_text("type", &self.kind, &found)?;
            if !self.event_types.iter().any(|t| **t == *kind) {
                return Ok(Parsed {
                    ignored: 1,
                    ..Parsed::default()
                });
            }
        }
        let principal = self.fields.principal(&found)?;
        let mut update = self.fields.update(&found, principal, &self.statuses)?;
        update.event_id = event_id.map(Cow::Borrowed);
        Ok(Parsed {
            updates: vec![update],
            ..Parsed::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Millis;

    fn parser(overrides: &FieldOverrides, types: &[&str]) -> StandardParser {
        let types: Vec<String> = types.iter().map(|t| (*t).to_owned()).collect();
        StandardParser::new(overrides, &types, StatusMap::new(STATUS_WORDS, [])).unwrap()
    }

    fn parse<'a>(p: &StandardParser, body: &'a str) -> Result<Parsed<'a>, ParseError> {
        p.parse(
            Verified::assume_verified_for_tests(body.as_bytes()),
            Some("msg_1"),
        )
    }

    #[test]
    fn the_fixture_shape_with_default_locations() {
        let p = parser(&FieldOverrides::default(), DEFAULT_EVENT_TYPES);
        let body = r#"{"type":"presence.updated","timestamp":"2026-11-24T10:15:31Z","data":{"user_id":"u-4411","status":"away","message":"back at 3","activity":"InAMeeting","changed_at":"2026-11-24T10:15:30Z"}}"#;
        let parsed = parse(&p, body).unwrap();
        let [update] = parsed.updates.as_slice() else {
            panic!("{parsed:?}");
        };
        assert_eq!(update.principal, "u-4411");
        assert_eq!(update.availability, Availability::Away);
        assert_eq!(update.raw_status.as_deref(), Some("away"));
        assert_eq!(update.status_text.as_deref(), Some("back at 3"));
        assert_eq!(update.activity.as_deref(), Some("in_a_meeting"));
        assert_eq!(
            update.observed_at,
            Millis::parse_rfc3339("2026-11-24T10:15:30Z")
        );
        assert_eq!(update.event_id.as_deref(), Some("msg_1"));
    }

    #[test]
    fn epoch_milliseconds_and_numeric_ids() {
        let p = parser(&FieldOverrides::default(), DEFAULT_EVENT_TYPES);
        let body = r#"{"type":"presence.updated","data":{"user_id":4411,"status":"Online","changed_at":1764000930123}}"#;
        let parsed = parse(&p, body).unwrap();
        assert_eq!(parsed.updates[0].principal, "4411");
        assert_eq!(parsed.updates[0].availability, Availability::Available);
        assert_eq!(
            parsed.updates[0].observed_at,
            Some(Millis(1_764_000_930_123))
        );
    }

    #[test]
    fn other_types_are_ignored_and_an_empty_list_takes_all() {
        let p = parser(&FieldOverrides::default(), DEFAULT_EVENT_TYPES);
        let body = r#"{"type":"invoice.paid","data":{"amount":3}}"#;
        let parsed = parse(&p, body).unwrap();
        assert_eq!((parsed.updates.len(), parsed.ignored), (0, 1));
        // The type is needed to decide.
        let untyped = r#"{"data":{"user_id":"u","status":"busy"}}"#;
        assert!(matches!(
            parse(&p, untyped),
            Err(ParseError::Missing { field: "type", .. })
        ));
        let all = parser(&FieldOverrides::default(), &[]);
        assert_eq!(parse(&all, untyped).unwrap().updates.len(), 1);
        assert_eq!(
            parse(&all, body).map(|_| ()).unwrap_err().to_string(),
            "no principal found at /data/user_id"
        );
    }

    #[test]
    fn a_custom_schema_by_configuration() {
        let overrides: FieldOverrides = toml::from_str(
            r#"
type = "/event"
principal = ["/payload/agent/email", "/payload/agent/id"]
status = "/payload/state"
note = "/payload/reason"
timestamp = "/payload/at"
"#,
        )
        .unwrap();
        let p = parser(&overrides, &["agent.state_changed"]);
        let body = r#"{"event":"agent.state_changed","payload":{"agent":{"id":7},"state":"do-not-disturb","reason":"focus","at":"2026-11-24T10:15:30.5+01:00"}}"#;
        let update = &parse(&p, body).unwrap().updates[0];
        assert_eq!(update.principal, "7");
        assert_eq!(update.availability, Availability::DoNotDisturb);
        assert_eq!(update.status_text.as_deref(), Some("focus"));
        assert_eq!(
            update.observed_at,
            Millis::parse_rfc3339("2026-11-24T09:15:30.500Z")
        );
    }

    #[test]
    fn bad_bodies_are_parse_errors() {
        let p = parser(&FieldOverrides::default(), DEFAULT_EVENT_TYPES);
        for body in [
            "",
            "[]",
            "{\"type\":",
            r#"{"type":"presence.updated","data":{"user_id":"u"}}"#,
            r#"{"type":"presence.updated","data":{"user_id":{"x":1},"status":"away"}}"#,
            r#"{"type":"presence.updated","data":{"user_id":"u","status":"away","changed_at":"noon"}}"#,
            r#"{"type":"presence.updated","data":{"user_id":"u","status":"away","changed_at":-5}}"#,
        ] {
            assert!(parse(&p, body).is_err(), "{body}");
        }
        let not_utf8 = [b'{', 0xff, b'}'];
        assert!(matches!(
            p.parse(Verified::assume_verified_for_tests(&not_utf8), None),
            Err(ParseError::NotUtf8)
        ));
    }
}
