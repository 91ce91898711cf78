//! The upstream side: the HTTP client, access tokens, and the life of the
//! subscriptions the gateway manages at providers.
//!
//! The upstream code knows nothing of the store: it keeps subscriptions
//! alive and tells the source's verifier which ids to accept.

pub mod manager;
pub mod netsapiens;
pub mod schedule;
pub mod token;

use std::sync::{Arc, Once};
use std::time::Duration;

use manager::{Clock, IdSink, Settings, UpstreamError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Auth, SourceConfig};
use crate::sources::{Sources, Verifier};
use schedule::{Backoff, Timing};
use token::{Grant, TokenSource};

/// Connect timeout of upstream calls.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of upstream calls.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The client for provider APIs: rustls (ring), connect and request
/// timeouts, no redirects to other hosts' credentials (bearer headers are
/// dropped on cross-origin redirects by reqwest).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("presence-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Starts a manager for every subscription the configured sources ask the
/// gateway to keep; they stop (deleting their subscriptions when so
/// configured) when `shutdown` is cancelled.
pub fn spawn_managers(
    sources: &Sources,
    configs: &[SourceConfig],
    shutdown: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, reqwest::Error> {
    let mut tasks = Vec::new();
    let clock = Clock::new();
    let mut client = None;
    for config in configs {
        let (Some(managed), Some(source)) = (&config.managed, sources.get(&config.id)) else {
            continue;
        };
        let Verifier::Correlation { ids, .. } = &source.verifier else {
            continue;
        };
        let client = match &client {
            Some(c) => reqwest::Client::clone(c),
            None => client.insert(http_client()?).clone(),
        };
        let token = Arc::new(match &managed.auth {
            Auth::Bearer(token) => TokenSource::Static(token.clone()),
            Auth::Grant { token_url, form } => TokenSource::oauth(Grant {
                token_url: token_url.clone(),
                form: form.clone(),
            }),
        });
        if managed.lifetime < Duration::from_secs(60) {
            tracing::warn!(source = %config.id, lifetime_secs = managed.lifetime.as_secs(), "very short subscription lifetime (meant for tests)");
        }
        for (model, name) in managed.models.iter().zip(&managed.model_names) {
            let upstream = netsapiens::NetSapiens {
                client: client.clone(),
                api_base: managed.api_base.clone(),
                token: Arc::clone(&token),
                request: netsapiens::Request {
                    model: name.clone(),
                    post_url: managed.callback_url.clone(),
                    reseller: managed.reseller.clone(),
                    domain: managed.domain.clone(),
                    user: managed.user.clone(),
                    geo_support: managed.geo_support,
                    preferred_server: managed.preferred_server.clone(),
                },
                clock,
            };
            let sink: Arc<dyn IdSink> = Arc::new(netsapiens::CorrelationSink {
                ids: Arc::clone(ids),
                model: *model,
            });
            let slot = source.subscriptions.add(name);
            let settings = Settings {
                timing: Timing {
                    lifetime_ms: millis(managed.lifetime),
                    renew_before_ms: millis(managed.renew_before),
                },
                backoff: Backoff::new(millis(managed.retry_initial), millis(managed.retry_max)),
                delete_on_shutdown: managed.delete_on_shutdown,
                secret_ids: true,
            };
            let span = tracing::info_span!("subscription", source = %config.id, model = %name);
            let task = manager::run(
                upstream,
                sink,
                Arc::clone(&source.subscriptions),
                slot,
                settings,
                clock,
                shutdown.clone(),
            );
            tasks.push(tokio::spawn(tracing::Instrument::instrument(task, span)));
        }
    }
    Ok(tasks)
}

fn millis(d: Duration) -> i64 {
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
