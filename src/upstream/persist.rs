//! The seam between the upstream side and whatever store runs: a few small
//! values (the id and expiry of each managed subscription, rotated refresh
//! tokens) that must survive a restart and, with a shared store, be seen by
//! every replica.
//!
//! The upstream code knows nothing of the store: it reads and writes these
//! values through [`Persisted`], under the keys built here, as JSON text.
//! The store backend decides where they live (a file under `data_dir`,
//! Redis, or nowhere: [`Ephemeral`]). Values hold secrets (NetSapiens
//! correlation ids, refresh tokens): nothing here logs or formats them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Small durable state of the upstream side (subscription ids and expiry,
/// rotated refresh tokens), kept by whichever store runs.
pub trait Persisted: Send + Sync + 'static {
    /// The value under `key`, if any.
    fn load(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, PersistError>>;
    /// Writes `value` under `key`; `None` deletes the key.
    fn save(&self, key: &str, value: Option<String>) -> BoxFuture<'_, Result<(), PersistError>>;
}

/// Why a value could not be read or written. Callers log it and carry on
/// with what they hold in memory.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// Nothing persists (memory store without `data_dir`).
pub struct Ephemeral;

impl Persisted for Ephemeral {
    fn load(&self, _: &str) -> BoxFuture<'_, Result<Option<String>, PersistError>> {
        Box::pin(async { Ok(None) })
    }

    fn save(&self, _: &str, _: Option<String>) -> BoxFuture<'_, Result<(), PersistError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Values in a map, for tests (of this crate and of store backends that
/// want a reference behaviour). [`MemoryPersisted::fail`] makes every call
/// fail until it is switched off again.
#[derive(Default)]
pub struct MemoryPersisted {
    values: Mutex<HashMap<String, String>>,
    failing: AtomicBool,
}

impl MemoryPersisted {
    /// The value under `key` (without going through the trait).
    pub fn get(&self, key: &str) -> Option<String> {
        self.values.lock().get(key).cloned()
    }

    /// Sets or deletes a value (without going through the trait).
    pub fn put(&self, key: &str, value: Option<String>) {
        let mut values = self.values.lock();
        match value {
            Some(value) => values.insert(key.to_owned(), value),
            None => values.remove(key),
        };
    }

    /// While `failing`, every load and save answers `Unavailable`.
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), PersistError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(PersistError::Unavailable(
                "switched off for the test".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Persisted for MemoryPersisted {
    fn load(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, PersistError>> {
        let result = self.check().map(|()| self.get(key));
        Box::pin(async move { result })
    }

    fn save(&self, key: &str, value: Option<String>) -> BoxFuture<'_, Result<(), PersistError>> {
        let result = self.check().map(|()| self.put(key, value));
        Box::pin(async move { result })
    }
}

/// The key of a managed subscription: `sub/{source_id}/{kind}`, where kind
/// is what `/v1/sources` shows (the NetSapiens model; Mitel `presence`,
/// `presence {principal}` or `media`).
pub fn subscription_key(source_id: &str, kind: &str) -> String {
    format!("sub/{source_id}/{kind}")
}

/// The key of a source's rotated refresh token: `token/{source_id}`.
pub fn token_key(source_id: &str) -> String {
    format!("token/{source_id}")
}

/// The persisted form of a managed subscription:
/// `{"id": "...", "expires_at": <epoch ms or null>}`.
///
/// No `Debug`: the id is a secret for NetSapiens (a correlation id).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSubscription {
    pub id: String,
    pub expires_at: Option<i64>,
}

impl SavedSubscription {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for text that is not such a value (a value from another
    /// version, or damaged): treated as nothing persisted.
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str::<Self>(text)
            .ok()
            .filter(|s| !s.id.is_empty())
    }
}

/// The persisted form of a rotated refresh token:
/// `{"configured": "<sha256 hex of the configured refresh token>",
/// "refresh_token": "..."}`. The digest says which configured token the
/// rotation started from, so that a new token put in the config wins.
///
/// No `Debug`: it holds a refresh token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedToken {
    pub configured: String,
    pub refresh_token: String,
}

impl SavedToken {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str::<Self>(text)
            .ok()
            .filter(|s| !s.refresh_token.is_empty())
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ephemeral_keeps_nothing_and_memory_keeps_until_deleted() {
        Ephemeral.save("k", Some("v".into())).await.unwrap();
        assert_eq!(Ephemeral.load("k").await.unwrap(), None);

        let m = MemoryPersisted::default();
        m.save("k", Some("v".into())).await.unwrap();
        assert_eq!(m.load("k").await.unwrap().as_deref(), Some("v"));
        m.fail(true);
        assert!(m.load("k").await.is_err());
        assert!(m.save("k", None).await.is_err());
        m.fail(false);
        m.save("k", None).await.unwrap();
        assert_eq!(m.load("k").await.unwrap(), None);
    }

    #[test]
    fn values_have_the_documented_json_shape() {
        let s = SavedSubscription {
            id: "sub-1".into(),
            expires_at: Some(1_700_000_000_000),
        };
        assert_eq!(s.to_json(), r#"{"id":"sub-1","expires_at":1700000000000}"#);
        assert!(SavedSubscription::from_json(r#"{"id":"x","expires_at":null}"#).is_some());
        assert!(SavedSubscription::from_json(r#"{"id":""}"#).is_none());
        assert!(SavedSubscription::from_json("garbage").is_none());
        let t = SavedToken {
            configured: sha256_hex(b"r1"),
            refresh_token: "r2".into(),
        };
        let back = SavedToken::from_json(&t.to_json()).unwrap();
        assert!(back == t);
        assert_eq!(subscription_key("ns", "presence"), "sub/ns/presence");
        assert_eq!(token_key("ucwa"), "token/ucwa");
    }
}
