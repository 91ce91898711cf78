//! People on the Redis backend (DESIGN §8, §9): person events committed by
//! any replica, numbered from the shared `seq`, kept in the history stream
//! and published on the change channel like presence changes.
//!
//! Keys, besides those of [`super`]:
//! - `P:people`: a hash, person id → `"{seq} {record as JSON}"` (the JSON's
//!   own `seq` is not read: the prefix is the truth, since the script
//!   assigns it after the record was written);
//! - `P:history` entries of a person event have the fields `person` (id),
//!   `x` (`1`: the person stays; `0`: the final record of a person no longer
//!   mapped) and `v` (the value as in `P:people`);
//! - messages on `P:changes`: `p\n{x}\n{id length}\n{id}{value}`.
//!
//! A replica derives a person from its mirror ([`People::derive_touched`],
//! [`People::remap`]) and commits the result with [`PERSON`], which checks
//! that every identity record the derivation read is still the revision it
//! read, and that the person's record is still the one this replica holds.
//! A replica that lost a race gets the current values back, installs them
//! and derives again. So two identities of one person changed at once on two
//! replicas end in a record derived from both, and replicas reconciling the
//! same mapping at once commit each difference once.
//!
//! Never decides a presence write; never fails one either: the caller logs
//! a failed person commit and the next change (or reconcile) repairs it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::Value;

use super::{RedisBackend, StoreError, int, parse_value, unavailable};
use crate::people::{Derivation, People};
use crate::presence::records::Records;
use crate::presence::{Event, PersonRecord};

/// Commit rounds before a person commit gives up (each lost round means
/// another replica changed an identity or the person in between).
const MAX_ATTEMPTS: usize = 16;

/// `KEYS`: people hash, seq counter, history stream, then the record hash
/// of every identity the derivation read. `ARGV`: person id, expected
/// person `seq` (0: none), `1` (stays), `0` (final record) or `check`
/// (write nothing: only check that the derivation read current values),
/// record JSON,
/// history length, channel, the highest `seq` the writer has seen, then per
/// identity its principal and the revision read (0: none).
///
/// Answers `{"ok", seq}`, `{"same"}` (checked), or `{"conflict", seq
/// counter, person value or nil, identity values or nil...}`.
pub(super) const PERSON: &str = r"
local n = #KEYS - 3
local ok = true
local current = redis.call('HGET', KEYS[1], ARGV[1])
local seq = 0
if current then
  seq = tonumber(string.match(current, '^(%d+) '))
end
if seq ~= tonumber(ARGV[2]) then
  ok = false
end
local found = {}
for i = 1, n do
  local value = redis.call('HGET', KEYS[3 + i], ARGV[6 + 2 * i])
  local rev = 0
  if value then
    rev = tonumber(string.match(value, '^(%d+) '))
  end
  if rev ~= tonumber(ARGV[7 + 2 * i]) then
    ok = false
  end
  found[i] = value
end
if not ok then
  local answer = {'conflict', tonumber(redis.call('GET', KEYS[2]) or '0'), current}
  for i = 1, n do
    answer[3 + i] = found[i]
  end
  return answer
end
if ARGV[3] == 'check' then
  return {'same'}
end
seq = redis.call('INCR', KEYS[2])
-- Never below what the writer has seen (a Redis that lost its data).
if seq <= tonumber(ARGV[7]) then
  seq = tonumber(ARGV[7]) + 1
  redis.call('SET', KEYS[2], seq)
end
local value = seq .. ' ' .. ARGV[4]
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], value)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], seq .. '-0', 'person', ARGV[1], 'x', ARGV[3], 'v', value)
redis.call('PUBLISH', ARGV[6], 'p\n' .. ARGV[3] .. '\n' .. string.len(ARGV[1]) .. '\n' .. ARGV[1] .. value)
return {'ok', seq}
";

/// What the script answered.
enum Reply {
    Done(u64),
    /// Checked: the derivation read current values.
    Same,
    Conflict {
        /// The `seq` counter when the script ran.
        counter: u64,
        person: Option<Vec<u8>>,
        /// Per identity of the derivation, its current value.
        identities: Vec<Option<Vec<u8>>>,
    },
}

/// A person change as stored and published: the record (with its `seq`)
/// and whether the person stays.
pub(super) struct Committed {
    pub record: Arc<PersonRecord>,
    pub stays: bool,
}

impl RedisBackend {
    /// Commits a derived person record; when another replica changed what
    /// it was derived from, installs the current values and derives again.
    /// A derivation without a difference is checked the same way: this
    /// replica may not have seen another identity's change yet, whose
    /// writer derived before this write and so could not see it either;
    /// one of the two must see both. Returns the `seq` of the committed
    /// event, or `None` when nothing was left to commit.
    pub(crate) async fn commit_person(
        &self,
        records: &Records,
        people: &People,
        derivation: Derivation,
    ) -> Result<Option<u64>, StoreError> {
        let id = Arc::clone(&derivation.change.record.person);
        let mut derivation = Some(derivation);
        for _ in 0..MAX_ATTEMPTS {
            let Some(d) = derivation.take() else {
                return Ok(None);
            };
            match self.write_person(&d, self.seen(records)).await? {
                Reply::Same => return Ok(None),
                Reply::Done(seq) => {
                    self.seen.fetch_max(seq, Ordering::AcqRel);
                    let record = Arc::new(PersonRecord {
                        seq,
                        ..d.change.record
                    });
                    // The event itself reaches the change log by the feed.
                    people.install(record, d.change.stays);
                    people.count_event();
                    return Ok(Some(seq));
                }
                Reply::Conflict {
                    counter,
                    person,
                    identities,
                } => {
                    for ((source, principal, _), value) in d.identities.iter().zip(identities) {
                        if let Some(presence) = value.as_deref().and_then(parse_value) {
                            self.seen.fetch_max(presence.seq, Ordering::AcqRel);
                            records.install_newer(*source, principal, presence);
                        }
                    }
                    match person.as_deref().and_then(|v| parse_person_value(v, &id)) {
                        Some(record) => {
                            self.seen.fetch_max(record.seq, Ordering::AcqRel);
                            people.install(Arc::new(record), true);
                        }
                        None => people.forget(&id, counter.saturating_add(1)),
                    }
                    derivation = people.derive_person(&id, records);
                }
            }
        }
        Err(StoreError::Unavailable(
            "too many concurrent changes of one person".into(),
        ))
    }

    /// Runs the script once.
    async fn write_person(&self, d: &Derivation, seen: u64) -> Result<Reply, StoreError> {
        // A check writes nothing.
        let json = match d.differs {
            true => serde_json::to_string(&d.change.record).map_err(|e| {
                tracing::error!(error = %e, "person record does not serialize");
                StoreError::Unavailable("person record does not serialize".into())
            })?,
            false => String::new(),
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.person.get_hash())
            .arg(3 + d.identities.len())
            .arg(&self.people_key)
            .arg(&self.seq_key)
            .arg(&self.history_key);
        for (source, _, _) in &d.identities {
            cmd.arg(&self.sources[*source].1);
        }
        cmd.arg(&*d.change.record.person)
            .arg(d.replaces)
            .arg(match (d.differs, d.change.stays) {
                (false, _) => "check",
                (true, true) => "1",
                (true, false) => "0",
            })
            .arg(json)
            .arg(self.history.max(1))
            .arg(&self.channel)
            .arg(seen);
        for (_, principal, rev) in &d.identities {
            cmd.arg(&**principal).arg(*rev);
        }
        let mut conn = self.redis.conn().await.map_err(unavailable)?;
        let mut answer = cmd.query_async::<Value>(&mut conn).await;
        if matches!(&answer, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            let loaded = self.person.prepare_invoke().load_async(&mut conn).await;
            self.redis.observe(loaded).map_err(unavailable)?;
            answer = cmd.query_async::<Value>(&mut conn).await;
        }
        let reply = self.redis.observe(answer).map_err(unavailable)?;
        parse_reply(reply).ok_or_else(|| {
            tracing::error!("unexpected answer of the person script");
            StoreError::Unavailable("unexpected answer from Redis".into())
        })
    }

    /// Applies a person change received from the feed or read from the
    /// stream: the record to `people`, the event to the change log.
    pub(super) fn install_person(&self, records: &Records, people: &People, change: Committed) {
        self.seen.fetch_max(change.record.seq, Ordering::AcqRel);
        people.install(Arc::clone(&change.record), change.stays);
        records
            .changes()
            .commit_replicated(Event::Person(change.record));
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
    let bytes = |value: Value| match value {
        Value::BulkString(b) => Some(b),
        _ => None,
    };
    match &tag[..] {
        b"ok" => Some(Reply::Done(int(items.next()?)?)),
        b"same" => Some(Reply::Same),
        b"conflict" => {
            let counter = int(items.next()?)?;
            let person = items.next().and_then(bytes);
            Some(Reply::Conflict {
                counter,
                person,
                identities: items.map(bytes).collect(),
            })
        }
        _ => None,
    }
}

/// `"{seq} {json}"` → person `id`'s record with that `seq`.
fn parse_person_value(value: &[u8], id: &str) -> Option<PersonRecord> {
    let space = value.iter().position(|&b| b == b' ')?;
    let seq: u64 = std::str::from_utf8(&value[..space]).ok()?.parse().ok()?;
    let record: PersonRecord = serde_json::from_slice(&value[space + 1..]).ok()?;
    (&*record.person == id).then_some(PersonRecord { seq, ..record })
}

fn stays(flag: &[u8]) -> Option<bool> {
    match flag {
        b"1" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

/// A feed message of a person change: `p\n{x}\n{id length}\n{id}{value}`.
pub(super) fn parse_message(bytes: &[u8]) -> Option<Committed> {
    let mut parts = bytes.splitn(4, |&b| b == b'\n');
    if parts.next()? != b"p" {
        return None;
    }
    let stays = stays(parts.next()?)?;
    let len: usize = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let rest = parts.next()?;
    let id = std::str::from_utf8(rest.get(..len)?).ok()?;
    let record = parse_person_value(rest.get(len..)?, id)?;
    Some(Committed {
        record: Arc::new(record),
        stays,
    })
}

/// Whether a stream entry is a person event.
pub(super) fn is_person_entry(fields: &[(String, Vec<u8>)]) -> bool {
    fields.iter().any(|(k, _)| k == "person")
}

/// A stream entry's fields `person`, `x`, `v`.
pub(super) fn parse_entry(fields: &[(String, Vec<u8>)]) -> Option<Committed> {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| &v[..]);
    let id = std::str::from_utf8(field("person")?).ok()?;
    let stays = stays(field("x")?)?;
    let record = parse_person_value(field("v")?, id)?;
    Some(Committed {
        record: Arc::new(record),
        stays,
    })
}

/// `HSCAN` of `P:people`: one field and value → the record.
pub(super) fn parse_stored(id: &[u8], value: &[u8]) -> Option<PersonRecord> {
    parse_person_value(value, std::str::from_utf8(id).ok()?)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::cluster::Redis;
    use crate::cluster::feed;
    use crate::cluster::test_support::TestKeys;
    use crate::config::people::{Identity, Mapping, PersonDef};
    use crate::presence::records::{ApplyOutcome, StoreLimits};
    use crate::presence::store::Store;
    use crate::presence::{Availability, Millis, PresenceUpdate};

    const DESK: usize = 0;
    const TEAMS: usize = 1;

    fn limits() -> StoreLimits {
        StoreLimits {
            history: 1000,
            dedup_window_ms: 60_000,
            dedup_capacity: 100,
            stream_buffer: 64,
            max_future_skew_ms: 300_000,
        }
    }

    /// A replica on the test prefix whose mirror is loaded but whose feed
    /// is not followed: it learns of other replicas' writes by its own
    /// calls (conflict answers, [`Store::catch_up`]).
    async fn replica(keys: &TestKeys) -> Arc<Store> {
        let redis = Redis::new(keys.url(), keys.prefix()).unwrap();
        let store = Store::redis(redis, &[Arc::from("desk"), Arc::from("teams")], limits());
        let backend = store.redis_backend().expect("a redis store");
        backend.load(store.records(), store.people()).await.unwrap();
        backend.set_loaded();
        Arc::new(store)
    }

    fn mapping(version: u64, name: &str, people: bool) -> Arc<Mapping> {
        let identity = |source: &str, principal: &str| Identity {
            source: Arc::from(source),
            principal: Arc::from(principal),
        };
        let ana = PersonDef {
            id: Arc::from("ana"),
            name: Some(Arc::from(name)),
            identities: vec![identity("desk", "ana-desk"), identity("teams", "ana-teams")],
        };
        Arc::new(Mapping {
            version,
            people: if people { vec![ana] } else { Vec::new() },
            match_equal_principals: false,
        })
    }

    fn update(principal: &str, availability: Availability, at: i64) -> PresenceUpdate<'static> {
        PresenceUpdate {
            principal: Cow::Owned(principal.to_owned()),
            availability,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Some(Millis(at)),
            event_id: None,
        }
    }

    /// Brings a replica's mirror and change log up to everything in Redis
    /// (what its feed would do).
    async fn sync(store: &Store) {
        store.catch_up(u64::MAX).await;
    }

    /// Ana's record as Redis holds it.
    async fn stored(store: &Store) -> Option<PersonRecord> {
        let backend = store.redis_backend().expect("a redis store");
        let mut conn = backend.redis.conn().await.unwrap();
        let value: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&backend.people_key)
            .arg("ana")
            .query_async(&mut conn)
            .await
            .unwrap();
        value.and_then(|v| parse_stored(b"ana", &v))
    }

    /// The person events in the history stream: `(seq, id, stays)`.
    async fn person_events(store: &Store) -> Vec<(u64, String, bool)> {
        let backend = store.redis_backend().expect("a redis store");
        feed::read_stream(&backend.redis, &backend.history_key, 0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|(seq, fields)| {
                let change = parse_entry(&fields)?;
                Some((seq, change.record.person.to_string(), change.stays))
            })
            .collect()
    }

    fn decided(record: &PersonRecord) -> (Availability, Option<&str>) {
        (
            record.availability,
            record.decided_by.as_ref().map(|d| &*d.source),
        )
    }

    /// Each round, replica A changes Ana's desk phone while replica B
    /// changes her Teams account, at once, neither having seen the other's
    /// write. Whoever commits the person second finds an identity record
    /// (or the person) changed under it and derives again, so the person
    /// ends derived from both records, in Redis and on both replicas.
    #[tokio::test]
    async fn two_identities_changed_at_once_on_two_replicas_end_in_a_record_derived_from_both() {
        let keys = TestKeys::new("people-race").await;
        let (a, b) = (replica(&keys).await, replica(&keys).await);
        for store in [&a, &b] {
            let done = store.reconcile_people_async(mapping(1, "Ana", true)).await;
            assert_eq!((done.people, done.changed), (1, 0), "no records yet");
        }
        let rounds = [
            (Availability::Busy, Availability::DoNotDisturb),
            (Availability::Available, Availability::Away),
            (Availability::Offline, Availability::BeRightBack),
            (Availability::DoNotDisturb, Availability::Available),
            (Availability::Away, Availability::Busy),
        ];
        for (round, (desk, teams)) in rounds.into_iter().enumerate() {
            let at = 1_000 * (round as i64 + 1);
            let (on_desk, on_teams) = (
                update("ana-desk", desk, at),
                update("ana-teams", teams, at + 1),
            );
            let (on_a, on_b) = tokio::join!(
                a.apply(DESK, &on_desk, Millis(at)),
                b.apply(TEAMS, &on_teams, Millis(at)),
            );
            assert!(matches!(on_a, Ok(ApplyOutcome::Changed(_))), "{on_a:?}");
            assert!(matches!(on_b, Ok(ApplyOutcome::Changed(_))), "{on_b:?}");
            let (winner, source) =
                if crate::people::derive::rank(desk) > crate::people::derive::rank(teams) {
                    (desk, "desk")
                } else {
                    (teams, "teams")
                };
            let in_redis = stored(&a).await.expect("ana is stored");
            assert_eq!(decided(&in_redis), (winner, Some(source)), "round {round}");
            for store in [&a, &b] {
                sync(store).await;
                let held = store.people().get("ana", store.records()).unwrap();
                assert_eq!(decided(&held), (winner, Some(source)), "round {round}");
                assert_eq!(held.seq, in_redis.seq);
                assert_eq!(held.sources.len(), 2);
                // The last person event in the change log is that record.
                let last = store
                    .changes()
                    .since(0)
                    .unwrap()
                    .iter()
                    .rev()
                    .find_map(|c| c.person().cloned())
                    .unwrap();
                assert_eq!(last.seq, in_redis.seq);
                assert!(last.same_derived(&in_redis));
            }
        }
    }

    /// Replica B changes Ana's Teams account without having seen replica
    /// A's change of her desk phone (nor A's person event): the script
    /// refuses B's derivation and answers with both, which B installs and
    /// derives again on; its record is decided by both identities.
    #[tokio::test]
    async fn a_person_derived_on_an_old_copy_is_derived_again_on_the_current_one() {
        let keys = TestKeys::new("people-conflict").await;
        let (a, b) = (replica(&keys).await, replica(&keys).await);
        for store in [&a, &b] {
            store.reconcile_people_async(mapping(1, "Ana", true)).await;
        }
        let dnd = update("ana-desk", Availability::DoNotDisturb, 10);
        a.apply(DESK, &dnd, Millis(10)).await.unwrap();
        let available = update("ana-teams", Availability::Available, 20);
        b.apply(TEAMS, &available, Millis(20)).await.unwrap();
        // B learnt A's desk record and person record from the answer, and
        // found nothing to commit: the desk phone still decides.
        assert!(b.get(DESK, "ana-desk").is_some());
        let held = b.people().get("ana", b.records()).unwrap();
        assert_eq!(decided(&held), (Availability::DoNotDisturb, Some("desk")));
        assert_eq!((held.seq, b.people().events()), (2, 0));
        assert_eq!(person_events(&a).await.len(), 1);
        // Now B's change wins: committed on top of A's person record.
        let busy = update("ana-teams", Availability::Busy, 30);
        let dnd_ends = update("ana-desk", Availability::Away, 25);
        a.apply(DESK, &dnd_ends, Millis(25)).await.unwrap();
        b.apply(TEAMS, &busy, Millis(30)).await.unwrap();
        let in_redis = stored(&a).await.unwrap();
        assert_eq!(decided(&in_redis), (Availability::Busy, Some("teams")));
        assert_eq!(person_events(&a).await.len(), 3, "A's away, then B's busy");
    }

    /// A person's event is numbered from the shared `seq`, kept in the
    /// history stream and the people hash: a replica that starts later
    /// replays it and holds the record before it takes a write.
    #[tokio::test]
    async fn person_events_share_seq_replay_on_any_replica_and_load_at_start() {
        let keys = TestKeys::new("people-load").await;
        let a = replica(&keys).await;
        a.reconcile_people_async(mapping(1, "Ana", true)).await;
        let busy = update("ana-desk", Availability::Busy, 10);
        assert_eq!(
            a.apply(DESK, &busy, Millis(10)).await,
            Ok(ApplyOutcome::Changed(1))
        );
        // The person event took the next `seq`, after the presence change.
        assert_eq!(person_events(&a).await, vec![(2, "ana".to_owned(), true)]);
        assert_eq!(a.people().get("ana", a.records()).unwrap().seq, 2);
        // A change of the other identity that does not change the winner
        // is no person event.
        let away = update("ana-teams", Availability::Away, 11);
        assert_eq!(
            a.apply(TEAMS, &away, Millis(11)).await,
            Ok(ApplyOutcome::Changed(3))
        );
        assert_eq!(person_events(&a).await.len(), 1);

        let c = replica(&keys).await;
        let seqs: Vec<(u64, &str)> = c
            .changes()
            .since(0)
            .unwrap()
            .iter()
            .map(|ch| (ch.seq(), ch.event.name()))
            .collect();
        assert_eq!(seqs, vec![(1, "presence"), (2, "person"), (3, "presence")]);
        let loaded = c.people().snapshot(None, u64::MAX);
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            (decided(&loaded[0]), loaded[0].seq),
            ((Availability::Busy, Some("desk")), 2)
        );
        // Its reconciliation finds nothing to change.
        let done = c.reconcile_people_async(mapping(1, "Ana", true)).await;
        assert_eq!((done.people, done.changed, done.removed), (1, 0, 0));
        assert_eq!(person_events(&a).await.len(), 1);
    }

    /// Two replicas reloading the same mapping at once: each difference
    /// (a new name, then a person removed) is one event, not one per
    /// replica; the removed person's final record is `unknown` without
    /// sources and leaves the people hash.
    #[tokio::test]
    async fn replicas_reconciling_the_same_mapping_commit_each_difference_once() {
        let keys = TestKeys::new("people-reload").await;
        let (a, b) = (replica(&keys).await, replica(&keys).await);
        a.apply(
            DESK,
            &update("ana-desk", Availability::Busy, 10),
            Millis(10),
        )
        .await
        .unwrap();
        sync(&b).await;
        let (on_a, on_b) = tokio::join!(
            a.reconcile_people_async(mapping(1, "Ana", true)),
            b.reconcile_people_async(mapping(1, "Ana", true)),
        );
        assert_eq!(on_a.changed + on_b.changed, 1, "{on_a:?} {on_b:?}");
        assert_eq!(person_events(&a).await.len(), 1);

        let (on_a, on_b) = tokio::join!(
            a.reconcile_people_async(mapping(2, "Ana Lima", true)),
            b.reconcile_people_async(mapping(2, "Ana Lima", true)),
        );
        assert_eq!(on_a.changed + on_b.changed, 1, "{on_a:?} {on_b:?}");
        assert_eq!(
            stored(&a).await.and_then(|r| r.name).as_deref(),
            Some("Ana Lima")
        );

        let (on_a, on_b) = tokio::join!(
            a.reconcile_people_async(mapping(3, "Ana Lima", false)),
            b.reconcile_people_async(mapping(3, "Ana Lima", false)),
        );
        assert_eq!(on_a.removed + on_b.removed, 1, "{on_a:?} {on_b:?}");
        let events = person_events(&a).await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(!events[2].2, "the last is the final record");
        assert_eq!(stored(&a).await, None);
        for store in [&a, &b] {
            sync(store).await;
            assert_eq!(store.people().get("ana", store.records()), None);
            assert!(store.people().snapshot(None, u64::MAX).is_empty());
            let last = store.changes().since(0).unwrap();
            let last = last.last().unwrap().person().unwrap();
            assert_eq!(decided(last), (Availability::Unknown, None));
            assert!(last.sources.is_empty());
        }
    }

    #[test]
    fn person_messages_and_entries_parse_and_refuse_garbage() {
        let message = b"p\n0\n3\nana7 {\"person\":\"ana\",\"name\":null,\"availability\":\"unknown\",\"activity\":null,\"status_text\":null,\"observed_at\":null,\"seq\":0,\"decided_by\":null,\"sources\":[]}";
        let change = parse_message(message).unwrap();
        assert_eq!((change.record.seq, change.stays), (7, false));
        assert_eq!(&*change.record.person, "ana");
        for garbage in [
            &b""[..],
            b"p\n",
            b"p\n2\n3\nana7 {}",
            b"p\n1\n3\nbob7 {\"person\":\"ana\"}",
            b"p\n1\n9\nana7 {}",
            b"c\n1\n3\nana7 {}",
        ] {
            assert!(parse_message(garbage).is_none(), "{garbage:?}");
        }
    }
}
