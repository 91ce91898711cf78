//! Access tokens for upstream API calls: a static bearer (an API key), or an
//! OAuth password grant that is refreshed before it expires and again when
//! the API answers 401.

use serde::Deserialize;
use tokio::sync::Mutex;

use super::manager::UpstreamError;
use crate::config::Secret;

/// Refresh this long before a token's `expires_in` runs out.
const REFRESH_MARGIN_MS: i64 = 60_000;

/// Credentials for the OAuth password grant.
#[derive(Debug)]
pub struct PasswordGrant {
    pub token_url: String,
    pub client_id: Secret,
    pub client_secret: Secret,
    pub username: Secret,
    pub password: Secret,
}

/// Where a source's bearer token comes from.
#[derive(Debug)]
pub enum TokenSource {
    Static(Secret),
    Password {
        grant: PasswordGrant,
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
    /// A token source for the password grant.
    pub fn password(grant: PasswordGrant) -> Self {
        TokenSource::Password {
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
            TokenSource::Password { grant, cached } => (grant, cached),
        };
        let mut cached = cached.lock().await;
        if let Some((token, until)) = &*cached {
            if now_ms < *until {
                return Ok(token.clone());
            }
        }
        let text = |s: &Secret| String::from_utf8_lossy(s.expose()).into_owned();
        let form = [
            ("grant_type", "password".to_owned()),
            ("client_id", text(&grant.client_id)),
            ("client_secret", text(&grant.client_secret)),
            ("username", text(&grant.username)),
            ("password", text(&grant.password)),
        ];
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
        let lifetime_ms = answer.expires_in.unwrap_or(3600).max(1) * 1000;
        let until = now_ms + (lifetime_ms - REFRESH_MARGIN_MS).max(lifetime_ms / 2);
        let token = Secret::new(answer.access_token);
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Forgets `rejected` (after a 401) so the next call fetches a new
    /// token; a token another caller has already replaced stays.
    pub async fn invalidate(&self, rejected: &Secret) {
        if let TokenSource::Password { cached, .. } = self {
            let mut cached = cached.lock().await;
            if cached.as_ref().is_some_and(|(token, _)| token == rejected) {
                *cached = None;
            }
        }
    }
}
