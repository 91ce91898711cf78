//! One shard of a source's records: an insertion-ordered table with its own
//! hash index, laid out for few cache misses at a million principals.
//!
//! - `entries` keeps records in insertion order (stable cursor pages); each
//!   entry holds its principal inline when it fits in [`Key::INLINE`] bytes
//!   (UUIDs, most user@domain ids), so comparing the key touches no other
//!   memory.
//! - `index` is open addressing with linear probing over `u64` slots, each a
//!   32-bit hash tag and a position: one probe is usually one cache line,
//!   where a general hash table would read a control byte and then a slot
//!   elsewhere.
//! - `words` shares short texts between records (see [`Words`]).
//!
//! There is no removal, which keeps linear probing simple.

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::quality::RandomState;
use hashbrown::HashTable;

use super::model::Presence;

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
    pub(crate) entries: Vec<Entry>,
    index: Index,
    pub(crate) words: Words,
}

impl Shard {
    /// The position of `principal`, whose hash is `hash`.
    pub(crate) fn find(&self, hash: u64, principal: &str) -> Option<usize> {
        let index = &self.index;
        if index.slots.is_empty() {
            return None;
        }
        let tag = tag(hash);
        let mask = index.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let slot = index.slots[i];
            if slot == 0 {
                return None;
            }
            if (slot >> 32) as u32 == tag {
                let position = slot as u32 as usize;
                if self.entries[position].key.bytes() == principal.as_bytes() {
                    return Some(position);
                }
            }
            i = (i + 1) & mask;
        }
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
        self.entries.push(Entry {
            key: Key::new(principal),
            presence,
        });
        if (self.entries.len()) * 4 > self.index.slots.len() * 3 {
            self.index.rebuild(&self.entries, hasher);
        } else {
            self.index.insert(hash, position);
        }
        position
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The tag kept in a slot: high hash bits, never 0 (0 is an empty slot). The
/// low bits choose the slot, so the tag adds information.
fn tag(hash: u64) -> u32 {
    ((hash >> 32) as u32) | 1
}

#[derive(Default)]
struct Index {
    /// `tag << 32 | position`, or 0 when empty; a power of two long.
    slots: Box<[u64]>,
}

impl Index {
    fn insert(&mut self, hash: u64, position: usize) {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = (u64::from(tag(hash)) << 32) | position as u64;
    }

    /// Rebuilds the index for all `entries` at twice their number or more
    /// (load at most one half after a rebuild, three quarters before the next).
    fn rebuild(&mut self, entries: &[Entry], hasher: &RandomState) {
        let size = (entries.len() * 2).next_power_of_two().max(16);
        self.slots = vec![0; size].into_boxed_slice();
        for (position, entry) in entries.iter().enumerate() {
            self.insert(hasher.hash_one(entry.key.as_str()), position);
        }
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
    fn finds_every_key_across_rebuilds_inline_or_not() {
        let hasher = RandomState::default();
        let mut shard = Shard::default();
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
            assert_eq!(shard.push(hash, id, presence(), &hasher), n);
        }
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
        shard.index.slots = vec![0; 16].into_boxed_slice();
        shard.index.insert(42, 0);
        shard.index.insert(42, 1);
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
