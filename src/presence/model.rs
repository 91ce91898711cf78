//! The normalized presence model: what every provider's payload becomes.
//!
//! This module owns the vocabulary (availability, activity, timestamps) and the
//! JSON shape consumers see. It never knows which provider a value came from.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The normalized availability of a principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Available,
    AvailableIdle,
    Away,
    BeRightBack,
    Busy,
    BusyIdle,
    DoNotDisturb,
    Offline,
    Unknown,
}

impl Availability {
    /// Every value, in the order the documentation lists them.
    pub const ALL: [Availability; 9] = [
        Availability::Available,
        Availability::AvailableIdle,
        Availability::Away,
        Availability::BeRightBack,
        Availability::Busy,
        Availability::BusyIdle,
        Availability::DoNotDisturb,
        Availability::Offline,
        Availability::Unknown,
    ];

    /// The snake_case name used in JSON, config and query strings.
    pub const fn as_str(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::AvailableIdle => "available_idle",
            Availability::Away => "away",
            Availability::BeRightBack => "be_right_back",
            Availability::Busy => "busy",
            Availability::BusyIdle => "busy_idle",
            Availability::DoNotDisturb => "do_not_disturb",
            Availability::Offline => "offline",
            Availability::Unknown => "unknown",
        }
    }

    /// Parses a snake_case name (ASCII case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch, UTC. Serialized as RFC 3339 with
/// millisecond precision (`2026-11-24T10:15:30.123Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub i64);

impl Millis {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Millis(jiff::Timestamp::now().as_millisecond())
    }

    /// Parses an RFC 3339 timestamp (any offset, any fractional precision).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        text.parse::<jiff::Timestamp>()
            .ok()
            .map(|ts| Millis(ts.as_millisecond()))
    }
}

/// The first millisecond RFC 3339 can write (year 0000), and the last one
/// `jiff` takes (a day short of the end of year 9999, to leave room for any
/// offset).
const RFC3339_FIRST_MS: i64 = -62_167_219_200_000;
const RFC3339_LAST_MS: i64 = 253_402_207_200_000;

impl fmt::Display for Millis {
    /// Always RFC 3339 (DESIGN §2): a time outside years 0000–9999 (which
    /// only a record kept from before timestamps were checked can hold) is
    /// written as the nearest one inside.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.clamp(RFC3339_FIRST_MS, RFC3339_LAST_MS);
        match jiff::Timestamp::from_millisecond(ms) {
            Ok(ts) => write!(f, "{}", ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")),
            // Inside jiff's range (years ±9999) by the clamp above.
            Err(_) => f.write_str("1970-01-01T00:00:00.000Z"),
        }
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Reads what [`Serialize`] writes (persisted person records).
impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Millis::parse_rfc3339(&text).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
    }
}

/// Converts a provider's activity word (`InAMeeting`, `in-a-call`,
/// `Out Of Office`) to the model's snake_case form (`in_a_meeting`).
pub fn snake_case(word: &str) -> Cow<'_, str> {
    let already = word
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if already {
        return Cow::Borrowed(word);
    }
    let mut out = String::with_capacity(word.len() + 4);
    let chars: Vec<char> = word.chars().collect();
    for (i, &ch) in chars.iter().enumerate() {
        if ch == '-' || ch == ' ' || ch == '_' {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            continue;
        }
        if ch.is_ascii_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|c| c.is_ascii_lowercase());
            let boundary = prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower);
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
        }
        out.push(ch.to_ascii_lowercase());
    }
    while out.ends_with('_') {
        out.pop();
    }
    Cow::Owned(out)
}

/// The state kept for one `(source, principal)`; the key lives in the store.
///
/// The texts are shared (`Arc<str>`): the store hands out one copy per
/// distinct short word (`Busy`, `in_a_call`, ...), so a record costs no
/// allocation of its own for them, and a change record shares them too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub availability: Availability,
    pub activity: Option<Arc<str>>,
    pub status_text: Option<Arc<str>>,
    pub raw_status: Option<Arc<str>>,
    pub observed_at: Millis,
    pub received_at: Millis,
    pub seq: u64,
    /// The principal's active calls, when it has any.
    pub calls: Option<Box<Calls>>,
    /// Whether a presence event has set this record (a record can start with
    /// a call); only then is an older presence event stale.
    pub reported: bool,
    /// Revision of the record in a shared backend (Redis): bumped by every
    /// write there, so a replica can tell a newer copy from an older one and
    /// a write can be made conditional on the copy it was decided on. (Sits
    /// in padding: the record is no larger for it.)
    pub rev: u32,
}

/// Active calls of one principal. While there is one, the record's activity
/// is the state of the most recently started call; when the last one ends,
/// the activity returns to `previous`, the latest activity presence events
/// reported (kept up to date during the call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calls {
    /// The provider's call ids, oldest first, with each call's state.
    pub active: Vec<(Box<str>, CallState)>,
    pub previous: Option<Arc<str>>,
}

/// The state of one call of a principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CallState {
    Ringing,
    Connected,
    Held,
}

impl CallState {
    /// The activity a principal has while this is its latest call.
    pub const fn activity(self) -> &'static str {
        match self {
            CallState::Ringing => "ringing",
            CallState::Connected => "in_a_call",
            CallState::Held => "on_hold",
        }
    }
}

impl Presence {
    /// Whether a consumer would see a difference between `self` and the
    /// given content (timestamps and the raw word do not count).
    pub fn same_content(
        &self,
        availability: Availability,
        activity: Option<&str>,
        status_text: Option<&str>,
    ) -> bool {
        self.availability == availability
            && self.activity.as_deref() == activity
            && self.status_text.as_deref() == status_text
    }
}

/// One record as consumers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub source: Arc<str>,
    pub principal: Arc<str>,
    pub availability: Availability,
    pub activity: Option<Arc<str>>,
    pub status_text: Option<Arc<str>>,
    pub raw_status: Option<Arc<str>>,
    pub observed_at: Millis,
    pub received_at: Millis,
    pub seq: u64,
}

impl PresenceRecord {
    pub fn new(source: &Arc<str>, principal: &str, presence: &Presence) -> Self {
        PresenceRecord {
            source: Arc::clone(source),
            principal: Arc::from(principal),
            availability: presence.availability,
            activity: presence.activity.clone(),
            status_text: presence.status_text.clone(),
            raw_status: presence.raw_status.clone(),
            observed_at: presence.observed_at,
            received_at: presence.received_at,
            seq: presence.seq,
        }
    }

    /// The same record with another `seq`.
    pub fn with_seq(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }
}

/// Which identity decided a person's presence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decider {
    pub source: Arc<str>,
    pub principal: Arc<str>,
}

/// A person's presence, derived from the records of their identities
/// (DESIGN §9); see [`crate::people`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonRecord {
    pub person: Arc<str>,
    pub name: Option<Arc<str>>,
    pub availability: Availability,
    pub activity: Option<Arc<str>>,
    pub status_text: Option<Arc<str>>,
    /// The deciding record's `observed_at`; `None` while no identity has a
    /// record.
    pub observed_at: Option<Millis>,
    pub seq: u64,
    pub decided_by: Option<Decider>,
    /// The identity records that exist, in the mapping's order.
    pub sources: Vec<PresenceRecord>,
}

impl PersonRecord {
    /// Whether a consumer would see a difference in what was derived
    /// (the identity records underneath may differ: a change of an
    /// identity that does not change the winner is no person event).
    pub fn same_derived(&self, other: &PersonRecord) -> bool {
        self.name == other.name
            && self.availability == other.availability
            && self.activity == other.activity
            && self.status_text == other.status_text
            && self.decided_by == other.decided_by
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_format_rfc3339_with_milliseconds() {
        assert_eq!(
            Millis(1_764_000_930_123).to_string(),
            "2025-11-24T16:15:30.123Z"
        );
        assert_eq!(Millis(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Millis(-1).to_string(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            Millis::parse_rfc3339("2026-11-24T10:15:30.5+01:00"),
            Some(Millis(1_795_511_730_500))
        );
    }

    #[test]
    fn times_beyond_rfc3339_are_written_as_the_nearest_it_can_write() {
        for (ms, text) in [
            (i64::MAX, "9999-12-30T22:00:00.000Z"),
            (RFC3339_LAST_MS, "9999-12-30T22:00:00.000Z"),
            (i64::MIN, "0000-01-01T00:00:00.000Z"),
            (RFC3339_FIRST_MS, "0000-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(Millis(ms).to_string(), text, "{ms}");
            assert!(Millis::parse_rfc3339(text).is_some(), "{text}");
        }
    }

    #[test]
    fn snake_case_handles_provider_spellings() {
        assert_eq!(snake_case("InAMeeting"), "in_a_meeting");
        assert_eq!(snake_case("InACall"), "in_a_call");
        assert_eq!(snake_case("OutOfOffice"), "out_of_office");
        assert_eq!(snake_case("in-a-call"), "in_a_call");
        assert_eq!(snake_case("Out Of Office"), "out_of_office");
        assert_eq!(snake_case("presenting"), "presenting");
    }

    #[test]
    fn availability_names_round_trip() {
        for a in Availability::ALL {
            assert_eq!(Availability::from_name(a.as_str()), Some(a));
            assert_eq!(
                serde_json::to_value(a).unwrap(),
                serde_json::Value::String(a.as_str().into())
            );
        }
        assert_eq!(
            Availability::from_name("Do_Not_Disturb"),
            Some(Availability::DoNotDisturb)
        );
    }
}
