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
//! - channel `P:changes`: every write, as it happens.
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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::codec;
use super::model::{Millis, Presence, PresenceRecord};
use super::records::{
    ApplyOutcome, Records, Step, new_call_record, new_record, update_call, update_record,
};
use super::store::StoreError;
use super::{CallUpdate, PresenceUpdate};
use crate::cluster::feed::{self, FeedEvent};
use crate::cluster::{Redis, Unavailable};

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
    seq_key: String,
    history_key: String,
    channel: String,
    meta_key: String,
    /// Per source index: its id and record hash key.
    sources: Vec<(Arc<str>, String)>,
    history: usize,
    window_ms: u64,
    /// The mirror was loaded from Redis (start-up done).
    loaded: AtomicBool,
    /// The highest `seq` a write of this replica was given. Its change
    /// reaches the change log only through the feed, so the log may not
    /// have it yet (or ever, if Redis lost it); `seq` must still never go
    /// back below it.
    written_seq: AtomicU64,
}

/// One `HSCAN` answer: the next cursor and field/value pairs.
type ScanPage = (u64, Vec<(Vec<u8>, Vec<u8>)>);

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
            written_seq: AtomicU64::new(0),
            redis,
        }
    }

    /// The Redis handle.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// The highest `seq` this replica has seen: in its change log, or given
    /// to one of its own writes.
    fn seen_seq(&self, records: &Records) -> u64 {
        records
            .changes()
            .last_seq()
            .max(self.written_seq.load(Ordering::Acquire))
    }

    /// Whether writes can be taken now: the mirror is loaded and Redis
    /// answers.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire) && self.redis.is_up()
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
            match self.load(records.get()).await {
                Ok(()) => break,
                Err(Unavailable) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        self.loaded.store(true, Ordering::Release);
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
                        || self.backfill(records.get()).await.is_err()
                    {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
                Some(FeedEvent::Message(bytes)) => {
                    if let Some((change, source, principal, presence)) = parse_message(&bytes) {
                        self.receive(records.get(), change, source, principal, presence)
                            .await;
                    }
                }
            }
        }
    }

    /// Applies one replicated write to the mirror and, for a change, to the
    /// change log (backfilling from the stream first when changes before it
    /// were missed).
    async fn receive(
        &self,
        records: &Records,
        change: bool,
        source: &str,
        principal: &str,
        presence: Presence,
    ) {
        let Some(index) = self.index(source) else {
            return;
        };
        let seq = presence.seq;
        if change && seq > records.changes().last_seq() + 1 {
            // A gap: fill it from the stream (best effort; a gap the stream
            // no longer covers restarts the history).
            let _ = self.backfill_to(records, seq - 1).await;
        }
        self.install(records, index, principal, presence, change);
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
        records.install_newer(index, principal, presence);
        if let Some(record) = record {
            records.changes().commit_replicated(record);
        }
    }

    /// After Redis was away: if it came back without its data (a restart
    /// without persistence), `seq` must still never go back, or consumers
    /// would take new changes for old ones. The counter is moved up to what
    /// this replica has seen (another replica may move it further).
    async fn heal(&self, records: &Records) -> Result<(), Unavailable> {
        let last = self.seen_seq(records);
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
    async fn backfill(&self, records: &Records) -> Result<(), Unavailable> {
        self.backfill_to(records, u64::MAX).await
    }

    async fn backfill_to(&self, records: &Records, until: u64) -> Result<(), Unavailable> {
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
                if let Some((source, principal, presence)) = parse_entry(&fields)
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

    /// Loads the mirror: the history's tail and `seq`, then every record.
    async fn load(&self, records: &Records) -> Result<(), Unavailable> {
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
            if let Some((source, principal, presence)) = parse_entry(&fields)
                && let Some(index) = self.index(source)
            {
                history.push(PresenceRecord::new(
                    &self.sources[index].0,
                    principal,
                    &presence,
                ));
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
                    records.install_newer(index, principal, presence);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
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
        let mut known: Option<Option<Presence>> = None;
        for _ in 0..MAX_ATTEMPTS {
            let current = match known.take() {
                Some(current) => current,
                None => records.get_presence(source, &update.principal),
            };
            let expected = current.as_ref().map_or(0, |p| p.rev);
            let (step, next) = match current {
                Some(mut presence) => {
                    let step = update_record(&mut presence, update, received_at, &mut own);
                    (step, presence)
                }
                None => (Step::Changed, new_record(update, received_at, &mut own)),
            };
            // Stale without an id: nothing to write or remember (the
            // stored record only ever gets newer).
            if step == Step::Stale && event_id.is_none() {
                return Ok(ApplyOutcome::Stale);
            }
            match self
                .write(
                    source,
                    &update.principal,
                    expected,
                    step,
                    &next,
                    event_id,
                    self.seen_seq(records),
                )
                .await?
            {
                Reply::Duplicate => return Ok(ApplyOutcome::Duplicate),
                Reply::Conflict(current) => known = Some(current),
                Reply::Done { rev, seq } => {
                    return Ok(self.written(
                        records,
                        source,
                        &update.principal,
                        step,
                        next,
                        rev,
                        seq,
                    ));
                }
            }
        }
        Err(StoreError::Unavailable(
            "too many concurrent writes to one record".into(),
        ))
    }

    /// Applies a call update; see [`Records::apply_call`].
    pub async fn apply_call(
        &self,
        records: &Records,
        source: usize,
        update: &CallUpdate<'_>,
        received_at: Millis,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut known: Option<Option<Presence>> = None;
        for _ in 0..MAX_ATTEMPTS {
            let current = match known.take() {
                Some(current) => current,
                None => records.get_presence(source, &update.principal),
            };
            let expected = current.as_ref().map_or(0, |p| p.rev);
            let mut next = match (current, update.state) {
                (Some(presence), _) => presence,
                // The end of a call never seen: nothing to show.
                (None, None) => return Ok(ApplyOutcome::Refreshed),
                (None, Some(_)) => new_call_record(update, received_at),
            };
            let step = match update_call(&mut next, update, received_at, &mut own) {
                Step::Changed => Step::Changed,
                _ if expected == 0 => Step::Changed,
                other => other,
            };
            match self
                .write(
                    source,
                    &update.principal,
                    expected,
                    step,
                    &next,
                    None,
                    self.seen_seq(records),
                )
                .await?
            {
                Reply::Duplicate => return Ok(ApplyOutcome::Duplicate),
                Reply::Conflict(current) => known = Some(current),
                Reply::Done { rev, seq } => {
                    return Ok(self.written(
                        records,
                        source,
                        &update.principal,
                        step,
                        next,
                        rev,
                        seq,
                    ));
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
    #[allow(clippy::too_many_arguments)]
    fn written(
        &self,
        records: &Records,
        source: usize,
        principal: &str,
        step: Step,
        mut next: Presence,
        rev: u32,
        seq: u64,
    ) -> ApplyOutcome {
        if step == Step::Stale {
            return ApplyOutcome::Stale;
        }
        next.rev = rev;
        next.seq = seq;
        self.written_seq.fetch_max(seq, Ordering::AcqRel);
        records.install_newer(source, principal, next);
        match step {
            Step::Changed => ApplyOutcome::Changed(seq),
            _ => ApplyOutcome::Refreshed,
        }
    }

    /// Runs the script.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        source: usize,
        principal: &str,
        expected: u32,
        step: Step,
        next: &Presence,
        event_id: Option<&str>,
        seen_seq: u64,
    ) -> Result<Reply, StoreError> {
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
        let reply: Value = self
            .redis
            .observe(
                self.apply
                    .key(record_key)
                    .key(&self.seq_key)
                    .key(&self.history_key)
                    .key(&dedup_key)
                    .arg(principal)
                    .arg(expected)
                    .arg(mode)
                    .arg(blob)
                    .arg(self.history.max(1))
                    .arg(self.window_ms.max(1))
                    .arg(&self.channel)
                    .arg(&**source_id)
                    .arg(if event_id.is_some() { "1" } else { "0" })
                    .arg(seen_seq)
                    .invoke_async(&mut conn)
                    .await,
            )
            .map_err(unavailable)?;
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
