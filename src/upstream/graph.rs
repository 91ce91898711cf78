//! Microsoft Graph presence subscriptions, reads and lifecycle events.
//!
//! - [`Graph`] is one group's subscription for the manager: `POST/GET
//!   {api_base}/v1.0/subscriptions`, `PATCH/DELETE .../{id}`, with the
//!   bearer token of the group's account. The create body is DESIGN §4's
//!   (resource `/communications/presences?$filter=id in ('a','b')`, the
//!   client state, the lifetime, and with a certificate the rich-notification
//!   fields); the expiry Graph answers is the truth. A listed subscription
//!   with the same resource and notification URL is adopted; the list's
//!   `@odata.nextLink` is followed only while it stays under `api_base`, so
//!   the token never goes to another host.
//! - [`Inbox`] is how the webhook hands work over: users to read, lifecycle
//!   events. [`run_reader`] coalesces the users named within
//!   [`COALESCE`] into `getPresencesByUserId` calls of at most 650 ids, and
//!   runs the resyncs (all configured users): at start-up (the source is
//!   ready after the first one), after `subscriptionRemoved` and `missed`,
//!   and every `resync_interval`. 429 and 5xx are retried after
//!   `Retry-After` (or a backoff). [`run_lifecycle`] reauthorizes a
//!   subscription on `reauthorizationRequired` and tells its manager when
//!   Graph removed it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use reqwest::Method;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::manager::{IdSink, Remote, Upstream, UpstreamError};
use super::schedule::{Backoff, jitter};
use super::ucwa::DeliverPresence;
use super::{Api, send_raw};
use crate::presence::Millis;
use crate::providers::graph::Lifecycle;

/// Users named within this long are read in one call.
pub const COALESCE: Duration = Duration::from_secs(1);

/// Ids per `getPresencesByUserId` call (Graph's limit).
pub const READ_BATCH: usize = 650;

/// Users waiting to be read, at most; beyond it a resync is asked for
/// instead (it reads everyone).
pub const READ_QUEUE: usize = 65_536;

/// Reads running at once.
const READS_IN_FLIGHT: usize = 4;

/// What one group's subscription asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub notification_url: String,
    pub lifecycle_url: String,
    /// `/communications/presences?$filter=id in ('a','b')`.
    pub resource: String,
    /// Rich notifications: the certificate (base64 DER) and its id.
    pub encryption: Option<(String, String)>,
    /// The resources of every group of the source: a listed presence
    /// subscription of this account to the same URL for none of them is
    /// left over from an earlier configuration and is deleted.
    pub all_resources: Vec<String>,
}

impl Request {
    /// The resource for a group of user ids (this form even for one).
    pub fn resource_for(users: &[String]) -> String {
        let ids: Vec<String> = users.iter().map(|u| format!("'{u}'")).collect();
        format!(
            "/communications/presences?$filter=id in ({})",
            ids.join(",")
        )
    }
}

/// One group's subscription, for the manager.
pub struct Graph {
    pub api: Api,
    pub request: Request,
    /// The client state, sent with every create (a secret).
    pub client_state: crate::config::Secret,
}

impl Graph {
    fn url(&self, id: Option<&str>) -> String {
        self.api.url("v1.0/subscriptions", id)
    }

    /// Whether a listed subscription is the one this group would create:
    /// resource and notification URL, and, where Graph lists them, the
    /// lifecycle URL, the client state and the certificate id (a changed
    /// setting makes a new subscription instead of adopting the old one).
    fn matches(&self, item: &Map<String, Value>) -> bool {
        let field = |name: &str| item.get(name).and_then(Value::as_str);
        let r = &self.request;
        let same_if_listed = |name: &str, want: Option<&str>| match item.get(name) {
            None | Some(Value::Null) => true,
            Some(v) => v.as_str() == want,
        };
        let client_state = String::from_utf8_lossy(self.client_state.expose());
        same_resource(field("resource"), &r.resource)
            && field("notificationUrl") == Some(r.notification_url.as_str())
            && same_if_listed("lifecycleNotificationUrl", Some(&r.lifecycle_url))
            && same_if_listed("clientState", Some(&client_state))
            && same_if_listed(
                "encryptionCertificateId",
                r.encryption.as_ref().map(|(_, id)| id.as_str()),
            )
    }

    /// A presence subscription of this account to our URL that is no
    /// longer wanted: its resource is no group's, or its settings changed.
    fn leftover(&self, item: &Map<String, Value>) -> bool {
        let field = |name: &str| item.get(name).and_then(Value::as_str);
        let ours = field("notificationUrl") == Some(self.request.notification_url.as_str());
        let presence = field("resource").is_some_and(|r| {
            r.trim_start_matches('/')
                .starts_with("communications/presences")
        });
        let other_group = self.request.all_resources.iter().any(|other| {
            other != &self.request.resource && same_resource(field("resource"), other)
        });
        ours && presence && !other_group && !self.matches(item)
    }

    /// `POST .../subscriptions/{id}/reauthorize`.
    pub async fn reauthorize(&self, id: &str) -> Result<(), UpstreamError> {
        let url = format!("{}/reauthorize", self.url(Some(id)));
        self.api.send(Method::POST, &url, None).await.map(drop)
    }
}

impl Upstream for Graph {
    async fn find(&self, prefer: Option<&str>) -> Result<Option<Remote>, UpstreamError> {
        let base = self.api.base.trim_end_matches('/').to_owned();
        let mut url = self.url(None);
        let mut matching = Vec::new();
        let mut leftovers = Vec::new();
        // A bounded number of pages: a provider that links forever must not
        // keep the manager listing.
        for _ in 0..100 {
            let page = self.api.send(Method::GET, &url, None).await?;
            let Some(Value::Object(page)) = page else {
                return Err(UpstreamError::Rejected(
                    "the subscription list is not a JSON object".into(),
                ));
            };
            let items = page.get("value").and_then(Value::as_array);
            for item in items.into_iter().flatten().filter_map(Value::as_object) {
                if self.matches(item) {
                    matching.extend(remote(item));
                } else if self.leftover(item) {
                    leftovers.extend(remote(item).map(|r| r.id));
                }
            }
            match page.get("@odata.nextLink").and_then(Value::as_str) {
                Some(next) if next.starts_with(&format!("{base}/")) => url = next.to_owned(),
                Some(_) => {
                    tracing::warn!("the subscription list links to another host; not following");
                    break;
                }
                None => break,
            }
        }
        // Graph allows one presence subscription per user and app: one
        // left from an earlier configuration would make the create fail.
        for id in leftovers {
            match self.delete(&id).await {
                Ok(()) | Err(UpstreamError::NotFound) => {
                    tracing::info!(subscription = %id, "deleted a subscription left from an earlier configuration");
                }
                Err(error) => {
                    tracing::warn!(subscription = %id, %error, "could not delete a subscription left from an earlier configuration");
                }
            }
        }
        Ok(super::manager::preferred(matching.into_iter(), prefer))
    }

    async fn create(&self, expires_at: Millis) -> Result<Remote, UpstreamError> {
        let r = &self.request;
        let mut body = json!({
            "changeType": "updated",
            "notificationUrl": r.notification_url,
            "lifecycleNotificationUrl": r.lifecycle_url,
            "resource": r.resource,
            "expirationDateTime": rfc3339(expires_at),
            "clientState": String::from_utf8_lossy(self.client_state.expose()),
        });
        if let (Some((certificate, id)), Some(map)) = (&r.encryption, body.as_object_mut()) {
            map.insert("includeResourceData".into(), Value::Bool(true));
            map.insert(
                "encryptionCertificate".into(),
                Value::String(certificate.clone()),
            );
            map.insert("encryptionCertificateId".into(), Value::String(id.clone()));
        }
        let answer = self
            .api
            .send(Method::POST, &self.url(None), Some(&body))
            .await?;
        answer
            .as_ref()
            .and_then(Value::as_object)
            .and_then(remote)
            .ok_or_else(|| {
                UpstreamError::Rejected("the create answer has no subscription id".into())
            })
    }

    async fn renew(&self, id: &str, expires_at: Millis) -> Result<Remote, UpstreamError> {
        let body = json!({ "expirationDateTime": rfc3339(expires_at) });
        let answer = self
            .api
            .send(Method::PATCH, &self.url(Some(id)), Some(&body))
            .await?;
        // The expiry Graph answers is the truth; without one, what was asked.
        Ok(answer
            .as_ref()
            .and_then(Value::as_object)
            .and_then(remote)
            .unwrap_or_else(|| Remote::asked(id, expires_at)))
    }

    async fn delete(&self, id: &str) -> Result<(), UpstreamError> {
        self.api
            .send(Method::DELETE, &self.url(Some(id)), None)
            .await
            .map(drop)
    }
}

/// Whether a listed resource is `want` (Graph may drop the leading `/`).
fn same_resource(listed: Option<&str>, want: &str) -> bool {
    listed.is_some_and(|r| r.trim_start_matches('/') == want.trim_start_matches('/'))
}

fn remote(item: &Map<String, Value>) -> Option<Remote> {
    let id = item.get("id")?.as_str().filter(|id| !id.is_empty())?;
    let expires_at = item
        .get("expirationDateTime")
        .and_then(Value::as_str)
        .and_then(Millis::parse_rfc3339);
    Some(Remote {
        id: id.to_owned(),
        expires_at,
        broken: false,
        posts_count: None,
        error_count: None,
    })
}

/// RFC 3339 UTC with milliseconds: `2026-11-24T10:00:00.000Z`.
fn rfc3339(at: Millis) -> String {
    jiff::Timestamp::from_millisecond(at.0)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// A lifecycle event for one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub event: Lifecycle,
    pub subscription_id: String,
}

/// Where the webhook hands work to a graph source's background tasks.
#[derive(Debug)]
pub struct Inbox {
    reads: mpsc::Sender<String>,
    lifecycle: mpsc::Sender<LifecycleEvent>,
    resync: Arc<Notify>,
}

/// The receiving ends of an [`Inbox`], taken once by the tasks.
#[derive(Debug)]
pub struct Outbox {
    pub reads: mpsc::Receiver<String>,
    pub lifecycle: mpsc::Receiver<LifecycleEvent>,
    pub resync: Arc<Notify>,
}

impl Inbox {
    /// A new inbox and its receiving ends.
    pub fn new() -> (Inbox, Outbox) {
        let (reads_tx, reads_rx) = mpsc::channel(READ_QUEUE);
        let (life_tx, life_rx) = mpsc::channel(1024);
        let resync = Arc::new(Notify::new());
        (
            Inbox {
                reads: reads_tx,
                lifecycle: life_tx,
                resync: Arc::clone(&resync),
            },
            Outbox {
                reads: reads_rx,
                lifecycle: life_rx,
                resync,
            },
        )
    }

    /// Asks for `user` to be read. A full queue asks for a resync instead.
    pub fn read(&self, user: &str) {
        if self.reads.try_send(user.to_owned()).is_err() {
            self.resync.notify_one();
        }
    }

    /// Hands a lifecycle event over. A full queue resyncs instead (the
    /// subscriptions' own renewals notice what else went wrong).
    pub fn lifecycle(&self, event: LifecycleEvent) {
        if self.lifecycle.try_send(event).is_err() {
            self.resync.notify_one();
        }
    }
}

/// The subscription ids each group's manager holds, and how to tell a
/// manager that Graph removed its subscription.
#[derive(Debug)]
pub struct Groups {
    ids: RwLock<HashMap<String, usize>>,
    gone: Vec<Arc<Notify>>,
    /// Bumped whenever a group's subscription changes.
    changed: watch::Sender<u64>,
}

impl Groups {
    /// Room for `count` groups.
    pub fn new(count: usize) -> Self {
        Groups {
            ids: RwLock::default(),
            gone: (0..count).map(|_| Arc::new(Notify::new())).collect(),
            changed: watch::Sender::new(0),
        }
    }

    /// Waits (at most `within`) until group `index` holds a subscription
    /// other than `old`: after Graph removed one, its manager creates the
    /// next.
    pub async fn replaced(&self, index: usize, old: &str, within: Duration) {
        let mut changed = self.changed.subscribe();
        let done = || {
            self.ids
                .read()
                .iter()
                .any(|(id, &group)| group == index && id != old)
        };
        let _ = tokio::time::timeout(within, async {
            while !done() {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// The group holding subscription `id`.
    pub fn group_of(&self, id: &str) -> Option<usize> {
        self.ids.read().get(id).copied()
    }

    /// What group `index`'s manager waits on to hear its subscription is gone.
    pub fn gone(&self, index: usize) -> Option<Arc<Notify>> {
        self.gone.get(index).cloned()
    }
}

/// One group's id sink: records which subscription is the group's.
pub struct GroupIds {
    pub groups: Arc<Groups>,
    pub index: usize,
}

impl IdSink for GroupIds {
    fn add(&self, id: &str) {
        self.groups.ids.write().insert(id.to_owned(), self.index);
        self.groups.changed.send_modify(|v| *v += 1);
    }
    fn remove(&self, id: &str) {
        self.groups.ids.write().remove(id);
        self.groups.changed.send_modify(|v| *v += 1);
    }
}

/// Handles lifecycle events until `shutdown`: reauthorizes with the
/// subscription's group's account (404: its manager recreates it), tells
/// the manager of a removed subscription, and asks for resyncs.
pub async fn run_lifecycle(
    mut events: mpsc::Receiver<LifecycleEvent>,
    groups: Arc<Groups>,
    apis: Vec<Graph>,
    resync: Arc<Notify>,
    managing: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => match e { Some(e) => e, None => return },
            () = shutdown.cancelled() => return,
        };
        let group = groups.group_of(&event.subscription_id);
        // Where another replica manages the source, its manager learns of
        // a removal at its next renewal (404); here nothing is recreated.
        let here = managing.as_ref().is_none_or(|m| *m.borrow());
        let managed_here = group.filter(|_| here);
        match event.event {
            Lifecycle::ReauthorizationRequired => {
                let Some(graph) = group.and_then(|g| apis.get(g)) else {
                    tracing::info!(
                        "reauthorization asked for a subscription this gateway does not hold; ignored"
                    );
                    continue;
                };
                match graph.reauthorize(&event.subscription_id).await {
                    Ok(()) => {
                        tracing::info!(subscription = %event.subscription_id, "subscription reauthorized")
                    }
                    Err(UpstreamError::NotFound) => {
                        tracing::warn!(subscription = %event.subscription_id, "subscription to reauthorize is gone; recreating");
                        recreate_then_resync(
                            &groups,
                            managed_here,
                            &event.subscription_id,
                            &resync,
                        )
                        .await;
                    }
                    Err(error) => {
                        tracing::warn!(subscription = %event.subscription_id, %error, "reauthorization failed; the next renewal tries again")
                    }
                }
            }
            Lifecycle::SubscriptionRemoved => {
                tracing::warn!(subscription = %event.subscription_id, "Graph removed the subscription; recreating and resyncing");
                recreate_then_resync(&groups, managed_here, &event.subscription_id, &resync).await;
            }
            Lifecycle::Missed => {
                tracing::info!(subscription = %event.subscription_id, "Graph missed notifications; resyncing");
                resync.notify_one();
            }
        }
    }
}

/// How long a resync waits for a removed subscription to be replaced
/// before it reads anyway.
const REPLACE_WAIT: Duration = Duration::from_secs(30);

/// Tells the group's manager its subscription is gone, waits until it holds
/// a new one (notifications flow again), then asks for a resync, which reads
/// what changed meanwhile.
async fn recreate_then_resync(groups: &Groups, group: Option<usize>, old: &str, resync: &Notify) {
    if let Some(index) = group
        && let Some(gone) = groups.gone(index)
    {
        // Only a manager waiting now hears it: a stored notice would drop
        // a healthy subscription when it is next awaited.
        gone.notify_waiters();
        groups.replaced(index, old, REPLACE_WAIT).await;
    }
    resync.notify_one();
}

/// The state of a source's resyncs, as `/v1/sources` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResyncView {
    /// `resyncing`, `done`, `retrying: <reason>`, `failed: <reason>`, or
    /// `standby` where another replica manages the source.
    pub state: String,
    /// When the last complete resync finished.
    pub finished_at: Option<Millis>,
    /// Users it read.
    pub users_read: Option<u64>,
    /// When the next one (or the next attempt) is due.
    pub next_at: Option<Millis>,
    pub last_error: Option<String>,
    /// Consecutive failed attempts of the current resync.
    pub failures: u32,
}

/// Shared view of a source's resyncs: `None` for sources that have none.
#[derive(Clone, Debug, Default)]
pub struct ResyncStatus(Arc<RwLock<Option<ResyncView>>>);

impl ResyncStatus {
    /// The current view, if the source resyncs.
    pub fn get(&self) -> Option<ResyncView> {
        self.0.read().clone()
    }

    /// Changes the view (creating it first).
    pub fn update(&self, f: impl FnOnce(&mut ResyncView)) {
        f(self.0.write().get_or_insert_with(ResyncView::default));
    }
}

/// What the reader needs.
pub struct Reader {
    pub api: Api,
    /// Every configured user (what a resync reads).
    pub users: Vec<String>,
    pub resync_interval: Duration,
    pub backoff: Backoff,
    pub deliver: DeliverPresence,
    /// Where the resync's state is shown (`/v1/sources`).
    pub status: ResyncStatus,
    /// Turns true once the first resync finished (or failed for good).
    pub ready: Arc<watch::Sender<bool>>,
}

/// Reads the users the webhook names (coalesced), until `shutdown`. Runs on
/// every replica: notifications arrive at any of them.
pub async fn run_reads(
    reader: Arc<Reader>,
    mut reads: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(READS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            id = reads.recv() => match id { Some(id) => id, None => return },
        };
        // Collect what else arrives within the window, up to one call.
        let mut batch = vec![first];
        let window = tokio::time::sleep(COALESCE);
        tokio::pin!(window);
        while batch.len() < READ_BATCH {
            tokio::select! {
                () = &mut window => break,
                id = reads.recv() => match id {
                    Some(id) => if !batch.contains(&id) { batch.push(id) },
                    None => break,
                },
                () = shutdown.cancelled() => return,
            }
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let (reader, shutdown) = (Arc::clone(&reader), shutdown.clone());
        tasks.spawn(async move {
            let _permit = permit;
            read_until_done(&reader, &batch, &shutdown).await;
        });
        while tasks.try_join_next().is_some() {}
    }
}

/// The resync schedule, until `shutdown`: at once, then after each `resync`
/// notice and every interval. Runs where the source is managed.
pub async fn run_resyncs(reader: Arc<Reader>, resync: Arc<Notify>, shutdown: CancellationToken) {
    let (reader, shutdown) = (&*reader, &shutdown);
    let clock = reader.api.clock;
    loop {
        reader.status.update(|v| v.state = "resyncing".into());
        let outcome = resync_all(reader, shutdown).await;
        let now = clock.now_ms();
        reader.status.update(|v| {
            match &outcome {
                Ok(count) => {
                    v.state = "done".into();
                    v.last_error = None;
                    v.failures = 0;
                    v.users_read = Some(*count as u64);
                    v.finished_at = Some(Millis(now));
                }
                Err(e) => {
                    v.state = format!("failed: {e}");
                    v.last_error = Some(e.to_string());
                }
            }
            v.next_at = Some(Millis(now + super::millis(reader.resync_interval)));
        });
        reader
            .ready
            .send_if_modified(|ready| !std::mem::replace(ready, true));
        tokio::select! {
            () = tokio::time::sleep(reader.resync_interval) => {}
            () = resync.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Reads every configured user, a batch at a time; the number read.
async fn resync_all(reader: &Reader, shutdown: &CancellationToken) -> Result<usize, UpstreamError> {
    let mut read = 0;
    for batch in reader.users.chunks(READ_BATCH) {
        read += read_with_retries(reader, batch, shutdown, true).await?;
    }
    Ok(read)
}

/// Reads a batch named by notifications; failures are retried while
/// transient, else logged (the next resync covers them).
async fn read_until_done(reader: &Reader, batch: &[String], shutdown: &CancellationToken) {
    if let Err(error) = read_with_retries(reader, batch, shutdown, false).await {
        tracing::warn!(users = batch.len(), %error, "presence read failed; the next resync reads them");
    }
}

/// Reads `batch`, retrying transient failures after `Retry-After` or a
/// backoff (a resync keeps trying; a notification read gives up after a few
/// attempts). Returns how many presences were delivered.
async fn read_with_retries(
    reader: &Reader,
    batch: &[String],
    shutdown: &CancellationToken,
    resync: bool,
) -> Result<usize, UpstreamError> {
    let mut backoff = reader.backoff.clone();
    loop {
        match read_batch(reader, batch).await {
            Ok(count) => return Ok(count),
            Err(UpstreamError::Transient {
                message,
                retry_after_ms,
            }) => {
                if !resync && backoff.failures() >= 4 {
                    return Err(UpstreamError::Transient {
                        message,
                        retry_after_ms,
                    });
                }
                let delay = backoff.next_delay(retry_after_ms, jitter());
                tracing::info!(%message, retry_in_ms = delay, "presence read failed; retrying");
                if resync {
                    let retry_at = reader.api.clock.now_ms() + delay;
                    reader.status.update(|v| {
                        v.state = format!("retrying: {message}");
                        v.last_error = Some(message.clone());
                        v.failures = backoff.failures();
                        v.next_at = Some(Millis(retry_at));
                    });
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(delay.max(0) as u64)) => {}
                    () = shutdown.cancelled() => return Err(UpstreamError::Transient {
                        message: "stopping".into(),
                        retry_after_ms: None,
                    }),
                }
            }
            Err(other) => return Err(other),
        }
    }
}

/// One `getPresencesByUserId` call; each presence in the answer is
/// delivered.
async fn read_batch(reader: &Reader, batch: &[String]) -> Result<usize, UpstreamError> {
    let url = reader
        .api
        .url("v1.0/communications/getPresencesByUserId", None);
    let url = reqwest::Url::parse(&url)
        .map_err(|_| UpstreamError::Rejected(format!("not a URL: {url:?}")))?;
    let body = json!({ "ids": batch });
    let api = &reader.api;
    let answer = send_raw(
        &api.client,
        &api.token,
        &api.clock,
        Method::POST,
        url,
        Some(&body),
    )
    .await?;
    if !answer.status.is_success() {
        return Err(super::failure(&Method::POST, &answer));
    }
    let value: Value = serde_json::from_slice(&answer.body)
        .map_err(|_| UpstreamError::Rejected("the presence read answered no JSON".into()))?;
    let items = value
        .get("value")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            UpstreamError::Rejected("the presence read answered no value list".into())
        })?;
    let mut delivered = 0;
    for item in items {
        let Some(id) = item.get("id").and_then(Value::as_str) else {
            continue;
        };
        // Only users the gateway asked for become records.
        if !batch.iter().any(|b| b.eq_ignore_ascii_case(id)) {
            continue;
        }
        (reader.deliver)(id, &item.to_string()).await;
        delivered += 1;
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_form_even_for_one_user() {
        assert_eq!(
            Request::resource_for(&["a".into()]),
            "/communications/presences?$filter=id in ('a')"
        );
        assert_eq!(
            Request::resource_for(&["a".into(), "b-2".into()]),
            "/communications/presences?$filter=id in ('a','b-2')"
        );
    }

    #[test]
    fn expiry_times_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(Millis(1_764_000_930_123)),
            "2025-11-24T16:15:30.123Z"
        );
    }

    #[test]
    fn group_ids_follow_the_managers() {
        let groups = Arc::new(Groups::new(2));
        let sink = GroupIds {
            groups: Arc::clone(&groups),
            index: 1,
        };
        sink.add("sub-1");
        assert_eq!(groups.group_of("sub-1"), Some(1));
        sink.remove("sub-1");
        assert_eq!(groups.group_of("sub-1"), None);
        assert!(groups.gone(1).is_some() && groups.gone(2).is_none());
    }
}
