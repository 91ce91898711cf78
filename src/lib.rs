//! presence-gateway: receives presence notifications from communication
//! platforms, proves each one authentic in constant time, normalizes it into
//! one presence model, keeps the current presence of every principal in
//! memory and serves it to consumers.
//!
//! Data flows one way: bytes → [`verify`] → [`providers`] →
//! [`presence::PresenceUpdate`] → [`presence::Store`] → change log. The binary
//! and the tests start the same thing: [`run`].

pub mod cli;
pub mod cluster;
pub mod config;
pub mod http;
pub mod people;
pub mod presence;
pub mod providers;
pub mod sources;
pub mod telemetry;
pub mod upstream;
pub mod verify;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::http::{AppState, StateParts};
use crate::presence::Store;
use crate::presence::store::StoreLimits;
use crate::sources::Sources;
use crate::telemetry::GlobalStats;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid source configuration: {0}")]
    Sources(#[from] providers::fields::FieldsError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot load persisted state: {0}")]
    State(#[from] presence::journal::OpenError),
    #[error("cannot load the people file {0}")]
    People(String),
}

/// The store the config asks for, with what it persisted loaded.
async fn open_store(config: &Config, source_ids: &[Arc<str>]) -> Result<Store, RunError> {
    let limits = StoreLimits {
        history: config.store.history,
        dedup_window_ms: i64::try_from(config.store.dedup_window.as_millis()).unwrap_or(i64::MAX),
        dedup_capacity: config.store.dedup_capacity,
        stream_buffer: config.consumers.stream_buffer,
        max_future_skew_ms: i64::try_from(config.store.max_future_skew.as_millis())
            .unwrap_or(i64::MAX),
    };
    let max_records = config.store.max_records;
    if config.store.backend == config::StoreBackend::Redis {
        let redis_config = &config.store.redis;
        let url = String::from_utf8_lossy(redis_config.url.expose()).into_owned();
        let redis = cluster::Redis::new(&url, &redis_config.key_prefix)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        tracing::info!(redis = %redis.endpoint(), key_prefix = %redis_config.key_prefix, "state lives in Redis");
        if let Some(dir) = &config.store.data_dir {
            tracing::warn!(data_dir = %dir.display(), "store.data_dir is ignored with backend = \"redis\": Redis keeps the state");
        }
        return Ok(Store::redis(redis, source_ids, limits).with_max_records(max_records));
    }
    let Some(dir) = config.store.data_dir.clone() else {
        return Ok(Store::new(source_ids, limits).with_max_records(max_records));
    };
    let ids = source_ids.to_vec();
    let started = std::time::Instant::now();
    // Reading a large snapshot is blocking work.
    let (store, loaded) = tokio::task::spawn_blocking(move || Store::open(&dir, &ids, limits))
        .await
        .map_err(|e| std::io::Error::other(format!("state loading failed: {e}")))??;
    let store = store.with_max_records(max_records);
    tracing::info!(
        data_dir = %store.data_dir().map(|d| d.display().to_string()).unwrap_or_default(),
        records = loaded.records,
        seq = store.changes().last_seq(),
        bytes = loaded.bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "persisted state loaded"
    );
    if loaded.orphans > 0 {
        tracing::warn!(
            records = loaded.orphans,
            "persisted records of sources no longer configured were skipped"
        );
    }
    if max_records > 0 && store.record_count() >= max_records {
        tracing::warn!(
            records = store.record_count(),
            max_records,
            "the persisted state already holds store.max_records records: events of new \
             principals will be refused until it is raised"
        );
    }
    Ok(store)
}

/// The upstream side's small values, kept by the store (which the upstream
/// code does not know).
struct StorePersisted(Arc<Store>);

impl upstream::persist::Persisted for StorePersisted {
    fn load(
        &self,
        key: &str,
    ) -> futures_util::future::BoxFuture<'_, Result<Option<String>, upstream::persist::PersistError>>
    {
        let key = key.to_owned();
        Box::pin(async move {
            self.0
                .meta_get(&key)
                .await
                .map_err(|e| upstream::persist::PersistError::Unavailable(e.to_string()))
        })
    }

    fn save(
        &self,
        key: &str,
        value: Option<String>,
    ) -> futures_util::future::BoxFuture<'_, Result<(), upstream::persist::PersistError>> {
        let key = key.to_owned();
        Box::pin(async move {
            self.0
                .meta_put(&key, value)
                .await
                .map_err(|e| upstream::persist::PersistError::Unavailable(e.to_string()))
        })
    }
}

/// Applies what a socket transport received; when it is not kept (a field
/// too long, the store unavailable or full), it is counted and logged (the
/// transport has no way to ask for a retry).
async fn keep(store: &Store, source: &sources::Source, parsed: &providers::Parsed<'_>, what: &str) {
    match sources::apply(store, source, parsed).await {
        Ok(()) => {}
        Err(sources::ApplyError::TooLong(e)) => {
            source.stats.reject(sources::Rejection::BadPayload);
            tracing::info!(source = %source.id, error = %e, "{what} rejected");
        }
        // The store logs that it is full (at most once a minute).
        Err(sources::ApplyError::Store(e @ presence::StoreError::Full { .. })) => {
            source.stats.reject(sources::Rejection::from(&e));
        }
        Err(sources::ApplyError::Store(e)) => {
            source.stats.reject(sources::Rejection::from(&e));
            tracing::warn!(source = %source.id, error = %e, "{what} not kept: the store is unavailable");
        }
    }
}

/// Runs the daemon on `listener` until `shutdown` is cancelled, then drains:
/// `/readyz` turns 503, the listener closes, in-flight requests get up to
/// `server.shutdown_grace` to finish, and the function returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let sources = Arc::new(Sources::new(&config.sources)?);
    let store = Arc::new(open_store(&config, &sources.ids()).await?);
    // Background work of the store ends with the process, after the
    // streams (it feeds them).
    let store_tasks = CancellationToken::new();
    store.start(&store_tasks);
    // People: the file is read now (a bad one stops the start, as a bad
    // config does), then followed for reloads.
    if let Some(people) = &config.people {
        let ids = sources.ids();
        let file = people.file.clone();
        let people_cfg = people.clone();
        let mapping = tokio::task::spawn_blocking(move || people_cfg.load(&ids, 1))
            .await
            .map_err(|e| RunError::People(e.to_string()))?
            .map_err(|e| RunError::People(format!("{}: {e}", file.display())))?;
        let mapping = Arc::new(mapping);
        // In memory the records are here: the people are in place before
        // the first request. (Redis: once the mirror is loaded, below.)
        if store.redis_handle().is_none() {
            let (store, mapping) = (Arc::clone(&store), Arc::clone(&mapping));
            tokio::task::spawn_blocking(move || store.reconcile_people(&mapping))
                .await
                .map_err(|e| RunError::People(e.to_string()))?;
        }
        let watch = config::people::PeopleWatch::spawn(
            people.clone(),
            sources.ids(),
            mapping,
            store_tasks.clone(),
        );
        people::reload::show_status(&store, &watch);
        tokio::spawn(people::reload::follow(
            Arc::clone(&store),
            watch,
            store_tasks.clone(),
        ));
    }
    // Socket transports hand each message to the source's parser and the
    // store, like a webhook body (the socket's TLS and the API token are its
    // authenticity).
    let deliver = |source: &sources::Source| -> upstream::mitel_ws::Deliver {
        let (sources, store, index) = (Arc::clone(&sources), Arc::clone(&store), source.index);
        Arc::new(move |payload: &[u8]| {
            let (sources, store) = (Arc::clone(&sources), Arc::clone(&store));
            let payload = payload.to_vec();
            Box::pin(async move {
                let Some(source) = sources.by_index(index) else {
                    return;
                };
                let verified = verify::Verified::from_authenticated_transport(&payload);
                match source.parser.parse(verified, providers::Proof::default()) {
                    Ok(parsed) => keep(&store, source, &parsed, "MQTT message").await,
                    Err(e) => {
                        source.stats.reject(sources::Rejection::BadPayload);
                        tracing::info!(source = %source.id, error = %e, "MQTT message rejected");
                    }
                }
            })
        })
    };
    let deliver_presence = |source: &sources::Source| -> upstream::ucwa::DeliverPresence {
        let (sources, store, index) = (Arc::clone(&sources), Arc::clone(&store), source.index);
        Arc::new(move |principal: &str, body: &str| {
            let (sources, store) = (Arc::clone(&sources), Arc::clone(&store));
            let (principal, body) = (principal.to_owned(), body.to_owned());
            Box::pin(async move {
                let Some(source) = sources.by_index(index) else {
                    return;
                };
                // A read returns the current presence: it is as new as the
                // read. (UCWA's `lastActive` is when the user was last
                // active; as `observed_at` it would make later reads look
                // stale.)
                let read_at = presence::Millis::now();
                let update = match &source.parser {
                    providers::Parser::Ucwa(statuses) => {
                        providers::ucwa::presence_update(&principal, &body, statuses, Some(read_at))
                    }
                    providers::Parser::Graph(statuses) => providers::graph::parse_presence(&body)
                        .and_then(|p| {
                            providers::graph::presence_update(
                                std::borrow::Cow::Borrowed(principal.as_str()),
                                &p,
                                statuses,
                                read_at,
                            )
                        }),
                    _ => return,
                };
                match update {
                    Ok(update) => {
                        let parsed = providers::Parsed {
                            updates: vec![update],
                            ..providers::Parsed::default()
                        };
                        keep(&store, source, &parsed, "contact presence").await;
                    }
                    Err(e) => {
                        source.stats.reject(sources::Rejection::BadPayload);
                        tracing::info!(source = %source.id, %principal, error = %e, "contact presence rejected");
                    }
                }
            })
        })
    };
    // With several replicas, one manages each managed source: the holder
    // of its lease. Leases are released only after the managers stopped.
    let lease_shutdown = CancellationToken::new();
    let mut lease_tasks = Vec::new();
    let mut may_manage = std::collections::HashMap::new();
    if let Some(redis) = store.redis_handle() {
        let mut leases = Vec::new();
        for source_config in config.sources.iter().filter(|c| c.managed.is_some()) {
            let Some(source) = sources.get(&source_config.id) else {
                continue;
            };
            let (task, lease) = cluster::lease::Lease::spawn(
                redis.clone(),
                &source_config.id,
                &config.server.replica_id,
                config.store.redis.lease_ttl,
                lease_shutdown.clone(),
            );
            lease_tasks.push(task);
            let _ = source.lease.set(lease.clone());
            leases.push((source_config.id.as_str(), lease));
        }
        // The managers start knowing whether they manage: the first claim
        // decides (at once while Redis answers). Otherwise a replica about
        // to take the lease would report ready while following, before it
        // has adopted anything.
        let first_claims = leases.iter().map(|(_, lease)| {
            let mut lease = lease.clone();
            async move {
                let _ = lease.changed().await;
            }
        });
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            futures_util::future::join_all(first_claims),
        )
        .await;
        for (id, mut lease) in leases {
            let (held_tx, held_rx) =
                tokio::sync::watch::channel(lease.borrow_and_update().held_here);
            tokio::spawn(async move {
                loop {
                    let held = lease.borrow_and_update().held_here;
                    held_tx.send_if_modified(|h| std::mem::replace(h, held) != held);
                    if lease.changed().await.is_err() {
                        held_tx.send_replace(false);
                        return;
                    }
                }
            });
            may_manage.insert(id, held_rx);
        }
    }
    let spawned = {
        let delivery = upstream::Delivery {
            envelopes: &deliver,
            presence: &deliver_presence,
        };
        // Subscription ids and refresh tokens live where the store keeps
        // its state (nowhere, data_dir or Redis).
        let persisted: Arc<dyn upstream::persist::Persisted> =
            Arc::new(StorePersisted(Arc::clone(&store)));
        upstream::spawn_managers(
            &sources,
            &config.sources,
            &delivery,
            &shutdown,
            persisted,
            &may_manage,
        )?
    };
    let mut managers = spawned.tasks;
    let mut startup = spawned.ready;
    let global = Arc::new(GlobalStats::default());
    let state = AppState::new(StateParts {
        sources,
        store,
        global: Arc::clone(&global),
        consumer_tokens: config.consumers.tokens.clone(),
        max_in_flight: config.server.max_in_flight,
        body_limit: config.server.body_limit_bytes,
        body_timeout: config.server.body_timeout,
        max_requests_per_client: config.server.max_requests_per_client,
        trusted_proxies: config.server.trusted_proxies.clone(),
        stream_opens: http::opens::OpenLimit {
            burst: config.consumers.stream_open_burst,
            per_minute: config.consumers.stream_opens_per_minute,
        },
    });
    if config.consumers.tokens.is_empty() {
        tracing::warn!("consumers.tokens is empty: the /v1 API is open to anyone who can reach it");
    }
    if config.sources.is_empty() {
        tracing::warn!("no [[sources]] configured: every webhook will be answered 404");
    }

    let app = http::router(state.clone());
    let local = listener.local_addr()?;
    let draining = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            state.set_ready(false);
            // Streams end: they need not be waited for.
            state.store().changes().close();
            tracing::info!("shutdown requested: draining");
        }
    };
    let listener =
        http::listener::GuardedListener::new(listener, config.server.write_timeout, global);
    let limits = http::server::Limits {
        max_connections: http::server::fit_connections_to_fd_limit(config.server.max_connections),
        header_read_timeout: config.server.header_read_timeout,
        max_header_bytes: config.server.max_header_bytes,
    };
    let server = http::server::serve(listener, app, limits, draining);
    // Ready once every managed subscription has been adopted or created (or
    // has failed visibly) and every source that fills the store at start-up
    // has done so.
    if startup.is_empty() {
        state.set_ready(true);
    } else {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            for ready in &mut startup {
                tokio::select! {
                    result = ready.wait_for(|done| *done) => if result.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
            }
            if !shutdown.is_cancelled() {
                state.set_ready(true);
                // Shutdown may have begun (and the drain set it false)
                // between the check and the set.
                if shutdown.is_cancelled() {
                    state.set_ready(false);
                }
            }
        });
    }
    tracing::info!(
        addr = %local,
        sources = config.sources.len(),
        "presence-gateway listening"
    );

    let grace = config.server.shutdown_grace;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(deadline);
    let out_of_time = tokio::select! {
        () = server => false,
        () = &mut deadline => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over with requests still in flight; stopping");
            true
        }
    };
    // WebSocket streams send their close frames, then managers delete their
    // subscriptions (when configured), within what is left of the grace
    // period.
    if !out_of_time {
        state.detached().close();
        tokio::select! {
            () = state.detached().wait() => {}
            () = &mut deadline => {
                tracing::warn!("grace period over before every WebSocket stream closed; stopping");
            }
        }
    }
    if !out_of_time {
        let managers_done = async {
            for task in &mut managers {
                let _ = task.await;
            }
        };
        tokio::select! {
            () = managers_done => {}
            () = &mut deadline => {
                tracing::warn!("grace period over before every subscription was cleaned up; stopping");
            }
        }
    }
    for task in &managers {
        task.abort();
    }
    // Everything acknowledged is written and synced before the process
    // exits.
    // Only now may another replica take over what this one managed.
    lease_shutdown.cancel();
    for task in lease_tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    store_tasks.cancel();
    let store = state.store_arc();
    if let Err(e) = tokio::task::spawn_blocking(move || store.close()).await {
        tracing::error!(error = %e, "could not close the store");
    }
    tracing::info!("stopped");
    Ok(())
}
