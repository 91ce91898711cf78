//! Access tokens for upstream API calls: a static bearer (an API key), or an
//! OAuth grant (password, client credentials, refresh token) whose token is
//! refreshed before it expires and again when the API answers 401.
//!
//! Refresh-token grant: when the token endpoint answers with a new
//! `refresh_token`, it replaces the one posted next (providers that rotate
//! refresh tokens invalidate the old one), and is persisted under
//! `token/{source_id}` together with the SHA-256 of the configured token. At
//! start-up the persisted token is used only when that digest matches the
//! token configured now, so an operator who puts a new token in the config
//! wins. Tokens stay in [`Secret`]s: never in logs or errors.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::Mutex;

use super::manager::UpstreamError;
use super::persist::{Persisted, SavedToken, sha256_hex};
use crate::config::Secret;

/// Refresh this long before a token's `expires_in` runs out.
const REFRESH_MARGIN_MS: i64 = 60_000;

/// A rotated refresh token whose write failed is written again at the next
/// token request, at most this often (ms).
const SAVE_RETRY_MS: i64 = 5_000;

/// An OAuth grant: the form posted to the token endpoint.
#[derive(Debug)]
pub struct Grant {
    pub token_url: String,
    /// `grant_type` and the credentials it needs, form-encoded in order.
    pub form: Vec<(&'static str, Secret)>,
}

impl Grant {
    /// The configured refresh token, for a refresh-token grant.
    fn configured_refresh_token(&self) -> Option<&Secret> {
        let field = |name: &str| self.form.iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        let grant_type = field("grant_type")?;
        (grant_type.expose() == b"refresh_token")
            .then(|| field("refresh_token"))
            .flatten()
    }
}

/// Where a rotated refresh token is kept.
pub struct TokenStore {
    pub persisted: Arc<dyn Persisted>,
    /// [`super::persist::token_key`] of the source.
    pub key: String,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("key", &self.key)
            .finish()
    }
}

/// Where a source's bearer token comes from.
#[derive(Debug)]
pub enum TokenSource {
    Static(Secret),
    Oauth {
        grant: Grant,
        /// Keeps rotated refresh tokens (refresh-token grants only).
        store: Option<TokenStore>,
        /// The current token and the refresh token to post next. Held
        /// while a new token is fetched, so concurrent callers (one manager
        /// per subscription) wait for that one instead of fetching their own.
        cached: Mutex<Cache>,
    },
}

/// The mutable part of an OAuth token source.
#[derive(Debug, Default)]
pub struct Cache {
    /// The access token and when to stop using it (epoch ms).
    token: Option<(Secret, i64)>,
    /// The refresh token to post instead of the configured one (rotated,
    /// or read back from the store).
    refresh: Option<Secret>,
    /// The persisted refresh token was read (or superseded by a rotation).
    loaded: bool,
    /// A rotated refresh token not yet written, and when to try again.
    unsaved: Option<i64>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<String>,
}

impl TokenSource {
    /// A token source for an OAuth grant.
    pub fn oauth(grant: Grant) -> Self {
        TokenSource::Oauth {
            grant,
            store: None,
            cached: Mutex::new(Cache::default()),
        }
    }

    /// A token source for an OAuth grant whose rotated refresh tokens are
    /// kept in `store` (only refresh-token grants use it).
    pub fn oauth_persisted(grant: Grant, store: TokenStore) -> Self {
        let store = grant.configured_refresh_token().is_some().then_some(store);
        TokenSource::Oauth {
            grant,
            store,
            cached: Mutex::new(Cache::default()),
        }
    }

    /// A valid token, fetching a new one when needed; `now_ms` is the time.
    pub async fn token(
        &self,
        client: &reqwest::Client,
        now_ms: i64,
    ) -> Result<Secret, UpstreamError> {
        let (grant, store, cached) = match self {
            TokenSource::Static(token) => return Ok(token.clone()),
            TokenSource::Oauth {
                grant,
                store,
                cached,
            } => (grant, store.as_ref(), cached),
        };
        let mut cache = cached.lock().await;
        if let Some(store) = store
            && cache.unsaved.is_some_and(|at| at <= now_ms)
        {
            save(store, grant, &mut cache, now_ms).await;
        }
        if let Some((token, until)) = &cache.token
            && now_ms < *until
        {
            return Ok(token.clone());
        }
        // Read before every refresh, not only the first: with a shared store
        // another replica may have rotated the token since (it managed the
        // source before this one). A rotation of our own not yet saved wins.
        if let Some(store) = store
            && (!cache.loaded || cache.unsaved.is_none())
        {
            load(store, grant, &mut cache).await;
        }
        let form: Vec<(&str, String)> = grant
            .form
            .iter()
            .map(|(k, v)| {
                let v = match (*k, &cache.refresh) {
                    ("refresh_token", Some(rotated)) => rotated,
                    _ => v,
                };
                (*k, String::from_utf8_lossy(v.expose()).into_owned())
            })
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
        let body = super::read_limited(response, super::MAX_TOKEN_ANSWER, "token answer").await?;
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::Rejected("token endpoint answered without an access_token".into())
        })?;
        // A day at most: a bogus `expires_in` must not keep a token forever
        // (or overflow).
        let lifetime_ms = answer.expires_in.unwrap_or(3600).clamp(1, 86_400) * 1000;
        let until = now_ms.saturating_add((lifetime_ms - REFRESH_MARGIN_MS).max(lifetime_ms / 2));
        let token = Secret::new(answer.access_token);
        cache.token = Some((token.clone(), until));
        let rotated = answer.refresh_token.filter(|r| !r.is_empty());
        if let (Some(rotated), Some(_)) = (rotated, grant.configured_refresh_token()) {
            let rotated = Secret::new(rotated);
            if cache.refresh.as_ref() != Some(&rotated) {
                cache.refresh = Some(rotated);
                cache.loaded = true;
                if let Some(store) = store {
                    save(store, grant, &mut cache, now_ms).await;
                }
            }
        }
        Ok(token)
    }

    /// Forgets `rejected` (after a 401) so the next call fetches a new
    /// token; a token another caller has already replaced stays.
    pub async fn invalidate(&self, rejected: &Secret) {
        if let TokenSource::Oauth { cached, .. } = self {
            let mut cache = cached.lock().await;
            if cache
                .token
                .as_ref()
                .is_some_and(|(token, _)| token == rejected)
            {
                cache.token = None;
            }
        }
    }
}

/// Reads the persisted refresh token; it replaces the configured one when
/// it was rotated from the token configured now. A failed read is tried
/// again at the next token request.
async fn load(store: &TokenStore, grant: &Grant, cache: &mut Cache) {
    let Some(configured) = grant.configured_refresh_token() else {
        cache.loaded = true;
        return;
    };
    let text = match store.persisted.load(&store.key).await {
        Ok(text) => text,
        Err(error) => {
            tracing::warn!(%error, "could not read the persisted refresh token; using the configured one");
            return;
        }
    };
    cache.loaded = true;
    let Some(text) = text else { return };
    match SavedToken::from_json(&text) {
        Some(saved) if saved.configured == sha256_hex(configured.expose()) => {
            let saved = Secret::new(saved.refresh_token);
            if cache.refresh.as_ref() != Some(&saved) {
                tracing::info!("using the rotated refresh token persisted for the configured one");
                cache.refresh = Some(saved);
            }
        }
        Some(_) => {
            tracing::info!(
                "the configured refresh token changed since the persisted one was rotated from it; using the configured one"
            );
        }
        None => tracing::warn!("the persisted refresh token is unreadable; ignoring it"),
    }
}

/// Writes the current rotated refresh token; a failure is logged and the
/// write tried again later (the token in memory is used meanwhile).
async fn save(store: &TokenStore, grant: &Grant, cache: &mut Cache, now_ms: i64) {
    let (Some(configured), Some(refresh)) = (grant.configured_refresh_token(), &cache.refresh)
    else {
        cache.unsaved = None;
        return;
    };
    let saved = SavedToken {
        configured: sha256_hex(configured.expose()),
        refresh_token: String::from_utf8_lossy(refresh.expose()).into_owned(),
    };
    match store
        .persisted
        .save(&store.key, Some(saved.to_json()))
        .await
    {
        Ok(()) => cache.unsaved = None,
        Err(error) => {
            cache.unsaved = Some(now_ms.saturating_add(SAVE_RETRY_MS));
            tracing::warn!(%error, "could not persist the rotated refresh token; keeping it in memory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::persist::MemoryPersisted;

    /// A token endpoint on loopback that rotates refresh tokens: the n-th
    /// answer carries access token `a{n}` and refresh token `r{n+1}`.
    #[derive(Clone, Default)]
    struct Endpoint {
        posted: Arc<parking_lot::Mutex<Vec<String>>>,
    }

    async fn token_endpoint(
        axum::extract::State(e): axum::extract::State<Endpoint>,
        body: String,
    ) -> axum::Json<serde_json::Value> {
        let refresh = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let mut posted = e.posted.lock();
        posted.push(refresh);
        let n = posted.len();
        axum::Json(serde_json::json!({
            "access_token": format!("a{n}"),
            "expires_in": 3600,
            "refresh_token": format!("r{}", n + 1),
        }))
    }

    async fn start_endpoint() -> (Endpoint, String) {
        let endpoint = Endpoint::default();
        let app = axum::Router::new()
            .route("/token", axum::routing::post(token_endpoint))
            .with_state(endpoint.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (endpoint, url)
    }

    const KEY: &str = "token/ucwa";
    /// Later than any token's `until`: forces a refresh.
    const LATER: i64 = 100 * 86_400_000;

    fn source(url: &str, configured: &str, store: &Arc<MemoryPersisted>) -> TokenSource {
        let grant = Grant {
            token_url: url.to_owned(),
            form: vec![
                ("grant_type", Secret::new("refresh_token")),
                ("refresh_token", Secret::new(configured)),
                ("client_id", Secret::new("gw")),
            ],
        };
        TokenSource::oauth_persisted(
            grant,
            TokenStore {
                persisted: Arc::clone(store) as Arc<dyn Persisted>,
                key: KEY.into(),
            },
        )
    }

    fn persisted_token(store: &MemoryPersisted) -> Option<(String, String)> {
        let saved = SavedToken::from_json(&store.get(KEY)?)?;
        Some((saved.configured, saved.refresh_token))
    }

    fn token_text(token: &Secret) -> String {
        String::from_utf8_lossy(token.expose()).into_owned()
    }

    /// Two replicas on one shared store: the one that manages the source
    /// second uses the token the first one rotated to, not its own stale
    /// copy.
    #[tokio::test]
    async fn a_token_another_replica_rotated_is_used_at_the_next_refresh() {
        let (endpoint, url) = start_endpoint().await;
        let store = Arc::new(MemoryPersisted::default());
        let (a, b) = (source(&url, "r1", &store), source(&url, "r1", &store));
        let client = super::super::http_client().unwrap();
        b.token(&client, 0).await.unwrap(); // b: r1 → r2
        a.token(&client, 0).await.unwrap(); // a reads r2 → r3
        b.token(&client, LATER).await.unwrap(); // b must post r3, not r2
        assert_eq!(*endpoint.posted.lock(), ["r1", "r2", "r3"]);
        assert_eq!(persisted_token(&store).map(|t| t.1).as_deref(), Some("r4"));
    }

    #[tokio::test]
    async fn a_rotated_refresh_token_replaces_the_configured_one_and_is_persisted() {
        let (endpoint, url) = start_endpoint().await;
        let store = Arc::new(MemoryPersisted::default());
        let tokens = source(&url, "r1", &store);
        let client = super::super::http_client().unwrap();

        let first = tokens.token(&client, 0).await.unwrap();
        assert_eq!(token_text(&first), "a1");
        assert_eq!(
            persisted_token(&store),
            Some((sha256_hex(b"r1"), "r2".into())),
            "the digest names the configured token it was rotated from"
        );
        // Cached until it runs out; the next refresh posts the rotated one.
        tokens.token(&client, 1_000).await.unwrap();
        tokens.token(&client, LATER).await.unwrap();
        // So does a refresh after a 401.
        let third = {
            let second = tokens.token(&client, LATER).await.unwrap();
            tokens.invalidate(&second).await;
            tokens.token(&client, LATER).await.unwrap()
        };
        assert_eq!(token_text(&third), "a3");
        assert_eq!(*endpoint.posted.lock(), ["r1", "r2", "r3"]);
        assert_eq!(
            persisted_token(&store),
            Some((sha256_hex(b"r1"), "r4".into()))
        );
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("r4") && !shown.contains("a3"), "{shown}");
    }

    #[tokio::test]
    async fn a_persisted_refresh_token_is_used_only_for_the_configured_token_it_came_from() {
        let (endpoint, url) = start_endpoint().await;
        let client = super::super::http_client().unwrap();
        let saved = |configured: &[u8]| {
            SavedToken {
                configured: sha256_hex(configured),
                refresh_token: "r7".into(),
            }
            .to_json()
        };

        // Rotated from the token configured now: used.
        let store = Arc::new(MemoryPersisted::default());
        store.put(KEY, Some(saved(b"r1")));
        source(&url, "r1", &store).token(&client, 0).await.unwrap();
        // Rotated from another one: the operator put a new token in the
        // config, which wins.
        let store = Arc::new(MemoryPersisted::default());
        store.put(KEY, Some(saved(b"r0")));
        source(&url, "r1", &store).token(&client, 0).await.unwrap();
        assert_eq!(*endpoint.posted.lock(), ["r7", "r1"]);
        assert_eq!(
            persisted_token(&store),
            Some((sha256_hex(b"r1"), "r3".into()))
        );
    }

    #[tokio::test]
    async fn a_failing_store_keeps_the_rotated_token_in_memory_and_retries_the_write() {
        let (endpoint, url) = start_endpoint().await;
        let client = super::super::http_client().unwrap();
        let store = Arc::new(MemoryPersisted::default());
        store.fail(true);
        let tokens = source(&url, "r1", &store);
        tokens.token(&client, 0).await.unwrap();
        store.fail(false);
        assert_eq!(persisted_token(&store), None);
        tokens.token(&client, 1_000).await.unwrap();
        assert_eq!(persisted_token(&store), None, "not retried at once");
        tokens.token(&client, SAVE_RETRY_MS).await.unwrap();
        assert_eq!(
            persisted_token(&store),
            Some((sha256_hex(b"r1"), "r2".into()))
        );
        tokens.token(&client, LATER).await.unwrap();
        assert_eq!(*endpoint.posted.lock(), ["r1", "r2"]);
    }

    #[tokio::test]
    async fn other_grants_neither_rotate_nor_persist() {
        let (endpoint, url) = start_endpoint().await;
        let client = super::super::http_client().unwrap();
        let store = Arc::new(MemoryPersisted::default());
        let grant = Grant {
            token_url: url,
            form: vec![
                ("grant_type", Secret::new("password")),
                ("username", Secret::new("u")),
                ("password", Secret::new("p")),
            ],
        };
        let tokens = TokenSource::oauth_persisted(
            grant,
            TokenStore {
                persisted: Arc::clone(&store) as Arc<dyn Persisted>,
                key: KEY.into(),
            },
        );
        tokens.token(&client, 0).await.unwrap();
        tokens.token(&client, LATER).await.unwrap();
        assert_eq!(endpoint.posted.lock().len(), 2);
        assert_eq!(store.get(KEY), None);
    }
}
