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
}

impl Fields {
    /// Compiles the defaults with the source's overrides.
    pub fn compile(defaults: &Defaults, overrides: &FieldOverrides) -> Result<Self, FieldsError> {
        let mut set = PointerSet::default();
        let mut field = |name: &'static str,
                         default: &'static [&'static str],
                         custom: &Option<OneOrMany>|
         -> Result<Vec<usize>, FieldsError> {
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
                    Ok(set.add(p)?)
                })
                .collect()
        };
        let principal = field("principal", defaults.principal, &overrides.principal)?;
        let status = field("status", defaults.status, &overrides.status)?;
        let activity = field("activity", defaults.activity, &overrides.activity)?;
        let note = field("note", defaults.note, &overrides.note)?;
        let timestamp = field("timestamp", defaults.timestamp, &overrides.timestamp)?;
        let event_id = field("event_id", defaults.event_id, &overrides.event_id)?;
        Ok(Fields {
            set,
            principal,
            status,
            activity,
            note,
            timestamp,
            event_id,
        })
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
        let observed_at = match first(found, &self.timestamp) {
            None => None,
            Some((i, raw)) => Some(parse_time(raw).ok_or_else(|| ParseError::Invalid {
                field: "timestamp",
                pointer: self.pointer_text(i),
                problem: "not epoch milliseconds or an RFC 3339 time",
            })?),
        };
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

    fn text<'de>(
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

    fn required_text<'de>(
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

fn first<'de>(found: &Found<'de>, pointers: &[usize]) -> Option<(usize, Raw<'de>)> {
    pointers
        .iter()
        .find_map(|&i| found.get(i).map(|raw| (i, raw)))
}

/// A provider timestamp: epoch milliseconds (number or digit string) or RFC 3339.
fn parse_time(raw: Raw<'_>) -> Option<Millis> {
    if let Some(ms) = extract::as_i64(raw) {
        return Some(Millis(ms));
    }
    let text = extract::as_str(raw)?;
    text.parse::<i64>()
        .ok()
        .map(Millis)
        .or_else(|| Millis::parse_rfc3339(&text))
}
