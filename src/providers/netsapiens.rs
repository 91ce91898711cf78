//! NetSapiens v2 event subscriptions (`kind = "netsapiens"`).
//!
//! A post is a JSON array of objects of the model its subscription was made
//! for; the verifier tells which model from the `X-Correlation-ID`. Models:
//!
//! - `presence`: one presence update per object (principal `user@domain`,
//!   SIP-style status words);
//! - `agent`, `subscriber`: the same, for objects that carry a status; others
//!   are counted as ignored;
//! - `call`, `call_origid`: call updates for both parties (`orig_user@
//!   orig_domain`, `term_user@term_domain`) keyed by the call id; `remove:
//!   "yes"` ends the call;
//! - any other model: acknowledged, every object counted as ignored.
//!
//! Field names are not documented by NetSapiens; the defaults below follow the
//! fixtures and each can be replaced per source (`[sources.fields]` for the
//! presence models, `[sources.call_fields]` for calls). The whole post is
//! parsed before anything is applied, so a bad element rejects the post and
//! stores nothing.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::fields::{Defaults, FieldOverrides, Fields, FieldsError, OneOrMany};
use super::status::{BuiltinTable, StatusMap};
use super::{ParseError, Parsed, body_text};
use crate::presence::{Availability, CallState, CallUpdate};
use crate::verify::Verified;

/// Default field locations of the presence-carrying models (PROVIDERS.md).
pub const DEFAULTS: Defaults = Defaults {
    principal: &["/user"],
    status: &["/presence"],
    activity: &[],
    note: &["/message"],
    timestamp: &["/time"],
    event_id: &[],
};

/// Where the domain of `user@domain` is, by default.
pub const DOMAIN: &[&str] = &["/domain"];

/// SIP-style status words (matched case-insensitively).
pub const STATUS_WORDS: BuiltinTable = &[
    ("open", Availability::Available),
    ("available", Availability::Available),
    ("closed", Availability::Offline),
    ("offline", Availability::Offline),
    ("inuse", Availability::Busy),
    ("busy", Availability::Busy),
    ("away", Availability::Away),
    ("dnd", Availability::DoNotDisturb),
];

/// The subscription models NetSapiens documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    Presence,
    Call,
    CallOrigid,
    Agent,
    Subscriber,
    /// A documented model that carries no presence (`cdr`, `message`, ...).
    Other,
}

impl Model {
    /// Every documented model name.
    pub const NAMES: [&'static str; 11] = [
        "agent",
        "auditlog",
        "auditlog_lite",
        "call",
        "call_origid",
        "cdr",
        "message",
        "messagesession",
        "subscriber",
        "presence",
        "voicemail",
    ];

    /// The model with this name, if NetSapiens documents it.
    pub fn from_name(name: &str) -> Option<Model> {
        Some(match name {
            "presence" => Model::Presence,
            "call" => Model::Call,
            "call_origid" => Model::CallOrigid,
            "agent" => Model::Agent,
            "subscriber" => Model::Subscriber,
            other if Self::NAMES.contains(&other) => Model::Other,
            _ => return None,
        })
    }
}

/// `[sources.call_fields]`: pointer overrides for call events (NetSapiens
/// `call` objects, Mitel `platform-api-media` envelopes).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallFieldOverrides {
    /// Both: the call's id.
    pub call_id: Option<OneOrMany>,
    /// NetSapiens: the two parties and the removal flag.
    pub orig_user: Option<OneOrMany>,
    pub orig_domain: Option<OneOrMany>,
    pub term_user: Option<OneOrMany>,
    pub term_domain: Option<OneOrMany>,
    pub remove: Option<OneOrMany>,
    /// Mitel: whose call it is, and its state word.
    pub principal: Option<OneOrMany>,
    pub state: Option<OneOrMany>,
}

impl CallFieldOverrides {
    /// The keys set here that `kind` does not use.
    pub fn foreign_keys(&self, mitel: bool) -> Vec<&'static str> {
        let netsapiens_only = [
            ("orig_user", self.orig_user.is_some()),
            ("orig_domain", self.orig_domain.is_some()),
            ("term_user", self.term_user.is_some()),
            ("term_domain", self.term_domain.is_some()),
            ("remove", self.remove.is_some()),
        ];
        let mitel_only = [
            ("principal", self.principal.is_some()),
            ("state", self.state.is_some()),
        ];
        let foreign: &[(&'static str, bool)] = if mitel { &netsapiens_only } else { &mitel_only };
        foreign
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Compiled locations of the call fields.
#[derive(Debug)]
struct CallFields {
    fields: Fields,
    orig_user: Vec<usize>,
    orig_domain: Vec<usize>,
    term_user: Vec<usize>,
    term_domain: Vec<usize>,
    call_id: Vec<usize>,
    remove: Vec<usize>,
}

impl CallFields {
    fn new(o: &CallFieldOverrides) -> Result<Self, FieldsError> {
        const NONE: Defaults = Defaults {
            principal: &[],
            status: &[],
            activity: &[],
            note: &[],
            timestamp: &[],
            event_id: &[],
        };
        let mut fields = Fields::compile(&NONE, &FieldOverrides::default())?;
        Ok(CallFields {
            orig_user: fields.add_list("orig_user", &["/orig_user"], o.orig_user.as_ref())?,
            orig_domain: fields.add_list(
                "orig_domain",
                &["/orig_domain"],
                o.orig_domain.as_ref(),
            )?,
            term_user: fields.add_list("term_user", &["/term_user"], o.term_user.as_ref())?,
            term_domain: fields.add_list(
                "term_domain",
                &["/term_domain"],
                o.term_domain.as_ref(),
            )?,
            call_id: fields.add_list(
                "call_id",
                &["/orig_callid", "/term_callid"],
                o.call_id.as_ref(),
            )?,
            remove: fields.add_list("remove", &["/remove"], o.remove.as_ref())?,
            fields,
        })
    }
}

/// Parser of one NetSapiens source.
#[derive(Debug)]
pub struct NetSapiensParser {
    fields: Fields,
    domain: Vec<usize>,
    calls: CallFields,
    statuses: StatusMap,
}

impl NetSapiensParser {
    /// A parser with the source's overrides, status map and time zone.
    pub fn new(
        overrides: &FieldOverrides,
        call_overrides: &CallFieldOverrides,
        statuses: StatusMap,
        timezone: jiff::tz::TimeZone,
    ) -> Result<Self, FieldsError> {
        let mut fields = Fields::compile(&DEFAULTS, overrides)?;
        let domain = fields.add_list("domain", DOMAIN, overrides.domain.as_ref())?;
        fields.set_timezone(timezone);
        Ok(NetSapiensParser {
            fields,
            domain,
            calls: CallFields::new(call_overrides)?,
            statuses,
        })
    }

    /// Parses one post of `model` objects.
    pub fn parse<'a>(&self, body: Verified<'a>, model: Model) -> Result<Parsed<'a>, ParseError> {
        let text = body_text(body)?;
        let items: Vec<&'a RawValue> = serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                ParseError::Shape {
                    expected: "array of objects",
                }
            } else {
                ParseError::Json(e)
            }
        })?;
        let mut parsed = Parsed::default();
        for (index, item) in items.iter().enumerate() {
            let item = item.get();
            let at = |source: ParseError| ParseError::Element {
                index,
                source: Box::new(source),
            };
            if !item.starts_with('{') {
                return Err(at(ParseError::Shape { expected: "object" }));
            }
            match model {
                Model::Presence | Model::Agent | Model::Subscriber => {
                    self.presence(item, model, &mut parsed).map_err(at)?;
                }
                Model::Call | Model::CallOrigid => self.call(item, &mut parsed).map_err(at)?,
                Model::Other => parsed.ignored += 1,
            }
        }
        Ok(parsed)
    }

    fn presence<'a>(
        &self,
        item: &'a str,
        model: Model,
        parsed: &mut Parsed<'a>,
    ) -> Result<(), ParseError> {
        let found = self.fields.extract(item)?;
        if model != Model::Presence && self.fields.status_absent(&found) {
            parsed.ignored += 1;
            return Ok(());
        }
        let user = self.fields.principal(&found)?;
        let domain = self.fields.text("domain", &self.domain, &found)?;
        let principal = join_principal(user, domain);
        let mut update = self.fields.update(&found, principal, &self.statuses)?;
        // The object itself identifies the event: the same object posted
        // twice (geo redundancy, failover) is a duplicate.
        if update.event_id.is_none() {
            update.event_id = Some(Cow::Borrowed(item));
        }
        parsed.updates.push(update);
        Ok(())
    }

    fn call<'a>(&self, item: &'a str, parsed: &mut Parsed<'a>) -> Result<(), ParseError> {
        let c = &self.calls;
        let found = c.fields.extract(item)?;
        let call_id = c.fields.required_text("call_id", &c.call_id, &found)?;
        let removed = c
            .fields
            .text("remove", &c.remove, &found)?
            .is_some_and(|r| r.eq_ignore_ascii_case("yes"));
        let state = (!removed).then_some(CallState::Connected);
        let parties = [
            (&c.orig_user, &c.orig_domain),
            (&c.term_user, &c.term_domain),
        ];
        let mut any = false;
        for (user, domain) in parties {
            let Some(user) = c
                .fields
                .text("user", user, &found)?
                .filter(|u| !u.is_empty())
            else {
                continue;
            };
            let domain = c.fields.text("domain", domain, &found)?;
            parsed.calls.push(CallUpdate {
                principal: join_principal(user, domain),
                call_id: call_id.clone(),
                state,
                observed_at: None,
            });
            any = true;
        }
        if !any {
            return Err(ParseError::Missing {
                field: "call party",
                tried: "orig_user and term_user".into(),
            });
        }
        Ok(())
    }
}

/// `user` and `domain` as `user@domain`; a user that already has a domain,
/// or no domain, stays as it is.
fn join_principal<'a>(user: Cow<'a, str>, domain: Option<Cow<'a, str>>) -> Cow<'a, str> {
    match domain.filter(|d| !d.is_empty()) {
        Some(domain) if !user.contains('@') => Cow::Owned(format!("{user}@{domain}")),
        _ => user,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Millis;

    const PRESENCE: &str = include_str!("../../tests/fixtures/netsapiens-presence.json");
    const CALL: &str = include_str!("../../tests/fixtures/netsapiens-call.json");

    fn parser(overrides: FieldOverrides) -> NetSapiensParser {
        NetSapiensParser::new(
            &overrides,
            &CallFieldOverrides::default(),
            StatusMap::new(STATUS_WORDS, []),
            jiff::tz::TimeZone::UTC,
        )
        .unwrap()
    }

    fn parse<'a>(
        p: &NetSapiensParser,
        body: &'a str,
        model: Model,
    ) -> Result<Parsed<'a>, ParseError> {
        p.parse(Verified::assume_verified_for_tests(body.as_bytes()), model)
    }

    #[test]
    fn presence_fixture() {
        let parsed = parse(
            &parser(FieldOverrides::default()),
            PRESENCE,
            Model::Presence,
        )
        .unwrap();
        assert_eq!(parsed.updates.len(), 2);
        let (a, b) = (&parsed.updates[0], &parsed.updates[1]);
        assert_eq!(a.principal, "1001@acme.example");
        assert_eq!(a.availability, Availability::Available);
        assert_eq!(a.status_text, None, "empty message is no text");
        assert_eq!(a.observed_at, Some(Millis(1_795_515_330_000)));
        assert_eq!(b.principal, "1002@acme.example");
        assert_eq!(b.availability, Availability::Busy);
        assert_eq!(b.raw_status.as_deref(), Some("inuse"));
        assert_eq!(b.status_text.as_deref(), Some("On the phone"));
        assert!(a.event_id.as_deref().unwrap().contains("\"1001\""));
    }

    #[test]
    fn call_fixture_starts_and_removes_for_both_parties() {
        let parsed = parse(&parser(FieldOverrides::default()), CALL, Model::Call).unwrap();
        let summary: Vec<_> = parsed
            .calls
            .iter()
            .map(|c| (c.principal.as_ref(), c.call_id.as_ref(), c.state))
            .collect();
        let id = "20261124101530012345-abc";
        assert_eq!(
            summary,
            [
                ("1001@acme.example", id, Some(CallState::Connected)),
                ("1002@acme.example", id, Some(CallState::Connected)),
                ("1001@acme.example", id, None),
                ("1002@acme.example", id, None),
            ]
        );
    }

    #[test]
    fn fields_can_point_elsewhere() {
        let overrides = FieldOverrides {
            principal: Some(OneOrMany::One("/login".into())),
            domain: Some(OneOrMany::Many(vec![])),
            ..FieldOverrides::default()
        };
        assert!(matches!(
            NetSapiensParser::new(
                &overrides,
                &CallFieldOverrides::default(),
                StatusMap::new(STATUS_WORDS, []),
                jiff::tz::TimeZone::UTC
            ),
            Err(FieldsError::Empty { field: "domain" })
        ));
        let overrides = FieldOverrides {
            principal: Some(OneOrMany::One("/login".into())),
            ..FieldOverrides::default()
        };
        let body = r#"[{"login":"ada@acme.example","presence":"dnd"}]"#;
        let parsed = parse(&parser(overrides), body, Model::Presence).unwrap();
        assert_eq!(parsed.updates[0].principal, "ada@acme.example");
        assert_eq!(parsed.updates[0].availability, Availability::DoNotDisturb);
    }

    #[test]
    fn other_models_and_statusless_agents_are_ignored() {
        let p = parser(FieldOverrides::default());
        let parsed = parse(&p, r#"[{"a":1},{"b":2}]"#, Model::Other).unwrap();
        assert_eq!((parsed.updates.len(), parsed.ignored), (0, 2));
        let body =
            r#"[{"user":"1001","domain":"d","presence":"away"},{"user":"1002","domain":"d"}]"#;
        let parsed = parse(&p, body, Model::Agent).unwrap();
        assert_eq!((parsed.updates.len(), parsed.ignored), (1, 1));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let p = parser(FieldOverrides::default());
        for (body, model, expect) in [
            (
                r#"{"user":"1001"}"#,
                Model::Presence,
                "expected a JSON array of objects",
            ),
            (
                r#"[{"user":"1001","domain":"d","presence":"open"}, 7]"#,
                Model::Presence,
                "element 1: expected a JSON object",
            ),
            (
                r#"[{"user":"1001","domain":"d"}]"#,
                Model::Presence,
                "element 0: no status found",
            ),
            (
                r#"[{"orig_user":"1001"}]"#,
                Model::Call,
                "element 0: no call_id found",
            ),
            (
                r#"[{"orig_callid":"x"}]"#,
                Model::Call,
                "element 0: no call party found",
            ),
            (
                r#"[{"user":{"x":1},"domain":"d","presence":"open"}]"#,
                Model::Presence,
                "element 0: principal at /user is not a string",
            ),
            ("[1,", Model::Presence, "not valid JSON"),
        ] {
            let err = parse(&p, body, model).unwrap_err().to_string();
            assert!(err.contains(expect), "{body}: {err}");
        }
    }
}
