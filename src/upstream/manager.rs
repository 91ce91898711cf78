//! The life of one managed subscription, for any provider.
//!
//! A provider implements [`Upstream`] (find, create, renew, delete); the
//! manager decides when to call what ([`super::schedule::plan`]), backs off
//! after failures, recreates a subscription the provider says is gone, keeps
//! the correlation ids that authenticate posts in step (an id is accepted from
//! the moment its subscription exists until it is deleted or known gone), and
//! publishes its state for `/v1/sources` and `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::schedule::{Action, Backoff, Situation, Timing, jitter, plan};
use crate::presence::Millis;

/// A subscription as the provider describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub id: String,
    pub expires_at: Option<Millis>,
    /// The provider reports it broken (NetSapiens `status: error`).
    pub broken: bool,
    pub posts_count: Option<u64>,
    pub error_count: Option<u64>,
}

/// Why an upstream call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The subscription does not exist (any more).
    #[error("not found")]
    NotFound,
    /// It already exists (create).
    #[error("already exists")]
    Conflict,
    /// Failed, may succeed later; `retry_after_ms` when the provider said.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after_ms: Option<i64>,
    },
    /// Failed in a way retrying the same request will not fix soon
    /// (rejected credentials, a 4xx about the request itself). Still retried,
    /// with backoff: configuration or rights can be fixed meanwhile.
    #[error("{0}")]
    Rejected(String),
}

/// What a provider does for the manager. Implementations map their API's
/// answers onto [`UpstreamError`] and never log secrets.
pub trait Upstream: Send + Sync + 'static {
    /// A subscription of the provider that matches what would be created.
    fn find(&self) -> impl Future<Output = Result<Option<Remote>, UpstreamError>> + Send;
    /// Creates the subscription, to expire at `expires_at`.
    fn create(
        &self,
        expires_at: Millis,
    ) -> impl Future<Output = Result<Remote, UpstreamError>> + Send;
    /// Extends subscription `id` to `expires_at`.
    fn renew(
        &self,
        id: &str,
        expires_at: Millis,
    ) -> impl Future<Output = Result<Remote, UpstreamError>> + Send;
    /// Deletes subscription `id`.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), UpstreamError>> + Send;
}

/// Where the manager keeps correlation ids current (the source's verifier).
pub trait IdSink: Send + Sync + 'static {
    fn add(&self, id: &str);
    fn remove(&self, id: &str);
}

/// The state of a managed subscription, as shown to operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubscriptionView {
    /// What it subscribes to (NetSapiens: the model).
    pub kind: String,
    /// The id, or a fingerprint of it when the id is a secret.
    pub id: Option<String>,
    /// `pending`, `active`, `renewing` or `failed: <reason>`.
    pub state: String,
    pub expires_at: Option<Millis>,
    pub next_action_at: Option<Millis>,
    pub last_error: Option<String>,
    pub posts_count: Option<u64>,
    pub error_count: Option<u64>,
    /// Consecutive failures of the current step.
    pub failures: u32,
    /// Socket and event-channel transports: times the connection was
    /// re-established.
    pub reconnects: u64,
}

/// The views of one source's managed subscriptions.
#[derive(Debug, Default)]
pub struct Board {
    views: RwLock<Vec<SubscriptionView>>,
}

impl Board {
    /// Adds a subscription; returns its slot.
    pub fn add(&self, kind: &str) -> usize {
        let mut views = self.views.write();
        views.push(SubscriptionView {
            kind: kind.to_owned(),
            id: None,
            state: "pending".into(),
            expires_at: None,
            next_action_at: None,
            last_error: None,
            posts_count: None,
            error_count: None,
            failures: 0,
            reconnects: 0,
        });
        views.len() - 1
    }

    /// All views, in slot order.
    pub fn snapshot(&self) -> Vec<SubscriptionView> {
        self.views.read().clone()
    }

    pub(crate) fn update(&self, slot: usize, f: impl FnOnce(&mut SubscriptionView)) {
        if let Some(view) = self.views.write().get_mut(slot) {
            f(view);
        }
    }
}

/// Current time for the manager: wall-clock epoch ms that advances with
/// tokio's clock, so tests with `tokio::time::pause()` move it too.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_ms: i64,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base_ms: Millis::now().0,
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.base_ms + self.base.elapsed().as_millis() as i64
    }

    fn instant_at(&self, ms: i64) -> tokio::time::Instant {
        self.base + Duration::from_millis((ms - self.base_ms).max(0) as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// How one managed subscription is run.
pub struct Settings {
    pub timing: Timing,
    pub backoff: Backoff,
    pub delete_on_shutdown: bool,
    /// Show ids only as fingerprints (they are secrets).
    pub secret_ids: bool,
}

/// Runs one subscription until `shutdown`, then deletes it if configured.
pub async fn run<U: Upstream>(
    upstream: U,
    ids: Arc<dyn IdSink>,
    board: Arc<Board>,
    slot: usize,
    mut settings: Settings,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let show = |id: &str| {
        if settings.secret_ids {
            crate::verify::correlation::fingerprint(id)
        } else {
            id.to_owned()
        }
    };
    let mut held: Option<Remote> = None;
    let mut retry_at: Option<i64> = None;
    // After a success, the next call waits at least this long, so that a
    // provider granting less than `renew_before` cannot make the manager
    // renew in a loop.
    let mut not_before: Option<i64> = None;
    let mut renewing = false;
    loop {
        let situation = Situation {
            held: held.is_some(),
            expires_at: held.as_ref().and_then(|r| r.expires_at).map(|m| m.0),
            retry_at,
        };
        let mut step = plan(situation, clock.now_ms(), settings.timing);
        step.at = step.at.max(not_before.take().unwrap_or(i64::MIN));
        board.update(slot, |v| v.next_action_at = Some(Millis(step.at)));
        tokio::select! {
            () = tokio::time::sleep_until(clock.instant_at(step.at)) => {}
            () = shutdown.cancelled() => break,
        }
        if step.action == Action::Renew {
            renewing = true;
            board.update(slot, |v| v.state = "renewing".into());
        }
        let expires_at = Millis(clock.now_ms() + settings.timing.lifetime_ms);
        let result = match (&held, step.action) {
            (Some(current), Action::Renew) => {
                let id = current.id.clone();
                match upstream.renew(&id, expires_at).await {
                    Err(UpstreamError::NotFound) => {
                        tracing::warn!(subscription = %show(&id), "subscription is gone; recreating");
                        ids.remove(&id);
                        held = None;
                        Err(None)
                    }
                    Ok(remote) if remote.broken => {
                        tracing::warn!(subscription = %show(&id), "provider reports the subscription broken; recreating");
                        let _ = upstream.delete(&id).await;
                        ids.remove(&id);
                        held = None;
                        Err(None)
                    }
                    other => other.map_err(Some),
                }
            }
            _ => adopt_or_create(&upstream, expires_at).await.map_err(Some),
        };
        match result {
            Ok(remote) => {
                if held.as_ref().map(|h| &h.id) != Some(&remote.id) {
                    if let Some(old) = &held {
                        ids.remove(&old.id);
                    }
                    ids.add(&remote.id);
                    tracing::info!(subscription = %show(&remote.id), "subscription active");
                }
                settings.backoff.reset();
                retry_at = None;
                renewing = false;
                let now = clock.now_ms();
                if remote
                    .expires_at
                    .is_some_and(|e| e.0 - settings.timing.renew_before_ms <= now)
                {
                    tracing::warn!(
                        subscription = %show(&remote.id),
                        "the provider granted less than renew_before; renewing again after a pause"
                    );
                }
                not_before = Some(now + settings.backoff.initial_ms.max(1_000));
                board.update(slot, |v| {
                    v.id = Some(show(&remote.id));
                    v.state = "active".into();
                    v.expires_at = remote.expires_at;
                    v.last_error = None;
                    v.posts_count = remote.posts_count;
                    v.error_count = remote.error_count;
                    v.failures = 0;
                });
                held = Some(remote);
            }
            // Gone: create again at once (counts as no failure).
            Err(None) => {
                retry_at = None;
                board.update(slot, |v| {
                    v.id = None;
                    v.state = "pending".into();
                    v.expires_at = None;
                });
            }
            Err(Some(error)) => {
                let retry_after = match &error {
                    UpstreamError::Transient { retry_after_ms, .. } => *retry_after_ms,
                    _ => None,
                };
                let delay = settings.backoff.next_delay(retry_after, jitter());
                retry_at = Some(clock.now_ms() + delay);
                let failures = settings.backoff.failures();
                let step_name = if renewing { "renew" } else { "create" };
                tracing::warn!(step = step_name, failures, retry_in_ms = delay, %error, "subscription call failed");
                // A failed renewal is "failed" too; the id stays accepted
                // until the subscription is known gone, and `expires_at`
                // says how long it still runs.
                board.update(slot, |v| {
                    v.state = format!("failed: {error}");
                    v.last_error = Some(error.to_string());
                    v.failures = failures;
                });
            }
        }
    }
    if let Some(current) = held
        && settings.delete_on_shutdown
    {
        match upstream.delete(&current.id).await {
            Ok(()) | Err(UpstreamError::NotFound) => {
                tracing::info!(subscription = %show(&current.id), "subscription deleted");
            }
            Err(e) => {
                tracing::warn!(subscription = %show(&current.id), error = %e, "could not delete subscription");
            }
        }
        ids.remove(&current.id);
    }
}

/// Adopts a matching subscription if the provider has one, else creates
/// one; a creation that conflicts adopts the one that exists.
async fn adopt_or_create<U: Upstream>(
    upstream: &U,
    expires_at: Millis,
) -> Result<Remote, UpstreamError> {
    if let Some(found) = upstream.find().await? {
        if !found.broken {
            return Ok(found);
        }
        let _ = upstream.delete(&found.id).await;
    }
    match upstream.create(expires_at).await {
        Err(UpstreamError::Conflict) => upstream.find().await?.ok_or(UpstreamError::Transient {
            message: "create conflicted, but no matching subscription is listed".into(),
            retry_after_ms: None,
        }),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::collections::{HashSet, VecDeque};

    /// A scripted provider: answers are taken from queues (a default when
    /// a queue is empty) and every call is logged with its virtual time.
    #[derive(Default)]
    struct Script {
        find: VecDeque<Result<Option<Remote>, UpstreamError>>,
        create: VecDeque<Result<Remote, UpstreamError>>,
        renew: VecDeque<Result<Remote, UpstreamError>>,
        log: Vec<(String, i64)>,
        next_id: u32,
    }

    #[derive(Clone, Default)]
    struct Fake {
        script: Arc<Mutex<Script>>,
        clock: Arc<Mutex<Option<Clock>>>,
    }

    impl Fake {
        fn now(&self) -> i64 {
            self.clock.lock().map_or(0, |c| c.now_ms())
        }
        fn log(&self, call: String) {
            let now = self.now();
            self.script.lock().log.push((call, now));
        }
        fn calls(&self) -> Vec<String> {
            self.script
                .lock()
                .log
                .iter()
                .map(|(c, _)| c.clone())
                .collect()
        }
    }

    fn remote(id: &str, expires_at: Millis) -> Remote {
        Remote {
            id: id.into(),
            expires_at: Some(expires_at),
            broken: false,
            posts_count: Some(0),
            error_count: Some(0),
        }
    }

    impl Upstream for Fake {
        async fn find(&self) -> Result<Option<Remote>, UpstreamError> {
            self.log("find".into());
            self.script.lock().find.pop_front().unwrap_or(Ok(None))
        }
        async fn create(&self, expires_at: Millis) -> Result<Remote, UpstreamError> {
            self.log("create".into());
            let mut s = self.script.lock();
            s.next_id += 1;
            let id = format!("sub-{}", s.next_id);
            s.create
                .pop_front()
                .unwrap_or_else(|| Ok(remote(&id, expires_at)))
        }
        async fn renew(&self, id: &str, expires_at: Millis) -> Result<Remote, UpstreamError> {
            self.log(format!("renew {id}"));
            self.script
                .lock()
                .renew
                .pop_front()
                .unwrap_or_else(|| Ok(remote(id, expires_at)))
        }
        async fn delete(&self, id: &str) -> Result<(), UpstreamError> {
            self.log(format!("delete {id}"));
            Ok(())
        }
    }

    #[derive(Default)]
    struct Ids(Mutex<HashSet<String>>);

    impl IdSink for Ids {
        fn add(&self, id: &str) {
            self.0.lock().insert(id.into());
        }
        fn remove(&self, id: &str) {
            self.0.lock().remove(id);
        }
    }

    impl Ids {
        fn sorted(&self) -> Vec<String> {
            let mut v: Vec<String> = self.0.lock().iter().cloned().collect();
            v.sort();
            v
        }
    }

    const MIN: i64 = 60_000;

    struct Running {
        fake: Fake,
        ids: Arc<Ids>,
        board: Arc<Board>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        start: i64,
    }

    fn start(fake: Fake, delete_on_shutdown: bool) -> Running {
        let clock = Clock::new();
        *fake.clock.lock() = Some(clock);
        let ids = Arc::new(Ids::default());
        let board = Arc::new(Board::default());
        let slot = board.add("presence");
        let shutdown = CancellationToken::new();
        let settings = Settings {
            timing: Timing {
                lifetime_ms: 60 * MIN,
                renew_before_ms: 10 * MIN,
            },
            backoff: Backoff::new(1_000, 5 * MIN),
            delete_on_shutdown,
            secret_ids: false,
        };
        let task = tokio::spawn(run(
            fake.clone(),
            ids.clone() as Arc<dyn IdSink>,
            board.clone(),
            slot,
            settings,
            clock,
            shutdown.clone(),
        ));
        Running {
            fake,
            ids,
            board,
            shutdown,
            task,
            start: clock.now_ms(),
        }
    }

    /// Lets the manager run until virtual time `at_ms` after the start.
    async fn until(r: &Running, at_ms: i64) {
        let target = r.start + at_ms;
        let clock = r.fake.clock.lock().expect("clock");
        let wait = (target - clock.now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // Let the task finish what became due.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn creates_then_renews_ahead_of_expiry_and_deletes_at_shutdown() {
        let r = start(Fake::default(), true);
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find", "create"]);
        assert_eq!(r.ids.sorted(), ["sub-1"]);
        let view = &r.board.snapshot()[0];
        assert_eq!(view.state, "active");
        assert_eq!(view.id.as_deref(), Some("sub-1"));
        let expires = view.expires_at.unwrap().0;
        assert_eq!(expires, r.start + 60 * MIN);
        assert_eq!(view.next_action_at, Some(Millis(expires - 10 * MIN)));

        until(&r, 50 * MIN - 1).await;
        assert_eq!(r.fake.calls().len(), 2, "not renewed early");
        until(&r, 50 * MIN).await;
        assert_eq!(r.fake.calls()[2], "renew sub-1");
        // The next renewal is one lifetime later.
        until(&r, 100 * MIN).await;
        assert_eq!(r.fake.calls()[3], "renew sub-1");
        let times: Vec<i64> = r
            .fake
            .script
            .lock()
            .log
            .iter()
            .map(|(_, t)| t - r.start)
            .collect();
        assert_eq!(times, [0, 0, 50 * MIN, 100 * MIN]);

        r.shutdown.cancel();
        r.task.await.unwrap();
        assert_eq!(r.fake.calls().last().unwrap(), "delete sub-1");
        assert!(r.ids.sorted().is_empty(), "deleted ids stop authenticating");
    }

    #[tokio::test(start_paused = true)]
    async fn adopts_an_existing_subscription_and_adopts_after_a_conflict() {
        let fake = Fake::default();
        fake.script
            .lock()
            .find
            .push_back(Ok(Some(remote("existing", Millis(i64::MAX / 2)))));
        let r = start(fake, false);
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find"]);
        assert_eq!(r.ids.sorted(), ["existing"]);
        r.shutdown.cancel();
        r.task.await.unwrap();
        assert_eq!(
            r.ids.sorted(),
            ["existing"],
            "kept without delete_on_shutdown"
        );

        let fake = Fake::default();
        {
            let mut s = fake.script.lock();
            s.find.push_back(Ok(None));
            s.create.push_back(Err(UpstreamError::Conflict));
            s.find
                .push_back(Ok(Some(remote("raced", Millis(i64::MAX / 2)))));
        }
        let r = start(fake, false);
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find", "create", "find"]);
        assert_eq!(r.ids.sorted(), ["raced"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_subscription_is_recreated_and_its_id_dropped() {
        let fake = Fake::default();
        fake.script
            .lock()
            .renew
            .push_back(Err(UpstreamError::NotFound));
        let r = start(fake, false);
        until(&r, 50 * MIN).await;
        assert_eq!(
            r.fake.calls(),
            ["find", "create", "renew sub-1", "find", "create"]
        );
        assert_eq!(r.ids.sorted(), ["sub-2"]);
        assert_eq!(r.board.snapshot()[0].state, "active");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_subscription_is_deleted_and_recreated() {
        let fake = Fake::default();
        let broken = Remote {
            broken: true,
            ..remote("sub-1", Millis(0))
        };
        fake.script.lock().renew.push_back(Ok(broken));
        let r = start(fake, false);
        until(&r, 50 * MIN).await;
        assert_eq!(
            r.fake.calls(),
            [
                "find",
                "create",
                "renew sub-1",
                "delete sub-1",
                "find",
                "create"
            ]
        );
        assert_eq!(r.ids.sorted(), ["sub-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_and_honour_retry_after() {
        let fake = Fake::default();
        {
            let mut s = fake.script.lock();
            for _ in 0..3 {
                s.find.push_back(Err(UpstreamError::Transient {
                    message: "GET answered 503".into(),
                    retry_after_ms: None,
                }));
            }
            s.find.push_back(Err(UpstreamError::Transient {
                message: "GET answered 429".into(),
                retry_after_ms: Some(90_000),
            }));
        }
        let r = start(fake, false);
        until(&r, 0).await;
        let view = &r.board.snapshot()[0];
        assert_eq!(view.state, "failed: GET answered 503");
        assert_eq!(view.failures, 1);
        assert!(r.ids.sorted().is_empty());
        until(&r, 200_000).await;
        let times: Vec<i64> = r
            .fake
            .script
            .lock()
            .log
            .iter()
            .map(|(_, t)| t - r.start)
            .collect();
        // Delays: 0.5–1 s, 1–2 s, 2–4 s (jittered), then the 90 s asked for.
        assert_eq!(times.len(), 6, "{times:?}");
        let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!((500..1_000).contains(&gaps[0]), "{gaps:?}");
        assert!((1_000..2_000).contains(&gaps[1]), "{gaps:?}");
        assert!((2_000..4_000).contains(&gaps[2]), "{gaps:?}");
        assert_eq!(gaps[3], 90_000, "{gaps:?}");
        assert_eq!(r.fake.calls()[4..], ["find", "create"]);
        assert_eq!(r.ids.sorted(), ["sub-1"]);
        assert_eq!(r.board.snapshot()[0].failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_renewal_keeps_the_id_and_retries_before_expiry() {
        let fake = Fake::default();
        for _ in 0..2 {
            fake.script
                .lock()
                .renew
                .push_back(Err(UpstreamError::Transient {
                    message: "PUT answered 500".into(),
                    retry_after_ms: None,
                }));
        }
        let r = start(fake, false);
        until(&r, 50 * MIN).await;
        assert_eq!(r.ids.sorted(), ["sub-1"], "still valid until it expires");
        let view = &r.board.snapshot()[0];
        assert_eq!(view.state, "failed: PUT answered 500");
        assert!(view.expires_at.is_some(), "still valid until then");
        until(&r, 50 * MIN + 5_000).await;
        assert_eq!(
            r.fake.calls(),
            [
                "find",
                "create",
                "renew sub-1",
                "renew sub-1",
                "renew sub-1"
            ]
        );
        assert_eq!(r.board.snapshot()[0].state, "active");
    }
}
