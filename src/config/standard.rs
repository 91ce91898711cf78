//! The `standard` kind (Standard Webhooks senders): `signing_keys` as
//! `whsec_<base64>` secrets, `tolerance_secs`, `event_types` and the
//! `fields.type` pointer, with the typed [`StandardSettings`]. The keys
//! every kind shares are checked in `sources.rs`.

use super::secrets::Secret;
use crate::providers::FieldOverrides;
use crate::providers::standard::DEFAULT_EVENT_TYPES;
use crate::verify::standard::decode_secret;

/// Default `tolerance_secs`: the five minutes the Standard Webhooks spec names.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// The largest `tolerance_secs` accepted: a day. A replay window longer
/// than the dedup window lets a captured request be applied again.
pub const MAX_TOLERANCE_SECS: u64 = 86_400;

/// What a `standard` source verifies and takes.
#[derive(Clone, Debug)]
pub struct StandardSettings {
    /// The decoded HMAC keys, in the order of `signing_keys`.
    pub keys: Vec<Secret>,
    /// How far a `webhook-timestamp` may be from the clock, either way.
    pub tolerance_secs: u64,
    /// Event types that carry presence; empty: every event does.
    pub event_types: Vec<String>,
}

/// The `standard` keys of one `[[sources]]` entry as written.
pub(super) struct RawStandard<'a> {
    pub is_standard: bool,
    pub signing_keys: &'a [Secret],
    pub tolerance_secs: Option<u64>,
    pub event_types: Option<&'a [String]>,
    pub fields: &'a FieldOverrides,
}

/// Validates the keys of a `standard` source, and refuses them on other
/// kinds; problems as `(field, message)`. `None` for other kinds or when a
/// key is wrong.
pub(super) fn settings(
    raw: &RawStandard<'_>,
    problems: &mut Vec<(String, String)>,
) -> Option<StandardSettings> {
    if !raw.is_standard {
        for (field, set) in [
            ("tolerance_secs", raw.tolerance_secs.is_some()),
            ("event_types", raw.event_types.is_some()),
            ("fields.type", raw.fields.kind.is_some()),
        ] {
            if set {
                problems.push((field.into(), "only for kind = \"standard\"".into()));
            }
        }
        return None;
    }
    let before = problems.len();
    if raw.signing_keys.is_empty() {
        problems.push((
            "signing_keys".into(),
            "must list at least one \"whsec_...\" secret".into(),
        ));
    }
    let keys: Vec<Secret> = raw
        .signing_keys
        .iter()
        .enumerate()
        .filter_map(|(i, secret)| {
            // The message names what is wrong, never the value.
            decode_secret(secret.expose())
                .map_err(|e| problems.push((format!("signing_keys[{i}]"), e.to_string())))
                .ok()
                .map(Secret::new)
        })
        .collect();
    let tolerance_secs = raw.tolerance_secs.unwrap_or(DEFAULT_TOLERANCE_SECS);
    if !(1..=MAX_TOLERANCE_SECS).contains(&tolerance_secs) {
        problems.push((
            "tolerance_secs".into(),
            format!("must be 1 to {MAX_TOLERANCE_SECS} seconds"),
        ));
    }
    let event_types: Vec<String> = match raw.event_types {
        Some(list) => list.to_vec(),
        None => DEFAULT_EVENT_TYPES
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
    };
    if event_types.iter().any(|t| t.trim().is_empty()) {
        problems.push((
            "event_types".into(),
            "event types must not be empty (an empty list takes every event)".into(),
        ));
    }
    if raw.fields.event_id.is_some() {
        problems.push((
            "fields.event_id".into(),
            "not used by kind = \"standard\": the event id is the webhook-id header".into(),
        ));
    }
    (problems.len() == before).then_some(StandardSettings {
        keys,
        tolerance_secs,
        event_types,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::ConfigError;
    use crate::config::test_support::parse;

    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn a_standard_source_with_defaults() {
        let text = format!(
            "[[sources]]\nid = \"vendor\"\nkind = \"standard\"\nsigning_keys = [\"{KEY}\"]\n"
        );
        let c = parse(&text, &[]).unwrap();
        let s = c.sources[0].standard.as_ref().unwrap();
        assert_eq!(s.tolerance_secs, 300);
        assert_eq!(s.event_types, ["presence.updated"]);
        assert_eq!(s.keys.len(), 1);
        assert_eq!(s.keys[0].expose().len(), 24);
    }

    #[test]
    fn bad_keys_are_named_without_their_values() {
        let text = r#"
[[sources]]
id = "vendor"
kind = "standard"
signing_keys = ["whsec_", "whsec_not*base64", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "env:PG_TEST_UNSET_STANDARD_KEY"]
tolerance_secs = 0
event_types = [""]
fields = { event_id = "/id" }

[[sources]]
id = "nokeys"
kind = "standard"

[[sources]]
id = "m"
kind = "mitel"
signing_keys = ["k"]
tolerance_secs = 300
event_types = ["presence.updated"]
fields = { type = "/type" }
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].signing_keys[0]",
            "sources[0].signing_keys[1]",
            "sources[0].signing_keys[2]",
            "sources[0].signing_keys[3]",
            "sources[0].tolerance_secs",
            "sources[0].event_types",
            "sources[0].fields.event_id",
            "sources[1].signing_keys",
            "sources[2].tolerance_secs",
            "sources[2].event_types",
            "sources[2].fields.type",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        let text = format!("{problems:?}");
        for secret in ["not*base64", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn managed_and_netsapiens_keys_are_refused() {
        let text = format!(
            r#"
[[sources]]
id = "vendor"
kind = "standard"
signing_keys = ["{KEY}"]
correlation_ids = ["x"]
model = "presence"
timezone = "UTC"
api_base = "https://api.example.net"
call_fields = {{ state = "/s" }}
fields = {{ domain = "/d" }}
"#
        );
        let Err(ConfigError::Invalid(problems)) = parse(&text, &[]) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].correlation_ids",
            "sources[0].model",
            "sources[0].timezone",
            "sources[0].api_base",
            "sources[0].call_fields",
            "sources[0].fields.domain",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }
}
