//! Current presence per `(source, principal)`, in memory: the truth of the
//! memory backend and the local mirror of the Redis one.
//!
//! Each source has a fixed number of shards, each an insertion-ordered table
//! behind its own `RwLock`, so writers for different principals rarely meet and
//! pages can be read in a stable order with an O(limit) cursor (the layout is
//! in [`super::shard`]). Locks are held only for map operations: never across
//! an `.await`, never while parsing.
//!
//! Applying an update decides, in this order: duplicate (provider event id seen
//! within the dedup window), stale (older `observed_at` than stored), silent
//! refresh (nothing a consumer sees changed), or change (new `seq`, published
//! through the [`ChangeLog`]). With a [`Journal`], every write is also
//! appended to it while the shard lock is held, so the journal keeps each
//! principal's writes in order (and changes in `seq` order: they are
//! appended under the change log's lock).

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use foldhash::quality::RandomState;
use parking_lot::RwLock;

use super::changes::ChangeLog;
use super::codec::{Entry, RecordEntry};
use super::dedup::Dedup;
use super::journal::Journal;
use super::model::Calls;
use super::model::{Availability, Millis, Presence, PresenceRecord};
use super::shard::Shard;
use super::{CallUpdate, PresenceUpdate};

/// Shards per source: a power of two, enough to keep two to a few dozen cores
/// from queueing on one lock.
const SHARDS: usize = 16;

/// The most calls kept active per principal; a new one beyond them forgets
/// the oldest (whose end was most likely missed).
pub const MAX_ACTIVE_CALLS: usize = 16;

/// What applying an update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// A visible change, published with this `seq`.
    Changed(u64),
    /// Same content as stored: `observed_at` refreshed, nothing published.
    Refreshed,
    /// The event id was seen within the dedup window.
    Duplicate,
    /// Older than what is stored.
    Stale,
    /// Not kept: a new principal while the store holds its maximum number
    /// of records ([`Records::set_max_records`]); nothing of the event was
    /// written or remembered. The store answers it as
    /// [`super::StoreError::Full`].
    Full,
}

/// Sizing of the store, from `[store]`.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub history: usize,
    pub dedup_window_ms: i64,
    pub dedup_capacity: usize,
    /// Changes a stream consumer may fall behind (the fan-out ring).
    pub stream_buffer: usize,
    /// How far ahead of the clock a provider timestamp is still trusted.
    pub max_future_skew_ms: i64,
}

/// Current presence of every principal of every source.
pub struct Records {
    sources: Box<[SourceStore]>,
    limits: StoreLimits,
    changes: ChangeLog,
    /// Keys for shard selection and event-id digests: unpredictable per process,
    /// so nobody can aim many principals at one shard or forge digest collisions.
    /// (Nothing persisted depends on them: the journal keeps ids, not digests.)
    hash_a: RandomState,
    hash_b: RandomState,
    /// Records held, all sources together.
    count: AtomicUsize,
    /// The most records held before new principals are refused; 0: no limit.
    max_records: usize,
}

struct SourceStore {
    id: Arc<str>,
    shards: Box<[RwLock<Shard>]>,
    dedup: Dedup,
}

/// A position in the stable listing order: source (by index), shard, entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub source: usize,
    pub shard: usize,
    pub index: usize,
}

/// Where one record sits: its source, shard and position in the shard,
/// packed in 8 bytes (a snapshot of a million records keeps a million of
/// them). Records are never removed or moved, so a slot names the same
/// record for the life of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(u64);

impl Slot {
    const INDEX_BITS: u32 = 40;
    const SHARD_BITS: u32 = 8;

    fn new(source: usize, shard: usize, index: usize) -> Self {
        // Sources come from the configuration (far fewer than 2^16) and a
        // shard holds far fewer than 2^40 records.
        debug_assert!(source < 1 << 16 && shard < SHARDS && index < 1 << Self::INDEX_BITS);
        Slot(
            ((source as u64) << (Self::INDEX_BITS + Self::SHARD_BITS))
                | ((shard as u64) << Self::INDEX_BITS)
                | index as u64,
        )
    }

    /// The index of the record's source.
    pub fn source(self) -> usize {
        self.parts().0
    }

    fn parts(self) -> (usize, usize, usize) {
        let source = self.0 >> (Self::INDEX_BITS + Self::SHARD_BITS);
        let shard = (self.0 >> Self::INDEX_BITS) & ((1 << Self::SHARD_BITS) - 1);
        let index = self.0 & ((1 << Self::INDEX_BITS) - 1);
        (source as usize, shard as usize, index as usize)
    }
}

/// One page of records.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<PresenceRecord>,
    /// Where the next page starts, or `None` when the listing is complete.
    pub next: Option<Cursor>,
}

impl Records {
    /// A store for the given source ids (their index is the source handle).
    pub fn new(source_ids: &[Arc<str>], limits: StoreLimits) -> Self {
        let sources = source_ids
            .iter()
            .map(|id| SourceStore {
                id: Arc::clone(id),
                shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
                dedup: Dedup::new(limits.dedup_window_ms, limits.dedup_capacity),
            })
            .collect();
        Records {
            sources,
            limits,
            changes: ChangeLog::new(limits.history, limits.stream_buffer),
            hash_a: RandomState::default(),
            hash_b: RandomState::default(),
            count: AtomicUsize::new(0),
            max_records: 0,
        }
    }

    /// Refuses new principals once `max` records are held, all sources
    /// together (`store.max_records`; 0: no limit). Known principals are
    /// always updated, and records loaded or replicated are always taken.
    pub fn set_max_records(&mut self, max: usize) {
        self.max_records = max;
    }

    /// The most records held before new principals are refused (0: no limit).
    pub fn max_records(&self) -> usize {
        self.max_records
    }

    /// Records held, all sources together (without taking a lock).
    pub fn record_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether a new principal would be taken now.
    pub fn has_room(&self) -> bool {
        self.max_records == 0 || self.record_count() < self.max_records
    }

    /// Takes the place of one new record; false when the store is full. Two
    /// writers in different shards cannot both take the last place.
    fn reserve(&self) -> bool {
        if self.max_records == 0 {
            self.count.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_records).then_some(n + 1)
            })
            .is_ok()
    }

    /// The change log every applied change is published to.
    pub fn changes(&self) -> &ChangeLog {
        &self.changes
    }

    /// The sizing it was made with.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Number of sources the store was built for.
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// The index of the source with this id.
    pub fn source_index(&self, id: &str) -> Option<usize> {
        self.sources.iter().position(|s| &*s.id == id)
    }

    /// The id of the source with this index.
    pub fn source_id(&self, source: usize) -> Option<&Arc<str>> {
        self.sources.get(source).map(|s| &s.id)
    }

    /// The principal's hash and shard. The shard comes from the top bits;
    /// the shard's index uses the low bits for the slot and the high half
    /// as its tag.
    fn locate(&self, principal: &str) -> (u64, usize) {
        let hash = self.hash_a.hash_one(principal);
        (hash, (hash >> (64 - SHARDS.trailing_zeros())) as usize)
    }

    /// Applies one update for the source with index `source`, journaling
    /// nothing.
    ///
    /// # Panics
    /// If `source` is not an index given to [`Records::new`] (a programming error).
    pub fn apply(
        &self,
        source: usize,
        update: &PresenceUpdate<'_>,
        received_at: Millis,
    ) -> ApplyOutcome {
        self.apply_with(source, update, received_at, None)
    }

    /// [`Records::apply_call`], journaling nothing.
    pub fn apply_call(
        &self,
        source: usize,
        update: &CallUpdate<'_>,
        received_at: Millis,
    ) -> ApplyOutcome {
        self.apply_call_with(source, update, received_at, None)
    }

    /// Applies one update and appends what it wrote to `journal`.
    pub fn apply_with(
        &self,
        source: usize,
        update: &PresenceUpdate<'_>,
        received_at: Millis,
        journal: Option<&Journal>,
    ) -> ApplyOutcome {
        let src = &self.sources[source];
        let event_id = update.event_id.as_deref().filter(|_| src.dedup.enabled());
        let event_digest = event_id.map(|id| (self.hash_a.hash_one(id), self.hash_b.hash_one(id)));

        let (hash, shard_no) = self.locate(&update.principal);
        let mut guard = src.shards[shard_no].write();
        let shard = &mut *guard;
        // Under the shard lock, so retries of one principal's event are
        // decided one after the other. The dedup bucket is read first and
        // checked after the index lookup: two independent cache misses,
        // which the CPU then waits for together.
        let probe =
            event_digest.map(|(bucket, fingerprint)| (src.dedup.probe(bucket), fingerprint));
        let found = shard.find(hash, &update.principal);
        // A new principal takes its place before anything of the event is
        // remembered: refused, its id must not make the retry a duplicate.
        if found.is_none() && !self.reserve() {
            return ApplyOutcome::Full;
        }
        if let Some((probe, fingerprint)) = probe
            && probe.seen(&src.dedup, fingerprint, received_at.0)
        {
            if found.is_none() {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            return ApplyOutcome::Duplicate;
        }
        // The id is remembered from here on, whatever the outcome: so is it
        // after a restart.
        if let (Some(journal), Some(id)) = (journal, event_id) {
            journal.append(&Entry::EventId {
                source: &src.id,
                id,
                at: received_at,
            });
        }
        let words = &mut shard.words;
        let hasher = &self.hash_a;
        let mut share =
            |have: Option<&Arc<str>>, want: Option<&str>| words.share(have, want, hasher);
        let position = match found {
            Some(position) => {
                let current = &mut shard.entries[position].presence;
                let before = current.availability;
                match update_record(current, update, received_at, &mut share) {
                    Step::Stale => return ApplyOutcome::Stale,
                    Step::Refreshed => {
                        if let Some(journal) = journal {
                            journal.append(&record_entry(
                                &src.id,
                                &update.principal,
                                current,
                                false,
                            ));
                        }
                        return ApplyOutcome::Refreshed;
                    }
                    Step::Changed => {
                        shard.tally.moved(before, current.availability);
                        position
                    }
                }
            }
            None => {
                let presence = new_record(update, received_at, &mut share);
                shard.push(hash, &update.principal, presence, hasher)
            }
        };
        self.publish(
            &src.id,
            &mut shard.entries[position].presence,
            &update.principal,
            journal,
        )
    }

    /// Applies a change of one of a principal's calls (see
    /// [`super::model::Calls`]): a principal with an active call shows the
    /// latest call's state as its activity, and returns to its previous
    /// activity when its last call ends.
    ///
    /// Providers post call objects more than once (both parties, geo
    /// duplicates, updates of a known call); applying the same state twice
    /// changes nothing, so no event id is needed. A principal first seen in
    /// a call gets a record with availability `unknown`. Call events are not
    /// checked for staleness and do not move `observed_at`, which orders
    /// presence events only.
    pub fn apply_call_with(
        &self,
        source: usize,
        update: &CallUpdate<'_>,
        received_at: Millis,
        journal: Option<&Journal>,
    ) -> ApplyOutcome {
        let src = &self.sources[source];
        let (hash, shard_no) = self.locate(&update.principal);
        let mut guard = src.shards[shard_no].write();
        let shard = &mut *guard;
        let position = match (shard.find(hash, &update.principal), update.state) {
            (Some(position), _) => position,
            // The end of a call never seen: nothing to show.
            (None, None) => return ApplyOutcome::Refreshed,
            (None, Some(_)) => {
                if !self.reserve() {
                    return ApplyOutcome::Full;
                }
                let presence = new_call_record(update, received_at);
                shard.push(hash, &update.principal, presence, &self.hash_a)
            }
        };
        let words = &mut shard.words;
        let hasher = &self.hash_a;
        let mut share =
            |have: Option<&Arc<str>>, want: Option<&str>| words.share(have, want, hasher);
        let current = &mut shard.entries[position].presence;
        let before = current.availability;
        let step = update_call(current, update, received_at, &mut share);
        shard.tally.moved(before, current.availability);
        match step {
            Step::Changed => self.publish(&src.id, current, &update.principal, journal),
            _ => {
                if let Some(journal) = journal {
                    journal.append(&record_entry(&src.id, &update.principal, current, false));
                }
                ApplyOutcome::Refreshed
            }
        }
    }

    /// Gives a changed record its `seq` and publishes it (and journals it,
    /// under the change log's lock, so changes reach the journal in `seq`
    /// order).
    fn publish(
        &self,
        source: &Arc<str>,
        presence: &mut Presence,
        principal: &str,
        journal: Option<&Journal>,
    ) -> ApplyOutcome {
        let seq = self.changes.commit(|seq| {
            presence.seq = seq;
            if let Some(journal) = journal {
                journal.append(&record_entry(source, principal, presence, true));
            }
            PresenceRecord::new(source, principal, presence)
        });
        ApplyOutcome::Changed(seq)
    }

    /// Sets a record to `presence` as it was persisted or replicated
    /// (nothing is published). Returns false for an unknown source.
    pub fn install(&self, source: usize, principal: &str, presence: Presence) -> bool {
        let Some(src) = self.sources.get(source) else {
            return false;
        };
        let (hash, shard_no) = self.locate(principal);
        let mut shard = src.shards[shard_no].write();
        let shard = &mut *shard;
        let presence = Presence {
            activity: shard
                .words
                .share(None, presence.activity.as_deref(), &self.hash_a),
            raw_status: shard
                .words
                .share(None, presence.raw_status.as_deref(), &self.hash_a),
            status_text: shard
                .words
                .share(None, presence.status_text.as_deref(), &self.hash_a),
            ..presence
        };
        match shard.find(hash, principal) {
            Some(position) => {
                let current = &mut shard.entries[position].presence;
                shard
                    .tally
                    .moved(current.availability, presence.availability);
                *current = presence;
            }
            None => {
                self.count.fetch_add(1, Ordering::Relaxed);
                shard.push(hash, principal, presence, &self.hash_a);
            }
        }
        true
    }

    /// Sets a record to a replicated copy unless the record already holds
    /// the same or a newer revision (copies arrive from more than one path:
    /// the replica's own write, the change feed, a backfill). Returns
    /// whether it was installed.
    pub fn install_newer(&self, source: usize, principal: &str, presence: Presence) -> bool {
        let Some(src) = self.sources.get(source) else {
            return false;
        };
        let (hash, shard_no) = self.locate(principal);
        {
            let shard = src.shards[shard_no].read();
            if let Some(position) = shard.find(hash, principal) {
                let current = &shard.entries[position].presence;
                if current.rev >= presence.rev && current.seq >= presence.seq {
                    return false;
                }
            }
        }
        self.install(source, principal, presence)
    }

    /// Remembers a provider event id seen at `at` (restored from disk).
    pub fn remember_event(&self, source: usize, id: &str, at: Millis) {
        let Some(src) = self.sources.get(source) else {
            return;
        };
        if src.dedup.enabled() {
            let probe = src.dedup.probe(self.hash_a.hash_one(id));
            probe.seen(&src.dedup, self.hash_b.hash_one(id), at.0);
        }
    }

    /// Calls `f` with every record of every source (under each shard's read
    /// lock in turn; `f` must be quick).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<str>, &str, &Presence)) {
        for src in self.sources.iter() {
            for shard in src.shards.iter() {
                for entry in &shard.read().entries {
                    f(&src.id, entry.key.as_str(), &entry.presence);
                }
            }
        }
    }

    /// The record of one principal, if any.
    pub fn get(&self, source: usize, principal: &str) -> Option<PresenceRecord> {
        let src = self.sources.get(source)?;
        let (hash, shard_no) = self.locate(principal);
        let shard = src.shards[shard_no].read();
        let entry = &shard.entries[shard.find(hash, principal)?];
        Some(PresenceRecord::new(&src.id, principal, &entry.presence))
    }

    /// A copy of one principal's state, if any (for backends that decide a
    /// write away from the shard lock).
    pub fn get_presence(&self, source: usize, principal: &str) -> Option<Presence> {
        let src = self.sources.get(source)?;
        let (hash, shard_no) = self.locate(principal);
        let shard = src.shards[shard_no].read();
        let position = shard.find(hash, principal)?;
        Some(shard.entries[position].presence.clone())
    }

    /// Number of records of one source.
    pub fn len(&self, source: usize) -> usize {
        self.sources
            .get(source)
            .map_or(0, |s| s.shards.iter().map(|sh| sh.read().len()).sum())
    }

    /// Number of records of all sources.
    pub fn total_len(&self) -> usize {
        (0..self.sources.len()).map(|s| self.len(s)).sum()
    }

    /// Whether the store holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.total_len() == 0
    }

    /// Reads up to `limit` records of the given sources (in that order),
    /// starting at `from`, keeping those `filter` accepts.
    ///
    /// The order is stable between pages: records added meanwhile appear at the
    /// end of their shard and are not skipped.
    pub fn page(
        &self,
        sources: &[usize],
        from: Option<Cursor>,
        limit: usize,
        filter: impl Fn(&Presence) -> bool,
    ) -> Page {
        let mut items = Vec::with_capacity(limit.min(1024));
        let start = from.unwrap_or(Cursor {
            source: sources.first().copied().unwrap_or(0),
            shard: 0,
            index: 0,
        });
        let Some(first) = sources.iter().position(|&s| s == start.source) else {
            return Page { items, next: None };
        };
        for (pos, &source) in sources.iter().enumerate().skip(first) {
            let Some(src) = self.sources.get(source) else {
                continue;
            };
            let first_shard = if pos == first { start.shard } else { 0 };
            for shard_no in first_shard..SHARDS {
                let shard = src.shards[shard_no].read();
                let mut index = if pos == first && shard_no == start.shard {
                    start.index
                } else {
                    0
                };
                while let Some(entry) = shard.entries.get(index) {
                    index += 1;
                    if !filter(&entry.presence) {
                        continue;
                    }
                    items.push(PresenceRecord::new(
                        &src.id,
                        entry.key.as_str(),
                        &entry.presence,
                    ));
                    if items.len() == limit {
                        let next = Cursor {
                            source,
                            shard: shard_no,
                            index,
                        };
                        drop(shard);
                        let more = self.has_records_at_or_after(sources, pos, next);
                        return Page {
                            items,
                            next: more.then_some(next),
                        };
                    }
                }
            }
        }
        Page { items, next: None }
    }

    /// Reads the `seq` and [`Slot`] of up to `limit` records of one shard,
    /// from `from` on, into `out` (those with `seq <= upto`); returns where
    /// the next read starts, or `None` after the last shard of the last
    /// source. The shard's read lock is held for this one read only, so a
    /// writer waits for at most `limit` entries (see
    /// [`super::snapshot`]).
    pub fn seq_page(
        &self,
        from: Cursor,
        limit: usize,
        upto: u64,
        out: &mut Vec<(u64, Slot)>,
    ) -> Option<Cursor> {
        let src = self.sources.get(from.source)?;
        let end = {
            let shard = src.shards.get(from.shard)?.read();
            let end = shard.entries.len().min(from.index.saturating_add(limit));
            for index in from.index..end {
                if let Some(entry) = shard.entries.get(index)
                    && entry.presence.seq <= upto
                {
                    out.push((
                        entry.presence.seq,
                        Slot::new(from.source, from.shard, index),
                    ));
                }
            }
            (end < shard.entries.len()).then_some(end)
        };
        let next = match end {
            Some(index) => Cursor { index, ..from },
            None if from.shard + 1 < SHARDS => Cursor {
                shard: from.shard + 1,
                index: 0,
                ..from
            },
            None if from.source + 1 < self.sources.len() => Cursor {
                source: from.source + 1,
                shard: 0,
                index: 0,
            },
            None => return None,
        };
        Some(next)
    }

    /// The record at `slot`, if it still has this `seq` (it has not
    /// changed since).
    pub fn at_slot(&self, slot: Slot, seq: u64) -> Option<PresenceRecord> {
        let (source, shard, index) = slot.parts();
        let src = self.sources.get(source)?;
        let shard = src.shards.get(shard)?.read();
        let entry = shard.entries.get(index)?;
        (entry.presence.seq == seq)
            .then(|| PresenceRecord::new(&src.id, entry.key.as_str(), &entry.presence))
    }

    fn has_records_at_or_after(&self, sources: &[usize], pos: usize, at: Cursor) -> bool {
        sources.iter().enumerate().skip(pos).any(|(p, &source)| {
            self.sources.get(source).is_some_and(|src| {
                src.shards.iter().enumerate().any(|(n, shard)| {
                    let len = shard.read().len();
                    match (p == pos, n.cmp(&at.shard)) {
                        (true, std::cmp::Ordering::Less) => false,
                        (true, std::cmp::Ordering::Equal) => len > at.index,
                        _ => len > 0,
                    }
                })
            })
        })
    }

    /// Counts records per availability for one source (`/metrics`,
    /// `/v1/sources`), indexed by `Availability as usize`: from the shards'
    /// tallies, so the cost does not grow with the number of records.
    pub fn availability_counts(&self, source: usize) -> [u64; Availability::ALL.len()] {
        let mut counts = [0u64; Availability::ALL.len()];
        if let Some(src) = self.sources.get(source) {
            for shard in src.shards.iter() {
                let tally = *shard.read().tally.counts();
                for (sum, n) in counts.iter_mut().zip(tally) {
                    *sum += n;
                }
            }
        }
        counts
    }
}

/// What an update does to a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Older than the record: nothing changed.
    Stale,
    /// Timestamps (and the raw word, or a call's bookkeeping) changed,
    /// nothing a consumer sees.
    Refreshed,
    /// A visible change: it needs a new `seq`.
    Changed,
}

/// Shares a text with what a record already holds, or makes it (see
/// [`super::shard::Words`]).
pub(crate) type Share<'a> = dyn FnMut(Option<&Arc<str>>, Option<&str>) -> Option<Arc<str>> + 'a;

/// The rules of a presence update, applied to `current` in place (which is
/// left as it was when the update is stale). Both backends decide with this.
pub(crate) fn update_record(
    current: &mut Presence,
    update: &PresenceUpdate<'_>,
    received_at: Millis,
    share: &mut Share<'_>,
) -> Step {
    let observed_at = update.observed_at.unwrap_or(received_at);
    // Only presence events order presence events: a record made by a call
    // has nothing to be stale against yet.
    if current.reported && observed_at < current.observed_at {
        return Step::Stale;
    }
    let activity = update.activity.as_deref();
    let status_text = update.status_text.as_deref();
    let raw_status = share(current.raw_status.as_ref(), update.raw_status.as_deref());
    // During a call the record shows the call; the reported activity is
    // what it returns to afterwards.
    let shown_activity = match current.calls.as_deref_mut() {
        Some(calls) => {
            calls.previous = share(calls.previous.as_ref(), activity);
            current.activity.clone()
        }
        None => share(current.activity.as_ref(), activity),
    };
    current.observed_at = observed_at;
    current.received_at = received_at;
    current.raw_status = raw_status;
    current.reported = true;
    if current.same_content(update.availability, shown_activity.as_deref(), status_text) {
        return Step::Refreshed;
    }
    current.availability = update.availability;
    current.activity = shown_activity;
    current.status_text = share(current.status_text.as_ref(), status_text);
    Step::Changed
}

/// The record a principal's first presence update makes.
pub(crate) fn new_record(
    update: &PresenceUpdate<'_>,
    received_at: Millis,
    share: &mut Share<'_>,
) -> Presence {
    Presence {
        availability: update.availability,
        activity: share(None, update.activity.as_deref()),
        status_text: share(None, update.status_text.as_deref()),
        raw_status: share(None, update.raw_status.as_deref()),
        observed_at: update.observed_at.unwrap_or(received_at),
        received_at,
        seq: 0,
        calls: None,
        reported: true,
        rev: 0,
    }
}

/// The record a principal first seen in a call gets: availability
/// `unknown`, and the call applied to it by [`update_call`].
pub(crate) fn new_call_record(update: &CallUpdate<'_>, received_at: Millis) -> Presence {
    Presence {
        availability: Availability::Unknown,
        activity: None,
        status_text: None,
        raw_status: None,
        observed_at: update.observed_at.unwrap_or(received_at),
        received_at,
        seq: 0,
        calls: None,
        reported: false,
        rev: 0,
    }
}

/// The rules of a call update, applied to `current` in place: never stale;
/// [`Step::Changed`] when the shown activity changed.
pub(crate) fn update_call(
    current: &mut Presence,
    update: &CallUpdate<'_>,
    received_at: Millis,
    share: &mut Share<'_>,
) -> Step {
    let calls = current.calls.get_or_insert_with(|| {
        Box::new(Calls {
            active: Vec::new(),
            previous: current.activity.clone(),
        })
    });
    let call = &*update.call_id;
    let known = calls.active.iter().position(|(id, _)| **id == *call);
    match (known, update.state) {
        (Some(i), Some(state)) => calls.active[i].1 = state,
        (None, Some(state)) => {
            // A call whose end never came (a missed post) must not stay
            // forever, nor let one principal's record grow without bound.
            if calls.active.len() >= MAX_ACTIVE_CALLS {
                calls.active.remove(0);
            }
            calls.active.push((call.into(), state));
        }
        (Some(i), None) => {
            calls.active.remove(i);
        }
        (None, None) => {}
    }
    let shown = match calls.active.last() {
        Some((_, state)) => share(current.activity.as_ref(), Some(state.activity())),
        None => calls.previous.take(),
    };
    if calls.active.is_empty() {
        current.calls = None;
    }
    current.received_at = received_at;
    if current.activity == shown {
        return Step::Refreshed;
    }
    current.activity = shown;
    Step::Changed
}

/// The journal entry of a record's current state.
fn record_entry<'a>(
    source: &'a str,
    principal: &'a str,
    presence: &'a Presence,
    change: bool,
) -> Entry<'a> {
    Entry::Record(RecordEntry {
        source,
        principal,
        change,
        presence: std::borrow::Cow::Borrowed(presence),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::CallState;
    use std::borrow::Cow;

    fn limits() -> StoreLimits {
        StoreLimits {
            history: 16,
            dedup_window_ms: 1_000,
            dedup_capacity: 100,
            stream_buffer: 64,
            max_future_skew_ms: 300_000,
        }
    }

    fn update<'a>(principal: &'a str, availability: Availability, at: i64) -> PresenceUpdate<'a> {
        PresenceUpdate {
            principal: Cow::Borrowed(principal),
            availability,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Some(Millis(at)),
            event_id: None,
        }
    }

    fn store() -> Records {
        Records::new(&[Arc::from("a"), Arc::from("b")], limits())
    }

    #[test]
    fn applies_refreshes_and_rejects_stale() {
        let s = store();
        let now = Millis(10_000);
        assert_eq!(
            s.apply(0, &update("p", Availability::Busy, 100), now),
            ApplyOutcome::Changed(1)
        );
        assert_eq!(
            s.apply(0, &update("p", Availability::Busy, 200), now),
            ApplyOutcome::Refreshed
        );
        assert_eq!(s.get(0, "p").unwrap().observed_at, Millis(200));
        assert_eq!(s.get(0, "p").unwrap().seq, 1);
        assert_eq!(
            s.apply(0, &update("p", Availability::Away, 150), now),
            ApplyOutcome::Stale
        );
        assert_eq!(s.get(0, "p").unwrap().availability, Availability::Busy);
        // Same observed_at, different content: last writer wins.
        assert_eq!(
            s.apply(0, &update("p", Availability::Away, 200), now),
            ApplyOutcome::Changed(2)
        );
        assert_eq!(s.get(0, "p").unwrap().seq, 2);
        assert!(s.get(1, "p").is_none());
        assert_eq!(s.changes().last_seq(), 2);
    }

    #[test]
    fn duplicates_are_detected_within_the_window() {
        let s = store();
        let mut u = update("p", Availability::Busy, 100);
        u.event_id = Some(Cow::Borrowed("e1"));
        assert_eq!(s.apply(0, &u, Millis(0)), ApplyOutcome::Changed(1));
        assert_eq!(s.apply(0, &u, Millis(500)), ApplyOutcome::Duplicate);
        // Another source has its own ids.
        assert_eq!(s.apply(1, &u, Millis(500)), ApplyOutcome::Changed(2));
        // Still remembered at the end of the window.
        assert_eq!(s.apply(0, &u, Millis(999)), ApplyOutcome::Duplicate);
        // Two windows later the id is forgotten; the same content is a refresh.
        assert_eq!(s.apply(0, &u, Millis(2_001)), ApplyOutcome::Refreshed);
    }

    /// Every id is remembered however its event turned out, so retries are
    /// duplicates in any order, also when a newer event came in between
    /// (whose timestamp would otherwise make the retry merely stale, or,
    /// with a redelivery that carries a new timestamp, applied again).
    #[test]
    fn retries_are_duplicates_in_any_order() {
        let s = store();
        let event = |availability, at, id| {
            let mut u = update("p", availability, at);
            u.event_id = Some(Cow::Borrowed(id));
            u
        };
        let first = event(Availability::Busy, 100, "e1");
        let second = event(Availability::Away, 200, "e2");
        let third = event(Availability::Away, 300, "e3"); // a refresh
        assert_eq!(s.apply(0, &first, Millis(0)), ApplyOutcome::Changed(1));
        assert_eq!(s.apply(0, &second, Millis(1)), ApplyOutcome::Changed(2));
        assert_eq!(s.apply(0, &third, Millis(2)), ApplyOutcome::Refreshed);
        // Retries, newest first and oldest last: duplicates, not stale.
        for retry in [&third, &second, &first] {
            assert_eq!(s.apply(0, retry, Millis(3)), ApplyOutcome::Duplicate);
        }
        // A redelivery of the first event stamped later than everything since.
        let restamped = event(Availability::Busy, 400, "e1");
        assert_eq!(s.apply(0, &restamped, Millis(3)), ApplyOutcome::Duplicate);
        assert_eq!(s.get(0, "p").unwrap().availability, Availability::Away);
        // Without a provider timestamp.
        let mut untimed = event(Availability::Busy, 0, "e4");
        untimed.observed_at = None;
        assert_eq!(s.apply(0, &untimed, Millis(400)), ApplyOutcome::Changed(3));
        assert_eq!(s.apply(0, &untimed, Millis(401)), ApplyOutcome::Duplicate);
        assert_eq!(s.get(0, "p").unwrap().seq, 3);
        // A record made by a call.
        let c = call("q", "c1", Some(CallState::Ringing));
        assert!(matches!(
            s.apply_call(0, &c, Millis(6)),
            ApplyOutcome::Changed(_)
        ));
        let mut q = event(Availability::Busy, 50, "e5");
        q.principal = Cow::Borrowed("q");
        assert!(matches!(
            s.apply(0, &q, Millis(7)),
            ApplyOutcome::Changed(_)
        ));
        assert_eq!(s.apply(0, &q, Millis(8)), ApplyOutcome::Duplicate);
    }

    fn call<'a>(principal: &'a str, id: &'a str, state: Option<CallState>) -> CallUpdate<'a> {
        CallUpdate {
            principal: Cow::Borrowed(principal),
            call_id: Cow::Borrowed(id),
            state,
            observed_at: None,
        }
    }

    #[test]
    fn new_principals_beyond_max_records_are_refused_and_known_ones_still_update() {
        let mut s = store();
        s.set_max_records(2);
        let now = Millis(10_000);
        assert_eq!(
            s.apply(0, &update("a", Availability::Busy, 1), now),
            ApplyOutcome::Changed(1)
        );
        // The limit is for all sources together.
        assert_eq!(
            s.apply(1, &update("b", Availability::Busy, 1), now),
            ApplyOutcome::Changed(2)
        );
        let mut c = update("c", Availability::Busy, 1);
        c.event_id = Some(Cow::Borrowed("event-c"));
        assert_eq!(s.apply(0, &c, now), ApplyOutcome::Full);
        let ringing = call("c", "call-1", Some(CallState::Ringing));
        assert_eq!(s.apply_call(0, &ringing, now), ApplyOutcome::Full);
        assert_eq!(
            s.apply(0, &update("a", Availability::Away, 2), now),
            ApplyOutcome::Changed(3)
        );
        let ringing_a = call("a", "call-2", Some(CallState::Ringing));
        assert_eq!(s.apply_call(0, &ringing_a, now), ApplyOutcome::Changed(4));
        assert_eq!((s.record_count(), s.total_len()), (2, 2));
        assert!(s.get(0, "c").is_none() && !s.has_room());
        // Raised: the refused event was not remembered, so its retry is
        // applied, not taken for a duplicate.
        s.set_max_records(3);
        assert_eq!(s.apply(0, &c, now), ApplyOutcome::Changed(5));
        assert_eq!(s.record_count(), 3);
    }

    #[test]
    fn concurrent_new_principals_never_pass_max_records() {
        let mut s = Records::new(&[Arc::from("a")], limits());
        s.set_max_records(500);
        let names: Vec<String> = (0..2_000).map(|i| format!("p{i}")).collect();
        let now = Millis(10_000);
        std::thread::scope(|scope| {
            for chunk in names.chunks(250) {
                let s = &s;
                scope.spawn(move || {
                    for name in chunk {
                        s.apply(0, &update(name, Availability::Busy, 1), now);
                    }
                });
            }
        });
        assert_eq!((s.record_count(), s.total_len()), (500, 500));
        // Records loaded or replicated are always taken, and counted.
        let kept = s.page(&[0], None, 1, |_| true).items[0].principal.clone();
        let copy = s.get_presence(0, &kept).expect("a record");
        assert!(s.install(0, "installed", copy));
        assert_eq!(s.record_count(), 501);
    }

    #[test]
    fn a_principal_keeps_at_most_max_active_calls() {
        let s = store();
        let now = Millis(10_000);
        let ids: Vec<String> = (0..MAX_ACTIVE_CALLS + 5).map(|i| format!("c{i}")).collect();
        for id in &ids {
            s.apply_call(0, &call("p", id, Some(CallState::Connected)), now);
        }
        let calls = s.get_presence(0, "p").unwrap().calls.unwrap();
        let kept: Vec<&str> = calls.active.iter().map(|(id, _)| &**id).collect();
        let newest: Vec<&str> = ids[5..].iter().map(String::as_str).collect();
        assert_eq!(kept, newest, "the oldest are forgotten");
        // Ending the kept ones ends the calls.
        for id in &ids[5..] {
            s.apply_call(0, &call("p", id, None), now);
        }
        assert!(s.get_presence(0, "p").unwrap().calls.is_none());
        assert_eq!(s.get(0, "p").unwrap().activity, None);
    }

    #[test]
    fn calls_set_the_activity_until_the_last_one_ends() {
        let s = store();
        let now = Millis(10_000);
        let mut u = update("p", Availability::Available, 100);
        u.activity = Some(Cow::Borrowed("in_a_meeting"));
        assert_eq!(s.apply(0, &u, now), ApplyOutcome::Changed(1));
        let activity = |s: &Records| s.get(0, "p").unwrap().activity.map(|a| a.to_string());

        let connected = Some(CallState::Connected);
        assert_eq!(
            s.apply_call(0, &call("p", "c1", connected), now),
            ApplyOutcome::Changed(2)
        );
        assert_eq!(activity(&s).as_deref(), Some("in_a_call"));
        // The same call again (other party's post, geo duplicate): nothing.
        assert_eq!(
            s.apply_call(0, &call("p", "c1", connected), now),
            ApplyOutcome::Refreshed
        );
        // A second call that rings, then is held.
        assert_eq!(
            s.apply_call(0, &call("p", "c2", Some(CallState::Ringing)), now),
            ApplyOutcome::Changed(3)
        );
        assert_eq!(
            s.apply_call(0, &call("p", "c2", Some(CallState::Held)), now),
            ApplyOutcome::Changed(4)
        );
        assert_eq!(activity(&s).as_deref(), Some("on_hold"));
        // Presence during the call changes availability and what the
        // activity returns to, not the shown activity.
        let mut during = update("p", Availability::Busy, 200);
        during.activity = Some(Cow::Borrowed("presenting"));
        assert_eq!(s.apply(0, &during, now), ApplyOutcome::Changed(5));
        assert_eq!(activity(&s).as_deref(), Some("on_hold"));
        // The held call ends: back to the first call.
        assert_eq!(
            s.apply_call(0, &call("p", "c2", None), now),
            ApplyOutcome::Changed(6)
        );
        assert_eq!(activity(&s).as_deref(), Some("in_a_call"));
        // The last call ends: back to the latest reported activity.
        assert_eq!(
            s.apply_call(0, &call("p", "c1", None), now),
            ApplyOutcome::Changed(7)
        );
        assert_eq!(activity(&s).as_deref(), Some("presenting"));
        assert_eq!(s.get(0, "p").unwrap().availability, Availability::Busy);
        // Ending it again, or a call never seen, changes nothing.
        assert_eq!(
            s.apply_call(0, &call("p", "c1", None), now),
            ApplyOutcome::Refreshed
        );
        assert_eq!(
            s.apply_call(0, &call("q", "c9", None), now),
            ApplyOutcome::Refreshed
        );
        assert!(s.get(0, "q").is_none());
    }

    #[test]
    fn a_call_for_an_unknown_principal_creates_an_unknown_record() {
        let s = store();
        let out = s.apply_call(0, &call("new", "c1", Some(CallState::Connected)), Millis(5));
        assert_eq!(out, ApplyOutcome::Changed(1));
        let r = s.get(0, "new").unwrap();
        assert_eq!(r.availability, Availability::Unknown);
        assert_eq!(r.activity.as_deref(), Some("in_a_call"));
        assert_eq!(
            s.apply_call(0, &call("new", "c1", None), Millis(6)),
            ApplyOutcome::Changed(2)
        );
        assert_eq!(s.get(0, "new").unwrap().activity, None);
    }

    /// The tallies, checked against counting every record.
    fn counts(s: &Records, source: usize) -> [u64; Availability::ALL.len()] {
        let mut scanned = [0u64; Availability::ALL.len()];
        s.for_each(|id, _, p| {
            if s.source_index(id) == Some(source) {
                scanned[p.availability as usize] += 1;
            }
        });
        let tallied = s.availability_counts(source);
        assert_eq!(tallied, scanned, "tallies against a scan");
        tallied
    }

    fn count_of(s: &Records, source: usize, a: Availability) -> u64 {
        counts(s, source)[a as usize]
    }

    #[test]
    fn a_change_of_availability_moves_one_count() {
        use Availability::{Available, Away, Busy, Unknown};
        let s = store();
        s.apply(0, &update("p", Busy, 10), Millis(10));
        s.apply(0, &update("q", Busy, 10), Millis(10));
        s.apply(1, &update("p", Away, 10), Millis(10));
        assert_eq!(count_of(&s, 0, Busy), 2);
        assert_eq!(count_of(&s, 1, Away), 1);
        s.apply(0, &update("p", Available, 20), Millis(20));
        let c = counts(&s, 0);
        assert_eq!((c[Busy as usize], c[Available as usize]), (1, 1));
        assert_eq!(c.iter().sum::<u64>(), 2);
        // Stale, refreshed, or only the text changed: nothing moves.
        s.apply(0, &update("p", Away, 5), Millis(21));
        s.apply(0, &update("p", Available, 30), Millis(30));
        let mut text = update("p", Available, 40);
        text.status_text = Some(Cow::Borrowed("back soon"));
        s.apply(0, &text, Millis(40));
        assert_eq!(counts(&s, 0), c);
        // A call on a new principal makes an unknown record; on a known one
        // it changes the activity, not the availability.
        s.apply_call(0, &call("r", "c1", Some(CallState::Connected)), Millis(50));
        s.apply_call(0, &call("q", "c2", Some(CallState::Connected)), Millis(50));
        let c = counts(&s, 0);
        assert_eq!((c[Unknown as usize], c[Busy as usize]), (1, 1));
        s.apply(0, &update("r", Away, 60), Millis(60));
        assert_eq!((count_of(&s, 0, Unknown), count_of(&s, 0, Away)), (0, 1));
        // Another source is its own.
        assert_eq!(counts(&s, 1).iter().sum::<u64>(), 1);
        assert_eq!(s.availability_counts(7), [0; Availability::ALL.len()]);
    }

    #[test]
    fn installed_records_move_counts_too() {
        // Loading a journal and the Redis mirror both install records.
        use Availability::{Away, Busy, Offline};
        let s = store();
        s.apply(0, &update("p", Busy, 10), Millis(10));
        let mut presence = s.get_presence(0, "p").unwrap();
        presence.availability = Offline;
        presence.rev = 1;
        assert!(s.install(0, "p", presence.clone()));
        assert_eq!((count_of(&s, 0, Busy), count_of(&s, 0, Offline)), (0, 1));
        // The same revision again changes nothing; a new one moves it.
        assert!(!s.install_newer(0, "p", presence.clone()));
        presence.availability = Away;
        presence.rev = 2;
        assert!(s.install_newer(0, "p", presence.clone()));
        assert!(s.install(0, "new", presence));
        let c = counts(&s, 0);
        assert_eq!((c[Offline as usize], c[Away as usize]), (0, 2));
    }

    #[test]
    fn records_share_short_texts_and_copy_long_ones() {
        let s = store();
        let now = Millis(10_000);
        let long = "x".repeat(crate::presence::shard::Words::MAX_LEN + 1);
        for (i, p) in ["p1", "p2"].into_iter().enumerate() {
            let mut u = update(p, Availability::Busy, 100 + i as i64);
            u.raw_status = Some(Cow::Borrowed("Busy"));
            u.status_text = Some(Cow::Borrowed(&long));
            s.apply(0, &u, now);
        }
        let (a, b) = (s.get(0, "p1").unwrap(), s.get(0, "p2").unwrap());
        let (ra, rb) = (a.raw_status.unwrap(), b.raw_status.unwrap());
        assert_eq!(&*ra, "Busy");
        // Shared within a shard; each of the 16 shards has its own copy.
        let same_shard = s.locate("p1").1 == s.locate("p2").1;
        assert_eq!(Arc::ptr_eq(&ra, &rb), same_shard);
        let (la, lb) = (a.status_text.unwrap(), b.status_text.unwrap());
        assert_eq!(*la, *long);
        assert!(!Arc::ptr_eq(&la, &lb));
    }

    #[test]
    fn pages_are_stable_and_complete() {
        let s = store();
        for i in 0..50 {
            let p = format!("p{i:02}");
            s.apply(i % 2, &update(&p, Availability::Busy, 1), Millis(0));
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = s.page(&[0, 1], cursor, 7, |_| true);
            assert!(page.items.len() <= 7);
            seen.extend(page.items.iter().map(|r| r.principal.to_string()));
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 50);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 50);
        let only_b = s.page(&[1], None, 100, |_| true);
        assert_eq!(only_b.items.len(), 25);
        assert!(only_b.next.is_none());
    }

    #[test]
    fn exact_page_boundary_has_no_next_cursor() {
        let s = store();
        for i in 0..4 {
            s.apply(
                0,
                &update(&format!("p{i}"), Availability::Busy, 1),
                Millis(0),
            );
        }
        let page = s.page(&[0], None, 4, |_| true);
        assert_eq!(page.items.len(), 4);
        assert!(page.next.is_none());
    }
}
