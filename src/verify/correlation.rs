//! Correlation-id authentication (NetSapiens `X-Correlation-ID`).
//!
//! The id of a subscription is a shared secret: a post that carries one of the
//! source's ids is authentic, and the id also says which subscription (and so
//! which model) the post belongs to. Ids can be added and removed while the
//! gateway runs (the subscription manager creates, adopts and deletes them).
//!
//! Nothing about a stored id may leak through timing. Ids are kept only as
//! keyed digests (HMAC-SHA256 under a random per-process key): a presented id
//! is digested the same way, the table is searched by the digest's first eight
//! bytes (which reveals nothing about any id to someone who does not know the
//! key), and the whole 32-byte digest is then compared in constant time. The
//! ids themselves are not kept, so they cannot end up in a log or a dump;
//! [`fingerprint`] gives the short, non-secret form shown to operators.

use std::collections::HashMap;
use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Verified, VerifyError};

type Digest32 = [u8; 32];

/// Longest correlation id accepted (NetSapiens ids are ~40 characters).
const MAX_ID_LEN: usize = 256;

/// The correlation ids of one source, each with a value `T` (the model of its
/// subscription).
pub struct CorrelationIds<T> {
    key: Hmac<Sha256>,
    table: RwLock<HashMap<u64, Vec<(Digest32, T)>>>,
}

impl<T> fmt::Debug for CorrelationIds<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count: usize = self.table.read().values().map(Vec::len).sum();
        write!(f, "CorrelationIds([{count} redacted])")
    }
}

impl<T: Copy> CorrelationIds<T> {
    /// An empty set with a fresh random digest key.
    pub fn new() -> Self {
        let mut seed = [0u8; 32];
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            use std::hash::{BuildHasher, RandomState};
            chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
        }
        CorrelationIds {
            key: <Hmac<Sha256> as KeyInit>::new_from_slice(&seed)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
            table: RwLock::new(HashMap::new()),
        }
    }

    fn digest(&self, id: &[u8]) -> Digest32 {
        let mut mac = self.key.clone();
        mac.update(id);
        mac.finalize().into_bytes().into()
    }

    fn bucket(digest: &Digest32) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    /// Adds `id` with `value` (replacing the value if present).
    pub fn insert(&self, id: impl AsRef<[u8]>, value: T) {
        let digest = self.digest(id.as_ref());
        let mut table = self.table.write();
        let bucket = table.entry(Self::bucket(&digest)).or_default();
        match bucket
            .iter_mut()
            .find(|(d, _)| bool::from(d.ct_eq(&digest)))
        {
            Some(slot) => slot.1 = value,
            None => bucket.push((digest, value)),
        }
    }

    /// Removes `id`; posts carrying it are rejected from now on.
    pub fn remove(&self, id: impl AsRef<[u8]>) -> bool {
        let digest = self.digest(id.as_ref());
        let mut table = self.table.write();
        let key = Self::bucket(&digest);
        let Some(bucket) = table.get_mut(&key) else {
            return false;
        };
        let before = bucket.len();
        bucket.retain(|(d, _)| !bool::from(d.ct_eq(&digest)));
        let removed = bucket.len() != before;
        if bucket.is_empty() {
            table.remove(&key);
        }
        removed
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.table.read().values().map(Vec::len).sum()
    }

    /// Whether there is no id at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the presented header value; on success returns the body as
    /// verified and the id's value.
    pub fn verify<'a>(
        &self,
        presented: Option<&[u8]>,
        body: &'a [u8],
    ) -> Result<(Verified<'a>, T), VerifyError> {
        let presented = match presented {
            None | Some([]) => return Err(VerifyError::Missing),
            Some(p) => p,
        };
        if presented.len() > MAX_ID_LEN || !presented.iter().all(u8::is_ascii_graphic) {
            return Err(VerifyError::Malformed);
        }
        let digest = self.digest(presented);
        let table = self.table.read();
        let mut found = None;
        if let Some(bucket) = table.get(&Self::bucket(&digest)) {
            // Compare with every entry of the bucket, not stopping early.
            for (stored, value) in bucket {
                if bool::from(stored.ct_eq(&digest)) {
                    found = Some(*value);
                }
            }
        }
        match found {
            Some(value) => Ok((Verified::new(body), value)),
            None => Err(VerifyError::Mismatch),
        }
    }
}

impl<T: Copy> Default for CorrelationIds<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A short, stable, non-secret name for a secret id (first 8 hex digits of
/// its SHA-256), for `/v1/sources`, metrics labels and logs.
pub fn fingerprint(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    format!("sha256:{}", hex::encode(&digest[..4]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_known_ids_with_their_value_and_rejects_others() {
        let ids = CorrelationIds::new();
        ids.insert("sub-a", 1u8);
        ids.insert("sub-b", 2u8);
        let (body, value) = ids.verify(Some(b"sub-b"), b"[]").unwrap();
        assert_eq!((body.bytes(), value), (&b"[]"[..], 2));
        assert_eq!(
            ids.verify(Some(b"sub-c"), b"[]").unwrap_err(),
            VerifyError::Mismatch
        );
        assert_eq!(ids.verify(None, b"[]").unwrap_err(), VerifyError::Missing);
        assert_eq!(
            ids.verify(Some(b""), b"[]").unwrap_err(),
            VerifyError::Missing
        );
        assert_eq!(
            ids.verify(Some(b"has space"), b"[]").unwrap_err(),
            VerifyError::Malformed
        );
        assert_eq!(
            ids.verify(Some(&[b'a'; MAX_ID_LEN + 1][..]), b"[]")
                .unwrap_err(),
            VerifyError::Malformed
        );
    }

    #[test]
    fn ids_can_be_added_and_removed_at_run_time() {
        let ids = CorrelationIds::new();
        assert!(ids.verify(Some(b"new"), b"").is_err());
        ids.insert("new", ());
        assert!(ids.verify(Some(b"new"), b"").is_ok());
        assert_eq!(ids.len(), 1);
        assert!(ids.remove("new"));
        assert!(!ids.remove("new"));
        assert!(ids.verify(Some(b"new"), b"").is_err());
        assert!(ids.is_empty());
    }

    #[test]
    fn debug_and_fingerprints_do_not_show_ids() {
        let ids = CorrelationIds::new();
        ids.insert("sub-7d1f0c52-secret", ());
        let debug = format!("{ids:?}");
        assert!(!debug.contains("sub-7d1f"), "{debug}");
        let fp = fingerprint("sub-7d1f0c52-secret");
        assert!(fp.starts_with("sha256:") && fp.len() == 15, "{fp}");
        assert!(!fp.contains("sub-"));
        assert_eq!(fp, fingerprint("sub-7d1f0c52-secret"));
    }
}
