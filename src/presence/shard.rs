//! One shard of a source's records: an insertion-ordered table with its own
//! hash index, laid out for few cache misses at a million principals.
//!
//! - `entries` keeps records in insertion order (stable cursor pages), in
//!   chunks that never move (see [`Entries`]); each entry holds its
//!   principal inline when it fits in [`Key::INLINE`] bytes (UUIDs, most
//!   user@domain ids), so comparing the key touches no other memory.
//! - `index` is open addressing with linear probing over `u64` slots, each a
//!   32-bit hash tag and a position: one probe is usually one cache line,
//!   where a general hash table would read a control byte and then a slot
//!   elsewhere. It grows a few keys per insert instead of all at once (see
//!   [`Index`]).
//! - `words` shares short texts between records (see [`Words`]).
//! - `tally` counts the records per availability (see [`Tally`]).
//!
//! There is no removal, which keeps linear probing simple.

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::quality::RandomState;
use hashbrown::HashTable;

use super::model::{Availability, Presence};

/// A principal id, inline when short.
#[derive(Clone)]
pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; Key::INLINE] },
    Heap(Box<str>),
}

impl Key {
    /// Longest id kept inline (a UUID is 36).
    pub(crate) const INLINE: usize = 38;

    fn new(id: &str) -> Self {
        if id.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            Key::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(id.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(s) => s.as_bytes(),
        }
    }

    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Key::Inline { .. } => std::str::from_utf8(self.bytes())
                .unwrap_or_else(|_| unreachable!("copied from a str whole")),
            Key::Heap(s) => s,
        }
    }
}

/// One record: the principal and its presence.
pub(crate) struct Entry {
    pub(crate) key: Key,
    pub(crate) presence: Presence,
}

/// The records of one shard.
#[derive(Default)]
pub(crate) struct Shard {
    pub(crate) entries: Entries,
    index: Index,
    pub(crate) words: Words,
    pub(crate) tally: Tally,
}

impl Shard {
    /// The position of `principal`, whose hash is `hash`.
    pub(crate) fn find(&self, hash: u64, principal: &str) -> Option<usize> {
        let matches = |position: usize| self.entries[position].key.bytes() == principal.as_bytes();
        self.index
            .current
            .find(hash, matches)
            .or_else(|| self.index.moving.as_ref()?.old.find(hash, matches))
    }

    /// Appends a principal known to be absent; returns its position.
    pub(crate) fn push(
        &mut self,
        hash: u64,
        principal: &str,
        presence: Presence,
        hasher: &RandomState,
    ) -> usize {
        // u32 positions: four billion principals per shard is not a limit a
        // single process reaches.
        let position = self.entries.len();
        self.tally.add(presence.availability);
        self.entries.push(Entry {
            key: Key::new(principal),
            presence,
        });
        self.index.insert(hash, position, &self.entries, hasher);
        position
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The shard's records per availability, kept as they change: whoever
/// changes a record's availability holds the shard's write lock, so plain
/// integers do (no atomics on the apply path), and a reader sums sixteen
/// small arrays instead of reading every record (`/v1/sources`, `/metrics`).
/// [`Shard::push`] counts new records; a change of an existing record's
/// availability must be told with [`Tally::moved`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally([u64; Availability::ALL.len()]);

impl Tally {
    fn add(&mut self, availability: Availability) {
        self.0[availability as usize] += 1;
    }

    /// One record went from `from` to `to` (nothing when they are equal).
    pub(crate) fn moved(&mut self, from: Availability, to: Availability) {
        if from != to {
            let count = &mut self.0[from as usize];
            debug_assert!(*count > 0, "no {from} record to move");
            *count = count.saturating_sub(1);
            self.0[to as usize] += 1;
        }
    }

    /// The counts, indexed by `Availability as usize`.
    pub(crate) fn counts(&self) -> &[u64; Availability::ALL.len()] {
        &self.0
    }
}

/// The tag kept in a slot: high hash bits, never 0 (0 is an empty slot). The
/// low bits choose the slot, so the tag adds information.
fn tag(hash: u64) -> u32 {
    ((hash >> 32) as u32) | 1
}

/// A shard's entries in insertion order, in chunks of [`Entries::CHUNK`].
///
/// One vector of a hundred thousand entries doubles by copying all of them
/// (megabytes, under the shard's lock: a pause of tens of milliseconds at a
/// million principals). Chunks never move: only the last one grows, and a
/// full chunk is followed by a new one.
#[derive(Default)]
pub(crate) struct Entries {
    chunks: Vec<Vec<Entry>>,
    len: usize,
}

impl Entries {
    const CHUNK_BITS: u32 = 12;
    /// Entries per chunk (about half a megabyte of them).
    const CHUNK: usize = 1 << Self::CHUNK_BITS;

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, position: usize) -> Option<&Entry> {
        self.chunks
            .get(position >> Self::CHUNK_BITS)?
            .get(position & (Self::CHUNK - 1))
    }

    pub(crate) fn get_mut(&mut self, position: usize) -> Option<&mut Entry> {
        self.chunks
            .get_mut(position >> Self::CHUNK_BITS)?
            .get_mut(position & (Self::CHUNK - 1))
    }

    pub(crate) fn push(&mut self, entry: Entry) {
        match self.chunks.last_mut() {
            Some(last) if last.len() < Self::CHUNK => last.push(entry),
            _ => self.chunks.push(vec![entry]),
        }
        self.len += 1;
    }
}

impl std::ops::Index<usize> for Entries {
    type Output = Entry;

    fn index(&self, position: usize) -> &Entry {
        match self.get(position) {
            Some(entry) => entry,
            None => panic!("entry {position} of {}", self.len),
        }
    }
}

impl std::ops::IndexMut<usize> for Entries {
    fn index_mut(&mut self, position: usize) -> &mut Entry {
        let len = self.len;
        match self.get_mut(position) {
            Some(entry) => entry,
            None => panic!("entry {position} of {len}"),
        }
    }
}

impl<'a> IntoIterator for &'a Entries {
    type Item = &'a Entry;
    type IntoIter = std::iter::Flatten<std::slice::Iter<'a, Vec<Entry>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.chunks.iter().flatten()
    }
}

/// The hash index of a shard's entries, grown without a pause.
///
/// Rebuilding a table of a hundred thousand keys at once held the shard's
/// lock for tens of milliseconds (every update of the shard waited, and the
/// sixteen shards of a source grow at about the same time). So a full table
/// is replaced gradually: a table of twice the size takes every new key, and
/// each insert also moves [`Index::MOVE_PER_INSERT`] of the old table's keys
/// (by entry position, oldest first). Lookups ask the new table, then the
/// old one, until every old key has moved.
#[derive(Default)]
struct Index {
    current: Table,
    moving: Option<Moving>,
}

/// The table being emptied into [`Index::current`].
struct Moving {
    old: Table,
    /// Entries below `next` have moved; `end` is where the old table ended.
    next: usize,
    end: usize,
}

impl Index {
    /// Keys moved per insert while growing. The new table has room for at
    /// least twice the keys it starts with, so it takes half as many
    /// inserts again before it is three quarters full: two per insert moves
    /// them all in time (more cost more per insert, measured).
    const MOVE_PER_INSERT: usize = 2;

    /// Indexes `entries[position]`, whose hash is `hash`.
    fn insert(&mut self, hash: u64, position: usize, entries: &Entries, hasher: &RandomState) {
        if self.current.slots.is_empty() {
            self.current = Table::with_slots(16);
        }
        self.move_keys(Self::MOVE_PER_INSERT, entries, hasher);
        self.current.insert(hash, position);
        let keys = position + 1;
        if keys * 4 > self.current.slots.len() * 3 {
            // Moving has finished by now with MOVE_PER_INSERT = 2; finishing
            // it here keeps it correct whatever the constant.
            self.move_keys(usize::MAX, entries, hasher);
            let size = (keys * 2).next_power_of_two();
            self.moving = Some(Moving {
                old: std::mem::replace(&mut self.current, Table::with_slots(size)),
                next: 0,
                end: keys,
            });
        }
    }

    /// Moves up to `count` keys from the old table into the current one.
    fn move_keys(&mut self, count: usize, entries: &Entries, hasher: &RandomState) {
        let Some(moving) = &mut self.moving else {
            return;
        };
        let until = moving.next.saturating_add(count).min(moving.end);
        for position in moving.next..until {
            let key = entries[position].key.as_str();
            self.current.insert(hasher.hash_one(key), position);
        }
        moving.next = until;
        if until == moving.end {
            self.moving = None;
        }
    }
}

/// Open addressing with linear probing.
#[derive(Default)]
struct Table {
    /// `tag << 32 | position`, or 0 when empty; a power of two long.
    slots: Box<[u64]>,
}

impl Table {
    fn with_slots(size: usize) -> Self {
        Table {
            slots: vec![0; size].into_boxed_slice(),
        }
    }

    /// The first position with `hash`'s tag for which `matches` holds.
    fn find(&self, hash: u64, matches: impl Fn(usize) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let tag = tag(hash);
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if (slot >> 32) as u32 == tag && matches(slot as u32 as usize) {
                return Some(slot as u32 as usize);
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, hash: u64, position: usize) {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = (u64::from(tag(hash)) << 32) | position as u64;
    }
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
pub(crate) struct Words {
    table: HashTable<Arc<str>>,
}

impl Words {
    pub(crate) const MAX: usize = 256;
    pub(crate) const MAX_LEN: usize = 64;

    /// `want` as a shared text: `have` when it is the same text, else the
    /// shard's copy (made on first use while there is room).
    pub(crate) fn share(
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

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::model::{Availability, Millis};

    fn presence() -> Presence {
        Presence {
            availability: Availability::Available,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Millis(0),
            received_at: Millis(0),
            seq: 0,
            calls: None,
            reported: true,
            rev: 0,
        }
    }

    #[test]
    fn finds_every_key_while_and_after_growing_inline_or_not() {
        let hasher = RandomState::default();
        let mut shard = Shard::default();
        let mut moves = 0;
        let ids: Vec<String> = (0..5_000)
            .map(|i| match i % 3 {
                0 => format!("{i:08}-5a9e-4a57-9d1e-2f6f8f7e9b11"),
                1 => format!("user{i}@a-rather-long-domain-name.example.com"),
                _ => format!("{i}"),
            })
            .collect();
        for (n, id) in ids.iter().enumerate() {
            let hash = hasher.hash_one(id.as_str());
            assert_eq!(shard.find(hash, id), None);
            let before = shard.index.moving.is_some();
            assert_eq!(shard.push(hash, id, presence(), &hasher), n);
            moves += usize::from(!before && shard.index.moving.is_some());
            // Keys from before and during a move are found mid-way.
            for earlier in [0, n / 2, n] {
                let id = &ids[earlier];
                assert_eq!(shard.find(hasher.hash_one(id.as_str()), id), Some(earlier));
            }
        }
        assert!(moves > 5, "the index grew several times, gradually");
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(shard.find(hasher.hash_one(id.as_str()), id), Some(n));
            assert_eq!(shard.entries[n].key.as_str(), id);
        }
        assert_eq!(shard.find(hasher.hash_one("absent"), "absent"), None);
        assert!(matches!(shard.entries[0].key, Key::Inline { .. }));
        assert!(matches!(shard.entries[1].key, Key::Heap(_)));
    }

    #[test]
    fn equal_tags_are_told_apart_by_the_key() {
        // The same hash for two ids: found by comparing keys.
        let mut shard = Shard::default();
        for id in ["a", "b"] {
            shard.entries.push(Entry {
                key: Key::new(id),
                presence: presence(),
            });
        }
        shard.index.current = Table::with_slots(16);
        shard.index.current.insert(42, 0);
        shard.index.current.insert(42, 1);
        assert_eq!(shard.find(42, "a"), Some(0));
        assert_eq!(shard.find(42, "b"), Some(1));
        assert_eq!(shard.find(42, "c"), None);
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
        assert_eq!(words.len(), Words::MAX);
        let first = words.share(None, Some("note 0"), &hasher).unwrap();
        let again = words.share(None, Some("note 0"), &hasher).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(words.share(Some(&first), None, &hasher), None);
    }
}
