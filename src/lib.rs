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
    let store = Arc::new(Store::new(
        &sources.ids(),
        StoreLimits {
            history: config.store.history,
            dedup_window_ms: i64::try_from(config.store.dedup_window.as_millis())
                .unwrap_or(i64::MAX),
            dedup_capacity: config.store.dedup_capacity,
            stream_buffer: config.consumers.stream_buffer,
        },
    ));
    // Socket transports hand each message to the source's parser and the
    // store, like a webhook body (the socket's TLS and the API token are its
    // authenticity).
    let deliver = |source: &sources::Source| -> upstream::mitel_ws::Deliver {
        let (sources, store, index) = (Arc::clone(&sources), Arc::clone(&store), source.index);
        Arc::new(move |payload: &[u8]| {
            let Some(source) = sources.by_index(index) else {
                return;
            };
            let verified = verify::Verified::from_authenticated_transport(payload);
            match source.parser.parse(verified, None) {
                Ok(parsed) => sources::apply(&store, source, &parsed),
                Err(e) => {
                    source.stats.reject(sources::Rejection::BadPayload);
                    tracing::info!(source = %source.id, error = %e, "MQTT message rejected");
                }
            }
        })
    };
    let deliver_presence = |source: &sources::Source| -> upstream::ucwa::DeliverPresence {
        let (sources, store, index) = (Arc::clone(&sources), Arc::clone(&store), source.index);
        Arc::new(move |principal: &str, body: &str| {
            let Some(source) = sources.by_index(index) else {
                return;
            };
            let providers::Parser::Ucwa(statuses) = &source.parser else {
                return;
            };
            // A GET returns the contact's current presence: it is as new as
            // the read. (`lastActive` is when the user was last active; as
            // `observed_at` it would make later reads look stale.)
            let read_at = Some(presence::Millis::now());
            match providers::ucwa::presence_update(principal, body, statuses, read_at) {
                Ok(update) => {
                    let parsed = providers::Parsed {
                        updates: vec![update],
                        ..providers::Parsed::default()
                    };
                    sources::apply(&store, source, &parsed);
                }
                Err(e) => {
                    source.stats.reject(sources::Rejection::BadPayload);
                    tracing::info!(source = %source.id, %principal, error = %e, "contact presence rejected");
                }
            }
        })
    };
    let spawned = {
        let delivery = upstream::Delivery {
            envelopes: &deliver,
            presence: &deliver_presence,
        };
        upstream::spawn_managers(&sources, &config.sources, &delivery, &shutdown)?
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
        trusted_proxies: config.server.trusted_proxies.clone(),
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
    let server = http::server::serve(listener, app, draining);
    // Ready once every source that fills the store at start-up has done so.
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
    tracing::info!("stopped");
    Ok(())
}
