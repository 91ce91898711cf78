//! The upstream side: the HTTP client, access tokens, and the life of the
//! subscriptions the gateway manages at providers.
//!
//! The upstream code knows nothing of the store: it keeps subscriptions
//! alive and tells the source's verifier which ids to accept.

pub mod manager;
pub mod netsapiens;
pub mod schedule;
pub mod token;

use std::sync::Once;
use std::time::Duration;

use manager::UpstreamError;

/// Connect timeout of upstream calls.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of upstream calls.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The client for provider APIs: rustls (ring), connect and request
/// timeouts, no redirects to other hosts' credentials (bearer headers are
/// dropped on cross-origin redirects by reqwest).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only when another provider was installed first, which is
        // just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("presence-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
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
