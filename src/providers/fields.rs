//! Where each presence field sits in a provider's payload.
//!
//! Every kind has documented (or assumed) default locations; a source can
//! replace any of them with its own JSON pointers in `[sources.fields]`, each a
//! pointer or a list tried in order. Compiled once at start-up into a
//! [`PointerSet`], so a request does one streaming pass over its body.

use std::borrow::Cow;

use serde::Deserialize;

use super::ParseError;
use super::extract::{self, Found, JsonPointer, PointerError, PointerSet, Raw, TooManyPointers};
use super::status::StatusMap;
use crate::presence::{Millis, PresenceUpdate};

/// `[sources.fields]`: per-field JSON pointer overrides.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldOverrides {
    pub principal: Option<OneOrMany>,
    pub status: Option<OneOrMany>,
    pub activity: Option<OneOrMany>,
    pub note: Option<OneOrMany>,
    pub timestamp: Option<OneOrMany>,
    pub event_id: Option<OneOrMany>,
    /// NetSapiens: the domain appended to the principal (`user@domain`).
    pub domain: Option<OneOrMany>,
    /// Standard Webhooks: the event type, matched against `event_types`.
    #[serde(rename = "type")]
    pub kind: Option<OneOrMany>,
}

/// A pointer or a list of pointers tried in order.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A kind's default pointers per field.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub principal: &'static [&'static str],
    pub status: &'static [&'static str],
    pub activity: &'static [&'static str],
    pub note: &'static [&'static str],
    pub timestamp: &'static [&'static str],
    pub event_id: &'static [&'static str],
}

/// A field configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldsError {
    #[error("{field}: {source}")]
    Pointer {
        field: &'static str,
        source: PointerError,
    },
    #[error("{field}: at least one pointer is required")]
    Empty { field: &'static str },
    #[error(transparent)]
    TooMany(#[from] TooManyPointers),
}

/// Compiled field locations of one source.
#[derive(Clone, Debug)]
pub struct Fields {
    set: PointerSet,
    principal: Vec<usize>,
    status: Vec<usize>,
    activity: Vec<usize>,
    note: Vec<usize>,
    timestamp: Vec<usize>,
    event_id: Vec<usize>,
    /// Zone of timestamps written without one (`YYYY-MM-DD HH:MM:SS`).
    timezone: jiff::tz::TimeZone,
}

impl Fields {
    /// Compiles the defaults with the source's overrides.
    pub fn compile(defaults: &Defaults, overrides: &FieldOverrides) -> Result<Self, FieldsError> {
        let mut fields = Fields {
            set: PointerSet::default(),
            principal: Vec::new(),
            status: Vec::new(),
            activity: Vec::new(),
            note: Vec::new(),
            timestamp: Vec::new(),
            event_id: Vec::new(),
            timezone: jiff::tz::TimeZone::UTC,
        };
        let o = overrides;
        fields.principal =
            fields.add_list("principal", defaults.principal, o.principal.as_ref())?;
        fields.status = fields.add_list("status", defaults.status, o.status.as_ref())?;
        fields.activity = fields.add_list("activity", defaults.activity, o.activity.as_ref())?;
        fields.note = fields.add_list("note", defaults.note, o.note.as_ref())?;
        fields.timestamp =
            fields.add_list("timestamp", defaults.timestamp, o.timestamp.as_ref())?;
        fields.event_id = fields.add_list("event_id", defaults.event_id, o.event_id.as_ref())?;
        Ok(fields)
    }

    /// Adds one more field: its default pointers, or the configured ones.
    /// Returns the pointers' indexes, in the order they are tried.
    pub fn add_list(
        &mut self,
        name: &'static str,
        default: &'static [&'static str],
        custom: Option<&OneOrMany>,
    ) -> Result<Vec<usize>, FieldsError> {
        let texts: Vec<&str> = match custom {
            Some(c) => c.as_slice().iter().map(String::as_str).collect(),
            None => default.to_vec(),
        };
        if custom.is_some() && texts.is_empty() {
            return Err(FieldsError::Empty { field: name });
        }
        texts
            .into_iter()
            .map(|t| {
                let p = JsonPointer::parse(t).map_err(|source| FieldsError::Pointer {
                    field: name,
                    source,
                })?;
                Ok(self.set.add(p)?)
            })
            .collect()
    }

    /// Sets the zone of timestamps that are written without one.
    pub fn set_timezone(&mut self, timezone: jiff::tz::TimeZone) {
        self.timezone = timezone;
    }

    /// Adds a pointer the provider itself needs (e.g. Mitel's `/topic`).
    pub fn add_extra(&mut self, pointer: &str) -> Result<usize, FieldsError> {
        let p = JsonPointer::parse(pointer).map_err(|source| FieldsError::Pointer {
            field: "internal",
            source,
        })?;
        Ok(self.set.add(p)?)
    }

    /// Walks one JSON document for every configured pointer.
    pub fn extract<'de>(&self, json: &'de str) -> Result<Found<'de>, ParseError> {
        Ok(extract::extract(&self.set, json)?)
    }

    /// Whether none of the status pointers has a value.
    pub fn status_absent(&self, found: &Found<'_>) -> bool {
        first(found, &self.status).is_none()
    }

    /// The first present value among the principal pointers.
    pub fn principal<'de>(&self, found: &Found<'de>) -> Result<Cow<'de, str>, ParseError> {
        self.required_text("principal", &self.principal, found)
    }

    /// Builds the update for `principal` from the other fields.
    pub fn update<'de>(
        &self,
        found: &Found<'de>,
        principal: Cow<'de, str>,
        statuses: &StatusMap,
    ) -> Result<PresenceUpdate<'de>, ParseError> {
        let raw_status = self.required_text("status", &self.status, found)?;
        let activity = self
            .text("activity", &self.activity, found)?
            .filter(|a| !a.is_empty())
            .map(|a| {
                let converted = match crate::presence::model::snake_case(&a) {
                    Cow::Owned(s) => Some(s),
                    Cow::Borrowed(_) => None,
                };
                converted.map_or(a, Cow::Owned)
            });
        let status_text = self
            .text("note", &self.note, found)?
            .filter(|n| !n.is_empty());
        let observed_at = self.time("timestamp", &self.timestamp, found)?;
        let event_id = self.text("event_id", &self.event_id, found)?;
        Ok(PresenceUpdate {
            principal,
            availability: statuses.map(&raw_status),
            activity,
            status_text,
            raw_status: Some(raw_status),
            observed_at,
            event_id,
        })
    }

    /// The first present value among `pointers` as a time: epoch
    /// milliseconds, RFC 3339, or `YYYY-MM-DD HH:MM:SS` in the source's zone.
    pub fn time(
        &self,
        field: &'static str,
        pointers: &[usize],
        found: &Found<'_>,
    ) -> Result<Option<Millis>, ParseError> {
        match first(found, pointers) {
            None => Ok(None),
            Some((i, raw)) => {
                parse_time(raw, &self.timezone)
                    .map(Some)
                    .ok_or_else(|| ParseError::Invalid {
                        field,
                        pointer: self.pointer_text(i),
                        problem: "not epoch milliseconds, an RFC 3339 time or YYYY-MM-DD HH:MM:SS",
                    })
            }
        }
    }

    /// The first present value among `pointers` as text (a string, or a
    /// number or boolean as written); an error when it is an object or array.
    pub fn text<'de>(
        &self,
        field: &'static str,
        pointers: &[usize],
        found: &Found<'de>,
    ) -> Result<Option<Cow<'de, str>>, ParseError> {
        match first(found, pointers) {
            None => Ok(None),
            Some((i, raw)) => extract::as_text(raw)
                .map(Some)
                .ok_or_else(|| ParseError::Invalid {
                    field,
                    pointer: self.pointer_text(i),
                    problem: "not a string",
                }),
        }
    }

    /// Like [`Fields::text`], but absent or blank is an error.
    pub fn required_text<'de>(
        &self,
        field: &'static str,
        pointers: &[usize],
        found: &Found<'de>,
    ) -> Result<Cow<'de, str>, ParseError> {
        self.text(field, pointers, found)?
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| ParseError::Missing {
                field,
                tried: self.list(pointers),
            })
    }

    fn pointer_text(&self, i: usize) -> String {
        self.set.get(i).map(|p| p.to_string()).unwrap_or_default()
    }

    fn list(&self, pointers: &[usize]) -> String {
        pointers
            .iter()
            .map(|&i| self.pointer_text(i))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Digits only, as epoch milliseconds (one pass; `None` beyond 64 bits).
fn epoch_ms(digits: &str) -> Option<Millis> {
    if digits.is_empty() {
        return None;
    }
    let mut ms: i64 = 0;
    for b in digits.bytes() {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        ms = ms.checked_mul(10)?.checked_add(i64::from(digit))?;
    }
    Some(Millis(ms))
}

fn first<'de>(found: &Found<'de>, pointers: &[usize]) -> Option<(usize, Raw<'de>)> {
    pointers
        .iter()
        .find_map(|&i| found.get(i).map(|raw| (i, raw)))
}

/// A provider timestamp: epoch milliseconds (number or digit string), RFC
/// 3339, or `YYYY-MM-DD HH:MM:SS` (NetSapiens) in `zone`.
///
/// Epoch milliseconds are a whole number of digits: a sign, a fraction or an
/// exponent makes no time (400) rather than one rounded or truncated, and
/// so does a number beyond the 64-bit range. Whether a readable time is
/// believed (2000 or later, not far ahead) is decided when it is applied.
fn parse_time(raw: Raw<'_>, zone: &jiff::tz::TimeZone) -> Option<Millis> {
    let number = raw.get();
    if number.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return epoch_ms(number);
    }
    let text = extract::as_str(raw)?;
    if let Some(ms) = epoch_ms(&text) {
        return Some(ms);
    }
    if let Some(ms) = Millis::parse_rfc3339(&text) {
        return Some(ms);
    }
    let civil = jiff::civil::DateTime::strptime("%Y-%m-%d %H:%M:%S", text.as_ref()).ok()?;
    let at = zone.to_timestamp(civil).ok()?;
    Some(Millis(at.as_millisecond()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_accepted_form() {
        let utc = jiff::tz::TimeZone::UTC;
        let raw = |s: &'static str| Raw::for_tests(s);
        assert_eq!(
            parse_time(raw("1764000930123"), &utc),
            Some(Millis(1_764_000_930_123))
        );
        assert_eq!(
            parse_time(raw("\"1764000930123\""), &utc),
            Some(Millis(1_764_000_930_123))
        );
        assert_eq!(
            parse_time(raw("\"2025-11-24T16:15:30.123Z\""), &utc),
            Some(Millis(1_764_000_930_123))
        );
        assert_eq!(
            parse_time(raw("\"2025-11-24 16:15:30\""), &utc),
            Some(Millis(1_764_000_930_000))
        );
        let berlin = jiff::tz::TimeZone::fixed(jiff::tz::offset(1));
        assert_eq!(
            parse_time(raw("\"2025-11-24 17:15:30\""), &berlin),
            Some(Millis(1_764_000_930_000))
        );
        assert_eq!(parse_time(raw("\"yesterday\""), &utc), None);
        assert_eq!(parse_time(raw("{}"), &utc), None);
        // Far ahead, or before 2000, still reads: applying decides (clock_skew).
        assert_eq!(
            parse_time(raw("9223372036854775807"), &utc),
            Some(Millis(i64::MAX))
        );
        assert_eq!(parse_time(raw("0"), &utc), Some(Millis(0)));
    }

    #[test]
    fn epoch_values_that_are_no_whole_milliseconds_are_no_time() {
        let utc = jiff::tz::TimeZone::UTC;
        for bad in [
            "-1",
            "-1764000930123",
            "\"-1764000930123\"",
            "1764000930123.5",
            "\"1764000930123.5\"",
            "1764000930123.0",
            "1.764000930123e12",
            "1764000930123e0",
            "\"+1764000930123\"",
            "9223372036854775808",
            "99999999999999999999999",
            "\"99999999999999999999999\"",
            "\"\"",
            "true",
            "null",
        ] {
            assert_eq!(parse_time(Raw::for_tests(bad), &utc), None, "{bad}");
        }
    }
}
