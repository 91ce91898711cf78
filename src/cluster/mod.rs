//! The connection to Redis behind `[store] backend = "redis"` (DESIGN §8):
//! one cheap, cloneable [`Redis`] handle per process, shared by everything
//! that talks to Redis (the store, the per-source [`lease`]s, the change
//! [`feed`]).
//!
//! It owns reachability: whether Redis answers right now, learnt from the
//! results callers hand to [`Redis::observe`] and, while Redis is down, from a
//! ping every second, so a replica that started without its Redis (or lost
//! it) recovers by itself. It never makes a caller wait long: connecting and
//! every reply are bounded ([`CONNECT_TIMEOUT`], [`RESPONSE_TIMEOUT`]), and
//! while Redis is known to be down [`Redis::conn`] fails at once with
//! [`Unavailable`], which a request answers with 503 and `Retry-After`.
//!
//! It never logs the URL, which may carry a password: logs and `Debug` name
//! the host and port (or the socket path) only.

pub mod feed;
pub mod lease;
#[cfg(test)]
pub(crate) mod test_support;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::RedisResult;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long one attempt to connect (TCP or unix socket, TLS, `AUTH`,
/// `SELECT`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long any reply may take before the command fails. Every command this
/// crate sends is O(1) or bounded by a `COUNT`, so a slower reply means an
/// unhealthy server or network, not a big command.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// While Redis is down, how often the background task pings it.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The bound on one reachability check (connect and `PING`), so a caller that
/// checks on its own while Redis is down never waits longer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// While Redis is down, a caller this soon after a failed check fails without
/// a check of its own: a burst of webhooks during an outage costs no burst of
/// connection attempts.
const PROBE_THROTTLE: Duration = Duration::from_millis(250);

/// The `url` given to [`Redis::new`] is not a Redis URL this build can use.
/// The reason never repeats the URL (it may carry a password).
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL: {reason}")]
pub struct InvalidUrl {
    reason: String,
}

/// Redis did not do what was asked: it is unreachable, did not answer in
/// time, or answered with an error (logged where it happened). Nothing was
/// stored that the caller can count on.
///
/// A request handler turns this into `503 Service Unavailable` with
/// `Retry-After: `[`Unavailable::RETRY_AFTER_SECS`], never into a success
/// for something that was not stored (DESIGN §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Redis is unavailable")]
pub struct Unavailable;

impl Unavailable {
    /// The `Retry-After` a 503 caused by this error carries: the background
    /// check runs every second, so a retry after that sees fresh state.
    pub const RETRY_AFTER_SECS: u64 = 1;
}

/// A handle on one Redis server: the key prefix, a lazily connected,
/// self-reconnecting multiplexed connection, and its reachability. Cloning
/// is cheap (an `Arc`).
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    /// `host:port` or the socket path: what logs may say about the server.
    endpoint: String,
    /// Created on first use (it needs a Tokio runtime) and replaced when a
    /// connection attempt fails for a reason other than I/O, because the
    /// manager only retries after I/O errors and would otherwise keep
    /// answering that one error forever (e.g. `WRONGPASS` until the password
    /// is fixed on the server).
    manager: Mutex<Option<ConnectionManager>>,
    health: Mutex<Health>,
    /// Mirrors `health.known == Known::Up` for the lock-free fast path.
    up_now: AtomicBool,
    up: watch::Sender<bool>,
    monitor_started: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Known {
    /// Not tried yet.
    Unknown,
    Up,
    Down,
}

struct Health {
    known: Known,
    last_failure: Option<Instant>,
}

impl Redis {
    /// A handle for the server at `url` (`redis://`, `rediss://`,
    /// `redis+unix:///path` or `unix:///path`, with an optional
    /// `user:password@` and `/db`), whose keys all start with `key_prefix`.
    ///
    /// Does no I/O: the server need not be up. Called inside a Tokio runtime
    /// it starts checking reachability at once; otherwise on first use.
    pub fn new(url: &str, key_prefix: &str) -> Result<Redis, InvalidUrl> {
        let client = redis::Client::open(url).map_err(|e| InvalidUrl {
            reason: e.to_string(),
        })?;
        let endpoint = client.get_connection_info().addr().to_string();
        let (up, _) = watch::channel(false);
        let redis = Redis {
            inner: Arc::new(Inner {
                client,
                prefix: key_prefix.to_owned(),
                endpoint,
                manager: Mutex::new(None),
                health: Mutex::new(Health {
                    known: Known::Unknown,
                    last_failure: None,
                }),
                up_now: AtomicBool::new(false),
                up,
                monitor_started: AtomicBool::new(false),
            }),
        };
        redis.ensure_monitor();
        Ok(redis)
    }

    /// A connection to send commands on (clones share one multiplexed
    /// connection, so pipelining across tasks is free).
    ///
    /// Fails with [`Unavailable`] at once while Redis is known to be down,
    /// and within [`PROBE_TIMEOUT`] (1.5 s) when this call has to find out;
    /// it never waits for a reconnect loop. Report what the commands sent on
    /// it return through [`Redis::observe`].
    pub async fn conn(&self) -> Result<ConnectionManager, Unavailable> {
        self.ensure_monitor();
        if self.inner.up_now.load(Ordering::Acquire) {
            return self.manager();
        }
        let recently_failed = self
            .inner
            .health
            .lock()
            .last_failure
            .is_some_and(|at| at.elapsed() < PROBE_THROTTLE);
        if recently_failed {
            return Err(Unavailable);
        }
        self.probe().await
    }

    /// Turns the result of a command into the caller's result, updating
    /// reachability: an answer (even an error answer) means Redis is up; a
    /// connection error, a timeout or a dropped connection means it is down.
    /// Error answers are logged here (without the URL).
    pub fn observe<T>(&self, result: RedisResult<T>) -> Result<T, Unavailable> {
        match result {
            Ok(value) => {
                self.mark_up();
                Ok(value)
            }
            Err(e) if is_connection_error(&e) => {
                self.mark_down(&e);
                Err(Unavailable)
            }
            Err(e) => {
                self.mark_up();
                tracing::error!(redis = %self.inner.endpoint, error = %e, "redis command failed");
                Err(Unavailable)
            }
        }
    }

    /// The key `{prefix}:{part}:{part}…`.
    pub fn key(&self, parts: &[&str]) -> String {
        let prefix = &self.inner.prefix;
        let len = prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(prefix);
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// The key prefix this handle was made with.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// `host:port` or the socket path: what may be logged about the server.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Whether Redis answered the last time anything talked to it. False
    /// until the first answer.
    pub fn is_up(&self) -> bool {
        self.inner.up_now.load(Ordering::Acquire)
    }

    /// Reachability as it changes (`/readyz` follows it). Starts `false`;
    /// turns `true` at the first answer.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.ensure_monitor();
        self.inner.up.subscribe()
    }

    /// The client, for the connections that cannot be shared (pub/sub).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    fn manager(&self) -> Result<ConnectionManager, Unavailable> {
        let mut slot = self.inner.manager.lock();
        if let Some(manager) = slot.as_ref() {
            return Ok(manager.clone());
        }
        // No retries inside the manager: a command during an outage fails
        // after one attempt instead of waiting out a backoff; reconnecting
        // is the background check's job.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(0);
        match self.inner.client.get_connection_manager_lazy(config) {
            Ok(manager) => {
                *slot = Some(manager.clone());
                Ok(manager)
            }
            Err(e) => {
                tracing::error!(redis = %self.inner.endpoint, error = %e, "cannot set up the redis connection");
                Err(Unavailable)
            }
        }
    }

    /// Connects if needed and pings, bounded by [`PROBE_TIMEOUT`].
    async fn probe(&self) -> Result<ConnectionManager, Unavailable> {
        let mut conn = self.manager()?;
        let ping = redis::cmd("PING");
        let answer = ping.query_async::<redis::Value>(&mut conn);
        match tokio::time::timeout(PROBE_TIMEOUT, answer).await {
            Ok(Ok(_)) => {
                self.mark_up();
                Ok(conn)
            }
            Ok(Err(e)) => {
                if !e.is_io_error() {
                    *self.inner.manager.lock() = None;
                }
                self.mark_down(&e);
                Err(Unavailable)
            }
            Err(_) => {
                self.mark_down(&"no answer to PING in time");
                Err(Unavailable)
            }
        }
    }

    fn mark_up(&self) {
        if self.inner.up_now.load(Ordering::Acquire) {
            return;
        }
        let mut health = self.inner.health.lock();
        match health.known {
            Known::Up => return,
            Known::Unknown => tracing::info!(redis = %self.inner.endpoint, "redis reachable"),
            Known::Down => tracing::info!(redis = %self.inner.endpoint, "redis reachable again"),
        }
        health.known = Known::Up;
        health.last_failure = None;
        self.inner.up_now.store(true, Ordering::Release);
        self.inner.up.send_replace(true);
    }

    fn mark_down(&self, error: &dyn fmt::Display) {
        {
            let mut health = self.inner.health.lock();
            health.last_failure = Some(Instant::now());
            if health.known != Known::Down {
                tracing::warn!(redis = %self.inner.endpoint, error = %error, "redis unreachable");
                health.known = Known::Down;
                self.inner.up_now.store(false, Ordering::Release);
                self.inner.up.send_replace(false);
            }
        }
        self.ensure_monitor();
    }

    /// Starts the background check once, when a Tokio runtime is there to
    /// run it. The task holds no strong reference between checks, so it
    /// ends when the last handle is dropped.
    fn ensure_monitor(&self) {
        if self.inner.monitor_started.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.monitor_started.swap(true, Ordering::AcqRel) {
            return;
        }
        runtime.spawn(monitor(
            Arc::downgrade(&self.inner),
            self.inner.up.subscribe(),
        ));
    }
}

/// Pings every [`PROBE_INTERVAL`] while Redis is not up; sleeps on the
/// reachability channel while it is.
async fn monitor(inner: Weak<Inner>, mut up: watch::Receiver<bool>) {
    loop {
        if *up.borrow_and_update() {
            if up.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Only the outcome matters here: probe() records it.
        let _ = Redis { inner }.probe().await;
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Errors that say nothing reached Redis or nothing came back, as opposed to
/// an error answer.
fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("endpoint", &self.inner.endpoint)
            .field("prefix", &self.inner.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::TestKeys;
    use super::*;

    #[test]
    fn key_joins_prefix_and_parts_with_colons() {
        let redis = Redis::new("redis://127.0.0.1:6379/0", "pg").expect("valid url");
        assert_eq!(redis.key(&["lease", "mitel"]), "pg:lease:mitel");
        assert_eq!(redis.key(&["changes"]), "pg:changes");
        assert_eq!(redis.key(&[]), "pg");
    }

    #[test]
    fn rejects_urls_it_cannot_use_without_repeating_them() {
        for url in [
            "http://user:s3cret-pw@host/",
            "redis://:s3cret-pw@host:notaport/0",
            "redis://:s3cret-pw@host:6379/notadb",
            "not a url s3cret-pw",
        ] {
            let err = Redis::new(url, "pg").expect_err(url);
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("s3cret-pw"), "{url}: {shown}");
        }
    }

    #[test]
    fn debug_names_the_host_but_never_the_password() {
        let redis =
            Redis::new("redis://gw:s3cret-pw@redis.internal:6380/2", "pg").expect("valid url");
        let shown = format!("{redis:?}");
        assert!(shown.contains("redis.internal:6380"), "{shown}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert_eq!(redis.endpoint(), "redis.internal:6380");
    }

    #[test]
    fn accepts_tls_and_unix_socket_urls() {
        Redis::new("rediss://redis.internal:6380/0", "pg").expect("rediss");
        let unix = Redis::new("redis+unix:///run/redis/redis.sock", "pg").expect("redis+unix");
        assert_eq!(unix.endpoint(), "/run/redis/redis.sock");
        Redis::new("unix:///run/redis/redis.sock", "pg").expect("unix");
    }

    #[tokio::test]
    async fn starts_without_a_server_and_fails_fast_while_it_is_missing() {
        // Port 1 on loopback: nothing listens there, the connect is refused.
        let redis = Redis::new("redis://127.0.0.1:1/0", "pg").expect("valid url");
        let mut up = redis.watch();
        let started = std::time::Instant::now();
        assert_eq!(redis.conn().await.err(), Some(Unavailable));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!redis.is_up());
        assert!(!*up.borrow_and_update());
        // Right after a failure, callers fail without trying again.
        let started = std::time::Instant::now();
        assert_eq!(redis.conn().await.err(), Some(Unavailable));
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn reports_up_once_the_server_answers() {
        let keys = TestKeys::new("handle-up").await;
        let redis = Redis::new(keys.url(), keys.prefix()).expect("valid url");
        let mut up = redis.watch();
        tokio::time::timeout(Duration::from_secs(3), up.wait_for(|up| *up))
            .await
            .expect("the background check reaches redis within 3 s")
            .expect("watch open");
        let mut conn = redis.conn().await.expect("connection");
        let pong = redis.observe(redis::cmd("PING").query_async::<String>(&mut conn).await);
        assert_eq!(pong.as_deref(), Ok("PONG"));
        assert!(redis.is_up());
    }

    #[tokio::test]
    async fn an_error_answer_is_unavailable_but_keeps_redis_up() {
        let keys = TestKeys::new("handle-error").await;
        let redis = Redis::new(keys.url(), keys.prefix()).expect("valid url");
        let mut conn = redis.conn().await.expect("connection");
        let answer = redis.observe(
            redis::cmd("NO-SUCH-COMMAND")
                .query_async::<redis::Value>(&mut conn)
                .await,
        );
        assert_eq!(answer, Err(Unavailable));
        assert!(redis.is_up());
    }
}
