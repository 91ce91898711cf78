//! The cross-replica change feed (DESIGN §8): a task that subscribes to
//! `{prefix}:changes` on a connection of its own and hands every message's
//! payload, in the order Redis delivered them, to one `mpsc` receiver.
//!
//! Pub/sub delivers at most once: whatever was published while the
//! subscription was down is gone. So after every (re)subscription, the
//! first included, the feed sends [`FeedEvent::Resubscribed`] before any
//! message, and the consumer backfills from the change stream with
//! [`read_stream`]. The feed reconnects by itself with a capped backoff, and
//! pings the subscribed connection so a silently dead link is noticed too.
//!
//! It never decodes payloads and never drops one on its own: a consumer that
//! falls behind slows the task (the channel is bounded); if it falls so far
//! behind that Redis cuts the subscription (its pub/sub output buffer
//! limit), the feed resubscribes and says so like after any other loss.

use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT, Redis, Unavailable};

/// What the feed hands to its consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// Subscribed (again): messages published before this may have been
    /// missed; backfill from the stream, then apply the messages that follow.
    Resubscribed,
    /// One message's payload, as published.
    Message(Vec<u8>),
}

/// How often the subscribed connection is pinged; a dead link is noticed
/// within this plus [`RESPONSE_TIMEOUT`].
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the feed of `redis`'s `{prefix}:changes` channel into `events`.
/// Must be called inside a Tokio runtime. The task ends when `shutdown` is
/// cancelled or the receiver of `events` is dropped.
pub fn spawn(
    redis: Redis,
    events: mpsc::Sender<FeedEvent>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run(redis, events, shutdown))
}

/// The wait before reconnecting after `failures` failed attempts in a row
/// (0 right after a subscription was lost): doubling from 100 ms, at most 5 s.
fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(2u32.saturating_pow(failures))
        .min(BACKOFF_MAX)
}

/// Why a subscription ended.
enum End {
    Shutdown,
    ConsumerGone,
    Lost(String),
}

async fn run(redis: Redis, events: mpsc::Sender<FeedEvent>, shutdown: CancellationToken) {
    let channel = redis.key(&["changes"]);
    let mut failures = 0u32;
    loop {
        let subscribe = async {
            let mut pubsub = redis.client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, subscribe) => r,
        };
        match subscribed {
            Ok(Ok(pubsub)) => {
                redis.observe(Ok(())).ok();
                failures = 0;
                tracing::debug!(channel, "change feed subscribed");
                match listen(pubsub, &events, &shutdown).await {
                    End::Shutdown | End::ConsumerGone => return,
                    End::Lost(reason) => {
                        tracing::warn!(redis = %redis.endpoint(), reason, "change feed lost its subscription; resubscribing");
                    }
                }
            }
            Ok(Err(e)) => {
                // observe() logs and records the failure.
                redis.observe::<()>(Err(e)).ok();
                failures = failures.saturating_add(1);
            }
            Err(_) => {
                tracing::debug!(redis = %redis.endpoint(), "change feed could not subscribe in time");
                failures = failures.saturating_add(1);
            }
        }
        // When Redis itself was down, its return (seen by the handle's
        // background check) cuts the wait short.
        let mut up = redis.watch();
        let redis_down = !*up.borrow_and_update();
        let redis_back = async {
            let _ = up.wait_for(|up| *up).await;
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = redis_back, if redis_down => {}
            () = tokio::time::sleep(backoff(failures)) => {}
        }
    }
}

async fn listen(
    pubsub: redis::aio::PubSub,
    events: &mpsc::Sender<FeedEvent>,
    shutdown: &CancellationToken,
) -> End {
    let (mut sink, mut stream) = pubsub.split();
    if let Some(end) = deliver(events, FeedEvent::Resubscribed, shutdown).await {
        return end;
    }
    let start = tokio::time::Instant::now() + PING_EVERY;
    let mut ping = tokio::time::interval_at(start, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return End::Shutdown,
            message = stream.next() => {
                let Some(message) = message else {
                    return End::Lost("connection closed".into());
                };
                let payload = message.get_payload_bytes().to_vec();
                if let Some(end) = deliver(events, FeedEvent::Message(payload), shutdown).await {
                    return end;
                }
            }
            _ = ping.tick() => {
                // Messages keep arriving in the connection's own buffer meanwhile.
                match tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return End::Lost(e.to_string()),
                    Err(_) => return End::Lost("no answer to PING in time".into()),
                }
            }
        }
    }
}

async fn deliver(
    events: &mpsc::Sender<FeedEvent>,
    event: FeedEvent,
    shutdown: &CancellationToken,
) -> Option<End> {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Some(End::Shutdown),
        sent = events.send(event) => sent.is_err().then_some(End::ConsumerGone),
    }
}

/// One stream entry: the id's first part, and the fields in stored order.
pub type StreamEntry = (u64, Vec<(String, Vec<u8>)>);

/// Up to `count` entries of the stream at `key` with ids after
/// `after_id-0`, oldest first (`XRANGE key (after_id-0 + COUNT count`; the
/// exclusive start needs Redis ≥ 6.2). The stream's ids are `<seq>-0`, so the
/// first part of an id is the `seq`.
pub async fn read_stream(
    redis: &Redis,
    key: &str,
    after_id: u64,
    count: usize,
) -> Result<Vec<StreamEntry>, Unavailable> {
    let mut conn = redis.conn().await?;
    let reply = redis::cmd("XRANGE")
        .arg(key)
        .arg(format!("({after_id}-0"))
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async::<Value>(&mut conn)
        .await;
    let reply = redis.observe(reply)?;
    parse_entries(reply).map_err(|what| {
        tracing::error!(key, what, "unexpected XRANGE reply");
        Unavailable
    })
}

pub(crate) fn parse_entries(reply: Value) -> Result<Vec<StreamEntry>, &'static str> {
    let Value::Array(entries) = reply else {
        return Err("not an array");
    };
    entries.into_iter().map(parse_entry).collect()
}

fn parse_entry(entry: Value) -> Result<StreamEntry, &'static str> {
    let Value::Array(parts) = entry else {
        return Err("entry is not an array");
    };
    let [id, fields]: [Value; 2] = parts.try_into().map_err(|_| "entry is not [id, fields]")?;
    let Value::BulkString(id) = id else {
        return Err("id is not a string");
    };
    let seq = std::str::from_utf8(&id)
        .ok()
        .and_then(|id| id.split_once('-'))
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .ok_or("id is not <number>-<number>")?;
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Array(flat) => {
            if flat.len() % 2 != 0 {
                return Err("odd number of field names and values");
            }
            let mut flat = flat.into_iter();
            std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
        }
        Value::Map(pairs) => pairs,
        _ => return Err("fields are not an array"),
    };
    let fields = pairs
        .into_iter()
        .map(|pair| match pair {
            (Value::BulkString(name), Value::BulkString(value)) => String::from_utf8(name)
                .map(|name| (name, value))
                .map_err(|_| "field name is not UTF-8"),
            _ => Err("field is not a string"),
        })
        .collect::<Result<_, _>>()?;
    Ok((seq, fields))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::cluster::test_support::TestKeys;

    const WAIT: Duration = Duration::from_secs(5);

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn backoff_doubles_from_100ms_up_to_5s() {
        let waits: Vec<_> = (0..9).map(backoff).collect();
        let ms: Vec<_> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn parses_entries_keeping_field_order_and_bytes() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![
                    bulk("z"),
                    bulk("1"),
                    bulk("a"),
                    Value::BulkString(vec![0xff, 0]),
                ]),
            ]),
            Value::Array(vec![bulk("8-0"), Value::Array(vec![])]),
        ]);
        let entries = parse_entries(reply).expect("well formed");
        assert_eq!(
            entries,
            vec![
                (
                    7,
                    vec![("z".into(), b"1".to_vec()), ("a".into(), vec![0xff, 0])]
                ),
                (8, vec![]),
            ]
        );
    }

    #[test]
    fn rejects_malformed_entries() {
        let cases = [
            Value::Nil,
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![Value::Array(vec![bulk("7-0")])]),
            Value::Array(vec![Value::Array(vec![bulk("x-0"), Value::Array(vec![])])]),
            Value::Array(vec![Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![bulk("lonely")]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![Value::Int(1), bulk("v")]),
            ])]),
        ];
        for case in cases {
            assert!(parse_entries(case.clone()).is_err(), "{case:?}");
        }
    }

    #[tokio::test]
    async fn reads_stream_entries_after_an_id() {
        let keys = TestKeys::new("read-stream").await;
        let redis = Redis::new(keys.url(), keys.prefix()).expect("valid url");
        let key = redis.key(&["history"]);
        let mut conn = redis.conn().await.expect("redis up");
        for (seq, value) in [(1u64, &b"one"[..]), (2, b"two"), (3, &[0xff, 0x00])] {
            redis::cmd("XADD")
                .arg(&key)
                .arg(format!("{seq}-0"))
                .arg("change")
                .arg(value)
                .arg("source")
                .arg("mitel")
                .exec_async(&mut conn)
                .await
                .expect("XADD");
        }

        let after_one = read_stream(&redis, &key, 1, 10).await.expect("read");
        assert_eq!(after_one.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(
            after_one[1].1,
            [
                ("change".to_owned(), vec![0xff, 0x00]),
                ("source".to_owned(), b"mitel".to_vec())
            ]
        );
        let first = read_stream(&redis, &key, 0, 1).await.expect("read");
        assert_eq!(first.iter().map(|e| e.0).collect::<Vec<_>>(), [1]);
        assert!(
            read_stream(&redis, &key, 3, 10)
                .await
                .expect("read")
                .is_empty()
        );
        let missing = redis.key(&["no-such-stream"]);
        assert!(
            read_stream(&redis, &missing, 0, 10)
                .await
                .expect("read")
                .is_empty()
        );
    }

    /// A TCP relay to the shared server, so the test knows the address the
    /// server sees for the feed's connection and can kill exactly that one
    /// (other tests and other people's feeds on the server stay untouched).
    async fn relay(target: SocketAddr) -> (SocketAddr, mpsc::UnboundedReceiver<SocketAddr>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (seen, upstreams) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut server) = TcpStream::connect(target).await else {
                    continue;
                };
                if let Ok(local) = server.local_addr() {
                    let _ = seen.send(local);
                }
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        (addr, upstreams)
    }

    async fn next_event(rx: &mut mpsc::Receiver<FeedEvent>) -> FeedEvent {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an event within 5 s")
            .expect("feed alive")
    }

    #[tokio::test]
    async fn delivers_messages_in_order_and_resubscribes_after_a_kill() {
        let keys = TestKeys::new("feed").await;
        let client = redis::Client::open(keys.url()).expect("valid url");
        let target = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .expect("resolve")
                    .next()
                    .expect("an address")
            }
            other => panic!("this test needs a TCP Redis URL, not {other}"),
        };
        let (relay_addr, mut upstreams) = relay(target).await;
        let redis =
            Redis::new(&format!("redis://{relay_addr}/0"), keys.prefix()).expect("valid url");
        let channel = redis.key(&["changes"]);
        let mut direct = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");

        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let feed = spawn(redis, tx, shutdown.clone());
        assert_eq!(next_event(&mut rx).await, FeedEvent::Resubscribed);

        for n in 0..5 {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(format!("change {n}"))
                .exec_async(&mut direct)
                .await
                .expect("PUBLISH");
        }
        for n in 0..5 {
            assert_eq!(
                next_event(&mut rx).await,
                FeedEvent::Message(format!("change {n}").into_bytes())
            );
        }

        // The relay also carries the handle's shared connection; only the
        // subscribed one is killed.
        let mut killed = 0;
        while let Ok(upstream) = upstreams.try_recv() {
            killed += redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .arg("ADDR")
                .arg(upstream.to_string())
                .query_async::<i64>(&mut direct)
                .await
                .expect("CLIENT KILL");
        }
        assert_eq!(killed, 1, "the feed's connection was killed");
        assert_eq!(next_event(&mut rx).await, FeedEvent::Resubscribed);

        redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(b"after".as_slice())
            .exec_async(&mut direct)
            .await
            .expect("PUBLISH");
        assert_eq!(
            next_event(&mut rx).await,
            FeedEvent::Message(b"after".to_vec())
        );

        shutdown.cancel();
        tokio::time::timeout(WAIT, feed)
            .await
            .expect("feed ends on shutdown")
            .expect("feed task ends cleanly");
    }
}
