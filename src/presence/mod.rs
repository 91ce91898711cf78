//! Presence: the normalized model, the store (in memory, journaled or on
//! Redis) and the change log.
//!
//! Providers hand the store a [`PresenceUpdate`]; the store decides whether it
//! is new, a duplicate or stale, and publishes every visible change to the
//! [`changes::ChangeLog`]. Nothing here knows about HTTP or about providers.

pub mod changes;
pub mod codec;
mod dedup;
pub mod journal;
pub mod model;
pub mod records;
pub mod redis;
mod shard;
pub mod snapshot;
pub mod store;

use std::borrow::Cow;

pub use changes::{Change, ChangeLog, Event};
pub use model::{Availability, CallState, Decider, Millis, PersonRecord, Presence, PresenceRecord};
pub use records::Records;
pub use store::{ApplyOutcome, Cursor, Page, Store, StoreError};

/// One normalized presence change for one principal, as a provider parsed it.
///
/// Fields borrow from the request body where they can, so a notification that
/// turns out to be a duplicate or stale costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceUpdate<'a> {
    pub principal: Cow<'a, str>,
    pub availability: Availability,
    pub activity: Option<Cow<'a, str>>,
    pub status_text: Option<Cow<'a, str>>,
    pub raw_status: Option<Cow<'a, str>>,
    /// The provider's own timestamp, when it sends one.
    pub observed_at: Option<Millis>,
    /// The provider's event id (Mitel `eventId`, `webhook-id`, ...), the key
    /// for duplicate detection.
    pub event_id: Option<Cow<'a, str>>,
}

/// A change in one of a principal's calls, as a provider parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallUpdate<'a> {
    pub principal: Cow<'a, str>,
    /// The provider's id of the call (the same for both parties).
    pub call_id: Cow<'a, str>,
    /// The call's new state, or `None` when it ended.
    pub state: Option<CallState>,
    /// The provider's own timestamp, when it sends one.
    pub observed_at: Option<Millis>,
}
