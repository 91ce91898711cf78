//! Access tokens for upstream API calls: a static bearer (an API key), or an
//! OAuth grant (password, client credentials, refresh token) whose token is
//! refreshed before it expires and again when the API answers 401.

use serde::Deserialize;
use tokio::sync::Mutex;

use super::manager::UpstreamError;
use crate::config::Secret;

/// Refresh this long before a token's `expires_in` runs out.
const REFRESH_MARGIN_MS: i64 = 60_000;

/// An OAuth grant: the form posted to the token endpoint.
#[derive(Debug)]
pub struct Grant {
    pub token_url: String,
    /// `grant_type` and the credentials it needs, form-encoded in order.
    pub form: Vec<(&'static str, Secret)>,
}

/// Where a source's bearer token comes from.
#[derive(Debug)]
pub enum TokenSource {
    Static(Secret),
    Oauth {
        grant: Grant,
        /// The current token and when to stop using it (epoch ms). Held
        /// while a new token is fetched, so concurrent callers (one manager
        /// per subscription) wait for that one instead of fetching their own.
        cached: Mutex<Option<(Secret, i64)>>,
    },
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<i64>,
}

impl TokenSource {
    /// A token source for an OAuth grant.
    pub fn oauth(grant: Grant) -> Self {
        TokenSource::Oauth {
            grant,
            cached: Mutex::new(None),
        }
    }

    /// A valid token, fetching a new one when needed; `now_ms` is the time.
    pub async fn token(
        &self,
        client: &reqwest::Client,
        now_ms: i64,
    ) -> Result<Secret, UpstreamError> {
        let (grant, cached) = match self {
            TokenSource::Static(token) => return Ok(token.clone()),
            TokenSource::Oauth { grant, cached } => (grant, cached),
        };
        let mut cached = cached.lock().await;
        if let Some((token, until)) = &*cached
            && now_ms < *until
        {
            return Ok(token.clone());
        }
        let form: Vec<(&str, String)> = grant
            .form
            .iter()
            .map(|(k, v)| (*k, String::from_utf8_lossy(v.expose()).into_owned()))
            .collect();
        let response = client
            .post(&grant.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| super::transport_error("token request", &e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after_ms = super::retry_after(&response);
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                UpstreamError::Transient {
                    message: format!("token endpoint answered {status}"),
                    retry_after_ms,
                }
            } else {
                UpstreamError::Rejected(format!("token endpoint answered {status}"))
            });
        }
        let answer: TokenAnswer = response.json().await.map_err(|_| {
            UpstreamError::Rejected("token endpoint answered without an access_token".into())
        })?;
        // A day at most: a bogus `expires_in` must not keep a token forever
        // (or overflow).
        let lifetime_ms = answer.expires_in.unwrap_or(3600).clamp(1, 86_400) * 1000;
        let until = now_ms.saturating_add((lifetime_ms - REFRESH_MARGIN_MS).max(lifetime_ms / 2));
        let token = Secret::new(answer.access_token);
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Forgets `rejected` (after a 401) so the next call fetches a new
    /// token; a token another caller has already replaced stays.
    pub async fn invalidate(&self, rejected: &Secret) {
        if let TokenSource::Oauth { cached, .. } = self {
            let mut cached = cached.lock().await;
            if cached.as_ref().is_some_and(|(token, _)| token == rejected) {
                *cached = None;
            }
        }
    }
}
