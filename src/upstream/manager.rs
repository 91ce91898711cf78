//! The life of one managed subscription, for any provider.
//!
//! A provider implements [`Upstream`] (find, create, renew, delete); the
//! manager decides when to call what ([`super::schedule::plan`]), backs off
//! after failures, recreates a subscription the provider says is gone, keeps
//! the correlation ids that authenticate posts in step (an id is accepted from
//! the moment its subscription exists until it is deleted or known gone), and
//! publishes its state for `/v1/sources` and `/metrics`.
//!
//! The subscription's id and expiry are kept through [`Persisted`] (the
//! manager knows nothing of the store behind it): loaded at start and
//! confirmed by listing, saved when they change. A manager can be gated by
//! a lease (`may_manage`, see [`run`]) so that only one replica of several
//! manages a source while the others follow the persisted state.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::persist::{Persisted, SavedSubscription};
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

impl Remote {
    /// A subscription known only by its id and the expiry the gateway asked
    /// for (a provider that answers a renewal without the subscription).
    pub fn asked(id: &str, expires_at: Millis) -> Self {
        Remote {
            id: id.to_owned(),
            expires_at: Some(expires_at),
            broken: false,
            posts_count: None,
            error_count: None,
        }
    }
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
    /// A subscription of the provider that matches what would be created;
    /// the one with id `prefer` when it is listed and matches.
    fn find(
        &self,
        prefer: Option<&str>,
    ) -> impl Future<Output = Result<Option<Remote>, UpstreamError>> + Send;
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

/// Of the matching subscriptions a provider lists, the one with id
/// `prefer` (the persisted one) if listed, else the first.
pub fn preferred(
    mut matching: impl Iterator<Item = Remote>,
    prefer: Option<&str>,
) -> Option<Remote> {
    let first = matching.next()?;
    if prefer.is_none_or(|id| first.id == id) {
        return Some(first);
    }
    Some(
        matching
            .find(|r| Some(r.id.as_str()) == prefer)
            .unwrap_or(first),
    )
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
    /// `pending`, `active`, `renewing` or `failed: <reason>`; `standby`
    /// while another replica manages it (leases).
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

/// Retry a failed write of the persisted state this often (ms), between
/// the steps of the subscription itself.
pub const PERSIST_RETRY_MS: i64 = 5_000;

/// While it may not manage, a manager re-reads the persisted state this
/// often (ms), so the ids it accepts follow what the managing replica holds.
pub const FOLLOW_REFRESH_MS: i64 = 3_000;

/// What a manager keeps in step and reports to.
pub struct Handles {
    /// The source's verifier (correlation ids) or the MQTT topics.
    pub ids: Arc<dyn IdSink>,
    pub board: Arc<Board>,
    pub slot: usize,
    /// Where the subscription's id and expiry outlive the process.
    pub persisted: Arc<dyn Persisted>,
    /// Its key there ([`super::persist::subscription_key`]).
    pub key: String,
    /// Set to true once the first adopt-or-create attempt has finished,
    /// whether it succeeded or failed (then the state says `failed: ...`);
    /// while the manager may not manage, once the persisted state was read.
    pub ready: watch::Sender<bool>,
    /// `None`: always manage. Otherwise manage only while it holds true (the
    /// replica holds the source's lease): see [`run`].
    pub may_manage: Option<watch::Receiver<bool>>,
    /// Notified when the provider announced that the subscription is gone
    /// (Graph's `subscriptionRemoved`): the manager drops it and adopts or
    /// creates one at once.
    pub gone: Option<Arc<tokio::sync::Notify>>,
}

/// Runs one subscription until `shutdown`, then deletes it if configured.
///
/// - Start: the persisted subscription (if any) is loaded and its id
///   accepted at once, so posts authenticate before the provider answers;
///   the first step then confirms it by listing: the same id listed →
///   adopted, another matching one → that one adopted and the old id
///   dropped, none → created and the old id dropped.
/// - Every create, adopt or renewal that changes the id or the expiry is
///   saved; a subscription deleted or known gone deletes the key. A failed
///   write is logged and retried (every [`PERSIST_RETRY_MS`] and at the next
///   step); it never stops the manager.
/// - `may_manage` (a lease): while false, the manager makes no provider
///   call and deletes nothing; it re-reads the persisted state every
///   [`FOLLOW_REFRESH_MS`] and accepts the id found there, so a replica
///   that does not manage the source still authenticates its correlation
///   ids. When it turns true, the manager loads the persisted state and
///   confirms it by listing, as at start. A closed channel counts as false.
pub async fn run<U: Upstream>(
    upstream: U,
    mut handles: Handles,
    settings: Settings,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut may_manage = handles.may_manage.take();
    let mut m = Manager {
        upstream,
        h: handles,
        settings,
        clock,
        held: None,
        unconfirmed: None,
        accepted: None,
        stored: None,
        retry_at: None,
        not_before: None,
        renewing: false,
        save_retry_at: None,
    };
    loop {
        if let Some(rx) = &mut may_manage {
            // A closed channel counts as false: nobody holds a lease for us.
            let may = rx.has_changed().is_ok() && *rx.borrow_and_update();
            if !may {
                match m.follow(rx, &shutdown).await {
                    Exit::Shutdown => return,
                    Exit::Paused => continue,
                }
            }
        }
        m.load().await;
        match m.manage(&mut may_manage, &shutdown).await {
            Exit::Shutdown => {
                m.shut_down().await;
                return;
            }
            Exit::Paused => m.pause(),
        }
    }
}

/// Resolves when `gone` is notified; never without one.
async fn announced(gone: Option<&tokio::sync::Notify>) {
    match gone {
        Some(gone) => gone.notified().await,
        None => std::future::pending().await,
    }
}

/// Why a phase of [`run`] ended.
enum Exit {
    Shutdown,
    /// Managing: the lease was lost. Following: it was gained.
    Paused,
}

/// The state of one running manager.
struct Manager<U> {
    upstream: U,
    h: Handles,
    settings: Settings,
    clock: Clock,
    /// The subscription held: created, adopted, or confirmed by listing.
    held: Option<Remote>,
    /// Read from the persisted state, not (yet) confirmed by listing: its
    /// id is accepted meanwhile.
    unconfirmed: Option<Remote>,
    /// The id given to the id sink, if any.
    accepted: Option<String>,
    /// What the persisted key holds, as far as known (`None`: unknown).
    stored: Option<Option<SavedSubscription>>,
    /// After a failure: the earliest time to try again.
    retry_at: Option<i64>,
    /// After a success, the next call waits at least until then, so that a
    /// provider granting less than `renew_before` cannot make the manager
    /// renew in a loop.
    not_before: Option<i64>,
    renewing: bool,
    /// A failed write of the persisted state is tried again then.
    save_retry_at: Option<i64>,
}

impl<U: Upstream> Manager<U> {
    /// How an id appears in logs and on the board (a fingerprint when the
    /// id is a secret).
    fn show(&self, id: &str) -> String {
        if self.settings.secret_ids {
            crate::verify::correlation::fingerprint(id)
        } else {
            id.to_owned()
        }
    }

    /// The subscription the manager answers for: held, or else persisted.
    fn current(&self) -> Option<&Remote> {
        self.held.as_ref().or(self.unconfirmed.as_ref())
    }

    /// Makes the id sink accept the current subscription's id and no other
    /// of this manager's (the new one is added before the old one goes, so
    /// a switch leaves no gap).
    fn accept(&mut self) {
        let want = self.current().map(|r| r.id.clone());
        if want == self.accepted {
            return;
        }
        if let Some(new) = &want {
            self.h.ids.add(new);
        }
        if let Some(old) = &self.accepted {
            self.h.ids.remove(old);
        }
        self.accepted = want;
    }

    /// Reads the persisted subscription: it becomes the unconfirmed one and
    /// its id is accepted. Returns false when the store could not be read
    /// (then what the manager had stays).
    async fn read(&mut self) -> bool {
        let text = match self.h.persisted.load(&self.h.key).await {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(%error, "could not read the persisted subscription");
                self.stored = None;
                return false;
            }
        };
        let saved = text.as_deref().map(SavedSubscription::from_json);
        if let Some(None) = saved {
            tracing::warn!("the persisted subscription is unreadable; ignoring it");
        }
        let saved = saved.flatten();
        // Unreadable text is rewritten at the next step.
        self.stored = match text {
            Some(_) if saved.is_none() => None,
            _ => Some(saved.clone()),
        };
        self.unconfirmed = saved.map(|s| Remote {
            id: s.id,
            expires_at: s.expires_at.map(Millis),
            broken: false,
            posts_count: None,
            error_count: None,
        });
        self.accept();
        true
    }

    /// Before managing: the persisted subscription, shown as pending until
    /// the first step confirms it.
    async fn load(&mut self) {
        if !self.read().await {
            tracing::warn!("confirming the subscription by listing only");
        }
        self.show_unconfirmed("pending", |_| {});
    }

    /// Shows the persisted, not yet confirmed subscription on the board in
    /// `state`, with whatever else `more` sets.
    fn show_unconfirmed(&self, state: &str, more: impl FnOnce(&mut SubscriptionView)) {
        let shown = self
            .unconfirmed
            .as_ref()
            .map(|r| (self.show(&r.id), r.expires_at));
        self.h.board.update(self.h.slot, |v| {
            v.state = state.into();
            v.id = shown.as_ref().map(|(id, _)| id.clone());
            v.expires_at = shown.and_then(|(_, at)| at);
            more(v);
        });
    }

    /// Writes what the key should hold, when that is not known to be there.
    async fn flush(&mut self) {
        let want = self.current().map(|r| SavedSubscription {
            id: r.id.clone(),
            expires_at: r.expires_at.map(|m| m.0),
        });
        if self.stored.as_ref() == Some(&want) {
            self.save_retry_at = None;
            return;
        }
        let value = want.as_ref().map(SavedSubscription::to_json);
        match self.h.persisted.save(&self.h.key, value).await {
            Ok(()) => {
                self.stored = Some(want);
                self.save_retry_at = None;
            }
            Err(error) => {
                self.stored = None;
                let retry_at = self.clock.now_ms() + PERSIST_RETRY_MS;
                self.save_retry_at = Some(retry_at);
                tracing::warn!(%error, retry_in_ms = PERSIST_RETRY_MS, "could not persist the subscription; carrying on");
            }
        }
    }

    /// Runs the subscription until shutdown or until it may not manage.
    async fn manage(
        &mut self,
        may_manage: &mut Option<watch::Receiver<bool>>,
        shutdown: &CancellationToken,
    ) -> Exit {
        loop {
            let situation = Situation {
                held: self.held.is_some(),
                expires_at: self.held.as_ref().and_then(|r| r.expires_at).map(|m| m.0),
                retry_at: self.retry_at,
            };
            let mut step = plan(situation, self.clock.now_ms(), self.settings.timing);
            step.at = step.at.max(self.not_before.unwrap_or(i64::MIN));
            self.h
                .board
                .update(self.h.slot, |v| v.next_action_at = Some(Millis(step.at)));
            let wake = self.save_retry_at.map_or(step.at, |t| t.min(step.at));
            tokio::select! {
                () = tokio::time::sleep_until(self.clock.instant_at(wake)) => {}
                () = shutdown.cancelled() => return Exit::Shutdown,
                () = lost(may_manage) => return Exit::Paused,
                () = announced(self.h.gone.as_deref()) => {
                    if let Some(held) = self.held.take() {
                        tracing::warn!(subscription = %self.show(&held.id), "the provider removed the subscription; recreating");
                        self.accept();
                        self.retry_at = None;
                        self.not_before = None;
                    }
                    continue;
                }
            }
            if self.clock.now_ms() < step.at {
                // Only the retry of a failed write was due.
                self.flush().await;
                continue;
            }
            self.not_before = None;
            self.step(step.action).await;
            if may_manage.as_ref().is_some_and(|rx| !*rx.borrow()) {
                // Whoever holds the source now writes its state.
                return Exit::Paused;
            }
            self.flush().await;
            self.h
                .ready
                .send_if_modified(|ready| !std::mem::replace(ready, true));
        }
    }

    /// One create (adopt) or renewal, and what follows from its outcome.
    async fn step(&mut self, action: Action) {
        if action == Action::Renew {
            self.renewing = true;
            self.h
                .board
                .update(self.h.slot, |v| v.state = "renewing".into());
        }
        let expires_at = Millis(self.clock.now_ms() + self.settings.timing.lifetime_ms);
        let result = match (&self.held, action) {
            (Some(current), Action::Renew) => {
                let id = current.id.clone();
                match self.upstream.renew(&id, expires_at).await {
                    Err(UpstreamError::NotFound) => {
                        tracing::warn!(subscription = %self.show(&id), "subscription is gone; recreating");
                        self.held = None;
                        self.accept();
                        Err(None)
                    }
                    Ok(remote) if remote.broken => {
                        tracing::warn!(subscription = %self.show(&id), "provider reports the subscription broken; recreating");
                        let _ = self.upstream.delete(&id).await;
                        self.held = None;
                        self.accept();
                        Err(None)
                    }
                    other => other.map_err(Some),
                }
            }
            _ => self.adopt_or_create(expires_at).await.map_err(Some),
        };
        match result {
            Ok(remote) => {
                if self.accepted.as_ref() != Some(&remote.id) {
                    tracing::info!(subscription = %self.show(&remote.id), "subscription active");
                }
                self.held = Some(remote.clone());
                self.unconfirmed = None;
                self.accept();
                self.settings.backoff.reset();
                self.retry_at = None;
                self.renewing = false;
                let now = self.clock.now_ms();
                if remote
                    .expires_at
                    .is_some_and(|e| e.0 - self.settings.timing.renew_before_ms <= now)
                {
                    tracing::warn!(
                        subscription = %self.show(&remote.id),
                        "the provider granted less than renew_before; renewing again after a pause"
                    );
                }
                self.not_before = Some(now + self.settings.backoff.initial_ms.max(1_000));
                let shown = self.show(&remote.id);
                self.h.board.update(self.h.slot, |v| {
                    v.id = Some(shown);
                    v.state = "active".into();
                    v.expires_at = remote.expires_at;
                    v.last_error = None;
                    v.posts_count = remote.posts_count;
                    v.error_count = remote.error_count;
                    v.failures = 0;
                });
            }
            // Gone: create again at once (counts as no failure).
            Err(None) => {
                self.retry_at = None;
                self.h.board.update(self.h.slot, |v| {
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
                let delay = self.settings.backoff.next_delay(retry_after, jitter());
                self.retry_at = Some(self.clock.now_ms() + delay);
                let failures = self.settings.backoff.failures();
                let step_name = if self.renewing { "renew" } else { "create" };
                tracing::warn!(step = step_name, failures, retry_in_ms = delay, %error, "subscription call failed");
                // A failed renewal is "failed" too; the id stays accepted
                // until the subscription is known gone, and `expires_at`
                // says how long it still runs.
                self.h.board.update(self.h.slot, |v| {
                    v.state = format!("failed: {error}");
                    v.last_error = Some(error.to_string());
                    v.failures = failures;
                });
            }
        }
    }

    /// Adopts a matching subscription if the provider lists one (the
    /// persisted one first), else creates one; a creation that conflicts
    /// adopts the one that exists. The listing is the truth about the
    /// persisted subscription: not listed (or broken), its id goes at once.
    async fn adopt_or_create(&mut self, expires_at: Millis) -> Result<Remote, UpstreamError> {
        let prefer = self.unconfirmed.as_ref().map(|r| r.id.clone());
        let found = self.upstream.find(prefer.as_deref()).await?;
        if let Some(old) = prefer
            && found.as_ref().is_none_or(|f| f.id != old || f.broken)
        {
            tracing::info!(subscription = %self.show(&old), "the persisted subscription is not listed as usable; dropping its id");
            self.unconfirmed = None;
            self.accept();
            self.h.board.update(self.h.slot, |v| {
                v.id = None;
                v.expires_at = None;
            });
        }
        if let Some(found) = found {
            if !found.broken {
                return Ok(found);
            }
            let _ = self.upstream.delete(&found.id).await;
        }
        match self.upstream.create(expires_at).await {
            Err(UpstreamError::Conflict) => {
                self.upstream
                    .find(None)
                    .await?
                    .ok_or(UpstreamError::Transient {
                        message: "create conflicted, but no matching subscription is listed".into(),
                        retry_after_ms: None,
                    })
            }
            other => other,
        }
    }

    /// At shutdown (while managing): deletes the subscription when so
    /// configured, and its key with it; otherwise keeps both (and makes a
    /// last attempt at a write that failed), so a restart adopts it.
    async fn shut_down(&mut self) {
        if !self.settings.delete_on_shutdown {
            if self.save_retry_at.is_some() {
                self.flush().await;
            }
            return;
        }
        let Some(current) = self.current().cloned() else {
            return;
        };
        let deleted = match self.upstream.delete(&current.id).await {
            Ok(()) | Err(UpstreamError::NotFound) => {
                tracing::info!(subscription = %self.show(&current.id), "subscription deleted");
                true
            }
            Err(e) => {
                tracing::warn!(subscription = %self.show(&current.id), error = %e, "could not delete subscription");
                false
            }
        };
        self.held = None;
        self.unconfirmed = None;
        self.accept();
        // A subscription that could not be deleted keeps its key: the next
        // start adopts it (or finds it gone).
        if deleted {
            self.flush().await;
        }
    }

    /// The lease was lost: forget what is held without touching it (the
    /// next holder adopts it); its id stays accepted until the persisted
    /// state says otherwise.
    fn pause(&mut self) {
        tracing::info!(
            "no longer managing this subscription (lease lost); following the persisted state"
        );
        if let Some(held) = self.held.take() {
            self.unconfirmed = Some(held);
        }
        self.stored = None;
        self.retry_at = None;
        self.not_before = None;
        self.renewing = false;
        self.save_retry_at = None;
        self.settings.backoff.reset();
    }

    /// While it may not manage: follows the persisted state until the
    /// lease is gained ([`Exit::Paused`]) or shutdown.
    async fn follow(
        &mut self,
        rx: &mut watch::Receiver<bool>,
        shutdown: &CancellationToken,
    ) -> Exit {
        let mut closed = false;
        loop {
            self.read().await;
            self.h
                .ready
                .send_if_modified(|ready| !std::mem::replace(ready, true));
            self.show_unconfirmed(super::STANDBY, |v| {
                v.next_action_at = None;
                v.last_error = None;
                v.failures = 0;
            });
            let refresh = Duration::from_millis(FOLLOW_REFRESH_MS as u64);
            tokio::select! {
                () = tokio::time::sleep(refresh) => {}
                () = shutdown.cancelled() => return Exit::Shutdown,
                gained = rx.wait_for(|may| *may), if !closed => match gained {
                    Ok(_) => {
                        tracing::info!("managing this subscription (lease gained)");
                        return Exit::Paused;
                    }
                    // Nobody can grant the lease any more.
                    Err(_) => closed = true,
                },
            }
        }
    }
}

/// Resolves when a manager may no longer manage (never without a lease).
async fn lost(may_manage: &mut Option<watch::Receiver<bool>>) {
    match may_manage {
        None => std::future::pending().await,
        Some(rx) => {
            let _ = rx.wait_for(|may| !*may).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::persist::MemoryPersisted;
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
        /// The manager's id sink, to see what it accepted at each find.
        ids: Arc<Mutex<Option<Arc<Ids>>>>,
        finds: Arc<Mutex<Vec<Find>>>,
    }

    /// What a find saw: the ids accepted at the time, and the id preferred.
    type Find = (Vec<String>, Option<String>);

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
        async fn find(&self, prefer: Option<&str>) -> Result<Option<Remote>, UpstreamError> {
            self.log("find".into());
            let accepted = self.ids.lock().as_ref().map(|ids| ids.sorted());
            self.finds
                .lock()
                .push((accepted.unwrap_or_default(), prefer.map(str::to_owned)));
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
        store: Arc<MemoryPersisted>,
        ready: watch::Receiver<bool>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        start: i64,
    }

    const KEY: &str = "sub/ns/presence";

    fn start(fake: Fake, delete_on_shutdown: bool) -> Running {
        start_with(fake, delete_on_shutdown, Arc::default(), None)
    }

    fn start_with(
        fake: Fake,
        delete_on_shutdown: bool,
        store: Arc<MemoryPersisted>,
        may_manage: Option<watch::Receiver<bool>>,
    ) -> Running {
        let clock = Clock::new();
        *fake.clock.lock() = Some(clock);
        let ids = Arc::new(Ids::default());
        *fake.ids.lock() = Some(Arc::clone(&ids));
        let board = Arc::new(Board::default());
        let slot = board.add("presence");
        let shutdown = CancellationToken::new();
        let (ready_tx, ready) = watch::channel(false);
        let settings = Settings {
            timing: Timing {
                lifetime_ms: 60 * MIN,
                renew_before_ms: 10 * MIN,
            },
            backoff: Backoff::new(1_000, 5 * MIN),
            delete_on_shutdown,
            secret_ids: false,
        };
        let handles = Handles {
            ids: ids.clone() as Arc<dyn IdSink>,
            board: board.clone(),
            slot,
            persisted: store.clone() as Arc<dyn Persisted>,
            key: KEY.into(),
            ready: ready_tx,
            may_manage,
            gone: None,
        };
        let task = tokio::spawn(run(
            fake.clone(),
            handles,
            settings,
            clock,
            shutdown.clone(),
        ));
        Running {
            fake,
            ids,
            board,
            store,
            ready,
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

    fn saved(id: &str, expires_at: i64) -> String {
        SavedSubscription {
            id: id.into(),
            expires_at: Some(expires_at),
        }
        .to_json()
    }

    fn stored(store: &MemoryPersisted) -> Option<(String, Option<i64>)> {
        let text = store.get(KEY)?;
        let s = SavedSubscription::from_json(&text).expect("valid JSON");
        Some((s.id, s.expires_at))
    }

    fn persisted_with(id: &str, expires_at: i64) -> Arc<MemoryPersisted> {
        let store = Arc::new(MemoryPersisted::default());
        store.put(KEY, Some(saved(id, expires_at)));
        store
    }

    #[tokio::test(start_paused = true)]
    async fn a_persisted_subscription_is_accepted_at_once_and_adopted_when_listed() {
        let expires = Millis::now().0 + 30 * MIN;
        let fake = Fake::default();
        fake.script
            .lock()
            .find
            .push_back(Ok(Some(remote("sub-old", Millis(expires)))));
        let r = start_with(fake, false, persisted_with("sub-old", expires), None);
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find"], "adopted, not created");
        let finds = r.fake.finds.lock().clone();
        assert_eq!(
            finds[0],
            (vec!["sub-old".to_owned()], Some("sub-old".to_owned())),
            "accepted before the provider answered, and preferred in the listing"
        );
        assert_eq!(r.ids.sorted(), ["sub-old"]);
        let view = &r.board.snapshot()[0];
        assert_eq!(view.state, "active");
        assert_eq!(view.expires_at, Some(Millis(expires)));
        assert_eq!(stored(&r.store), Some(("sub-old".into(), Some(expires))));
        assert!(*r.ready.borrow());
        r.shutdown.cancel();
        r.task.await.unwrap();
        assert_eq!(
            stored(&r.store),
            Some(("sub-old".into(), Some(expires))),
            "kept for the next start without delete_on_shutdown"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_persisted_subscription_not_listed_is_replaced_and_its_id_dropped() {
        let r = start_with(
            Fake::default(),
            false,
            persisted_with("sub-old", Millis::now().0 + 30 * MIN),
            None,
        );
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find", "create"]);
        assert_eq!(r.fake.finds.lock()[0].0, ["sub-old"]);
        assert_eq!(r.ids.sorted(), ["sub-1"], "the old id stops authenticating");
        assert_eq!(
            stored(&r.store),
            Some(("sub-1".into(), Some(r.start + 60 * MIN)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn another_listed_subscription_is_adopted_instead_of_the_persisted_one() {
        let expires = Millis::now().0 + 40 * MIN;
        let fake = Fake::default();
        fake.script
            .lock()
            .find
            .push_back(Ok(Some(remote("sub-other", Millis(expires)))));
        let r = start_with(fake, false, persisted_with("sub-old", expires - MIN), None);
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find"]);
        assert_eq!(r.ids.sorted(), ["sub-other"]);
        assert_eq!(stored(&r.store), Some(("sub-other".into(), Some(expires))));
    }

    #[tokio::test(start_paused = true)]
    async fn saves_carry_id_and_expiry_and_deleting_at_shutdown_removes_the_key() {
        let r = start(Fake::default(), true);
        until(&r, 0).await;
        assert_eq!(
            stored(&r.store),
            Some(("sub-1".into(), Some(r.start + 60 * MIN)))
        );
        until(&r, 50 * MIN).await;
        assert_eq!(r.fake.calls()[2], "renew sub-1");
        assert_eq!(
            stored(&r.store),
            Some(("sub-1".into(), Some(r.start + 110 * MIN))),
            "the renewed expiry"
        );
        r.shutdown.cancel();
        r.task.await.unwrap();
        assert_eq!(r.fake.calls().last().unwrap(), "delete sub-1");
        assert_eq!(stored(&r.store), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_subscription_is_forgotten_and_the_new_one_saved() {
        let fake = Fake::default();
        fake.script
            .lock()
            .renew
            .push_back(Err(UpstreamError::NotFound));
        let r = start(fake, false);
        until(&r, 50 * MIN).await;
        assert_eq!(r.ids.sorted(), ["sub-2"]);
        assert_eq!(
            stored(&r.store),
            Some(("sub-2".into(), Some(r.start + 110 * MIN)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn persistence_failures_are_retried_and_never_stop_the_manager() {
        let store = Arc::new(MemoryPersisted::default());
        store.fail(true);
        let r = start_with(Fake::default(), false, store, None);
        until(&r, 0).await;
        assert_eq!(r.fake.calls(), ["find", "create"]);
        assert_eq!(r.ids.sorted(), ["sub-1"]);
        assert_eq!(r.board.snapshot()[0].state, "active");
        assert!(*r.ready.borrow());
        assert_eq!(stored(&r.store), None);
        r.store.fail(false);
        until(&r, PERSIST_RETRY_MS).await;
        assert_eq!(
            stored(&r.store),
            Some(("sub-1".into(), Some(r.start + 60 * MIN)))
        );
        assert_eq!(r.fake.calls().len(), 2, "the retry only writes");
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_the_first_attempt_even_when_it_fails() {
        let expires = Millis::now().0 + 30 * MIN;
        let fake = Fake::default();
        fake.script
            .lock()
            .find
            .push_back(Err(UpstreamError::Transient {
                message: "GET answered 503".into(),
                retry_after_ms: None,
            }));
        let r = start_with(fake, false, persisted_with("sub-old", expires), None);
        assert!(!*r.ready.borrow());
        until(&r, 0).await;
        assert!(*r.ready.borrow(), "ready after a failed attempt");
        let view = &r.board.snapshot()[0];
        assert_eq!(view.state, "failed: GET answered 503");
        assert_eq!(
            r.ids.sorted(),
            ["sub-old"],
            "the persisted id stays accepted until the listing says otherwise"
        );
        assert_eq!(stored(&r.store), Some(("sub-old".into(), Some(expires))));
        until(&r, 5_000).await;
        assert_eq!(r.fake.calls(), ["find", "find", "create"]);
        assert_eq!(r.ids.sorted(), ["sub-1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_lease_it_follows_the_persisted_state_and_resumes_by_adopting() {
        let expires = Millis::now().0 + 30 * MIN;
        let (lease, may_manage) = watch::channel(false);
        let r = start_with(
            Fake::default(),
            true,
            persisted_with("sub-a", expires),
            Some(may_manage),
        );
        until(&r, 0).await;
        assert!(
            r.fake.calls().is_empty(),
            "no provider call without the lease"
        );
        assert_eq!(r.ids.sorted(), ["sub-a"]);
        assert_eq!(r.board.snapshot()[0].state, "standby");
        assert!(*r.ready.borrow());

        // The managing replica replaced it: the ids follow.
        r.store.put(KEY, Some(saved("sub-b", expires)));
        until(&r, FOLLOW_REFRESH_MS).await;
        assert_eq!(r.ids.sorted(), ["sub-b"]);

        // The lease is gained: the persisted one is confirmed by listing.
        r.fake
            .script
            .lock()
            .find
            .push_back(Ok(Some(remote("sub-b", Millis(expires)))));
        lease.send_replace(true);
        until(&r, FOLLOW_REFRESH_MS + 1).await;
        assert_eq!(r.fake.calls(), ["find"]);
        assert_eq!(r.fake.finds.lock()[0].1.as_deref(), Some("sub-b"));
        assert_eq!(r.board.snapshot()[0].state, "active");

        // Lost again: nothing renewed or deleted, the id still accepted
        // while the persisted state names it.
        lease.send_replace(false);
        until(&r, 60 * MIN).await;
        assert_eq!(r.fake.calls(), ["find"]);
        assert_eq!(r.board.snapshot()[0].state, "standby");
        assert_eq!(r.ids.sorted(), ["sub-b"]);
        r.store.put(KEY, None);
        until(&r, 60 * MIN + FOLLOW_REFRESH_MS).await;
        assert!(r.ids.sorted().is_empty());

        // Shutdown while not managing deletes nothing.
        r.shutdown.cancel();
        r.task.await.unwrap();
        assert_eq!(r.fake.calls(), ["find"]);
    }

    #[test]
    fn the_persisted_subscription_is_preferred_among_matching_ones() {
        let list = || vec![remote("a", Millis(1)), remote("b", Millis(2))].into_iter();
        assert_eq!(preferred(list(), None).unwrap().id, "a");
        assert_eq!(preferred(list(), Some("b")).unwrap().id, "b");
        assert_eq!(preferred(list(), Some("gone")).unwrap().id, "a");
        assert_eq!(preferred(std::iter::empty(), Some("a")), None);
    }
}
