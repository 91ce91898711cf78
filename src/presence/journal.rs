//! Persistence of the memory backend in `data_dir`: a journal of every write,
//! flushed to disk at least once a second, compacted into snapshots.
//!
//! Files (all in `data_dir`):
//! - `LOCK`: held (`flock`) while a gateway uses the directory, so two
//!   processes never write one journal.
//! - `snapshot-NNNNNNNNNN.bin`: the state after every journal segment
//!   numbered below `N`: the change history (oldest first), then every
//!   current record, the remembered event ids, upstream values and `seq`.
//! - `journal-NNNNNNNNNN.log`: the writes made while segment `N` was open.
//!
//! Each file starts with an 8-byte magic and the format version; entries are
//! [`codec`] frames. Start-up loads the newest snapshot and replays every
//! segment from its number on. A torn or corrupt tail (a crash mid-write, a
//! bad disk block) is cut at the last good entry with a warning; a file of
//! another format version is refused with an error naming it.
//!
//! Writes never wait for the disk. A write appends its entry to an in-memory
//! buffer while the store's lock for that record is held; a writer thread
//! writes the buffer out every [`FLUSH_INTERVAL`] and `fdatasync`s at least
//! once a second, the promise of Redis' `appendfsync everysec`: after a crash,
//! everything acknowledged more than a second before it is on disk. When a
//! write or sync fails, the journal reports itself unavailable (the store
//! then refuses new writes, so nothing is acknowledged that was not kept),
//! keeps what it could not write, and retries until the disk takes it.
//!
//! Compaction runs on its own thread and never reads live state: it folds the
//! last snapshot and the closed segments into a new snapshot (written to a
//! temporary file, synced, renamed), then deletes what it replaces. A crash
//! at any point leaves a readable directory.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::changes::Event;
use super::codec::{self, Entry, FORMAT_VERSION};
use super::model::{Millis, PersonRecord, PresenceRecord};
use super::records::Records;

/// How often buffered writes are handed to the operating system (after
/// which they survive the process being killed).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// How often they are synced to the disk (after which they survive power
/// loss).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

const SNAPSHOT_MAGIC: &[u8; 8] = b"PGSNAP\0\0";
const JOURNAL_MAGIC: &[u8; 8] = b"PGJRNL\0\0";
const HEADER_LEN: usize = 12;

/// Why `data_dir` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("store.data_dir {path}: cannot be written: {source}")]
    NotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store.data_dir {path}: in use by another process (its LOCK is held)")]
    Locked { path: PathBuf },
    #[error("{path}: cannot be read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: format version {found}, this build reads version {FORMAT_VERSION}; \
         move the directory away or use a matching build"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: not a presence-gateway {what} file")]
    NotOurs { path: PathBuf, what: &'static str },
}

/// What was persisted, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The last `seq` handed out.
    pub seq: u64,
    /// The kept changes, oldest first.
    pub history: VecDeque<Event>,
    /// Upstream values.
    pub meta: HashMap<String, String>,
    /// People's current records.
    pub people: HashMap<Arc<str>, Arc<PersonRecord>>,
    /// Records of sources no longer configured (skipped).
    pub orphans: u64,
    pub records: u64,
    /// Bytes on disk after loading.
    pub bytes: u64,
}

/// The journal of a store with `data_dir`; see the module doc.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    compactor: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    dir: PathBuf,
    /// Encoded entries not yet handed to the writer thread.
    pending: Mutex<Vec<u8>>,
    healthy: AtomicBool,
    stop: AtomicBool,
    /// Wakes the writer early (shutdown).
    wake: Condvar,
    wake_lock: Mutex<()>,
    /// Wakes the compactor: the number of the segment now being written.
    compact: Mutex<Option<u64>>,
    compact_wake: Condvar,
    history: usize,
    dedup_window_ms: i64,
    /// A segment is closed and a new one started past this size.
    segment_bytes: u64,
    /// The writer's latest failure, for logs and `/readyz`.
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.dir)
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

/// Files of the directory, by kind and number.
#[derive(Default)]
struct Listing {
    snapshots: Vec<(u64, PathBuf)>,
    segments: Vec<(u64, PathBuf)>,
}

impl Journal {
    /// Opens `dir` (creating it when missing), loads what it holds into
    /// `records`, and starts the writer on a new segment.
    pub fn open(
        dir: &Path,
        records: &Records,
        history: usize,
        dedup_window_ms: i64,
    ) -> Result<(Journal, Loaded), OpenError> {
        Self::open_with(dir, records, history, dedup_window_ms, SEGMENT_BYTES)
    }

    fn open_with(
        dir: &Path,
        records: &Records,
        history: usize,
        dedup_window_ms: i64,
        segment_bytes: u64,
    ) -> Result<(Journal, Loaded), OpenError> {
        let not_writable = |source| OpenError::NotWritable {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(not_writable)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(not_writable)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(not_writable(e)),
        }
        probe_writable(dir).map_err(not_writable)?;

        let listing = list(dir).map_err(|source| OpenError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut loaded = Loaded::default();
        let base = listing.snapshots.last().map_or(0, |(n, _)| *n);
        let now = Millis::now();
        let mut fold = LiveFold {
            records,
            loaded: &mut loaded,
            history,
            earliest_event: now.0.saturating_sub(dedup_window_ms),
        };
        if let Some((_, path)) = listing.snapshots.last() {
            read_file(path, SNAPSHOT_MAGIC, "snapshot", |e| fold.entry(e))?;
        }
        let mut next = base.max(1);
        for (n, path) in listing.segments.iter().filter(|(n, _)| *n >= base) {
            read_file(path, JOURNAL_MAGIC, "journal", |e| fold.entry(e))?;
            next = next.max(n + 1);
        }
        // Older files than the snapshot are left over from a compaction
        // interrupted before its clean-up.
        for (n, path) in listing
            .snapshots
            .iter()
            .filter(|(n, _)| *n < base)
            .chain(listing.segments.iter().filter(|(n, _)| *n < base))
        {
            tracing::debug!(file = %path.display(), n, "removing a file an earlier snapshot replaced");
            let _ = std::fs::remove_file(path);
        }
        loaded.bytes = dir_bytes(dir);

        let segment = create_segment(dir, next).map_err(not_writable)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            pending: Mutex::new(Vec::with_capacity(1 << 16)),
            healthy: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            compact: Mutex::new(None),
            compact_wake: Condvar::new(),
            history,
            dedup_window_ms,
            segment_bytes,
            last_error: Mutex::new(None),
        });
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || write_loop(&shared, segment, next, lock))
                .map_err(not_writable)?
        };
        let compactor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("journal-compactor".into())
                .spawn(move || compact_loop(&shared))
                .map_err(not_writable)?
        };
        // A long journal from the last run is folded into a snapshot soon.
        if listing
            .segments
            .iter()
            .filter(|(n, _)| *n >= base)
            .map(|(_, p)| file_len(p))
            .sum::<u64>()
            >= segment_bytes
        {
            *shared.compact.lock() = Some(next);
            shared.compact_wake.notify_one();
        }
        Ok((
            Journal {
                shared,
                writer: Mutex::new(Some(writer)),
                compactor: Mutex::new(Some(compactor)),
            },
            loaded,
        ))
    }

    /// Appends one entry to the buffer (written within [`FLUSH_INTERVAL`]).
    pub fn append(&self, entry: &Entry<'_>) {
        codec::encode(entry, &mut self.shared.pending.lock());
    }

    /// Whether every write so far could be handed to the disk (a failed
    /// write or sync makes the store refuse new writes until it recovers).
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The writer's latest failure, while it lasts.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    /// Writes and syncs everything buffered, then stops the threads
    /// (blocking; at shutdown). Idempotent.
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _guard = self.shared.wake_lock.lock();
            self.shared.wake.notify_all();
        }
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        {
            let _guard = self.shared.compact.lock();
            self.shared.compact_wake.notify_all();
        }
        if let Some(compactor) = self.compactor.lock().take() {
            let _ = compactor.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

/// Folds loaded entries into the live store.
struct LiveFold<'a> {
    records: &'a Records,
    loaded: &'a mut Loaded,
    history: usize,
    earliest_event: i64,
}

impl LiveFold<'_> {
    fn entry(&mut self, entry: Entry<'_>) {
        match entry {
            Entry::Record(r) => {
                let Some(source) = self.records.source_index(r.source) else {
                    self.loaded.orphans += 1;
                    return;
                };
                let presence = r.presence.into_owned();
                self.loaded.seq = self.loaded.seq.max(presence.seq);
                if r.change
                    && self.history > 0
                    && let Some(id) = self.records.source_id(source)
                {
                    if self.loaded.history.len() == self.history {
                        self.loaded.history.pop_front();
                    }
                    self.loaded
                        .history
                        .push_back(Event::Presence(PresenceRecord::new(
                            id,
                            r.principal,
                            &presence,
                        )));
                }
                self.records.install(source, r.principal, presence);
            }
            Entry::EventId { source, id, at } => {
                if at.0 >= self.earliest_event
                    && let Some(source) = self.records.source_index(source)
                {
                    self.records.remember_event(source, id, at);
                }
            }
            Entry::Meta { key, value } => match value {
                Some(v) => {
                    self.loaded.meta.insert(key.to_owned(), v.to_owned());
                }
                None => {
                    self.loaded.meta.remove(key);
                }
            },
            Entry::Seq(seq) => self.loaded.seq = self.loaded.seq.max(seq),
            Entry::Person {
                id,
                seq,
                change,
                present,
                json,
            } => {
                self.loaded.seq = self.loaded.seq.max(seq);
                // Written by this build: a record that does not read back
                // is corruption the CRC missed; the person is re-derived.
                let Ok(record) = serde_json::from_str::<PersonRecord>(json) else {
                    self.loaded.people.remove(id);
                    return;
                };
                let record = Arc::new(record);
                self.loaded.seq = self.loaded.seq.max(record.seq);
                if change && self.history > 0 {
                    if self.loaded.history.len() == self.history {
                        self.loaded.history.pop_front();
                    }
                    self.loaded
                        .history
                        .push_back(Event::Person(Arc::clone(&record)));
                }
                if present {
                    self.loaded.people.insert(Arc::from(id), record);
                } else {
                    self.loaded.people.remove(id);
                }
            }
        }
    }
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".write-probe");
    let mut file = File::create(&probe)?;
    file.write_all(b"ok")?;
    file.sync_all()?;
    drop(file);
    std::fs::remove_file(&probe)
}

fn list(dir: &Path) -> std::io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            // An interrupted compaction's output.
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        let number = |prefix: &str, suffix: &str| {
            name.strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse::<u64>()
                .ok()
        };
        if let Some(n) = number("snapshot-", ".bin") {
            listing.snapshots.push((n, entry.path()));
        } else if let Some(n) = number("journal-", ".log") {
            listing.segments.push((n, entry.path()));
        }
    }
    listing.snapshots.sort();
    listing.segments.sort();
    Ok(listing)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("journal-{n:010}.log"))
}

fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:010}.bin"))
}

fn header(magic: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// Creates segment `n` with its header, synced with its directory entry.
fn create_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    let path = segment_path(dir, n);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    file.write_all(&header(JOURNAL_MAGIC))?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn dir_bytes(dir: &Path) -> u64 {
    list(dir).map_or(0, |l| {
        l.snapshots
            .iter()
            .chain(&l.segments)
            .map(|(_, p)| file_len(p))
            .sum()
    })
}

/// Reads every good entry of one file into `f`. A torn or corrupt tail is
/// cut off the file (with a warning) so the next start does not meet it
/// again; a wrong magic or version is an error.
fn read_file(
    path: &Path,
    magic: &[u8; 8],
    what: &'static str,
    mut f: impl FnMut(Entry<'_>),
) -> Result<(), OpenError> {
    let read_error = |source| OpenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() < HEADER_LEN {
        // A segment whose header never reached the disk holds nothing.
        tracing::warn!(file = %path.display(), "{what} file has no complete header; treating it as empty");
        truncate(path, 0);
        return Ok(());
    }
    if &bytes[..8] != magic {
        return Err(OpenError::NotOurs {
            path: path.to_path_buf(),
            what,
        });
    }
    let found = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if found != FORMAT_VERSION {
        return Err(OpenError::Version {
            path: path.to_path_buf(),
            found,
        });
    }
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        match codec::decode(&bytes[at..]) {
            Ok((entry, len)) => {
                f(entry);
                at += len;
            }
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    offset = at,
                    dropped_bytes = bytes.len() - at,
                    reason = %e,
                    "{what} file has a torn or corrupt tail; cutting it at the last good entry"
                );
                truncate(path, at as u64);
                break;
            }
        }
    }
    Ok(())
}

fn truncate(path: &Path, len: u64) {
    let result = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()));
    if let Err(e) = result {
        tracing::warn!(file = %path.display(), error = %e, "could not cut the file; the next start will cut it again");
    }
}

/// The writer thread: hands the buffer to the OS every [`FLUSH_INTERVAL`],
/// syncs every [`SYNC_INTERVAL`], rotates segments, and on failure keeps
/// the unwritten bytes and retries.
fn write_loop(shared: &Shared, mut file: File, mut number: u64, _lock: File) {
    // Bytes of the current segment known to be written whole.
    let mut good = HEADER_LEN as u64;
    let mut carry: Vec<u8> = Vec::new();
    let mut spare: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    loop {
        let stopping = shared.stop.load(Ordering::Acquire);
        if !stopping {
            let mut guard = shared.wake_lock.lock();
            if !shared.stop.load(Ordering::Acquire) {
                shared.wake.wait_for(&mut guard, FLUSH_INTERVAL);
            }
        }
        let stopping = shared.stop.load(Ordering::Acquire);
        {
            let mut pending = shared.pending.lock();
            std::mem::swap(&mut *pending, &mut spare);
        }
        if carry.is_empty() {
            std::mem::swap(&mut carry, &mut spare);
        } else {
            carry.extend_from_slice(&spare);
            spare.clear();
        }
        let mut failure = None;
        if !carry.is_empty() {
            match file.write_all(&carry) {
                Ok(()) => {
                    good += carry.len() as u64;
                    carry.clear();
                    unsynced = true;
                }
                Err(e) => {
                    // Part of it may be in the file: cut back to the last
                    // whole write so the retry does not follow a torn frame,
                    // and write the retry there. (Cutting does not move the
                    // file position: the retry would land past the end and
                    // leave a hole of zeros, which reads as a corrupt tail
                    // and loses everything after it at the next start.)
                    if let Err(e) = file.set_len(good) {
                        tracing::debug!(error = %e, "could not cut the journal back");
                    }
                    if let Err(e) = file.seek(SeekFrom::Start(good)) {
                        tracing::debug!(error = %e, "could not rewind the journal");
                    }
                    failure = Some(format!("journal write failed: {e}"));
                }
            }
        }
        if failure.is_none() && unsynced && (stopping || last_sync.elapsed() >= SYNC_INTERVAL) {
            match file.sync_data() {
                Ok(()) => {
                    unsynced = false;
                    last_sync = Instant::now();
                }
                Err(e) => failure = Some(format!("journal sync failed: {e}")),
            }
        }
        if failure.is_none() && good >= shared.segment_bytes && !stopping {
            match create_segment(&shared.dir, number + 1) {
                Ok(next) => {
                    if let Err(e) = file.sync_all() {
                        failure = Some(format!("journal sync failed: {e}"));
                    } else {
                        file = next;
                        number += 1;
                        good = HEADER_LEN as u64;
                        *shared.compact.lock() = Some(number);
                        shared.compact_wake.notify_one();
                    }
                }
                Err(e) => failure = Some(format!("cannot start a new journal segment: {e}")),
            }
        }
        let failed = failure.is_some();
        match failure {
            Some(message) => {
                if shared.healthy.swap(false, Ordering::AcqRel) {
                    tracing::error!(dir = %shared.dir.display(), error = %message, "journal unavailable: webhooks are answered 503 until it recovers");
                }
                *shared.last_error.lock() = Some(message);
            }
            None if carry.is_empty() && !shared.healthy.swap(true, Ordering::AcqRel) => {
                tracing::info!(dir = %shared.dir.display(), "journal writes work again");
                *shared.last_error.lock() = None;
            }
            None => {}
        }
        if stopping {
            if carry.is_empty() && shared.pending.lock().is_empty() {
                return;
            }
            if failed {
                tracing::error!(dir = %shared.dir.display(), bytes = carry.len(), "stopping with journal entries that could not be written");
                return;
            }
        }
    }
}

/// The compactor thread: waits for a segment rotation, then folds the last
/// snapshot and the closed segments into a new snapshot.
fn compact_loop(shared: &Shared) {
    loop {
        let open = {
            let mut compact = shared.compact.lock();
            while compact.is_none() && !shared.stop.load(Ordering::Acquire) {
                shared.compact_wake.wait(&mut compact);
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            compact.take()
        };
        let Some(open) = open else { continue };
        let started = Instant::now();
        match compact(shared, open) {
            Ok(Some(stats)) => tracing::info!(
                snapshot = %stats.path.display(),
                records = stats.records,
                bytes = stats.bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "journal compacted into a snapshot"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dir = %shared.dir.display(), error = %e, "journal compaction failed; retried at the next segment")
            }
        }
    }
}

struct CompactStats {
    path: PathBuf,
    records: usize,
    bytes: u64,
}

/// Writes `snapshot-{open}` from the newest snapshot and every segment below
/// `open` (the one being written), then removes them.
fn compact(shared: &Shared, open: u64) -> Result<Option<CompactStats>, OpenError> {
    let dir = &shared.dir;
    let listing = list(dir).map_err(|source| OpenError::Read {
        path: dir.clone(),
        source,
    })?;
    let base = listing.snapshots.last().map_or(0, |(n, _)| *n);
    let closed: Vec<&(u64, PathBuf)> = listing
        .segments
        .iter()
        .filter(|(n, _)| *n >= base && *n < open)
        .collect();
    if closed.is_empty() {
        return Ok(None);
    }
    let mut fold = ByteFold {
        history: VecDeque::new(),
        history_cap: shared.history,
        records: HashMap::new(),
        events: HashMap::new(),
        meta: HashMap::new(),
        people: HashMap::new(),
        seq: 0,
    };
    // A stop does not wait for a compaction: it is abandoned (what it
    // would replace stays, and is read at the next start).
    let stopping = || shared.stop.load(Ordering::Acquire);
    if let Some((_, path)) = listing.snapshots.last() {
        read_file(path, SNAPSHOT_MAGIC, "snapshot", |e| fold.entry(&e))?;
    }
    for (_, path) in &closed {
        if stopping() {
            return Ok(None);
        }
        read_file(path, JOURNAL_MAGIC, "journal", |e| fold.entry(&e))?;
    }
    if stopping() {
        return Ok(None);
    }
    let earliest = Millis::now().0.saturating_sub(shared.dedup_window_ms);
    let path = snapshot_path(dir, open);
    let tmp = path.with_extension("bin.tmp");
    let write_error = |source| OpenError::NotWritable {
        path: tmp.clone(),
        source,
    };
    let mut out =
        std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(write_error)?);
    out.write_all(&header(SNAPSHOT_MAGIC))
        .map_err(write_error)?;
    let mut buf = Vec::with_capacity(1 << 16);
    let flush = |buf: &mut Vec<u8>, out: &mut std::io::BufWriter<File>| {
        let r = out.write_all(buf);
        buf.clear();
        r
    };
    // History first, records after: loading installs every record entry in
    // order, so the current state must come last.
    for frame in &fold.history {
        buf.extend_from_slice(frame);
        if buf.len() > 1 << 16 {
            flush(&mut buf, &mut out).map_err(write_error)?;
        }
    }
    for frame in fold.records.values() {
        buf.extend_from_slice(frame);
        if buf.len() > 1 << 16 {
            flush(&mut buf, &mut out).map_err(write_error)?;
            if stopping() {
                drop(out);
                let _ = std::fs::remove_file(&tmp);
                return Ok(None);
            }
        }
    }
    for frame in fold.people.values() {
        buf.extend_from_slice(frame);
    }
    for ((source, id), at) in &fold.events {
        if *at >= earliest {
            codec::encode(
                &Entry::EventId {
                    source,
                    id,
                    at: Millis(*at),
                },
                &mut buf,
            );
        }
    }
    for (key, value) in &fold.meta {
        codec::encode(
            &Entry::Meta {
                key,
                value: Some(value),
            },
            &mut buf,
        );
    }
    codec::encode(&Entry::Seq(fold.seq), &mut buf);
    flush(&mut buf, &mut out).map_err(write_error)?;
    let file = out.into_inner().map_err(|e| write_error(e.into_error()))?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(write_error)?;
    sync_dir(dir).map_err(write_error)?;
    for (_, old) in listing.snapshots.iter().filter(|(n, _)| *n < open) {
        let _ = std::fs::remove_file(old);
    }
    for (_, old) in &closed {
        let _ = std::fs::remove_file(old);
    }
    Ok(Some(CompactStats {
        bytes: file_len(&path),
        path,
        records: fold.records.len(),
    }))
}

/// Folds entries as bytes, for compaction: the latest frame per record, the
/// last changes, live event ids, upstream values, `seq`.
struct ByteFold {
    history: VecDeque<Vec<u8>>,
    history_cap: usize,
    records: HashMap<(Box<str>, Box<str>), Vec<u8>>,
    events: HashMap<(Box<str>, Box<str>), i64>,
    meta: HashMap<String, String>,
    /// People's current records, as frames.
    people: HashMap<Box<str>, Vec<u8>>,
    seq: u64,
}

impl ByteFold {
    fn entry(&mut self, entry: &Entry<'_>) {
        match entry {
            Entry::Record(r) => {
                self.seq = self.seq.max(r.presence.seq);
                if r.change && self.history_cap > 0 {
                    if self.history.len() == self.history_cap {
                        self.history.pop_front();
                    }
                    let mut frame = Vec::new();
                    codec::encode(entry, &mut frame);
                    self.history.push_back(frame);
                }
                let mut frame = Vec::new();
                let mut current = r.clone();
                current.change = false;
                codec::encode(&Entry::Record(current), &mut frame);
                self.records
                    .insert((r.source.into(), r.principal.into()), frame);
            }
            Entry::EventId { source, id, at } => {
                let at_least = self
                    .events
                    .entry(((*source).into(), (*id).into()))
                    .or_insert(at.0);
                *at_least = (*at_least).max(at.0);
            }
            Entry::Meta { key, value } => match value {
                Some(v) => {
                    self.meta.insert((*key).to_owned(), (*v).to_owned());
                }
                None => {
                    self.meta.remove(*key);
                }
            },
            Entry::Seq(seq) => self.seq = self.seq.max(*seq),
            Entry::Person {
                id,
                seq,
                change,
                present,
                json,
            } => {
                self.seq = self.seq.max(*seq);
                if *change && self.history_cap > 0 {
                    if self.history.len() == self.history_cap {
                        self.history.pop_front();
                    }
                    let mut frame = Vec::new();
                    codec::encode(entry, &mut frame);
                    self.history.push_back(frame);
                }
                if *present {
                    let mut frame = Vec::new();
                    codec::encode(
                        &Entry::Person {
                            id,
                            seq: *seq,
                            change: false,
                            present: true,
                            json,
                        },
                        &mut frame,
                    );
                    self.people.insert((*id).into(), frame);
                } else {
                    self.people.remove(*id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::records::StoreLimits;
    use crate::presence::{ApplyOutcome, Availability, Presence, PresenceUpdate};
    use std::borrow::Cow;

    fn limits() -> StoreLimits {
        StoreLimits {
            history: 100,
            dedup_window_ms: 600_000,
            dedup_capacity: 1_000,
            stream_buffer: 16,
            max_future_skew_ms: 300_000,
        }
    }

    fn records() -> Records {
        Records::new(&[Arc::from("a"), Arc::from("b")], limits())
    }

    fn update(
        principal: &str,
        availability: Availability,
        at: i64,
        id: &str,
    ) -> PresenceUpdate<'static> {
        PresenceUpdate {
            principal: Cow::Owned(principal.to_owned()),
            availability,
            activity: Some(Cow::Borrowed("in_a_meeting")),
            status_text: None,
            raw_status: Some(Cow::Borrowed("Busy")),
            observed_at: Some(Millis(at)),
            event_id: Some(Cow::Owned(id.to_owned())),
        }
    }

    fn state(r: &Records) -> Vec<(String, String, Presence)> {
        let mut all = Vec::new();
        r.for_each(|s, p, presence| all.push((s.to_string(), p.to_owned(), presence.clone())));
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    fn open(dir: &Path, records: &Records) -> (Journal, Loaded) {
        Journal::open(dir, records, 100, 600_000).expect("open")
    }

    #[test]
    fn everything_written_is_there_after_a_restart() {
        let dir = tempdir();
        let now = Millis::now();
        let before = records();
        let (journal, loaded) = open(dir.path(), &before);
        assert_eq!(loaded.seq, 0);
        for i in 0..50 {
            let u = update(
                &format!("p{i}"),
                Availability::Busy,
                now.0 + i,
                &format!("e{i}"),
            );
            before.apply_with(i as usize % 2, &u, now, Some(&journal));
        }
        // A refresh (same content, newer time) and a call.
        let refresh = update("p0", Availability::Busy, now.0 + 500, "e-refresh");
        assert_eq!(
            before.apply_with(0, &refresh, now, Some(&journal)),
            ApplyOutcome::Refreshed
        );
        let call = crate::presence::CallUpdate {
            principal: Cow::Borrowed("p2"),
            call_id: Cow::Borrowed("call-1"),
            state: Some(crate::presence::CallState::Connected),
            observed_at: None,
        };
        assert!(matches!(
            before.apply_call_with(0, &call, now, Some(&journal)),
            ApplyOutcome::Changed(51)
        ));
        journal.append(&Entry::Meta {
            key: "sub/x",
            value: Some("{\"id\":\"1\"}"),
        });
        journal.close();

        let after = records();
        let (journal, loaded) = open(dir.path(), &after);
        assert_eq!(state(&after), state(&before));
        assert_eq!(loaded.seq, 51);
        assert_eq!(loaded.history.len(), 51);
        assert!(
            loaded
                .history
                .iter()
                .zip(1..)
                .all(|(r, seq)| r.seq() == seq)
        );
        assert_eq!(
            loaded.meta.get("sub/x").map(String::as_str),
            Some("{\"id\":\"1\"}")
        );
        // Ids seen before the restart are still duplicates.
        let retry = update("p3", Availability::Away, now.0 + 900, "e3");
        assert_eq!(
            after.apply_with(1, &retry, now, Some(&journal)),
            ApplyOutcome::Duplicate
        );
        let retry = update("p0", Availability::Away, now.0 + 900, "e-refresh");
        assert_eq!(
            after.apply_with(0, &retry, now, Some(&journal)),
            ApplyOutcome::Duplicate
        );
    }

    #[test]
    fn a_torn_or_garbage_tail_is_cut_at_the_last_good_entry() {
        for garbage in [&b"\x40\x00\x00\x00\x01\x02"[..], &[0xff; 300][..]] {
            let dir = tempdir();
            let now = Millis::now();
            let before = records();
            let (journal, _) = open(dir.path(), &before);
            for i in 0..10 {
                before.apply_with(
                    0,
                    &update(
                        &format!("p{i}"),
                        Availability::Busy,
                        now.0,
                        &format!("e{i}"),
                    ),
                    now,
                    Some(&journal),
                );
            }
            journal.close();
            drop(journal);
            let segment = segment_path(dir.path(), 1);
            let good_len = file_len(&segment);
            let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
            file.write_all(garbage).unwrap();
            drop(file);

            let after = records();
            let (journal, loaded) = open(dir.path(), &after);
            assert_eq!(loaded.seq, 10);
            assert_eq!(state(&after), state(&before));
            assert_eq!(file_len(&segment), good_len, "the tail was cut");
            journal.close();
        }
    }

    #[test]
    fn another_format_version_is_refused_naming_the_file() {
        let dir = tempdir();
        let (journal, _) = open(dir.path(), &records());
        journal.close();
        drop(journal);
        let segment = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&segment, bytes).unwrap();
        let err = Journal::open(dir.path(), &records(), 100, 1).unwrap_err();
        assert!(
            matches!(err, OpenError::Version { found: 99, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("journal-0000000001.log") && message.contains("version 99"),
            "{message}"
        );
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_an_error_naming_it() {
        let dir = tempdir();
        // Below a regular file: not writable whoever we are (even root).
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let target = file.join("state");
        let err = Journal::open(&target, &records(), 100, 1).unwrap_err();
        assert!(matches!(err, OpenError::NotWritable { .. }));
        assert!(err.to_string().contains(&target.display().to_string()));
    }

    #[test]
    fn a_second_process_cannot_use_the_same_directory() {
        let dir = tempdir();
        let (journal, _) = open(dir.path(), &records());
        let err = Journal::open(dir.path(), &records(), 100, 1).unwrap_err();
        assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
        journal.close();
        drop(journal);
        let (again, _) = open(dir.path(), &records());
        again.close();
    }

    #[test]
    fn compaction_keeps_the_state_and_removes_what_it_replaced() {
        let dir = tempdir();
        let now = Millis::now();
        let before = records();
        let (journal, _) = Journal::open_with(dir.path(), &before, 100, 600_000, 4096).unwrap();
        for round in 0..40 {
            for i in 0..20 {
                let availability = [Availability::Busy, Availability::Away][round % 2];
                let u = update(
                    &format!("p{i}"),
                    availability,
                    now.0 + round as i64,
                    &format!("e{round}-{i}"),
                );
                before.apply_with(0, &u, now, Some(&journal));
            }
            // Let the writer rotate now and then.
            std::thread::sleep(FLUSH_INTERVAL / 4);
        }
        // Wait for at least one snapshot to appear.
        let deadline = Instant::now() + Duration::from_secs(30);
        while list(dir.path()).unwrap().snapshots.is_empty() {
            assert!(Instant::now() < deadline, "no snapshot was written");
            std::thread::sleep(Duration::from_millis(20));
        }
        journal.close();
        drop(journal);
        let listing = list(dir.path()).unwrap();
        let base = listing.snapshots.last().unwrap().0;
        assert!(
            listing.segments.iter().all(|(n, _)| *n >= base),
            "replaced segments removed"
        );

        let after = records();
        let (journal, loaded) = open(dir.path(), &after);
        assert_eq!(state(&after), state(&before));
        assert_eq!(loaded.seq, 800);
        assert_eq!(loaded.history.len(), 100);
        assert_eq!(loaded.history.back().map(|r| r.seq()), Some(800));
        let retry = update("p1", Availability::Busy, now.0 + 39, "e39-1");
        assert_eq!(
            after.apply_with(0, &retry, now, Some(&journal)),
            ApplyOutcome::Duplicate
        );
        journal.close();
    }

    /// Person records and events (DESIGN §9) come back after a restart,
    /// also from a snapshot that compaction wrote: current people, the
    /// events in the history in `seq` order, and no person that was
    /// removed.
    #[test]
    fn person_records_and_events_survive_restarts_and_compaction() {
        use crate::config::people::{Identity, Mapping, PersonDef};
        use crate::people::{self, People};
        let mapping = |people: &[(&str, &str)]| Mapping {
            version: 1,
            match_equal_principals: false,
            people: people
                .iter()
                .map(|(id, principal)| PersonDef {
                    id: Arc::from(*id),
                    name: None,
                    identities: vec![Identity {
                        source: Arc::from("a"),
                        principal: Arc::from(*principal),
                    }],
                })
                .collect(),
        };
        let dir = tempdir();
        let now = Millis::now();
        let before = records();
        let (journal, _) = Journal::open_with(dir.path(), &before, 1000, 600_000, 4096).unwrap();
        let persons = People::default();
        let commit = |change| people::commit_local(&before, Some(&journal), change);
        persons.reconcile(&mapping(&[("ana", "p0"), ("bo", "p1")]), &before, &commit);
        for round in 0..40 {
            for i in 0..4 {
                let availability = [Availability::Busy, Availability::Away][round % 2];
                let principal = format!("p{i}");
                let u = update(
                    &principal,
                    availability,
                    now.0 + round as i64,
                    &format!("e{round}-{i}"),
                );
                before.apply_with(0, &u, now, Some(&journal));
                persons.touched(0, &principal, &before, &commit);
            }
            std::thread::sleep(FLUSH_INTERVAL / 4);
        }
        // Bo leaves: his final record is the last person event.
        persons.reconcile(&mapping(&[("ana", "p0")]), &before, &commit);
        let deadline = Instant::now() + Duration::from_secs(30);
        while list(dir.path()).unwrap().snapshots.is_empty() {
            assert!(Instant::now() < deadline, "no snapshot was written");
            std::thread::sleep(Duration::from_millis(20));
        }
        let last = before.changes().last_seq();
        let kept: Vec<_> = before
            .changes()
            .since(last - 50)
            .unwrap()
            .iter()
            .map(|c| c.event.clone())
            .collect();
        journal.close();
        drop(journal);

        let after = records();
        let (journal, loaded) = open(dir.path(), &after);
        assert_eq!(loaded.seq, last);
        let ana = persons.get("ana", &before).unwrap();
        let loaded_ana = loaded.people.get("ana").expect("ana");
        assert_eq!(
            (loaded_ana.seq, loaded_ana.availability),
            (ana.seq, ana.availability)
        );
        assert!(!loaded.people.contains_key("bo"), "bo was removed");
        let tail: Vec<_> = loaded
            .history
            .iter()
            .skip(loaded.history.len() - 50)
            .cloned()
            .collect();
        assert_eq!(tail, kept, "the history, person events included, in order");
        let bo_last = loaded.history.back().and_then(|e| match e {
            crate::presence::Event::Person(p) => Some(p.clone()),
            crate::presence::Event::Presence(_) => None,
        });
        let bo_last = bo_last.expect("a person event last");
        assert_eq!(
            (&*bo_last.person, bo_last.availability),
            ("bo", Availability::Unknown)
        );
        journal.close();
    }

    /// A fresh directory under the target dir's tmp, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn tempdir() -> TempDir {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pg-journal-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}
