//! The store: the one interface the rest of the daemon uses for presence
//! state, whichever backend keeps it.
//!
//! Webhooks, socket transports, streams, the read API and the upstream
//! managers see only [`Store`]: apply an update (dedup, stale check, write,
//! `seq`, history, publication), read records and pages, follow the change
//! log, and keep small upstream values. Behind it:
//!
//! - **memory**: [`Records`] is the truth. With `data_dir`, every write is
//!   also journaled ([`super::journal`]) and loaded again at start-up; while
//!   the journal cannot write, writes are refused ([`StoreError`]) so that
//!   nothing is acknowledged that was not kept.
//!
//! - **redis**: Redis is the truth, shared by several replicas; [`Records`]
//!   is this replica's mirror of it ([`super::redis`]).
//!
//! Reads are always served from [`Records`], in memory: a backend only
//! changes how writes are decided and kept.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::changes::ChangeLog;
use super::codec::Entry;
use super::journal::{Journal, Loaded, OpenError};
use super::model::{Availability, Millis, Presence, PresenceRecord};
use super::records::Records;
use super::redis::{RecordsHandle, RedisBackend};
use super::snapshot::Snapshots;
use super::{CallUpdate, PresenceUpdate};
use crate::cluster::Redis;
use crate::config::people::Mapping;
use crate::people::{self, People, Reconciled};
use crate::telemetry::LogEvery;
use tokio_util::sync::CancellationToken;

pub use super::records::{ApplyOutcome, Cursor, Page, Slot, StoreLimits};

/// Why the store could not take a write; the caller answers 503 with
/// `Retry-After` and the provider retries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot keep writes right now (journal write failing,
    /// Redis unreachable).
    #[error("the store cannot keep writes right now: {0}")]
    Unavailable(String),
    /// A new principal while the store holds `store.max_records` records.
    #[error(
        "the gateway holds its maximum of {max} presence records (store.max_records); \
         it takes no new principals until an operator raises the limit"
    )]
    Full { max: usize },
}

impl StoreError {
    /// Seconds a caller should wait before retrying: a full store stays
    /// full until an operator acts, so its callers need not hurry.
    pub fn retry_after_secs(&self) -> u32 {
        match self {
            StoreError::Unavailable(_) => 1,
            StoreError::Full { .. } => 60,
        }
    }
}

/// How often, at most, the store logs that it is full.
const FULL_LOG_INTERVAL_MS: i64 = 60_000;

/// Current presence and its change log; see the module doc.
pub struct Store {
    records: Records,
    backend: Backend,
    /// Upstream values (subscription ids, refresh tokens).
    meta: Mutex<HashMap<String, String>>,
    /// New principals refused because the store was full.
    refused: AtomicU64,
    /// Paces the log line that says so.
    full_logged: LogEvery,
    /// Paces the log line about person events not committed (Redis).
    person_failed_logged: LogEvery,
    /// Snapshots for stream consumers.
    snapshots: Snapshots,
    /// People derived from the records (DESIGN §9).
    people: People,
}

enum Backend {
    /// Memory, journaled to `data_dir` when one is set.
    Memory { journal: Option<Journal> },
    /// Redis, mirrored in memory.
    Redis(Arc<RedisBackend>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A memory store that persists nothing.
    pub fn new(source_ids: &[Arc<str>], limits: StoreLimits) -> Self {
        Store {
            records: Records::new(source_ids, limits),
            backend: Backend::Memory { journal: None },
            meta: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            full_logged: LogEvery::new(FULL_LOG_INTERVAL_MS),
            person_failed_logged: LogEvery::new(FULL_LOG_INTERVAL_MS),
            snapshots: Snapshots::default(),
            people: People::default(),
        }
    }

    /// A memory store persisted in `dir`: loads what it holds (records,
    /// history, `seq`, event ids, upstream values) and journals every write
    /// from then on.
    pub fn open(
        dir: &Path,
        source_ids: &[Arc<str>],
        limits: StoreLimits,
    ) -> Result<(Self, Loaded), OpenError> {
        let records = Records::new(source_ids, limits);
        let (journal, mut loaded) =
            Journal::open(dir, &records, limits.history, limits.dedup_window_ms)?;
        records
            .changes()
            .restore(loaded.seq, std::mem::take(&mut loaded.history));
        let meta = std::mem::take(&mut loaded.meta);
        let people = People::default();
        people.restore(std::mem::take(&mut loaded.people).into_values());
        loaded.records = records.total_len() as u64;
        Ok((
            Store {
                records,
                backend: Backend::Memory {
                    journal: Some(journal),
                },
                meta: Mutex::new(meta),
                refused: AtomicU64::new(0),
                full_logged: LogEvery::new(FULL_LOG_INTERVAL_MS),
                person_failed_logged: LogEvery::new(FULL_LOG_INTERVAL_MS),
                snapshots: Snapshots::default(),
                people,
            },
            loaded,
        ))
    }

    /// A store whose truth is the Redis server behind `redis`, shared with
    /// other replicas; nothing is read until [`Store::start`].
    pub fn redis(redis: Redis, source_ids: &[Arc<str>], limits: StoreLimits) -> Self {
        Store {
            records: Records::new(source_ids, limits),
            backend: Backend::Redis(Arc::new(RedisBackend::new(
                redis,
                source_ids,
                limits.history,
                limits.dedup_window_ms,
            ))),
            meta: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            full_logged: LogEvery::new(FULL_LOG_INTERVAL_MS),
            person_failed_logged: LogEvery::new(FULL_LOG_INTERVAL_MS),
            snapshots: Snapshots::default(),
            people: People::default(),
        }
    }

    /// Refuses new principals once `max` records are held, all sources
    /// together (`store.max_records`; 0: no limit). With Redis the count is
    /// this replica's mirror of the shared records.
    pub fn with_max_records(mut self, max: usize) -> Self {
        self.records.set_max_records(max);
        self
    }

    /// The most records held before new principals are refused (0: no limit).
    pub fn max_records(&self) -> usize {
        self.records.max_records()
    }

    /// Records held, all sources together (Redis: in this replica's mirror).
    pub fn record_count(&self) -> usize {
        self.records.record_count()
    }

    /// New principals refused so far because the store was full.
    pub fn refused_new(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Turns a refusal of the records into the error callers answer with,
    /// counting it, and says so in the log at most once a minute.
    fn full(&self) -> StoreError {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.max_records();
        if self.full_logged.ready(Millis::now().0) {
            tracing::warn!(
                max_records = max,
                records = self.record_count(),
                refused_total = refused,
                "the store is full: it holds store.max_records records, so events of new \
                 principals are refused (503) while known principals are still updated; \
                 raise store.max_records if this many principals are expected, or narrow \
                 the provider subscriptions"
            );
        }
        StoreError::Full { max }
    }

    /// Starts what the backend runs in the background (Redis: loading the
    /// mirror, following the change feed) until `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: &CancellationToken) {
        if let Backend::Redis(backend) = &self.backend {
            backend.start(Arc::new(RecordsHandle(Arc::clone(self))), shutdown.clone());
        }
    }

    /// `memory` or `redis`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Memory { .. } => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    /// The Redis backend, if it runs.
    #[cfg(test)]
    pub(crate) fn redis_backend(&self) -> Option<&RedisBackend> {
        match &self.backend {
            Backend::Redis(backend) => Some(backend),
            Backend::Memory { .. } => None,
        }
    }

    /// The Redis handle, with the Redis backend.
    pub fn redis_handle(&self) -> Option<&Redis> {
        match &self.backend {
            Backend::Redis(backend) => Some(backend.redis()),
            Backend::Memory { .. } => None,
        }
    }

    fn journal(&self) -> Option<&Journal> {
        match &self.backend {
            Backend::Memory { journal } => journal.as_ref(),
            Backend::Redis(_) => None,
        }
    }

    /// Whether writes are taken now (`/readyz` follows it too): the journal
    /// writes, or Redis answers and the mirror is loaded.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Memory {
                journal: Some(journal),
            } if !journal.is_healthy() => Err(StoreError::Unavailable(
                journal
                    .last_error()
                    .unwrap_or_else(|| "journal write failing".into()),
            )),
            Backend::Redis(backend) if !backend.is_ready() => Err(StoreError::Unavailable(
                "Redis is unreachable or its state is not loaded yet".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Applies one update of the source with index `source`.
    pub async fn apply(
        &self,
        source: usize,
        update: &PresenceUpdate<'_>,
        received_at: Millis,
    ) -> Result<ApplyOutcome, StoreError> {
        self.check_writable()?;
        let outcome = match &self.backend {
            Backend::Memory { journal } => {
                let outcome =
                    self.records
                        .apply_with(source, update, received_at, journal.as_ref());
                if matches!(outcome, ApplyOutcome::Changed(_) | ApplyOutcome::Refreshed) {
                    self.touched(source, &update.principal, journal.as_ref());
                }
                outcome
            }
            Backend::Redis(backend) => {
                let outcome = backend
                    .apply(&self.records, source, update, received_at)
                    .await?;
                if matches!(outcome, ApplyOutcome::Changed(_) | ApplyOutcome::Refreshed) {
                    self.touched_shared(backend, source, &update.principal)
                        .await;
                }
                outcome
            }
        };
        match outcome {
            ApplyOutcome::Full => Err(self.full()),
            outcome => Ok(outcome),
        }
    }

    /// Applies a change of one of a principal's calls.
    pub async fn apply_call(
        &self,
        source: usize,
        update: &CallUpdate<'_>,
        received_at: Millis,
    ) -> Result<ApplyOutcome, StoreError> {
        self.check_writable()?;
        let outcome = match &self.backend {
            Backend::Memory { journal } => {
                let outcome =
                    self.records
                        .apply_call_with(source, update, received_at, journal.as_ref());
                if matches!(outcome, ApplyOutcome::Changed(_)) {
                    self.touched(source, &update.principal, journal.as_ref());
                }
                outcome
            }
            Backend::Redis(backend) => {
                let outcome = backend
                    .apply_call(&self.records, source, update, received_at)
                    .await?;
                if matches!(outcome, ApplyOutcome::Changed(_)) {
                    self.touched_shared(backend, source, &update.principal)
                        .await;
                }
                outcome
            }
        };
        match outcome {
            ApplyOutcome::Full => Err(self.full()),
            outcome => Ok(outcome),
        }
    }

    /// Re-derives the person an identity belongs to after its record
    /// changed (memory backend).
    fn touched(&self, source: usize, principal: &str, journal: Option<&Journal>) {
        self.people
            .touched(source, principal, &self.records, &|change| {
                people::commit_local(&self.records, journal, change)
            });
    }

    /// Re-derives the person an identity belongs to after its record
    /// changed (Redis backend): the person event is committed in Redis.
    /// The presence write has succeeded already, so a failure here is only
    /// logged: the person's next change, or the next reconciliation,
    /// brings the record in line.
    async fn touched_shared(&self, backend: &RedisBackend, source: usize, principal: &str) {
        let Some(derivation) = self.people.derive_touched(source, principal, &self.records) else {
            return;
        };
        let person = Arc::clone(&derivation.change.record.person);
        if let Err(e) = backend
            .commit_person(&self.records, &self.people, derivation)
            .await
        {
            self.person_failed(&person, &e);
        }
    }

    /// Logs (at most once a minute) that a person event was not committed.
    fn person_failed(&self, person: &str, error: &StoreError) {
        if self.person_failed_logged.ready(Millis::now().0) {
            tracing::warn!(
                person,
                error = %error,
                "a person's derived record was not committed; its next identity change \
                 or the next people reload brings it in line"
            );
        }
    }

    /// The people derived from the records.
    pub fn people(&self) -> &People {
        &self.people
    }

    /// Puts a (new) people mapping in use and brings every person in line
    /// with it (see [`People::reconcile`]); blocking with many people.
    /// Memory backend: with Redis, person events are committed in Redis
    /// ([`Store::reconcile_people_async`]), so this only logs an error.
    pub fn reconcile_people(&self, mapping: &Mapping) -> Reconciled {
        let Backend::Memory { journal } = &self.backend else {
            tracing::error!("reconcile_people on the Redis backend: use reconcile_people_async");
            return Reconciled::default();
        };
        self.people.reconcile(mapping, &self.records, &|change| {
            people::commit_local(&self.records, journal.as_ref(), change)
        })
    }

    /// [`Store::reconcile_people`] on either backend, off the async
    /// workers. Redis: once the mirror is loaded, every difference is
    /// committed in Redis like an identity change's (replicas reconciling
    /// the same mapping at once commit each difference once).
    pub async fn reconcile_people_async(self: &Arc<Self>, mapping: Arc<Mapping>) -> Reconciled {
        let store = Arc::clone(self);
        let Backend::Redis(backend) = &self.backend else {
            let done = tokio::task::spawn_blocking(move || store.reconcile_people(&mapping)).await;
            return done.unwrap_or_else(|e| {
                tracing::error!(error = %e, "people reconciliation failed");
                Reconciled::default()
            });
        };
        backend.wait_loaded().await;
        let planned =
            tokio::task::spawn_blocking(move || store.people.remap(&mapping, &store.records)).await;
        let (derivations, people) = match planned {
            Ok(planned) => planned,
            Err(e) => {
                tracing::error!(error = %e, "people reconciliation failed");
                return Reconciled::default();
            }
        };
        let mut done = Reconciled {
            people,
            ..Reconciled::default()
        };
        for derivation in derivations {
            let stays = derivation.change.stays;
            let person = Arc::clone(&derivation.change.record.person);
            match backend
                .commit_person(&self.records, &self.people, derivation)
                .await
            {
                Ok(Some(_)) if stays => done.changed += 1,
                Ok(Some(_)) => done.removed += 1,
                // Another replica committed the same difference first.
                Ok(None) => {}
                Err(e) => self.person_failed(&person, &e),
            }
        }
        done
    }

    /// Makes sure the change log holds every change up to `seq` that the
    /// backend has (a consumer resuming here with an id another replica
    /// gave it, before this replica's feed brought that change), and every
    /// change this replica has written or seen (a consumer opening a stream
    /// right after a write here must not get that write's change late, as
    /// if it came after its snapshot or its resume position): Redis only,
    /// bounded to a second or two; nothing to do in memory.
    pub async fn catch_up(&self, seq: u64) {
        if let Backend::Redis(backend) = &self.backend {
            let seq = seq.max(backend.seen(&self.records));
            if self.changes().last_seq() >= seq {
                return;
            }
            let fill = backend.backfill_to(&self.records, &self.people, seq);
            if tokio::time::timeout(std::time::Duration::from_secs(2), fill)
                .await
                .is_err()
            {
                tracing::debug!(
                    seq,
                    "catching up with Redis took too long; resuming from what is here"
                );
            }
        }
    }

    /// How far ahead of the gateway's clock a provider timestamp is still
    /// trusted (`store.max_future_skew_secs`).
    pub fn max_future_skew_ms(&self) -> i64 {
        self.records.limits().max_future_skew_ms
    }

    /// The in-memory records (for benchmarks and tests of the engine).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// The change log every applied change is published to.
    pub fn changes(&self) -> &ChangeLog {
        self.records.changes()
    }

    /// Snapshots for stream consumers (see [`super::snapshot`]).
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    /// Number of sources the store was built for.
    pub fn source_count(&self) -> usize {
        self.records.source_count()
    }

    /// The record of one principal, if any.
    pub fn get(&self, source: usize, principal: &str) -> Option<PresenceRecord> {
        self.records.get(source, principal)
    }

    /// Number of records of one source.
    pub fn len(&self, source: usize) -> usize {
        self.records.len(source)
    }

    /// Number of records of all sources.
    pub fn total_len(&self) -> usize {
        self.records.total_len()
    }

    /// Whether the store holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Reads up to `limit` records of the given sources (in that order),
    /// starting at `from`, keeping those `filter` accepts; see
    /// [`Records::page`].
    pub fn page(
        &self,
        sources: &[usize],
        from: Option<Cursor>,
        limit: usize,
        filter: impl Fn(&Presence) -> bool,
    ) -> Page {
        self.records.page(sources, from, limit, filter)
    }

    /// Counts records per availability for one source (for metrics).
    pub fn availability_counts(&self, source: usize) -> [u64; Availability::ALL.len()] {
        self.records.availability_counts(source)
    }

    /// An upstream value.
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        if let Backend::Redis(backend) = &self.backend {
            return backend.meta_get(key).await;
        }
        Ok(self.meta.lock().get(key).cloned())
    }

    /// Sets (or, with `None`, removes) an upstream value; persisted where
    /// state persists.
    pub async fn meta_put(&self, key: &str, value: Option<String>) -> Result<(), StoreError> {
        if let Backend::Redis(backend) = &self.backend {
            return backend.meta_put(key, value.as_deref()).await;
        }
        self.check_writable()?;
        let mut meta = self.meta.lock();
        if let Some(journal) = self.journal() {
            journal.append(&Entry::Meta {
                key,
                value: value.as_deref(),
            });
        }
        match value {
            Some(v) => meta.insert(key.to_owned(), v),
            None => meta.remove(key),
        };
        Ok(())
    }

    /// Where state is persisted, if anywhere.
    pub fn data_dir(&self) -> Option<&Path> {
        self.journal().map(Journal::dir)
    }

    /// Writes out and syncs everything not yet on disk and stops the
    /// journal (blocking: call it off the async workers). Nothing is
    /// accepted afterwards that would be lost.
    pub fn close(&self) {
        if let Some(journal) = self.journal() {
            journal.close();
        }
    }
}
