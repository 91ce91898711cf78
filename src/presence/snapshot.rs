//! Snapshots for stream consumers: every record as of a position of the
//! change log, in ascending `seq`, taken without stopping commits or the
//! runtime, and shared by the consumers that open at about the same time.
//!
//! A snapshot is an [`Index`]: the `seq` and [`Slot`] of every record whose
//! `seq` is at most the index's position, sorted by `seq` (16 bytes a
//! record, not the records themselves). It is built on a blocking thread,
//! one build at a time, reading each shard [`READ_PAGE`] entries per hold of
//! its read lock, so a webhook waits for at most one page and the runtime's
//! workers never wait at all. (Built on the workers, 20 consumers opening at
//! once held every webhook and `/healthz` for 2.8 s at 324 k records.)
//!
//! A consumer reads the records themselves only as it gets to them, each
//! under its shard's lock for that one record. A record whose `seq` is no
//! longer the indexed one changed after the position, and that change
//! reaches the consumer after the snapshot (the stream follows the change
//! log from the position on), so the record is skipped, not sent twice or
//! out of order. So a consumer gets, in ascending `seq`, every record that
//! has not changed since the position, then every change after it: laying
//! each over what it holds, it is never missing a record, and a resume from
//! the last id it saw misses nothing (everything up to that id was sent,
//! everything after it is in the history).
//!
//! A consumer positioned at `at` may use an index built at or after `at`
//! (its position moves up to the index's: it has taken nothing from the
//! log since `at`), or one up to [`REUSE`] changes older, with those
//! changes replayed after it: consumers opening together share one build.
//!
//! Never holds a lock across an `.await`.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::changes::Change;
use super::records::{Cursor, Records, Slot};
use super::store::Store;

/// Entries read from a shard per hold of its read lock.
pub const READ_PAGE: usize = 1024;

/// How many changes older than a consumer's position an index may be and
/// still be used (its consumer gets those changes replayed after it,
/// copied at once: at most this many shared pointers).
pub const REUSE: u64 = 4096;

/// The snapshots of one store: one build at a time, the newest one shared.
pub struct Snapshots {
    /// A build takes a core for a moment (reading and sorting a million
    /// entries takes some 100 ms): one at a time, and whoever waited for it
    /// usually uses its result instead of building again.
    builds: Arc<Semaphore>,
    /// The newest index, while some consumer still reads it.
    latest: Arc<Mutex<Weak<Index>>>,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots {
            builds: Arc::new(Semaphore::new(1)),
            latest: Arc::default(),
        }
    }
}

/// The records with `seq` at most a position, as `seq` and [`Slot`],
/// ascending.
#[derive(Debug)]
pub struct Index {
    at: u64,
    entries: Box<[(u64, Slot)]>,
}

impl Index {
    /// The position: every record with `seq <= at()` when it was built.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Number of records indexed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it indexes no record.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `i`-th entry in ascending `seq`.
    pub fn get(&self, i: usize) -> Option<(u64, Slot)> {
        self.entries.get(i).copied()
    }
}

/// A snapshot for a consumer positioned at some `at`: the index, and the
/// changes between the index's position and `at` (empty when the index is
/// at or after `at`), to send after it.
#[derive(Debug)]
pub struct Taken {
    pub index: Arc<Index>,
    pub then: Vec<Arc<Change>>,
}

/// Reads a store into an [`Index`] one page at a time (on a blocking
/// thread; tests step it by hand).
pub struct Builder<'a> {
    records: &'a Records,
    at: u64,
    next: Option<Cursor>,
    entries: Vec<(u64, Slot)>,
}

impl<'a> Builder<'a> {
    /// A build of the records with `seq <= at`.
    pub fn new(records: &'a Records, at: u64) -> Self {
        let next = (records.source_count() > 0).then_some(Cursor {
            source: 0,
            shard: 0,
            index: 0,
        });
        Builder {
            records,
            at,
            next,
            entries: Vec::new(),
        }
    }

    /// Reads one page (one shard lock, held for at most [`READ_PAGE`]
    /// entries); false once everything is read.
    pub fn step(&mut self) -> bool {
        let Some(from) = self.next else {
            return false;
        };
        self.next = self
            .records
            .seq_page(from, READ_PAGE, self.at, &mut self.entries);
        self.next.is_some()
    }

    /// The index, sorted (the remaining pages read first).
    pub fn finish(mut self) -> Index {
        while self.step() {}
        // Every seq belongs to one change of one record: no two entries
        // share one.
        self.entries.sort_unstable_by_key(|&(seq, _)| seq);
        Index {
            at: self.at,
            entries: self.entries.into_boxed_slice(),
        }
    }
}

impl Snapshots {
    /// A snapshot for a consumer positioned at `at` (a position it read
    /// from the change log after subscribing to it): the newest index when
    /// it fits, else a new one built once the builds before it are done.
    /// `None` only when the runtime is shutting down.
    pub async fn take(store: Arc<Store>, at: u64) -> Option<Taken> {
        let snapshots = store.snapshots();
        if let Some(taken) = snapshots.reuse(&store, at) {
            return Some(taken);
        }
        let permit = Arc::clone(&snapshots.builds).acquire_owned().await.ok()?;
        // Built while this one waited: most consumers that open together
        // end here.
        if let Some(taken) = snapshots.reuse(&store, at) {
            return Some(taken);
        }
        let latest = Arc::clone(&snapshots.latest);
        let building = Arc::clone(&store);
        let index = tokio::task::spawn_blocking(move || {
            // Held by the build itself: a consumer that leaves meanwhile
            // does not let a second build start beside it.
            let _permit = permit;
            // At or after `at`: it was read before, and positions only grow.
            let position = building.changes().last_seq();
            let index = Arc::new(Builder::new(building.records(), position).finish());
            *latest.lock() = Arc::downgrade(&index);
            index
        })
        .await
        .ok()?;
        Some(Taken {
            index,
            then: Vec::new(),
        })
    }

    /// The newest index, with the changes from its position to `at`, when
    /// it is still read by someone and not more than [`REUSE`] changes
    /// older than `at` (and the history still has those).
    fn reuse(&self, store: &Store, at: u64) -> Option<Taken> {
        let index = self.latest.lock().upgrade()?;
        if index.at >= at {
            return Some(Taken {
                index,
                then: Vec::new(),
            });
        }
        if at - index.at > REUSE {
            return None;
        }
        let then = store.changes().between(index.at, at).ok()?;
        // Up to `at` without a hole, or not at all.
        (then.last().map(|c| c.seq()) == Some(at)).then_some(Taken { index, then })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::store::StoreLimits;
    use crate::presence::{Availability, Millis, PresenceRecord, PresenceUpdate};
    use std::borrow::Cow;
    use std::collections::HashMap;

    fn limits(history: usize) -> StoreLimits {
        StoreLimits {
            history,
            dedup_window_ms: 0,
            dedup_capacity: 1,
            stream_buffer: 64,
            max_future_skew_ms: 300_000,
        }
    }

    fn update(principal: &str, n: u64) -> PresenceUpdate<'_> {
        PresenceUpdate {
            principal: Cow::Borrowed(principal),
            availability: [Availability::Busy, Availability::Away][(n % 2) as usize],
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Some(Millis(n as i64 + 1)),
            event_id: None,
        }
    }

    /// What a consumer gets from an index: the records still at their
    /// indexed `seq`, those with `seq <= upto`, in order.
    fn send(records: &Records, index: &Index, upto: u64) -> Vec<PresenceRecord> {
        (0..index.len())
            .filter_map(|i| index.get(i))
            .take_while(|&(seq, _)| seq <= upto)
            .filter_map(|(seq, slot)| records.at_slot(slot, seq))
            .collect()
    }

    /// A build paused half-way holds no lock: commits go on (on this very
    /// thread, which would deadlock on a held shard lock), and what a
    /// consumer then gets, followed by the changes after the position, is
    /// exactly the final state, in ascending `seq`, each change once.
    #[test]
    fn a_build_paused_half_way_blocks_no_commit_and_loses_nothing() {
        let store = Store::new(&[Arc::from("a"), Arc::from("b")], limits(100_000));
        let records = store.records();
        let names: Vec<String> = (0..20_000).map(|i| format!("p{i}")).collect();
        for (n, p) in names.iter().enumerate() {
            records.apply(n % 2, &update(p, n as u64), Millis(0));
        }
        let at = store.changes().last_seq();
        let mut build = Builder::new(records, at);
        for _ in 0..8 {
            assert!(build.step());
        }
        // Changes of records read already and of records not read yet,
        // and new records, while the build is paused.
        for n in 0..3_000u64 {
            let p = if n % 3 == 0 {
                format!("new{n}")
            } else {
                names[(n * 7919 % 20_000) as usize].clone()
            };
            records.apply((n % 2) as usize, &update(&p, 100_001 + n), Millis(0));
        }
        let index = build.finish();
        assert_eq!(index.at(), at);
        let sent = send(records, &index, at);
        assert!(sent.windows(2).all(|w| w[0].seq < w[1].seq), "ascending");
        assert!(sent.iter().all(|r| r.seq <= at), "none newer");
        // Lay the changes after the position over what was sent.
        let mut view: HashMap<(String, String), u64> = sent
            .iter()
            .map(|r| ((r.source.to_string(), r.principal.to_string()), r.seq))
            .collect();
        let later = store.changes().since(at).unwrap();
        assert_eq!(later.len(), 3_000);
        for c in &later {
            let key = (
                c.presence().unwrap().source.to_string(),
                c.presence().unwrap().principal.to_string(),
            );
            view.insert(key, c.seq());
        }
        let mut truth = HashMap::new();
        records.for_each(|s, p, presence| {
            truth.insert((s.to_string(), p.to_owned()), presence.seq);
        });
        assert_eq!(view, truth);
    }

    /// Consumers opening together share one build; one opening a few
    /// changes later uses it too, with those changes; one far later, or
    /// after everyone let go of the index, gets a new build.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumers_share_the_newest_index() {
        let store = Arc::new(Store::new(&[Arc::from("a")], limits(100)));
        for n in 0..10u64 {
            store
                .records()
                .apply(0, &update(&format!("p{n}"), n), Millis(0));
        }
        let at = store.changes().last_seq();
        let (first, second) = tokio::join!(
            Snapshots::take(Arc::clone(&store), at),
            Snapshots::take(Arc::clone(&store), at)
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        assert!(Arc::ptr_eq(&first.index, &second.index), "one build");
        assert_eq!(first.index.at(), at);
        assert_eq!(first.index.len(), 10);
        store.records().apply(0, &update("p0", 51), Millis(0));
        store.records().apply(0, &update("late", 52), Millis(0));
        assert_eq!(store.changes().last_seq(), at + 2);
        let later = Snapshots::take(Arc::clone(&store), at + 2).await.unwrap();
        assert!(Arc::ptr_eq(&later.index, &first.index), "reused");
        assert_eq!(
            later.then.iter().map(|c| c.seq()).collect::<Vec<_>>(),
            [at + 1, at + 2]
        );
        // The record changed after the index: skipped there, sent as a change.
        assert_eq!(send(store.records(), &later.index, at).len(), 9);
        drop((first, second, later));
        let fresh = Snapshots::take(Arc::clone(&store), at + 2).await.unwrap();
        assert_eq!(fresh.index.at(), at + 2);
        assert!(fresh.then.is_empty());
        assert_eq!(fresh.index.len(), 11);
    }

    /// Beyond what the history keeps, an old index is not used.
    #[tokio::test]
    async fn an_index_older_than_the_history_is_not_reused() {
        let store = Arc::new(Store::new(&[Arc::from("a")], limits(2)));
        store.records().apply(0, &update("p", 0), Millis(0));
        let old = Snapshots::take(Arc::clone(&store), 1).await.unwrap();
        for n in 1..5 {
            store.records().apply(0, &update("p", n), Millis(0));
        }
        let new = Snapshots::take(Arc::clone(&store), 5).await.unwrap();
        assert!(!Arc::ptr_eq(&old.index, &new.index));
        assert_eq!(new.index.at(), 5);
    }
}
