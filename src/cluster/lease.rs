//! One lease per managed source (DESIGN §8): the replica that holds
//! `{prefix}:lease:{source_id}` manages that source's upstream subscriptions
//! and socket transports; every other replica only knows who does.
//!
//! The key's value is `"{replica_id} {random token}"`, set with a TTL. A
//! replica claims the lease every third of the TTL with one atomic script:
//! free, it takes it (`SET … PX ttl`, so an abandoned lease frees itself);
//! ours, it extends it (`PEXPIRE`); someone else's, it learns the holder. At
//! shutdown it deletes the key, only if the value is still its own, so the
//! next replica takes over at its next check instead of after the TTL.
//!
//! Fencing: a holder counts its lease from the moment it *sent* the last
//! successful claim, which is no later than Redis set the expiry, and gives
//! it up a safety margin before the TTL runs out from there. So a holder
//! that cannot reach Redis stops managing (its [`LeaseState`] says
//! `held_here: false`) before any other replica can take the lease.
//!
//! This module decides when to claim and whether the lease is held; it
//! never manages a source itself. The schedule is the pure [`Machine`]; the
//! task around it only sleeps, sends and publishes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Redis, Unavailable};

/// Who holds a source's lease, as this replica last learnt it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// The holder's replica id; `None` when the lease is free or this
    /// replica cannot tell (Redis unreachable after losing it).
    pub holder: Option<String>,
    /// This replica holds the lease and may manage the source.
    pub held_here: bool,
}

/// Takes the lease when free (`SET NX PX`), extends it when ours
/// (`PEXPIRE`); answers the value the key holds afterwards, so one round
/// trip both renews and tells a non-holder who holds it. One script, so
/// "it is ours" and "it was extended" can never come apart.
const CLAIM: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return ARGV[1]
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return holder
";

/// Deletes the lease only while it is ours: a late release must never free
/// a lease another replica has taken since.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// One source's lease on Redis, claimed and released by its own task.
pub struct Lease {
    redis: Redis,
    key: String,
    value: String,
    ttl_ms: u64,
    claim: redis::Script,
    release: redis::Script,
}

impl Lease {
    /// Starts claiming the lease of `source_id` for `replica_id`, renewing
    /// it every `ttl / 3` while held, checking every `ttl / 3` otherwise.
    /// Must be called inside a Tokio runtime.
    ///
    /// The task runs until `shutdown` is cancelled, then releases the lease
    /// if it may hold it, publishes `held_here: false` and ends. The
    /// receiver starts at `LeaseState::default()` (nobody known, not held).
    pub fn spawn(
        redis: Redis,
        source_id: &str,
        replica_id: &str,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> (JoinHandle<()>, watch::Receiver<LeaseState>) {
        let value = format!("{replica_id} {}", token());
        let lease = Lease {
            key: redis.key(&["lease", source_id]),
            value: value.clone(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            redis,
        };
        let machine = Machine::new(replica_id.to_owned(), value, ttl, Instant::now());
        let (state, receiver) = watch::channel(LeaseState::default());
        let source = source_id.to_owned();
        let task = tokio::spawn(drive(lease, machine, state, shutdown, source));
        (task, receiver)
    }
}

/// What the driver needs from Redis; a fake in the tests.
trait Backend {
    /// Runs [`CLAIM`]: the holder's value afterwards.
    async fn claim(&mut self) -> Result<Option<String>, Unavailable>;
    /// Runs [`RELEASE`]: whether the key was ours and is gone.
    async fn release(&mut self) -> Result<bool, Unavailable>;
}

impl Backend for Lease {
    async fn claim(&mut self) -> Result<Option<String>, Unavailable> {
        let mut conn = self.redis.conn().await?;
        let reply = self
            .claim
            .key(&self.key)
            .arg(&self.value)
            .arg(self.ttl_ms)
            .invoke_async(&mut conn)
            .await;
        self.redis.observe(reply)
    }

    async fn release(&mut self) -> Result<bool, Unavailable> {
        let mut conn = self.redis.conn().await?;
        let reply = self
            .release
            .key(&self.key)
            .arg(&self.value)
            .invoke_async::<i64>(&mut conn)
            .await;
        self.redis.observe(reply).map(|deleted| deleted == 1)
    }
}

/// The lease's schedule and fencing, with time passed in.
#[derive(Debug)]
struct Machine {
    replica_id: String,
    /// Our value of the key: replica id and token.
    value: String,
    ttl: Duration,
    /// Between two claims: `ttl / 3`, so a holder gets two tries (and
    /// retries in between) before the margin.
    interval: Duration,
    /// How long before the TTL would run out (counted from the sending of
    /// the last successful claim) the holder gives up: covers the time the
    /// users of the lease need to notice and stop, and timer slack.
    margin: Duration,
    /// After a failed claim while holding, how soon to try again.
    retry: Duration,
    next_claim: Instant,
    /// While we hold the lease: when we stop counting on it.
    held_until: Option<Instant>,
    state: LeaseState,
}

impl Machine {
    fn new(replica_id: String, value: String, ttl: Duration, now: Instant) -> Machine {
        let interval = ttl / 3;
        Machine {
            replica_id,
            value,
            ttl,
            interval,
            margin: ttl / 5,
            retry: interval / 4,
            next_claim: now,
            held_until: None,
            state: LeaseState::default(),
        }
    }

    /// When the driver must wake up next: the next claim, or the moment a
    /// held lease stops counting, whichever is first.
    fn wake_at(&self) -> Instant {
        match self.held_until {
            Some(until) => until.min(self.next_claim),
            None => self.next_claim,
        }
    }

    /// Gives up a lease whose time is over; says whether a claim is due.
    fn poll(&mut self, now: Instant) -> bool {
        if self.held_until.is_some_and(|until| now >= until) {
            self.held_until = None;
            self.state = LeaseState::default();
        }
        now >= self.next_claim
    }

    /// Takes in the answer to a claim sent at `sent_at`.
    fn on_claim(
        &mut self,
        sent_at: Instant,
        reply: Result<Option<String>, Unavailable>,
        now: Instant,
    ) {
        match reply {
            Ok(Some(holder)) if holder == self.value => {
                self.next_claim = sent_at + self.interval;
                let until = sent_at + self.ttl.saturating_sub(self.margin);
                if now < until {
                    self.held_until = Some(until);
                    self.state = LeaseState {
                        holder: Some(self.replica_id.clone()),
                        held_here: true,
                    };
                } else {
                    // The answer came too late to count on.
                    self.held_until = None;
                    self.state = LeaseState::default();
                }
            }
            Ok(holder) => {
                self.next_claim = sent_at + self.interval;
                self.held_until = None;
                self.state = LeaseState {
                    holder: holder.as_deref().map(replica_of),
                    held_here: false,
                };
            }
            // Unreachable: a holder retries soon (and loses the lease at
            // `held_until` if that fails too); anyone else keeps what it
            // knew and checks at the usual pace.
            Err(Unavailable) => match self.held_until {
                Some(until) => self.next_claim = (now + self.retry).min(until),
                None => self.next_claim = now + self.interval,
            },
        }
    }

    /// Whether the key may still be ours on Redis (so shutdown releases it).
    fn may_hold(&self) -> bool {
        self.held_until.is_some()
    }

    fn state(&self) -> &LeaseState {
        &self.state
    }
}

/// The replica id in a lease value `"{replica_id} {token}"`.
fn replica_of(value: &str) -> String {
    value
        .rsplit_once(' ')
        .map_or(value, |(replica, _token)| replica)
        .to_owned()
}

async fn drive<B: Backend>(
    mut backend: B,
    mut machine: Machine,
    state: watch::Sender<LeaseState>,
    shutdown: CancellationToken,
    source: String,
) {
    // A claim cut short by shutdown may have taken the lease.
    let mut interrupted = false;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(machine.wake_at()) => {}
        }
        let now = Instant::now();
        let due = machine.poll(now);
        publish(&state, machine.state(), &source);
        if !due {
            continue;
        }
        let reply = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                interrupted = true;
                break;
            }
            reply = backend.claim() => reply,
        };
        machine.on_claim(now, reply, Instant::now());
        publish(&state, machine.state(), &source);
    }

    if machine.may_hold() || interrupted {
        match backend.release().await {
            Ok(true) => tracing::info!(source, "lease released"),
            Ok(false) => {}
            Err(Unavailable) => {
                tracing::warn!(source, "could not release the lease; it expires by itself");
            }
        }
    }
    state.send_if_modified(|current| {
        let was_held = std::mem::take(&mut current.held_here);
        if was_held {
            current.holder = None;
        }
        was_held
    });
}

/// Publishes `new` if it differs, logging what changed.
fn publish(state: &watch::Sender<LeaseState>, new: &LeaseState, source: &str) {
    state.send_if_modified(|current| {
        if current == new {
            return false;
        }
        match (current.held_here, new.held_here) {
            (false, true) => tracing::info!(source, "lease acquired"),
            (true, false) => {
                tracing::warn!(source, holder = ?new.holder, "lease lost; no longer managing");
            }
            _ => tracing::debug!(source, holder = ?new.holder, "lease holder"),
        }
        *current = new.clone();
        true
    });
}

/// A fresh token for the lease value. It only has to be unique (the value
/// is readable by anyone with access to Redis); if the OS has no randomness
/// to give, time, pid and std's randomly seeded hasher make do.
fn token() -> String {
    let mut bytes = [0u8; 16];
    match getrandom::fill(&mut bytes) {
        Ok(()) => hex::encode(bytes),
        Err(e) => {
            tracing::warn!(error = %e, "no OS randomness for the lease token; using time and pid");
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let salt = std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                nanos,
            );
            format!("{nanos:x}{:x}{salt:x}", std::process::id())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use parking_lot::Mutex;

    use super::*;
    use crate::cluster::test_support::TestKeys;

    const TTL: Duration = Duration::from_secs(2);

    fn machine(now: Instant) -> Machine {
        Machine::new("gw-1".into(), "gw-1 t0k3n".into(), TTL, now)
    }

    fn held() -> LeaseState {
        LeaseState {
            holder: Some("gw-1".into()),
            held_here: true,
        }
    }

    // ---- the pure schedule ----

    #[tokio::test(start_paused = true)]
    async fn claims_at_once_then_every_third_of_the_ttl() {
        let start = Instant::now();
        let mut m = machine(start);
        assert_eq!(m.wake_at(), start);
        assert!(m.poll(start));
        m.on_claim(start, Ok(Some("gw-1 t0k3n".into())), start);
        assert_eq!(m.state(), &held());
        assert_eq!(m.wake_at(), start + TTL / 3);

        tokio::time::advance(TTL / 3).await;
        let now = Instant::now();
        assert!(m.poll(now));
        m.on_claim(now, Ok(Some("gw-1 t0k3n".into())), now);
        assert_eq!(m.wake_at(), now + TTL / 3);
        assert_eq!(m.state(), &held());
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_cannot_renew_gives_up_before_the_ttl_runs_out() {
        let start = Instant::now();
        let mut m = machine(start);
        assert!(m.poll(start));
        m.on_claim(start, Ok(Some("gw-1 t0k3n".into())), start);

        // Every renewal fails: retries come quicker than the interval and
        // never later than the end of the lease.
        let mut now = m.wake_at();
        let mut claims = 0;
        while m.state().held_here {
            tokio::time::advance(now - Instant::now()).await;
            if m.poll(now) && m.state().held_here {
                claims += 1;
                m.on_claim(now, Err(Unavailable), now);
            }
            assert!(m.wake_at() > now || !m.state().held_here);
            now = m.wake_at();
        }
        let lost_at = Instant::now();
        assert!(claims >= 3, "{claims} retries");
        assert_eq!(lost_at - start, TTL - TTL / 5);
        assert!(
            lost_at < start + TTL,
            "gave up before Redis could expire the key"
        );
        assert_eq!(m.state(), &LeaseState::default());
        assert!(!m.may_hold());
    }

    #[tokio::test(start_paused = true)]
    async fn someone_elses_value_loses_the_lease_at_once_and_names_the_holder() {
        let start = Instant::now();
        let mut m = machine(start);
        m.poll(start);
        m.on_claim(start, Ok(Some("gw-1 t0k3n".into())), start);
        tokio::time::advance(TTL / 3).await;
        let now = Instant::now();
        assert!(m.poll(now));
        m.on_claim(now, Ok(Some("gw 2 other-token".into())), now);
        assert_eq!(
            m.state(),
            &LeaseState {
                holder: Some("gw 2".into()),
                held_here: false
            }
        );
        assert!(!m.may_hold());
        assert_eq!(m.wake_at(), now + TTL / 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_holder_keeps_what_it_knew_while_redis_is_down() {
        let start = Instant::now();
        let mut m = machine(start);
        m.poll(start);
        m.on_claim(start, Ok(Some("gw-2 x".into())), start);
        tokio::time::advance(TTL / 3).await;
        let now = Instant::now();
        assert!(m.poll(now));
        m.on_claim(now, Err(Unavailable), now);
        assert_eq!(m.state().holder.as_deref(), Some("gw-2"));
        assert_eq!(m.wake_at(), now + TTL / 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_comes_too_late_is_not_counted_on() {
        let start = Instant::now();
        let mut m = machine(start);
        m.poll(start);
        tokio::time::advance(TTL).await;
        m.on_claim(start, Ok(Some("gw-1 t0k3n".into())), Instant::now());
        assert!(!m.state().held_here);
        assert!(!m.may_hold());
    }

    #[test]
    fn the_holder_is_the_value_before_the_token() {
        assert_eq!(replica_of("gw-1 abc"), "gw-1");
        assert_eq!(replica_of("host 7 abc"), "host 7");
        assert_eq!(replica_of("no-token"), "no-token");
    }

    #[test]
    fn tokens_differ() {
        let a = token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, token());
    }

    // ---- the driver, on a simulated Redis with paused time ----

    /// One lease key with an expiry, shared by the fake replicas.
    #[derive(Default)]
    struct FakeStore {
        keys: HashMap<String, (String, Instant)>,
    }

    struct FakeBackend {
        store: Arc<Mutex<FakeStore>>,
        /// This replica's link to Redis is cut.
        down: Arc<AtomicBool>,
        value: String,
        ttl: Duration,
    }

    impl FakeBackend {
        fn reachable(&self) -> Result<(), Unavailable> {
            if self.down.load(Ordering::SeqCst) {
                Err(Unavailable)
            } else {
                Ok(())
            }
        }
    }

    impl Backend for FakeBackend {
        async fn claim(&mut self) -> Result<Option<String>, Unavailable> {
            self.reachable()?;
            let now = Instant::now();
            let mut store = self.store.lock();
            let entry = store
                .keys
                .entry("lease".into())
                .or_insert((String::new(), now));
            if entry.1 <= now {
                *entry = (self.value.clone(), now + self.ttl);
            } else if entry.0 == self.value {
                entry.1 = now + self.ttl;
            }
            Ok(Some(entry.0.clone()))
        }

        async fn release(&mut self) -> Result<bool, Unavailable> {
            self.reachable()?;
            let mut store = self.store.lock();
            let ours = store
                .keys
                .get("lease")
                .is_some_and(|(v, exp)| *v == self.value && *exp > Instant::now());
            if ours {
                store.keys.remove("lease");
            }
            Ok(ours)
        }
    }

    struct FakeReplica {
        task: JoinHandle<()>,
        state: watch::Receiver<LeaseState>,
        down: Arc<AtomicBool>,
        shutdown: CancellationToken,
    }

    fn fake_replica(store: &Arc<Mutex<FakeStore>>, id: &str) -> FakeReplica {
        let down = Arc::new(AtomicBool::new(false));
        let value = format!("{id} {}", token());
        let backend = FakeBackend {
            store: store.clone(),
            down: down.clone(),
            value: value.clone(),
            ttl: TTL,
        };
        let (tx, state) = watch::channel(LeaseState::default());
        let shutdown = CancellationToken::new();
        let machine = Machine::new(id.into(), value, TTL, Instant::now());
        let task = tokio::spawn(drive(backend, machine, tx, shutdown.clone(), id.into()));
        FakeReplica {
            task,
            state,
            down,
            shutdown,
        }
    }

    async fn until(
        rx: &mut watch::Receiver<LeaseState>,
        within: Duration,
        cond: impl FnMut(&LeaseState) -> bool,
    ) -> LeaseState {
        tokio::time::timeout(within, rx.wait_for(cond))
            .await
            .expect("state reached in time")
            .expect("lease task alive")
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_holder_stops_managing_before_another_replica_takes_over() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let mut a = fake_replica(&store, "a");
        until(&mut a.state, TTL, |s| s.held_here).await;
        let mut b = fake_replica(&store, "b");
        until(&mut b.state, TTL, |s| s.holder.as_deref() == Some("a")).await;

        a.down.store(true, Ordering::SeqCst);
        let cut = Instant::now();
        until(&mut a.state, TTL, |s| !s.held_here).await;
        let a_stopped = Instant::now();
        until(&mut b.state, 2 * TTL, |s| s.held_here).await;
        let b_took = Instant::now();
        assert!(
            a_stopped < b_took,
            "a stopped {:?} after the cut, b took over {:?} after",
            a_stopped - cut,
            b_took - cut
        );
        assert!(
            b_took - cut <= TTL + TTL / 3,
            "took over {:?} after the cut",
            b_took - cut
        );
        // The link comes back: a learns the new holder and does not take it.
        a.down.store(false, Ordering::SeqCst);
        until(&mut a.state, TTL, |s| s.holder.as_deref() == Some("b")).await;
        assert!(b.state.borrow().held_here);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_releases_so_the_other_replica_takes_over_at_its_next_check() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let mut a = fake_replica(&store, "a");
        until(&mut a.state, TTL, |s| s.held_here).await;
        let mut b = fake_replica(&store, "b");
        until(&mut b.state, TTL, |s| s.holder.as_deref() == Some("a")).await;

        let stopped = Instant::now();
        a.shutdown.cancel();
        a.task.await.expect("lease task ends cleanly");
        assert_eq!(*a.state.borrow(), LeaseState::default());
        until(&mut b.state, TTL, |s| s.held_here).await;
        // Timers have millisecond resolution.
        let next_check = TTL / 3 + Duration::from_millis(1);
        let took = Instant::now() - stopped;
        assert!(took <= next_check, "took {took:?}");
        b.shutdown.cancel();
    }

    // ---- against the real Redis ----

    fn real(
        keys: &TestKeys,
        replica: &str,
    ) -> (
        JoinHandle<()>,
        watch::Receiver<LeaseState>,
        CancellationToken,
    ) {
        let redis = Redis::new(keys.url(), keys.prefix()).expect("valid url");
        let shutdown = CancellationToken::new();
        let (task, state) = Lease::spawn(redis, "mitel", replica, TTL, shutdown.clone());
        (task, state, shutdown)
    }

    async fn lease_value(keys: &TestKeys) -> Option<String> {
        let client = redis::Client::open(keys.url()).expect("valid url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        redis::cmd("GET")
            .arg(format!("{}:lease:mitel", keys.prefix()))
            .query_async(&mut conn)
            .await
            .expect("GET")
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn only_one_of_two_replicas_holds_the_lease() {
        let keys = TestKeys::new("lease-exclusive").await;
        let (_a_task, mut a, a_stop) = real(&keys, "gw-a");
        until(&mut a, WAIT, |s| s.held_here).await;
        let (_b_task, mut b, b_stop) = real(&keys, "gw-b");
        let seen = until(&mut b, WAIT, |s| s.holder.is_some()).await;
        assert_eq!(
            seen,
            LeaseState {
                holder: Some("gw-a".into()),
                held_here: false
            }
        );
        assert!(a.borrow().held_here);
        let value = lease_value(&keys).await.expect("lease key set");
        assert!(value.starts_with("gw-a "), "{value}");
        a_stop.cancel();
        b_stop.cancel();
    }

    #[tokio::test]
    async fn another_replica_takes_over_an_abandoned_lease_within_ttl_and_one_check() {
        let keys = TestKeys::new("lease-takeover").await;
        let (a_task, mut a, _a_stop) = real(&keys, "gw-a");
        until(&mut a, WAIT, |s| s.held_here).await;
        let (_b_task, mut b, b_stop) = real(&keys, "gw-b");
        until(&mut b, WAIT, |s| s.holder.as_deref() == Some("gw-a")).await;

        // A crash: the task goes without releasing anything.
        a_task.abort();
        let aborted = Instant::now();
        let slack = Duration::from_millis(500);
        until(&mut b, TTL + TTL / 3 + slack, |s| s.held_here).await;
        let took = aborted.elapsed();
        // The last renewal was at most a third of the TTL before the abort.
        let earliest = TTL - TTL / 3 - Duration::from_millis(100);
        assert!(
            took >= earliest,
            "{took:?}: taken before the abandoned lease expired"
        );
        let value = lease_value(&keys).await.expect("lease key set");
        assert!(value.starts_with("gw-b "), "{value}");
        b_stop.cancel();
    }

    #[tokio::test]
    async fn a_released_lease_goes_to_the_other_replica_at_its_next_check() {
        let keys = TestKeys::new("lease-release").await;
        let (a_task, mut a, a_stop) = real(&keys, "gw-a");
        until(&mut a, WAIT, |s| s.held_here).await;
        let (b_task, mut b, b_stop) = real(&keys, "gw-b");
        until(&mut b, WAIT, |s| s.holder.as_deref() == Some("gw-a")).await;

        a_stop.cancel();
        let stopped = Instant::now();
        tokio::time::timeout(WAIT, a_task)
            .await
            .expect("released in time")
            .expect("task ends cleanly");
        assert_eq!(*a.borrow(), LeaseState::default());
        // Well before the TTL: it was released, not left to expire.
        until(&mut b, TTL / 3 + Duration::from_millis(500), |s| {
            s.held_here
        })
        .await;
        assert!(stopped.elapsed() < TTL, "{:?}", stopped.elapsed());

        b_stop.cancel();
        tokio::time::timeout(WAIT, b_task)
            .await
            .expect("released in time")
            .expect("task ends cleanly");
        assert_eq!(lease_value(&keys).await, None, "released at shutdown");
    }
}
