//! `kind = "ucwa"`: the UCWA application, its presence subscription and the
//! event channel, kept running for as long as the gateway runs.
//!
//! - Start: create the application (`POST {api_base}`), subscribe to the
//!   contacts' presence in one batch (`POST .../people/presenceSubscriptions
//!   {"duration", "uris"}`), then read every contact's presence once; the
//!   source reports ready only after that, so `/readyz` waits for a complete
//!   store.
//! - Event channel: one pending GET at a time, following `_links.next`.
//!   `contactPresence` events trigger a GET of that contact's presence (the
//!   events of one answer are coalesced per contact, and at most
//!   [`FETCH_PARALLELISM`] fetches run at once); `resync` re-reads every
//!   contact; a `presenceSubscription` update extends the subscription at
//!   once. 404 `ApplicationNotFound` → a new application and subscription;
//!   409 `PGetReplaced` → another reader took the channel over: this loop
//!   stops and says so; network errors and 5xx → backoff, then the same
//!   (last acknowledged) `ack` again.
//! - The subscription is extended (`POST` with the duration) a margin before
//!   it expires.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::manager::{Board, Clock, UpstreamError};
use super::schedule::{Backoff, jitter};
use super::token::TokenSource;
use crate::presence::Millis;

/// Contact presence fetches running at once.
pub const FETCH_PARALLELISM: usize = 8;

/// Contacts per subscription request (the rest go through memberships).
pub const BATCH: usize = 50;

/// Hands one contact's presence (principal, JSON body) to the store.
pub type DeliverPresence =
    Arc<dyn Fn(&str, &str) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// One UCWA source's loop.
pub struct Ucwa {
    pub client: reqwest::Client,
    /// For the pending GET, which the server holds up to `event_timeout`.
    pub events_client: reqwest::Client,
    pub token: Arc<TokenSource>,
    pub api_base: String,
    pub contacts: Vec<String>,
    pub duration: Duration,
    pub event_timeout: Duration,
    pub backoff: Backoff,
    pub clock: Clock,
    pub board: Arc<Board>,
    pub deliver: DeliverPresence,
    /// Set to true once every contact has been read after start-up.
    pub ready: watch::Sender<bool>,
}

/// The resources of one application.
struct Application {
    events: Url,
    subscriptions: Url,
    people: Url,
}

/// How an event-channel session ended.
enum Ended {
    Shutdown,
    /// Recreate the application.
    ApplicationGone,
    /// Another reader took over; stop.
    Replaced,
    Failed(String),
}

impl Ucwa {
    fn resolve(&self, href: &str) -> Result<Url, UpstreamError> {
        Url::parse(&self.api_base)
            .and_then(|base| base.join(href))
            .map_err(|_| UpstreamError::Rejected(format!("cannot resolve link {href:?}")))
    }

    /// One request with the bearer token (see [`super::send_raw`]); any
    /// HTTP answer is returned, as status and text.
    async fn call(
        &self,
        client: &reqwest::Client,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, String), UpstreamError> {
        let answer = super::send_raw(client, &self.token, &self.clock, method, url, body).await?;
        Ok((
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        ))
    }

    async fn expect_ok(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Value, UpstreamError> {
        let answer = super::send_raw(
            &self.client,
            &self.token,
            &self.clock,
            method.clone(),
            url,
            body,
        )
        .await?;
        if answer.status.is_success() {
            return Ok(serde_json::from_slice(&answer.body).unwrap_or(Value::Null));
        }
        Err(super::failure(&method, &answer))
    }

    async fn create_application(&self) -> Result<Application, UpstreamError> {
        let endpoint = format!("{:016x}", (jitter() * 1e16) as u64);
        let body =
            json!({"userAgent": "presence-gateway", "endpointId": endpoint, "culture": "en-US"});
        let base = Url::parse(&self.api_base)
            .map_err(|_| UpstreamError::Rejected("api_base is not a URL".into()))?;
        let app = self.expect_ok(Method::POST, base, Some(&body)).await?;
        let link = |path: &[&str]| -> Option<String> {
            let mut v = &app;
            for key in path {
                v = v.get(*key)?;
            }
            v.get("href")?.as_str().map(str::to_owned)
        };
        let own = link(&["_links", "self"])
            .ok_or_else(|| UpstreamError::Rejected("the application has no _links.self".into()))?;
        let events = link(&["_links", "events"]).unwrap_or_else(|| format!("{own}/events"));
        let people = link(&["_embedded", "people", "_links", "self"])
            .unwrap_or_else(|| format!("{own}/people"));
        let subscriptions = link(&["_embedded", "people", "_links", "presenceSubscriptions"])
            .unwrap_or_else(|| format!("{own}/people/presenceSubscriptions"));
        Ok(Application {
            events: self.resolve(&events)?,
            subscriptions: self.resolve(&subscriptions)?,
            people: self.resolve(&format!("{}/", people.trim_end_matches('/')))?,
        })
    }

    /// Subscribes to every contact: the first [`BATCH`] with the
    /// subscription, the rest through its memberships link, a batch per
    /// request. Returns the subscription.
    async fn subscribe(&self, app: &Application) -> Result<Url, UpstreamError> {
        let mut batches = self.contacts.chunks(BATCH);
        let first = batches.next().unwrap_or_default();
        let body = json!({"duration": self.duration.as_secs() / 60, "uris": first});
        let answer = self
            .expect_ok(Method::POST, app.subscriptions.clone(), Some(&body))
            .await?;
        let subscription = self.subscription_link(app, &answer)?;
        let memberships = match answer
            .pointer("/_links/memberships/href")
            .and_then(Value::as_str)
        {
            Some(href) => self.resolve(href)?,
            None => self.resolve(&format!("{}/memberships", subscription.path()))?,
        };
        for batch in batches {
            let body = json!({"uris": batch});
            self.expect_ok(Method::POST, memberships.clone(), Some(&body))
                .await?;
        }
        Ok(subscription)
    }

    fn subscription_link(&self, app: &Application, answer: &Value) -> Result<Url, UpstreamError> {
        let href = answer
            .pointer("/_links/self/href")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                let id = answer.get("id")?;
                let id = id
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| id.to_string());
                Some(format!("{}/{id}", app.subscriptions.path()))
            })
            .ok_or_else(|| UpstreamError::Rejected("the presence subscription has no id".into()))?;
        self.resolve(&href)
    }

    async fn extend(&self, subscription: &Url) -> Result<(), UpstreamError> {
        let body = json!({"duration": self.duration.as_secs() / 60});
        self.expect_ok(Method::POST, subscription.clone(), Some(&body))
            .await
            .map(drop)
    }

    /// Reads the presence resources at `urls` (at most
    /// [`FETCH_PARALLELISM`] at once) and delivers each.
    async fn fetch_all(self: &Arc<Self>, urls: Vec<Url>) -> Result<(), UpstreamError> {
        let limit = Arc::new(Semaphore::new(FETCH_PARALLELISM));
        let mut tasks = tokio::task::JoinSet::new();
        for url in urls {
            let (this, limit) = (Arc::clone(self), Arc::clone(&limit));
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let principal = crate::providers::ucwa::principal(url.path());
                let (status, text) = this.call(&this.client, Method::GET, url, None).await?;
                if status.is_success() {
                    (this.deliver)(&principal, &text).await;
                    Ok(())
                } else if status.is_server_error() {
                    Err(UpstreamError::Transient {
                        message: format!("presence GET answered {status}"),
                        retry_after_ms: None,
                    })
                } else {
                    // A contact the server does not know: nothing to store.
                    tracing::warn!(%principal, %status, "contact presence not readable");
                    Ok(())
                }
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(e)) = joined {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn contact_urls(&self, app: &Application) -> Vec<Url> {
        self.contacts
            .iter()
            .filter_map(|c| {
                let address = crate::providers::ucwa::principal(c);
                app.people.join(&format!("{address}/presence")).ok()
            })
            .collect()
    }

    fn margin(&self) -> Duration {
        (self.duration / 5).max(Duration::from_secs(60))
    }
}

/// An application with its subscription, and where the event channel is.
struct Channel {
    app: Application,
    subscription: Url,
    /// The next pending GET: the last acknowledged position.
    events: Url,
    expires_at: i64,
    extend_at: i64,
}

/// Runs the source until `shutdown`, or until another reader replaces it.
pub async fn run(ucwa: Ucwa, slot: usize, shutdown: CancellationToken) {
    let u = Arc::new(ucwa);
    let mut backoff = u.backoff.clone();
    let mut reconnects = 0u64;
    let mut channel: Option<Channel> = None;
    loop {
        let ended = tokio::select! {
            ended = session(&u, slot, &mut channel, &mut backoff, reconnects) => ended,
            () = shutdown.cancelled() => Ended::Shutdown,
        };
        let reason = match ended {
            Ended::Shutdown => return,
            Ended::Replaced => {
                let reason = "PGetReplaced: another reader took over the event channel; stopped";
                tracing::error!(reason, "UCWA event channel stopped");
                u.board.update(slot, |v| {
                    v.state = format!("failed: {reason}");
                    v.last_error = Some(reason.into());
                    v.next_action_at = None;
                });
                return;
            }
            Ended::ApplicationGone => {
                tracing::warn!("UCWA application not found; creating a new one");
                channel = None;
                "ApplicationNotFound: recreating the application".to_owned()
            }
            // The channel (if any) is kept: the next GET asks for the
            // last acknowledged position again.
            Ended::Failed(reason) => reason,
        };
        let delay = backoff.next_delay(None, jitter());
        reconnects += 1;
        let failures = backoff.failures();
        tracing::warn!(%reason, retry_in_ms = delay, "UCWA session interrupted");
        u.board.update(slot, |v| {
            v.state = format!("failed: {reason}");
            v.last_error = Some(reason.clone());
            v.failures = failures;
            v.reconnects = reconnects;
            v.next_action_at = Some(Millis(u.clock.now_ms() + delay));
        });
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(delay as u64)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Sets up the application when there is none, then reads the event
/// channel until something ends it.
async fn session(
    u: &Arc<Ucwa>,
    slot: usize,
    channel: &mut Option<Channel>,
    backoff: &mut Backoff,
    reconnects: u64,
) -> Ended {
    let failed = |e: UpstreamError| Ended::Failed(e.to_string());
    if channel.is_none() {
        let app = match u.create_application().await {
            Ok(app) => app,
            Err(e) => return failed(e),
        };
        let subscription = match u.subscribe(&app).await {
            Ok(s) => s,
            Err(e) => return failed(e),
        };
        if let Err(e) = u.fetch_all(u.contact_urls(&app)).await {
            return failed(e);
        }
        u.ready.send_replace(true);
        let expires_at = u.clock.now_ms() + super::millis(u.duration);
        *channel = Some(Channel {
            events: app.events.clone(),
            app,
            subscription,
            expires_at,
            extend_at: expires_at - super::millis(u.margin()),
        });
    }
    let Some(c) = channel.as_mut() else {
        return Ended::Failed("no application".into());
    };
    let publish = |c: &Channel| {
        u.board.update(slot, |v| {
            v.state = "active".into();
            v.expires_at = Some(Millis(c.expires_at));
            v.next_action_at = Some(Millis(c.extend_at));
            v.last_error = None;
            v.failures = 0;
            v.reconnects = reconnects;
        });
    };
    let extended = |c: &mut Channel| {
        c.expires_at = u.clock.now_ms() + super::millis(u.duration);
        c.extend_at = c.expires_at - super::millis(u.margin());
    };
    publish(c);
    let mut first = true;
    loop {
        let mut request = c.events.clone();
        request
            .query_pairs_mut()
            .append_pair("timeout", &u.event_timeout.as_secs().to_string());
        let wait_extend = tokio::time::sleep(Duration::from_millis(
            (c.extend_at - u.clock.now_ms()).max(0) as u64,
        ));
        let answer = tokio::select! {
            answer = u.call(&u.events_client, Method::GET, request, None) => answer,
            () = wait_extend => {
                match u.extend(&c.subscription).await {
                    Ok(()) => {}
                    // The subscription (or its application) is gone.
                    Err(UpstreamError::NotFound) => return Ended::ApplicationGone,
                    Err(e) => return failed(e),
                }
                extended(c);
                publish(c);
                // The pending GET was dropped; the same ack is asked again.
                continue;
            }
        };
        let (status, text) = match answer {
            Ok(answer) => answer,
            Err(e) => return failed(e),
        };
        match status.as_u16() {
            200..=299 => {}
            // ApplicationNotFound, or any other 404: the channel is gone.
            404 => return Ended::ApplicationGone,
            409 if text.contains("PGetReplaced") => return Ended::Replaced,
            _ => return Ended::Failed(format!("event channel answered {status}")),
        }
        if first {
            // A channel that answers again resets the backoff.
            backoff.reset();
            first = false;
        }
        let parsed = match crate::providers::ucwa::events(&text) {
            Ok(parsed) => parsed,
            Err(e) => return Ended::Failed(format!("event channel answer: {e}")),
        };
        let urls: Vec<Url> = if parsed.resync {
            u.contact_urls(&c.app)
        } else {
            parsed
                .presence
                .iter()
                .filter_map(|href| u.resolve(href).ok())
                .collect()
        };
        if let Err(e) = u.fetch_all(urls).await {
            return failed(e);
        }
        if !parsed.subscription_updates.is_empty() {
            // The server warns that the subscription is about to expire.
            match u.extend(&c.subscription).await {
                Ok(()) => {}
                Err(UpstreamError::NotFound) => return Ended::ApplicationGone,
                Err(e) => return failed(e),
            }
            extended(c);
            publish(c);
        }
        if let Some(next) = parsed.next {
            match u.resolve(&next) {
                Ok(next) => c.events = next,
                Err(e) => return failed(e),
            }
        }
    }
}
