//! The upstream side: the HTTP client, access tokens, and the life of the
//! subscriptions the gateway manages at providers.
//!
//! The upstream code knows nothing of the store: it keeps subscriptions
//! alive and tells the source's verifier which ids to accept. What must
//! outlive the process (subscription ids and expiry, rotated refresh
//! tokens) goes through [`persist::Persisted`], which the store provides.

pub mod graph;
pub mod manager;
pub mod mitel;
pub mod mitel_ws;
pub mod netsapiens;
pub mod persist;
pub mod schedule;
pub mod token;
pub mod ucwa;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Once};
use std::time::Duration;

use manager::{Clock, Handles, IdSink, Settings, UpstreamError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Auth, SourceConfig};
use crate::providers::mitel::{MEDIA_TOPIC, PRESENCE_TOPIC};
use crate::sources::{Source, Sources, Verifier};
use persist::Persisted;
use schedule::{Backoff, Timing};
use token::{Grant, TokenSource, TokenStore};

/// Connect timeout of upstream calls.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of upstream calls (reading the answer included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Most bytes read of a provider API answer: subscription lists, UCWA
/// resources and event batches are kilobytes; a provider (or whatever
/// answers in its place) that sends more fails the call instead of filling
/// memory.
pub const MAX_API_ANSWER: usize = 4 * 1024 * 1024;
/// Most bytes read of a token endpoint's answer (a token, a refresh token
/// and a few fields).
pub const MAX_TOKEN_ANSWER: usize = 64 * 1024;

/// The client for provider APIs: rustls (ring), connect and request
/// timeouts, no redirects to other hosts' credentials (bearer headers are
/// dropped on cross-origin redirects by reqwest).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    http_client_waiting(Duration::ZERO)
}

/// How socket and polling transports hand what they receive to the store.
pub struct Delivery<'a> {
    /// Mitel envelopes (MQTT messages).
    pub envelopes: &'a dyn Fn(&Source) -> mitel_ws::Deliver,
    /// UCWA contact presence resources.
    pub presence: &'a dyn Fn(&Source) -> ucwa::DeliverPresence,
}

/// What [`spawn_managers`] started.
pub struct Spawned {
    pub tasks: Vec<JoinHandle<()>>,
    /// What the gateway waits for before it is ready; each turns true once:
    /// one per managed subscription (after its first adopt-or-create
    /// attempt, successful or failed), and one per UCWA source (after every
    /// contact was read).
    pub ready: Vec<tokio::sync::watch::Receiver<bool>>,
}

/// Starts a manager for every subscription the configured sources ask the
/// gateway to keep; they stop (deleting their subscriptions when so
/// configured) when `shutdown` is cancelled. Subscription ids and rotated
/// refresh tokens are kept in `persisted`.
pub fn spawn_managers(
    sources: &Sources,
    configs: &[SourceConfig],
    delivery: &Delivery<'_>,
    shutdown: &CancellationToken,
    persisted: Arc<dyn Persisted>,
    leases: &HashMap<&str, watch::Receiver<bool>>,
) -> Result<Spawned, reqwest::Error> {
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    let clock = Clock::new();
    let mut client = None;
    for config in configs {
        let (Some(managed), Some(source)) = (&config.managed, sources.get(&config.id)) else {
            continue;
        };
        let client = match &client {
            Some(c) => reqwest::Client::clone(c),
            None => client.insert(http_client()?).clone(),
        };
        let token = Arc::new(match &managed.auth {
            Auth::Bearer(token) => TokenSource::Static(token.clone()),
            Auth::Grant { token_url, form } => TokenSource::oauth_persisted(
                Grant {
                    token_url: token_url.clone(),
                    form: form.clone(),
                },
                TokenStore {
                    persisted: Arc::clone(&persisted),
                    key: persist::token_key(&config.id),
                },
            ),
        });
        let backoff = || Backoff::new(millis(managed.retry_initial), millis(managed.retry_max));
        let api = Api {
            client: client.clone(),
            base: managed.api_base.clone(),
            token: Arc::clone(&token),
            clock,
        };
        let may_manage = leases.get(config.id.as_str()).cloned();
        if let Some(g) = &managed.graph {
            let context = GraphContext {
                source,
                managed,
                graph: g,
                client: &client,
                clock,
                persisted: &persisted,
                may_manage,
                deliver: (delivery.presence)(source),
                shutdown,
            };
            spawn_graph(&context, &mut tasks, &mut ready);
            continue;
        }
        if let Some(u) = &managed.ucwa {
            let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
            ready.push(ready_rx);
            let ready_tx = Arc::new(ready_tx);
            let events_client = http_client_waiting(u.event_timeout)?;
            let slot = source.subscriptions.add("ucwa");
            let board = Arc::clone(&source.subscriptions);
            let deliver = (delivery.presence)(source);
            let (token, base, u) = (Arc::clone(&token), managed.api_base.clone(), u.clone());
            let backoff = backoff();
            let standby = {
                let (board, ready_tx) = (Arc::clone(&board), Arc::clone(&ready_tx));
                move || {
                    board.update(slot, |v| v.state = STANDBY.into());
                    ready_tx.send_replace(true);
                }
            };
            let make = move |stop: CancellationToken| {
                // Each run reports its own start-up read; the source is
                // ready once one has finished it.
                let (run_ready, mut finished) = tokio::sync::watch::channel(false);
                let ready_tx = Arc::clone(&ready_tx);
                tokio::spawn(async move {
                    if finished.wait_for(|done| *done).await.is_ok() {
                        ready_tx.send_replace(true);
                    }
                });
                ucwa::run(
                    ucwa::Ucwa {
                        client: client.clone(),
                        events_client: events_client.clone(),
                        token: Arc::clone(&token),
                        api_base: base.clone(),
                        contacts: u.contacts.clone(),
                        duration: u.duration,
                        event_timeout: u.event_timeout,
                        backoff: backoff.clone(),
                        clock,
                        board: Arc::clone(&board),
                        deliver: Arc::clone(&deliver),
                        ready: run_ready,
                    },
                    slot,
                    stop,
                )
            };
            let run = while_managing(may_manage, shutdown.clone(), standby, make);
            tasks.push(start(&config.id, "ucwa", run));
            continue;
        }
        if let Some(m) = &managed.mitel {
            let timing = Timing {
                lifetime_ms: millis(m.check_interval),
                renew_before_ms: 0,
            };
            let mut wanted: Vec<(String, &str, String)> = Vec::new();
            if m.principals.is_empty() {
                wanted.push((
                    "presence".into(),
                    PRESENCE_TOPIC,
                    mitel::ALL_PRESENTITIES.into(),
                ));
            }
            for principal in &m.principals {
                wanted.push((
                    format!("presence {principal}"),
                    PRESENCE_TOPIC,
                    format!("/presentities/{principal}"),
                ));
            }
            if m.media {
                wanted.push(("media".into(), MEDIA_TOPIC, m.media_subject_filter.clone()));
            }
            let topics = m.mqtt_client_id.as_ref().map(|_| mitel_ws::Topics::new());
            for (kind, topic, subject_filter) in wanted {
                let upstream = mitel::Mitel {
                    api: api.clone(),
                    request: mitel::Request {
                        application_id: m.application_id.clone(),
                        device_id: m
                            .mqtt_client_id
                            .clone()
                            .unwrap_or_else(|| managed.callback_url.clone()),
                        transport: if m.mqtt_client_id.is_some() {
                            "websocket"
                        } else {
                            "webhook"
                        },
                        topic: topic.into(),
                        subject_filter,
                        method_filter: m.method_filter.clone(),
                    },
                };
                let settings = Settings {
                    timing,
                    backoff: backoff(),
                    delete_on_shutdown: managed.delete_on_shutdown,
                    secret_ids: false,
                };
                let sink: Arc<dyn IdSink> = match &topics {
                    Some(topics) => Arc::clone(topics) as Arc<dyn IdSink>,
                    None => Arc::new(NoIds),
                };
                let mut handles = handles(source, &kind, sink, &persisted, &mut ready);
                handles.may_manage = may_manage.clone();
                let run = manager::run(upstream, handles, settings, clock, shutdown.clone());
                tasks.push(start(&config.id, &kind, run));
            }
            if let (Some(topics), Some(client_id)) = (topics, &m.mqtt_client_id) {
                let slot = source.subscriptions.add("mqtt");
                let board = Arc::clone(&source.subscriptions);
                let deliver = (delivery.envelopes)(source);
                let (api, client_id, application_id) =
                    (api.clone(), client_id.clone(), m.application_id.clone());
                let backoff = backoff();
                let standby = {
                    let board = Arc::clone(&board);
                    move || board.update(slot, |v| v.state = STANDBY.into())
                };
                let make = move |stop: CancellationToken| {
                    let connection = mitel_ws::Connection {
                        api: mitel::Mitel {
                            api: api.clone(),
                            request: mitel::Request {
                                application_id: application_id.clone(),
                                device_id: client_id.clone(),
                                transport: "websocket",
                                topic: PRESENCE_TOPIC.into(),
                                subject_filter: String::new(),
                                method_filter: None,
                            },
                        },
                        client_id: client_id.clone(),
                        topics: Arc::clone(&topics),
                        deliver: Arc::clone(&deliver),
                        board: Arc::clone(&board),
                        backoff: backoff.clone(),
                        clock,
                    };
                    mitel_ws::run(connection, slot, stop)
                };
                tasks.push(start(
                    &config.id,
                    "mqtt",
                    while_managing(may_manage.clone(), shutdown.clone(), standby, make),
                ));
            }
            continue;
        }
        let Verifier::Correlation { ids, .. } = &source.verifier else {
            continue;
        };
        if managed.lifetime < Duration::from_secs(60) {
            tracing::warn!(source = %config.id, lifetime_secs = managed.lifetime.as_secs(), "very short subscription lifetime (meant for tests)");
        }
        for (model, name) in managed.models.iter().zip(&managed.model_names) {
            let upstream = netsapiens::NetSapiens {
                api: api.clone(),
                request: netsapiens::Request {
                    model: name.clone(),
                    post_url: managed.callback_url.clone(),
                    reseller: managed.reseller.clone(),
                    domain: managed.domain.clone(),
                    user: managed.user.clone(),
                    geo_support: managed.geo_support,
                    preferred_server: managed.preferred_server.clone(),
                },
            };
            let sink: Arc<dyn IdSink> = Arc::new(netsapiens::CorrelationSink {
                ids: Arc::clone(ids),
                model: *model,
            });
            let settings = Settings {
                timing: Timing {
                    lifetime_ms: millis(managed.lifetime),
                    renew_before_ms: millis(managed.renew_before),
                },
                backoff: backoff(),
                delete_on_shutdown: managed.delete_on_shutdown,
                secret_ids: true,
            };
            let mut handles = handles(source, name, sink, &persisted, &mut ready);
            handles.may_manage = may_manage.clone();
            let run = manager::run(upstream, handles, settings, clock, shutdown.clone());
            tasks.push(start(&config.id, name, run));
        }
    }
    Ok(Spawned { tasks, ready })
}

/// What [`spawn_graph`] starts from.
struct GraphContext<'a> {
    source: &'a Source,
    managed: &'a crate::config::Managed,
    graph: &'a crate::config::GraphManaged,
    client: &'a reqwest::Client,
    clock: Clock,
    persisted: &'a Arc<dyn Persisted>,
    may_manage: Option<watch::Receiver<bool>>,
    deliver: ucwa::DeliverPresence,
    shutdown: &'a CancellationToken,
}

/// A Graph source: one manager per group of users (each with its account's
/// token), the lifecycle handler and the reads (on every replica), and the
/// resyncs (where the source is managed; the source is ready after the
/// first).
fn spawn_graph(
    c: &GraphContext<'_>,
    tasks: &mut Vec<JoinHandle<()>>,
    ready: &mut Vec<tokio::sync::watch::Receiver<bool>>,
) {
    let (source, managed, g) = (c.source, c.managed, c.graph);
    let Some(outbox) = source.graph_outbox.lock().take() else {
        return;
    };
    let apis: Vec<Api> = g
        .accounts
        .iter()
        .enumerate()
        .map(|(i, account)| Api {
            client: c.client.clone(),
            base: managed.api_base.clone(),
            token: Arc::new(TokenSource::oauth_persisted(
                Grant {
                    token_url: g.token_url.clone(),
                    form: account.form.clone(),
                },
                TokenStore {
                    persisted: Arc::clone(c.persisted),
                    key: format!("{}/{i}", persist::token_key(&source.id)),
                },
            )),
            clock: c.clock,
        })
        .collect();
    let backoff = || Backoff::new(millis(managed.retry_initial), millis(managed.retry_max));
    let encryption = g.rich.as_ref().map(|r| {
        (
            r.certificate_base64().to_owned(),
            r.certificate_id().to_owned(),
        )
    });
    let all_resources: Vec<String> = g
        .groups
        .iter()
        .map(|users| graph::Request::resource_for(users))
        .collect();
    let upstream = |i: usize, users: &[String]| graph::Graph {
        api: apis[i].clone(),
        request: graph::Request {
            notification_url: managed.callback_url.clone(),
            lifecycle_url: g.lifecycle_url.clone(),
            resource: graph::Request::resource_for(users),
            encryption: encryption.clone(),
            all_resources: all_resources.clone(),
        },
        client_state: g.client_state.clone(),
    };
    let groups = Arc::new(graph::Groups::new(g.groups.len()));
    for (i, users) in g.groups.iter().enumerate().take(apis.len()) {
        let kind = format!("group {}", i + 1);
        let settings = Settings {
            timing: Timing {
                lifetime_ms: millis(managed.lifetime),
                renew_before_ms: millis(managed.renew_before),
            },
            backoff: backoff(),
            delete_on_shutdown: managed.delete_on_shutdown,
            secret_ids: false,
        };
        let sink: Arc<dyn IdSink> = Arc::new(graph::GroupIds {
            groups: Arc::clone(&groups),
            index: i,
        });
        let mut handles = handles(source, &kind, sink, c.persisted, ready);
        handles.may_manage = c.may_manage.clone();
        handles.gone = groups.gone(i);
        let run = manager::run(
            upstream(i, users),
            handles,
            settings,
            c.clock,
            c.shutdown.clone(),
        );
        tasks.push(start(&source.id, &kind, run));
    }
    let lifecycle_apis = g
        .groups
        .iter()
        .enumerate()
        .take(apis.len())
        .map(|(i, users)| upstream(i, users))
        .collect();
    tasks.push(start(
        &source.id,
        "lifecycle",
        graph::run_lifecycle(
            outbox.lifecycle,
            groups,
            lifecycle_apis,
            Arc::clone(&outbox.resync),
            c.may_manage.clone(),
            c.shutdown.clone(),
        ),
    ));
    let Some(read_api) = apis.first().cloned() else {
        return;
    };
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    ready.push(ready_rx);
    let ready_tx = Arc::new(ready_tx);
    let status = source.graph_resync.clone();
    let reader = Arc::new(graph::Reader {
        api: read_api,
        users: g.groups.concat(),
        resync_interval: g.resync_interval,
        backoff: backoff(),
        deliver: Arc::clone(&c.deliver),
        status: status.clone(),
        ready: Arc::clone(&ready_tx),
    });
    tasks.push(start(
        &source.id,
        "reads",
        graph::run_reads(Arc::clone(&reader), outbox.reads, c.shutdown.clone()),
    ));
    let standby = move || {
        status.update(|v| v.state = STANDBY.into());
        ready_tx.send_replace(true);
    };
    let resync = outbox.resync;
    let make = move |stop: CancellationToken| {
        graph::run_resyncs(Arc::clone(&reader), Arc::clone(&resync), stop)
    };
    tasks.push(start(
        &source.id,
        "resync",
        while_managing(c.may_manage.clone(), c.shutdown.clone(), standby, make),
    ));
}

/// A board slot, a persisted key and a readiness flag for one managed
/// subscription of `source`, named `kind` on the board.
fn handles(
    source: &Source,
    kind: &str,
    ids: Arc<dyn IdSink>,
    persisted: &Arc<dyn Persisted>,
    ready: &mut Vec<tokio::sync::watch::Receiver<bool>>,
) -> Handles {
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    ready.push(ready_rx);
    Handles {
        ids,
        board: Arc::clone(&source.subscriptions),
        slot: source.subscriptions.add(kind),
        persisted: Arc::clone(persisted),
        key: persist::subscription_key(&source.id, kind),
        ready: ready_tx,
        // Set by the caller where leases decide (the Redis backend).
        may_manage: None,
        gone: None,
    }
}

/// The board state of a socket transport that another replica runs.
pub const STANDBY: &str = "standby";

/// Runs a socket transport (the UCWA event channel, the MQTT connection)
/// only while this replica may manage its source: with `may_manage` (a
/// lease), started when it turns true and stopped when it turns false
/// (`standby` runs meanwhile), until `shutdown`; without, always.
async fn while_managing<M, F>(
    may_manage: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
    standby: impl Fn(),
    mut make: M,
) where
    M: FnMut(CancellationToken) -> F,
    F: Future<Output = ()>,
{
    let Some(mut may) = may_manage else {
        return make(shutdown).await;
    };
    loop {
        if !*may.borrow_and_update() {
            standby();
            tokio::select! {
                changed = may.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            continue;
        }
        let stop = shutdown.child_token();
        let run = make(stop.clone());
        tokio::pin!(run);
        loop {
            tokio::select! {
                () = &mut run => {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    break;
                }
                changed = may.changed() => {
                    if changed.is_err() || !*may.borrow_and_update() {
                        tracing::info!("lease lost: stopping the connection; another replica takes over");
                        stop.cancel();
                        run.as_mut().await;
                        break;
                    }
                }
            }
        }
    }
}

/// Spawns one manager in a span naming its source and subscription.
fn start(
    source: &str,
    kind: &str,
    run: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let span = tracing::info_span!("subscription", source = %source, kind = %kind);
    tokio::spawn(tracing::Instrument::instrument(run, span))
}

/// Mitel webhooks are verified by their signing keys, not by subscription
/// ids: nothing to keep in step.
struct NoIds;

impl IdSink for NoIds {
    fn add(&self, _: &str) {}
    fn remove(&self, _: &str) {}
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Makes ring the process's TLS crypto provider (once). Every reqwest client
/// in the process needs one; [`http_client`] calls this itself.
pub fn install_crypto_provider() {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only when another provider was installed first, which is
        // just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A provider API as one source reaches it: client, root URL and token.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    /// The API root, without a trailing `/`.
    pub base: String,
    pub token: Arc<TokenSource>,
    pub clock: Clock,
}

impl Api {
    /// `{base}/{collection}`, or `{base}/{collection}/{id}` with the id
    /// percent-encoded as one path segment.
    fn url(&self, collection: &str, id: Option<&str>) -> String {
        let base = self.base.trim_end_matches('/');
        match id {
            None => format!("{base}/{collection}"),
            Some(id) => format!("{base}/{collection}/{}", netsapiens::encode_segment(id)),
        }
    }

    /// [`send_with_token`] with this API's client and token.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Option<serde_json::Value>, UpstreamError> {
        send_with_token(&self.client, &self.token, &self.clock, method, url, body).await
    }
}

/// An HTTP answer of a provider API: status, `Retry-After` (ms) and body.
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    pub retry_after_ms: Option<i64>,
    pub body: axum::body::Bytes,
}

/// Sends an API request with the source's bearer token; on a 401 the token
/// is replaced and the request sent once more. Any HTTP answer is returned;
/// only transport failures are errors.
pub(crate) async fn send_raw(
    client: &reqwest::Client,
    token: &TokenSource,
    clock: &Clock,
    method: reqwest::Method,
    url: reqwest::Url,
    body: Option<&serde_json::Value>,
) -> Result<Answer, UpstreamError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let bearer = token.token(client, clock.now_ms()).await?;
        let mut request = client
            .request(method.clone(), url.clone())
            .bearer_auth(String::from_utf8_lossy(bearer.expose()));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error("API request", &e))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 1 {
            token.invalidate(&bearer).await;
            continue;
        }
        let retry_after_ms = retry_after(&response);
        let body = read_limited(response, MAX_API_ANSWER, "API answer").await?;
        return Ok(Answer {
            status,
            retry_after_ms,
            body,
        });
    }
}

/// Maps a failed answer: 404 → `NotFound`; 409 → `Conflict`; 429 and 5xx →
/// `Transient` with `Retry-After`; anything else → `Rejected`.
pub(crate) fn failure(method: &reqwest::Method, answer: &Answer) -> UpstreamError {
    let status = answer.status;
    match status.as_u16() {
        404 => UpstreamError::NotFound,
        409 => UpstreamError::Conflict,
        401 => UpstreamError::Rejected("the API rejects the credentials (401)".into()),
        429 | 500..=599 => UpstreamError::Transient {
            message: format!("{method} answered {status}"),
            retry_after_ms: answer.retry_after_ms,
        },
        _ => UpstreamError::Rejected(format!("{method} answered {status}")),
    }
}

/// [`send_raw`], then success → the JSON body (if any), else [`failure`].
async fn send_with_token(
    client: &reqwest::Client,
    token: &TokenSource,
    clock: &Clock,
    method: reqwest::Method,
    url: &str,
    body: Option<&serde_json::Value>,
) -> Result<Option<serde_json::Value>, UpstreamError> {
    let url = reqwest::Url::parse(url)
        .map_err(|_| UpstreamError::Rejected(format!("not a URL: {url:?}")))?;
    let answer = send_raw(client, token, clock, method.clone(), url, body).await?;
    if answer.status.is_success() {
        Ok(serde_json::from_slice(&answer.body).ok())
    } else {
        Err(failure(&method, &answer))
    }
}

/// The client for upstream calls whose answers may take up to `wait` (a
/// held pending GET), with the usual timeouts on top.
fn http_client_waiting(wait: Duration) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(wait + REQUEST_TIMEOUT)
        .user_agent(concat!("presence-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The body of `response`, at most `limit` bytes. A declared length over
/// the limit fails before anything is read, and a body that grows past it
/// (an endless chunked answer) fails once it does; either way the call fails
/// like any other (retried with backoff), and the connection is dropped.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<axum::body::Bytes, UpstreamError> {
    let too_large = || UpstreamError::Transient {
        message: format!("{what} is larger than the limit of {limit} bytes"),
        retry_after_ms: None,
    };
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(what, &e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.into())
}

/// A transport failure, described without the URL's query (which could
/// carry a credential).
fn transport_error(what: &str, error: &reqwest::Error) -> UpstreamError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_decode() {
        "answer could not be read"
    } else {
        "failed"
    };
    UpstreamError::Transient {
        message: format!("{what} {kind}"),
        retry_after_ms: None,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from APIs and is
/// treated as absent).
fn retry_after(response: &reqwest::Response) -> Option<i64> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .map(|secs| secs.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_client_builds_with_tls() {
        super::http_client().expect("client with rustls and ring");
    }
}
