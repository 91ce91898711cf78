//! The in-memory presence store: current presence per `(source, principal)`.
//!
//! Each source has a fixed number of shards, each an insertion-ordered table
//! behind its own `RwLock`, so writers for different principals rarely meet and
//! pages can be read in a stable order with an O(limit) cursor. A shard is a
//! `Vec` of entries plus a hash index of `u32` positions: the same idea as an
//! `IndexMap`, without a stored hash per entry and without reserving entry
//! space ahead of the index, which keeps a record near 100 bytes. Locks are held
//! only for map operations: never across an `.await`, never while parsing.
//!
//! Applying an update decides, in this order: duplicate (provider event id seen
//! within the dedup window), stale (older `observed_at` than stored), silent
//! refresh (nothing a consumer sees changed), or change (new `seq`, published
//! through the [`ChangeLog`]).

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::quality::RandomState;

use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};

use super::PresenceUpdate;
use super::changes::ChangeLog;
use super::model::{Availability, Millis, Presence, PresenceRecord};

/// Shards per source: a power of two, enough to keep two to a few dozen cores
/// from queueing on one lock.
const SHARDS: usize = 16;

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
}

/// Sizing of the store, from `[store]`.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub history: usize,
    pub dedup_window_ms: i64,
    pub dedup_capacity: usize,
}

/// Current presence of every principal of every source.
pub struct Store {
    sources: Box<[SourceStore]>,
    changes: ChangeLog,
    /// Keys for shard selection and event-id digests: unpredictable per process,
    /// so nobody can aim many principals at one shard or forge digest collisions.
    hash_a: RandomState,
    hash_b: RandomState,
}

/// The principals of one shard, in insertion order.
#[derive(Default)]
struct ShardMap {
    /// Positions in `entries`, by principal hash.
    index: HashTable<u32>,
    entries: Vec<(Arc<str>, Presence)>,
    /// The shard's shared texts (see [`Words`]).
    words: Words,
}

/// Shared copies of the short texts records hold (status words, activities,
/// common notes), so that storing `Busy` for the millionth principal, or
/// publishing its change, allocates nothing.
///
/// Bounded: at most [`Words::MAX`] texts of at most [`Words::MAX_LEN`] bytes
/// per shard; past that, texts get their own copy as usual. Kept per shard,
/// under the shard's lock, so there is no extra lock and no reference-count
/// traffic between shards.
#[derive(Default)]
struct Words {
    table: HashTable<Arc<str>>,
}

impl Words {
    const MAX: usize = 256;
    const MAX_LEN: usize = 64;

    /// `want` as a shared text: `have` when it is the same text, else the
    /// shard's copy (made on first use while there is room).
    fn share(
        &mut self,
        have: Option<&Arc<str>>,
        want: Option<&str>,
        hasher: &RandomState,
    ) -> Option<Arc<str>> {
        let want = want?;
        if let Some(have) = have.filter(|h| ***h == *want) {
            return Some(Arc::clone(have));
        }
        if want.len() > Self::MAX_LEN {
            return Some(Arc::from(want));
        }
        let hash = hasher.hash_one(want);
        if let Some(word) = self.table.find(hash, |w| **w == *want) {
            return Some(Arc::clone(word));
        }
        let word: Arc<str> = Arc::from(want);
        if self.table.len() < Self::MAX {
            self.table
                .insert_unique(hash, Arc::clone(&word), |w| hasher.hash_one(&**w));
        }
        Some(word)
    }
}

impl ShardMap {
    fn find(&self, hash: u64, principal: &str) -> Option<usize> {
        self.index
            .find(hash, |&i| &*self.entries[i as usize].0 == principal)
            .map(|&i| i as usize)
    }

    fn push(&mut self, hash: u64, principal: Arc<str>, presence: Presence, hasher: &RandomState) {
        // u32 positions: four billion principals per shard is not a limit
        // a single process reaches.
        let position = self.entries.len() as u32;
        self.entries.push((principal, presence));
        let entries = &self.entries;
        self.index.insert_unique(hash, position, |&i| {
            hasher.hash_one(&*entries[i as usize].0)
        });
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

type Shard = RwLock<ShardMap>;

struct SourceStore {
    id: Arc<str>,
    shards: Box<[Shard]>,
    dedup: Mutex<Dedup>,
}

/// A position in the stable listing order: source (by index), shard, entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub source: usize,
    pub shard: usize,
    pub index: usize,
}

/// One page of records.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<PresenceRecord>,
    /// Where the next page starts, or `None` when the listing is complete.
    pub next: Option<Cursor>,
}

impl Store {
    /// A store for the given source ids (their index is the source handle).
    pub fn new(source_ids: &[Arc<str>], limits: StoreLimits) -> Self {
        let sources = source_ids
            .iter()
            .map(|id| SourceStore {
                id: Arc::clone(id),
                shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
                dedup: Mutex::new(Dedup::new(limits.dedup_window_ms, limits.dedup_capacity)),
            })
            .collect();
        Store {
            sources,
            changes: ChangeLog::new(limits.history),
            hash_a: RandomState::default(),
            hash_b: RandomState::default(),
        }
    }

    /// The change log every applied change is published to.
    pub fn changes(&self) -> &ChangeLog {
        &self.changes
    }

    /// Number of sources the store was built for.
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// The principal's hash and shard. The shard comes from bits 32..36,
    /// which the hash table uses for neither its bucket nor its tag bits.
    fn locate(&self, principal: &str) -> (u64, usize) {
        let hash = self.hash_a.hash_one(principal);
        (hash, ((hash >> 32) as usize) & (SHARDS - 1))
    }

    /// Applies one update for the source with index `source`.
    ///
    /// # Panics
    /// If `source` is not an index given to [`Store::new`] (a programming error).
    pub fn apply(
        &self,
        source: usize,
        update: &PresenceUpdate<'_>,
        received_at: Millis,
    ) -> ApplyOutcome {
        let src = &self.sources[source];
        if let Some(event_id) = update.event_id.as_deref() {
            let digest = (u128::from(self.hash_a.hash_one(event_id)) << 64)
                | u128::from(self.hash_b.hash_one(event_id));
            if src.dedup.lock().seen(digest, received_at.0) {
                return ApplyOutcome::Duplicate;
            }
        }
        let observed_at = update.observed_at.unwrap_or(received_at);
        let activity = update.activity.as_deref();
        let status_text = update.status_text.as_deref();
        let raw_status = update.raw_status.as_deref();

        let (hash, shard_no) = self.locate(&update.principal);
        let mut guard = src.shards[shard_no].write();
        let shard = &mut *guard;
        let found = shard.find(hash, &update.principal);
        let words = &mut shard.words;
        let hasher = &self.hash_a;
        let (key, presence) = match found {
            Some(position) => {
                let (key, current) = &mut shard.entries[position];
                if observed_at < current.observed_at {
                    return ApplyOutcome::Stale;
                }
                let raw_status = words.share(current.raw_status.as_ref(), raw_status, hasher);
                if current.same_content(update.availability, activity, status_text) {
                    current.observed_at = observed_at;
                    current.received_at = received_at;
                    current.raw_status = raw_status;
                    return ApplyOutcome::Refreshed;
                }
                *current = Presence {
                    availability: update.availability,
                    activity: words.share(current.activity.as_ref(), activity, hasher),
                    status_text: words.share(current.status_text.as_ref(), status_text, hasher),
                    raw_status,
                    observed_at,
                    received_at,
                    seq: 0,
                };
                (&*key, current)
            }
            None => {
                let presence = Presence {
                    availability: update.availability,
                    activity: words.share(None, activity, hasher),
                    status_text: words.share(None, status_text, hasher),
                    raw_status: words.share(None, raw_status, hasher),
                    observed_at,
                    received_at,
                    seq: 0,
                };
                let key: Arc<str> = Arc::from(update.principal.as_ref());
                shard.push(hash, key, presence, &self.hash_a);
                let (key, presence) = shard
                    .entries
                    .last_mut()
                    .unwrap_or_else(|| unreachable!("just pushed"));
                (&*key, presence)
            }
        };
        let seq = self
            .changes
            .commit(|seq| PresenceRecord::new(&src.id, key, presence).with_seq(seq));
        presence.seq = seq;
        ApplyOutcome::Changed(seq)
    }

    /// The record of one principal, if any.
    pub fn get(&self, source: usize, principal: &str) -> Option<PresenceRecord> {
        let src = self.sources.get(source)?;
        let (hash, shard_no) = self.locate(principal);
        let shard = src.shards[shard_no].read();
        let (key, presence) = &shard.entries[shard.find(hash, principal)?];
        Some(PresenceRecord::new(&src.id, key, presence))
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
                while let Some((key, presence)) = shard.entries.get(index) {
                    index += 1;
                    if !filter(presence) {
                        continue;
                    }
                    items.push(PresenceRecord::new(&src.id, key, presence));
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

    /// Counts records per availability for one source (for metrics).
    pub fn availability_counts(&self, source: usize) -> [u64; Availability::ALL.len()] {
        let mut counts = [0u64; Availability::ALL.len()];
        if let Some(src) = self.sources.get(source) {
            for shard in src.shards.iter() {
                for (_, presence) in &shard.read().entries {
                    counts[presence.availability as usize] += 1;
                }
            }
        }
        counts
    }
}

/// Event ids seen recently, by keyed 128-bit digest, in two generations.
///
/// Ids go into `current`; when it is a window old (or holds half the
/// capacity) it becomes `previous` and the old `previous` is dropped whole.
/// An id is therefore remembered for at least one window and at most two,
/// with no per-entry expiry bookkeeping: one hash probe per generation, and
/// memory bounded by `capacity` whatever the burst.
struct Dedup {
    current: HashSet<u128, BuildDigest>,
    previous: HashSet<u128, BuildDigest>,
    /// When `current` was started, epoch ms.
    started: i64,
    window: i64,
    capacity: usize,
}

impl Dedup {
    fn new(window: i64, capacity: usize) -> Self {
        Dedup {
            current: HashSet::default(),
            previous: HashSet::default(),
            started: i64::MIN,
            window: window.max(0),
            capacity: capacity.max(2),
        }
    }

    /// Records `digest` seen at `now`; returns whether it was already there.
    fn seen(&mut self, digest: u128, now: i64) -> bool {
        let age = now.saturating_sub(self.started);
        if age >= self.window || self.current.len() >= self.capacity / 2 {
            let keep_previous = age < self.window.saturating_mul(2);
            let next =
                HashSet::with_capacity_and_hasher(self.current.len(), BuildDigest::default());
            self.previous = std::mem::replace(&mut self.current, next);
            if !keep_previous {
                self.previous.clear();
            }
            self.started = now;
        }
        if self.previous.contains(&digest) {
            return true;
        }
        !self.current.insert(digest)
    }
}

/// The digests are already keyed hashes: use their low bits as they are
/// instead of hashing them again.
type BuildDigest = std::hash::BuildHasherDefault<DigestHasher>;

#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u128 keys; a plain fold keeps it correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn limits() -> StoreLimits {
        StoreLimits {
            history: 16,
            dedup_window_ms: 1_000,
            dedup_capacity: 100,
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

    fn store() -> Store {
        Store::new(&[Arc::from("a"), Arc::from("b")], limits())
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

    #[test]
    fn dedup_remembers_for_one_to_two_windows() {
        let mut d = Dedup::new(100, 1_000);
        assert!(!d.seen(1, 0));
        assert!(d.seen(1, 99));
        // Rotated at 100: still remembered (previous generation).
        assert!(!d.seen(2, 100));
        assert!(d.seen(1, 150));
        // Rotated at 200: 1 is dropped with its generation, 2 is kept.
        assert!(!d.seen(3, 200));
        assert!(!d.seen(1, 201));
        assert!(d.seen(2, 202));
        // A long quiet spell forgets everything.
        assert!(!d.seen(2, 10_000));
    }

    #[test]
    fn records_share_short_texts_and_copy_long_ones() {
        let s = store();
        let now = Millis(10_000);
        let long = "x".repeat(Words::MAX_LEN + 1);
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
    fn shared_texts_are_bounded_per_shard() {
        let mut words = Words::default();
        let hasher = RandomState::default();
        for i in 0..Words::MAX + 10 {
            let text = format!("note {i}");
            assert_eq!(
                words.share(None, Some(&text), &hasher).as_deref(),
                Some(&*text)
            );
        }
        assert_eq!(words.table.len(), Words::MAX);
        let first = words.share(None, Some("note 0"), &hasher).unwrap();
        let again = words.share(None, Some("note 0"), &hasher).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(words.share(Some(&first), None, &hasher), None);
    }

    #[test]
    fn dedup_capacity_bounds_memory() {
        let mut d = Dedup::new(1_000_000, 4);
        for digest in 0..10u128 {
            assert!(!d.seen(digest, 0));
        }
        assert!(d.current.len() + d.previous.len() <= 4);
        assert!(d.seen(9, 0), "the newest are kept");
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
