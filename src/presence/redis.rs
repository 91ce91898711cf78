//! The Redis backend: several replicas share one Redis server (DESIGN §8).
//!
//! Redis holds the truth; each replica keeps a mirror of it in its
//! [`Records`] (which serves every read, also while Redis is unreachable) and
//! a local [`super::ChangeLog`] fed in `seq` order from Redis.
//!
//! Keys (all under the configured prefix `P`):
//! - `P:seq`: the last `seq` handed out (one counter for every replica);
//! - `P:rec:{source}`: a hash, principal → `"{rev} {seq} {record}"` (the
//!   record in [`codec::encode_presence`] form);
//! - `P:history`: a stream of changes, id `{seq}-0`, trimmed to about
//!   `store.history`: the replay history every replica resumes from;
//! - `P:dedup:{source}:{event id}`: present while the id is inside the dedup
//!   window (`PX`);
//! - `P:meta`: a hash of upstream values (subscription ids, refresh tokens);
//! - channel `P:changes`: every write, as it happens;
//! - `P:people` and person events in `P:history` and on `P:changes`: see
//!   [`people`].
//!
//! A write is decided here with the same rules as the memory backend
//! ([`update_record`]), on the mirror's copy of the record, and made in Redis
//! by one script that checks the event id (duplicate), checks that the record
//! is still the revision the decision was made on, and then writes the
//! record, takes the next `seq`, appends the change to the stream and
//! publishes it, atomically. When another replica wrote the record in
//! between, the script answers with the current copy and the write is
//! decided again on it. So a retry that lands on another replica is still a
//! duplicate, and no two replicas can interleave an update.
//!
//! Changes reach this replica's streams only through the feed (the channel,
//! backfilled from the stream after any gap), never straight from a write, so
//! every replica's streams see every change exactly once in `seq` order.

mod people;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::Value;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::codec;
use super::model::{Millis, Presence, PresenceRecord};
use super::records::{
    ApplyOutcome, Records, Step, new_call_record, new_record, update_call, update_record,
};
use super::store::StoreError;
use super::{CallUpdate, Event, PresenceUpdate};
use crate::cluster::feed::{self, FeedEvent};
use crate::cluster::{Redis, Unavailable};
use crate::people::People;

/// Decide-and-write rounds before a write gives up (each lost round means
/// another replica wrote the same record in between).
const MAX_ATTEMPTS: usize = 16;
/// Stream entries read per backfill call.
const BACKFILL_BATCH: usize = 1000;
/// Records read per `HSCAN` call at start-up.
const SCAN_BATCH: usize = 1000;

/// See the module doc. `KEYS`: record hash, seq counter, history stream,
/// dedup key. `ARGV`: principal, expected revision, mode (`mark`: only
/// remember the event id; `refresh`: write without a new `seq`; `change`),
/// record, history length, dedup window (ms), channel, source id, whether
/// there is an event id (`1`/`0`), the highest `seq` the writer has seen.
///
/// Answers `{"dup"}`, `{"conflict", current value or false}`, or `{"ok",
/// rev, seq}`.
const APPLY: &str = r"
local has_event = ARGV[9] == '1'
if has_event and redis.call('EXISTS', KEYS[4]) == 1 then
  return {'dup'}
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
local rev, seq = 0, 0
if current then
  local r, s = string.match(current, '^(%d+) (%d+) ')
  rev, seq = tonumber(r), tonumber(s)
end
if rev ~= tonumber(ARGV[2]) then
  return {'conflict', current}
end
if has_event then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[6])
end
if ARGV[3] == 'mark' then
  return {'ok', rev, seq}
end
rev = rev + 1
local kind = 'r'
if ARGV[3] == 'change' then
  seq = redis.call('INCR', KEYS[2])
  -- Never below what the writer has seen (a Redis that lost its data).
  if seq <= tonumber(ARGV[10]) then
    seq = tonumber(ARGV[10]) + 1
    redis.call('SET', KEYS[2], seq)
  end
  kind = 'c'
end
local value = rev .. ' ' .. seq .. ' ' .. ARGV[4]
redis.call('HSET', KEYS[1], ARGV[1], value)
if kind == 'c' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], seq .. '-0', 's', ARGV[8], 'p', ARGV[1], 'v', value)
end
redis.call('PUBLISH', ARGV[7], kind .. '\n' .. ARGV[8] .. '\n' .. string.len(ARGV[1]) .. '\n' .. ARGV[1] .. value)
return {'ok', rev, seq}
";

/// Moves the `seq` counter up to `ARGV[1]` when it is below; answers 1
/// when it did.
const RAISE_SEQ: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
";

/// The backend; see the module doc.
pub struct RedisBackend {
    redis: Redis,
    apply: redis::Script,
    /// The person commit script ([`people::PERSON`]).
    person: redis::Script,
    seq_key: String,
    history_key: String,
    channel: String,
    meta_key: String,
    people_key: String,
    /// Per source index: its id and record hash key.
    sources: Vec<(Arc<str>, String)>,
    history: usize,
    window_ms: u64,
    /// The mirror was loaded from Redis (start-up done).
    loaded: AtomicBool,
    /// Wakes [`RedisBackend::wait_loaded`] once `loaded` is set.
    loaded_signal: Notify,
    /// The highest `seq` this replica has seen (written, received or
    /// loaded): Redis must never hand out one at or below it, even after
    /// losing its data.
    seen: AtomicU64,
}

/// One `HSCAN` answer: the next cursor and field/value pairs.
type ScanPage = (u64, Vec<(Vec<u8>, Vec<u8>)>);

/// What a decision on the current copy of a record came to.
enum Decision {
    /// Nothing to write: this is the outcome.
    Done(ApplyOutcome),
    /// Write this copy (or, for a stale event, only remember its id).
    Write(Step, Presence),
}

/// One call of the apply script.
struct Write<'a> {
    source: usize,
    principal: &'a str,
    /// The revision the decision was made on (0: no record).
    expected: u32,
    step: Step,
    next: &'a Presence,
    event_id: Option<&'a str>,
    /// The highest `seq` this replica has seen.
    seen_seq: u64,
}

/// What the script answered.
enum Reply {
    Duplicate,
    Conflict(Option<Presence>),
    Done { rev: u32, seq: u64 },
}

impl RedisBackend {
    /// A backend on `redis` for the given sources; nothing is read until
    /// [`RedisBackend::start`].
    pub fn new(redis: Redis, source_ids: &[Arc<str>], history: usize, window_ms: i64) -> Self {
        RedisBackend {
            apply: redis::Script::new(APPLY),
            person: redis::Script::new(people::PERSON),
            people_key: redis.key(&["people"]),
            seq_key: redis.key(&["seq"]),
            history_key: redis.key(&["history"]),
            channel: redis.key(&["changes"]),
            meta_key: redis.key(&["meta"]),
            sources: source_ids
                .iter()
                .map(|id| (Arc::clone(id), redis.key(&["rec", id])))
                .collect(),
            history,
            window_ms: u64::try_from(window_ms).unwrap_or(0),
            loaded: AtomicBool::new(false),
            loaded_signal: Notify::new(),
            seen: AtomicU64::new(0),
            redis,
        }
    }

    /// The Redis handle.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Whether writes can be taken now: the mirror is loaded and Redis
    /// answers.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire) && self.redis.is_up()
    }

    /// Returns once the mirror is loaded (at once afterwards).
    pub async fn wait_loaded(&self) {
        loop {
            // Created before the check: a `notify_waiters` after the check
            // still wakes it.
            let signal = self.loaded_signal.notified();
            if self.loaded.load(Ordering::Acquire) {
                return;
            }
            signal.await;
        }
    }

    fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
        self.loaded_signal.notify_waiters();
    }

    /// Subscribes to the change feed, loads the mirror (retrying until Redis
    /// answers), then follows the feed until `shutdown`.
    pub fn start(self: &Arc<Self>, records: Arc<RecordsHandle>, shutdown: CancellationToken) {
        let (tx, rx) = mpsc::channel(4096);
        feed::spawn(self.redis.clone(), tx, shutdown.clone());
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.follow(&records, rx, shutdown).await;
        });
    }

    async fn follow(
        &self,
        records: &RecordsHandle,
        mut rx: mpsc::Receiver<FeedEvent>,
        shutdown: CancellationToken,
    ) {
        // The feed is subscribed before the mirror is read, so nothing
        // written meanwhile is missed: what the load already holds is
        // skipped by `seq` and revision.
        loop {
            match self.load(records.get(), records.people()).await {
                Ok(()) => break,
                Err(Unavailable) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        self.set_loaded();
        tracing::info!(
            redis = %self.redis.endpoint(),
            records = records.get().total_len(),
            seq = records.get().changes().last_seq(),
            "state loaded from Redis"
        );
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = rx.recv() => event,
            };
            match event {
                None => return,
                Some(FeedEvent::Resubscribed) => {
                    // Retried until it works: the feed only resubscribes
                    // once Redis answers again.
                    while self.heal(records.get()).await.is_err()
                        || self
                            .backfill(records.get(), records.people())
                            .await
                            .is_err()
                    {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
                Some(FeedEvent::Message(bytes)) => {
                    if let Some((change, source, principal, presence)) = parse_message(&bytes) {
                        let seq = change.then_some(presence.seq);
                        self.fill_gap(records.get(), records.people(), seq).await;
                        if let Some(index) = self.index(source) {
                            self.install(records.get(), index, principal, presence, change);
                        }
                    } else if let Some(person) = people::parse_message(&bytes) {
                        let seq = person.record.seq;
                        self.fill_gap(records.get(), records.people(), Some(seq))
                            .await;
                        self.install_person(records.get(), records.people(), person);
                    }
                }
            }
        }
    }

    /// Before a replicated change with `seq` (`None`: a write that is no
    /// change) goes to the change log: when changes before it were missed,
    /// backfills them from the stream (best effort; a gap the stream no
    /// longer covers restarts the history).
    async fn fill_gap(&self, records: &Records, people: &People, seq: Option<u64>) {
        if let Some(seq) = seq
            && seq > records.changes().last_seq() + 1
        {
            let _ = self.backfill_to(records, people, seq - 1).await;
        }
    }

    fn install(
        &self,
        records: &Records,
        index: usize,
        principal: &str,
        presence: Presence,
        change: bool,
    ) {
        let record =
            change.then(|| PresenceRecord::new(&self.sources[index].0, principal, &presence));
        self.seen.fetch_max(presence.seq, Ordering::AcqRel);
        records.install_newer(index, principal, presence);
        if let Some(record) = record {
            records.changes().commit_replicated(Event::Presence(record));
        }
    }

    /// After Redis was away: if it came back without its data (a restart
    /// without persistence), `seq` must still never go back, or consumers
    /// would take new changes for old ones. The counter is moved up to what
    /// this replica has seen (another replica may move it further).
    async fn heal(&self, records: &Records) -> Result<(), Unavailable> {
        let last = self.seen(records);
        let mut conn = self.redis.conn().await?;
        let raised: i64 = self.redis.observe(
            redis::Script::new(RAISE_SEQ)
                .key(&self.seq_key)
                .arg(last)
                .invoke_async(&mut conn)
                .await,
        )?;
        if raised == 1 {
            tracing::error!(
                redis = %self.redis.endpoint(),
                seq = last,
                "Redis came back with an older seq than this replica has seen: it lost data \
                 (persistence off?); seq continues from here, lost records return as their \
                 principals change again"
            );
        }
        Ok(())
    }

    /// Reads every change after the log's last `seq` from the stream.
    async fn backfill(&self, records: &Records, people: &People) -> Result<(), Unavailable> {
        self.backfill_to(records, people, u64::MAX).await
    }

    /// Reads the changes after the log's last `seq`, up to `until`, from the
    /// stream.
    pub(crate) async fn backfill_to(
        &self,
        records: &Records,
        people: &People,
        until: u64,
    ) -> Result<(), Unavailable> {
        loop {
            let after = records.changes().last_seq();
            if after >= until {
                return Ok(());
            }
            let entries =
                feed::read_stream(&self.redis, &self.history_key, after, BACKFILL_BATCH).await?;
            let complete = entries.len() < BACKFILL_BATCH;
            for (seq, fields) in entries {
                if seq > until {
                    return Ok(());
                }
                if people::is_person_entry(&fields) {
                    if let Some(person) = people::parse_entry(&fields) {
                        self.install_person(records, people, person);
                    }
                } else if let Some((source, principal, presence)) = parse_entry(&fields)
                    && let Some(index) = self.index(source)
                {
                    self.install(records, index, principal, presence, true);
                }
            }
            if complete {
                return Ok(());
            }
        }
    }

    /// Loads the mirror: the history's tail and `seq`, then every record
    /// and every person record.
    async fn load(&self, records: &Records, people: &People) -> Result<(), Unavailable> {
        let mut conn = self.redis.conn().await?;
        let seq: Option<u64> = self.redis.observe(
            redis::cmd("GET")
                .arg(&self.seq_key)
                .query_async(&mut conn)
                .await,
        )?;
        let tail: Value = self.redis.observe(
            redis::cmd("XREVRANGE")
                .arg(&self.history_key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(self.history.max(1))
                .query_async(&mut conn)
                .await,
        )?;
        let mut history = Vec::new();
        for (_, fields) in stream_entries(tail) {
            if people::is_person_entry(&fields) {
                if let Some(person) = people::parse_entry(&fields) {
                    history.push(Event::Person(person.record));
                }
            } else if let Some((source, principal, presence)) = parse_entry(&fields)
                && let Some(index) = self.index(source)
            {
                history.push(Event::Presence(PresenceRecord::new(
                    &self.sources[index].0,
                    principal,
                    &presence,
                )));
            }
        }
        history.reverse();
        if self.history == 0 {
            history.clear();
        }
        records.changes().restore(seq.unwrap_or(0), history);
        for (index, (_, key)) in self.sources.iter().enumerate() {
            let mut cursor: u64 = 0;
            loop {
                let (next, items): ScanPage = self.redis.observe(
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(SCAN_BATCH)
                        .query_async(&mut conn)
                        .await,
                )?;
                for (principal, value) in items {
                    let (Ok(principal), Some(presence)) =
                        (std::str::from_utf8(&principal), parse_value(&value))
                    else {
                        continue;
                    };
                    self.seen.fetch_max(presence.seq, Ordering::AcqRel);
                    records.install_newer(index, principal, presence);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let mut cursor: u64 = 0;
        loop {
            let (next, items): ScanPage = self.redis.observe(
                redis::cmd("HSCAN")
                    .arg(&self.people_key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_BATCH)
                    .query_async(&mut conn)
                    .await,
            )?;
            for (id, value) in items {
                if let Some(record) = people::parse_stored(&id, &value) {
                    self.seen.fetch_max(record.seq, Ordering::AcqRel);
                    people.install(Arc::new(record), true);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(())
    }

    /// The highest `seq` seen here: in the change log, or written or
    /// installed but not yet in it.
    pub(crate) fn seen(&self, records: &Records) -> u64 {
        self.seen
            .load(Ordering::Acquire)
            .max(records.changes().last_seq())
    }

    fn index(&self, source: &str) -> Option<usize> {
        self.sources.iter().position(|(id, _)| &**id == source)
    }

    /// Applies a presence update; see the module doc.
    pub async fn apply(
        &self,
        records: &Records,
        source: usize,
        update: &PresenceUpdate<'_>,
        received_at: Millis,
    ) -> Result<ApplyOutcome, StoreError> {
        let event_id = update.event_id.as_deref().filter(|_| self.window_ms > 0);
        self.decide_and_write(records, source, &update.principal, event_id, |current| {
            let (step, next) = match current {
                Some(mut presence) => {
                    let step = update_record(&mut presence, update, received_at, &mut own);
                    (step, presence)
                }
                // The limit is checked on the mirror: a record another
                // replica has just added may not be here yet.
                None if !records.has_room() => return Decision::Done(ApplyOutcome::Full),
                None => (Step::Changed, new_record(update, received_at, &mut own)),
            };
            // Stale without an id: nothing to write or remember (the stored
            // record only ever gets newer).
            match (step, event_id) {
                (Step::Stale, None) => Decision::Done(ApplyOutcome::Stale),
                _ => Decision::Write(step, next),
            }
        })
        .await
    }

    /// Applies a call update; see [`Records::apply_call`].
    pub async fn apply_call(
        &self,
        records: &Records,
        source: usize,
        update: &CallUpdate<'_>,
        received_at: Millis,
    ) -> Result<ApplyOutcome, StoreError> {
        self.decide_and_write(records, source, &update.principal, None, |current| {
            let new = current.is_none();
            let mut next = match (current, update.state) {
                (Some(presence), _) => presence,
                // The end of a call never seen: nothing to show.
                (None, None) => return Decision::Done(ApplyOutcome::Refreshed),
                (None, Some(_)) if !records.has_room() => {
                    return Decision::Done(ApplyOutcome::Full);
                }
                (None, Some(_)) => new_call_record(update, received_at),
            };
            match update_call(&mut next, update, received_at, &mut own) {
                _ if new => Decision::Write(Step::Changed, next),
                step => Decision::Write(step, next),
            }
        })
        .await
    }

    /// Decides a write on the mirror's copy of the record with `decide`,
    /// then makes it in Redis; when another replica wrote the record in
    /// between, decides again on the copy Redis answered with.
    async fn decide_and_write(
        &self,
        records: &Records,
        source: usize,
        principal: &str,
        event_id: Option<&str>,
        mut decide: impl FnMut(Option<Presence>) -> Decision,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut known: Option<Option<Presence>> = None;
        for _ in 0..MAX_ATTEMPTS {
            let current = match known.take() {
                Some(current) => current,
                None => records.get_presence(source, principal),
            };
            let expected = current.as_ref().map_or(0, |p| p.rev);
            let (step, next) = match decide(current) {
                Decision::Done(outcome) => return Ok(outcome),
                Decision::Write(step, next) => (step, next),
            };
            let write = Write {
                source,
                principal,
                expected,
                step,
                next: &next,
                event_id,
                seen_seq: self.seen(records),
            };
            match self.write(write).await? {
                Reply::Duplicate => return Ok(ApplyOutcome::Duplicate),
                Reply::Conflict(current) => known = Some(current),
                Reply::Done { rev, seq } => {
                    return Ok(self.written(records, source, principal, step, next, (rev, seq)));
                }
            }
        }
        Err(StoreError::Unavailable(
            "too many concurrent writes to one record".into(),
        ))
    }

    /// After a successful write: the mirror takes the written copy at once
    /// (a read right after the answer sees it); the change itself reaches
    /// the change log through the feed.
    fn written(
        &self,
        records: &Records,
        source: usize,
        principal: &str,
        step: Step,
        mut next: Presence,
        (rev, seq): (u32, u64),
    ) -> ApplyOutcome {
        if step == Step::Stale {
            return ApplyOutcome::Stale;
        }
        next.rev = rev;
        next.seq = seq;
        self.seen.fetch_max(seq, Ordering::AcqRel);
        records.install_newer(source, principal, next);
        match step {
            Step::Changed => ApplyOutcome::Changed(seq),
            _ => ApplyOutcome::Refreshed,
        }
    }

    /// Runs the script.
    async fn write(&self, w: Write<'_>) -> Result<Reply, StoreError> {
        let Write {
            source,
            principal,
            expected,
            step,
            next,
            event_id,
            seen_seq,
        } = w;
        let (source_id, record_key) = &self.sources[source];
        let mode = match step {
            Step::Stale => "mark",
            Step::Refreshed => "refresh",
            Step::Changed => "change",
        };
        let mut blob = Vec::with_capacity(96);
        if step != Step::Stale {
            codec::encode_presence(next, false, &mut blob);
        }
        let dedup_key = match event_id {
            Some(id) => self.redis.key(&["dedup", source_id, id]),
            None => String::new(),
        };
        let mut conn = self.redis.conn().await.map_err(unavailable)?;
        // One command with its arguments in one buffer (a script invocation
        // would allocate every argument on its own: measurable per webhook).
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.apply.get_hash())
            .arg(4)
            .arg(record_key)
            .arg(&self.seq_key)
            .arg(&self.history_key)
            .arg(&dedup_key)
            .arg(principal)
            .arg(expected)
            .arg(mode)
            .arg(blob)
            .arg(self.history.max(1))
            .arg(self.window_ms.max(1))
            .arg(&self.channel)
            .arg(&**source_id)
            .arg(if event_id.is_some() { "1" } else { "0" })
            .arg(seen_seq);
        let mut answer = cmd.query_async::<Value>(&mut conn).await;
        if matches!(&answer, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // A new (or restarted) Redis without the script: load it, once.
            let loaded = self.apply.prepare_invoke().load_async(&mut conn).await;
            self.redis.observe(loaded).map_err(unavailable)?;
            answer = cmd.query_async::<Value>(&mut conn).await;
        }
        let reply = self.redis.observe(answer).map_err(unavailable)?;
        parse_reply(reply).ok_or_else(|| {
            tracing::error!("unexpected answer of the apply script");
            StoreError::Unavailable("unexpected answer from Redis".into())
        })
    }

    /// An upstream value.
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.redis.conn().await.map_err(unavailable)?;
        self.redis
            .observe(
                redis::cmd("HGET")
                    .arg(&self.meta_key)
                    .arg(key)
                    .query_async(&mut conn)
                    .await,
            )
            .map_err(unavailable)
    }

    /// Sets or removes an upstream value.
    pub async fn meta_put(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.redis.conn().await.map_err(unavailable)?;
        let cmd = match value {
            Some(v) => {
                let mut c = redis::cmd("HSET");
                c.arg(&self.meta_key).arg(key).arg(v);
                c
            }
            None => {
                let mut c = redis::cmd("HDEL");
                c.arg(&self.meta_key).arg(key);
                c
            }
        };
        self.redis
            .observe(cmd.query_async::<Value>(&mut conn).await)
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// The mirror, shared with the task that follows the feed.
pub struct RecordsHandle(pub(crate) Arc<super::store::Store>);

impl RecordsHandle {
    fn get(&self) -> &Records {
        self.0.records()
    }

    fn people(&self) -> &People {
        self.0.people()
    }
}

fn unavailable(_: Unavailable) -> StoreError {
    StoreError::Unavailable("Redis is unreachable".into())
}

/// Texts for a record decided away from a shard: plain copies (the mirror
/// shares them when it installs the record).
fn own(have: Option<&Arc<str>>, want: Option<&str>) -> Option<Arc<str>> {
    let want = want?;
    match have {
        Some(have) if **have == *want => Some(Arc::clone(have)),
        _ => Some(Arc::from(want)),
    }
}

fn parse_reply(reply: Value) -> Option<Reply> {
    let Value::Array(items) = reply else {
        return None;
    };
    let mut items = items.into_iter();
    let tag = match items.next()? {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        _ => return None,
    };
    match &tag[..] {
        b"dup" => Some(Reply::Duplicate),
        b"conflict" => Some(Reply::Conflict(match items.next() {
            Some(Value::BulkString(value)) => parse_value(&value),
            _ => None,
        })),
        b"ok" => {
            let rev = int(items.next()?)?;
            let seq = int(items.next()?)?;
            Some(Reply::Done {
                rev: u32::try_from(rev).ok()?,
                seq,
            })
        }
        _ => None,
    }
}

fn int(value: Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

/// `"{rev} {seq} {record}"` → the record with its revision and `seq`.
fn parse_value(value: &[u8]) -> Option<Presence> {
    let space = value.iter().position(|&b| b == b' ')?;
    let rev: u32 = std::str::from_utf8(&value[..space]).ok()?.parse().ok()?;
    let rest = &value[space + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let seq: u64 = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
    let (mut presence, _) = codec::decode_presence(&rest[space + 1..]).ok()?;
    presence.rev = rev;
    presence.seq = seq;
    Some(presence)
}

/// A feed message: `{c|r}\n{source}\n{principal length}\n{principal}{value}`.
fn parse_message(bytes: &[u8]) -> Option<(bool, &str, &str, Presence)> {
    let mut parts = bytes.splitn(4, |&b| b == b'\n');
    let change = match parts.next()? {
        b"c" => true,
        b"r" => false,
        _ => return None,
    };
    let source = std::str::from_utf8(parts.next()?).ok()?;
    let len: usize = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let rest = parts.next()?;
    let principal = std::str::from_utf8(rest.get(..len)?).ok()?;
    let presence = parse_value(rest.get(len..)?)?;
    Some((change, source, principal, presence))
}

/// A stream entry's fields `s` (source), `p` (principal), `v` (value).
fn parse_entry(fields: &[(String, Vec<u8>)]) -> Option<(&str, &str, Presence)> {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| &v[..]);
    let source = std::str::from_utf8(field("s")?).ok()?;
    let principal = std::str::from_utf8(field("p")?).ok()?;
    let presence = parse_value(field("v")?)?;
    Some((source, principal, presence))
}

/// The entries of an `XRANGE`/`XREVRANGE` answer.
fn stream_entries(reply: Value) -> Vec<feed::StreamEntry> {
    feed::parse_entries(reply).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::test_support::TestKeys;
    use crate::presence::Availability;
    use crate::presence::records::StoreLimits;
    use crate::presence::store::Store;
    use std::borrow::Cow;

    fn limits() -> StoreLimits {
        StoreLimits {
            history: 100,
            dedup_window_ms: 60_000,
            dedup_capacity: 100,
            stream_buffer: 64,
            max_future_skew_ms: 300_000,
        }
    }

    fn update(
        principal: &str,
        availability: Availability,
        at: i64,
        id: Option<&str>,
    ) -> PresenceUpdate<'static> {
        PresenceUpdate {
            principal: Cow::Owned(principal.to_owned()),
            availability,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Some(Millis(at)),
            event_id: id.map(|i| Cow::Owned(i.to_owned())),
        }
    }

    /// A store on the test prefix whose mirror is loaded but whose feed is
    /// not followed: what it learns, it learns by its own calls.
    async fn store(keys: &TestKeys) -> Store {
        let redis = Redis::new(keys.url(), keys.prefix()).unwrap();
        let store = Store::redis(redis, &[Arc::from("s")], limits());
        let Some(backend) = store.redis_backend() else {
            unreachable!("a redis store")
        };
        backend.load(store.records(), store.people()).await.unwrap();
        backend.set_loaded();
        store
    }

    #[tokio::test]
    async fn a_write_decided_on_an_old_copy_is_decided_again_on_the_current_one() {
        let keys = TestKeys::new("conflict").await;
        let (a, b) = (store(&keys).await, store(&keys).await);
        let now = Millis(1_000);
        assert_eq!(
            a.apply(0, &update("p", Availability::Busy, 10, None), now)
                .await,
            Ok(ApplyOutcome::Changed(1))
        );
        // B has not seen A's write; its decision is made again on the
        // current copy: newer, so applied on top of it.
        assert_eq!(
            b.apply(0, &update("p", Availability::Away, 20, None), now)
                .await,
            Ok(ApplyOutcome::Changed(2))
        );
        let on_b = b.get(0, "p").unwrap();
        assert_eq!((on_b.availability, on_b.seq), (Availability::Away, 2));
        // A's copy is old too: an event older than B's write is stale.
        assert_eq!(
            a.apply(0, &update("p", Availability::Busy, 15, Some("e1")), now)
                .await,
            Ok(ApplyOutcome::Stale)
        );
        // ...and its id is remembered: a retry on B is a duplicate.
        assert_eq!(
            b.apply(0, &update("p", Availability::Busy, 15, Some("e1")), now)
                .await,
            Ok(ApplyOutcome::Duplicate)
        );
    }

    #[tokio::test]
    async fn the_mirror_counts_records_per_availability_on_every_replica() {
        let keys = TestKeys::new("tally").await;
        let (a, b) = (store(&keys).await, store(&keys).await);
        let busy = Availability::Busy as usize;
        let away = Availability::Away as usize;
        a.apply(0, &update("p", Availability::Busy, 10, None), Millis(1))
            .await
            .unwrap();
        a.apply(0, &update("q", Availability::Busy, 10, None), Millis(1))
            .await
            .unwrap();
        // B changes p on top of A's write (its mirror learns A's copy first).
        b.apply(0, &update("p", Availability::Away, 20, None), Millis(2))
            .await
            .unwrap();
        let on_b = b.availability_counts(0);
        assert_eq!((on_b[busy], on_b[away]), (0, 1));
        // A learns the changes it did not make from Redis, as the feed would.
        a.catch_up(3).await;
        let on_a = a.availability_counts(0);
        assert_eq!((on_a[busy], on_a[away]), (1, 1));
        assert_eq!(on_a.iter().sum::<u64>(), 2);
    }

    #[tokio::test]
    async fn catch_up_reads_changes_the_feed_has_not_brought_yet() {
        let keys = TestKeys::new("catchup").await;
        let (a, b) = (store(&keys).await, store(&keys).await);
        for i in 0..5 {
            let u = update(&format!("p{i}"), Availability::Busy, 10, None);
            a.apply(0, &u, Millis(1)).await.unwrap();
        }
        assert_eq!(b.changes().last_seq(), 0);
        b.catch_up(4).await;
        let seqs: Vec<u64> = b
            .changes()
            .since(0)
            .unwrap()
            .iter()
            .map(|c| c.seq())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert_eq!(b.get(0, "p3").map(|r| r.seq), Some(4));
        // Beyond what Redis has: nothing invented.
        b.catch_up(50).await;
        assert_eq!(b.changes().last_seq(), 5);
    }

    #[test]
    fn values_and_messages_parse_and_refuse_garbage() {
        let mut blob = Vec::new();
        let presence = Presence {
            availability: Availability::Busy,
            activity: None,
            status_text: Some(Arc::from("x")),
            raw_status: None,
            observed_at: Millis(5),
            received_at: Millis(6),
            seq: 0,
            calls: None,
            reported: true,
            rev: 0,
        };
        codec::encode_presence(&presence, false, &mut blob);
        let mut value = b"7 42 ".to_vec();
        value.extend_from_slice(&blob);
        let parsed = parse_value(&value).unwrap();
        assert_eq!(
            (parsed.rev, parsed.seq, parsed.status_text.as_deref()),
            (7, 42, Some("x"))
        );
        let mut message = b"c\nsrc\n5\na\nb c".to_vec();
        message.extend_from_slice(&value);
        let (change, source, principal, _) = parse_message(&message).unwrap();
        assert_eq!((change, source, principal), (true, "src", "a\nb c"));
        for garbage in [
            &b""[..],
            b"c\n",
            b"x\ns\n1\np",
            b"c\ns\n99\np1 2 ",
            b"1 2",
            b"a b c",
        ] {
            assert!(parse_message(garbage).is_none() && parse_value(garbage).is_none());
        }
    }
}
