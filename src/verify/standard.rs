//! Standard Webhooks signatures (`kind = "standard"`).
//!
//! A request carries three headers: `webhook-id` (the message id, also the
//! idempotency key), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature`, a space-separated list of `version,signature`
//! entries. A `v1` signature is the base64 of HMAC-SHA256 over
//! `id.timestamp.body` (the raw bytes), keyed with the base64 after a
//! `whsec_` secret's prefix. The request is authentic when any `v1` entry
//! matches any configured key; entries of other versions (`v1a`, future
//! ones) are skipped.
//!
//! Checks, in order: every header present (else missing); the id and the
//! timestamp well-formed and at least one `v1` entry that decodes to 32
//! bytes (else malformed); the timestamp within `tolerance` of the
//! gateway's clock in either direction (else expired); a match (else
//! mismatch). The timestamp is checked before any hashing, so a replayed
//! request costs no HMAC. Each key's digest is computed once and compared
//! with every entry in constant time; nothing is allocated.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, PAD_INDIFFERENT};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{Verified, VerifyError};

type HmacSha256 = Hmac<Sha256>;

/// The message id header (the event id for dedup).
pub const ID_HEADER: &str = "webhook-id";
/// The Unix-seconds timestamp header.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// The signature list header.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The longest `webhook-id` accepted: ids are event ids, kept for dedup.
pub const MAX_ID_LEN: usize = 256;

/// Standard base64, padding optional (senders pad; a missing pad is harmless).
const BASE64: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, PAD_INDIFFERENT);

/// Length of an HMAC-SHA256 digest.
const DIGEST_LEN: usize = 32;

/// Why a configured secret cannot be used. Carries no part of the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must start with \"whsec_\" followed by the base64 key")]
    NoPrefix,
    #[error("the part after \"whsec_\" is empty")]
    Empty,
    #[error("the part after \"whsec_\" is not valid base64")]
    NotBase64,
}

/// Decodes a `whsec_<base64>` secret into its key bytes.
pub fn decode_secret(secret: &[u8]) -> Result<Vec<u8>, KeyError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX.as_bytes())
        .ok_or(KeyError::NoPrefix)?;
    if encoded.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = BASE64.decode(encoded).map_err(|_| KeyError::NotBase64)?;
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(key)
}

/// The three headers of one request, as received (`None`: absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct Headers<'a> {
    pub id: Option<&'a [u8]>,
    pub timestamp: Option<&'a [u8]>,
    pub signature: Option<&'a [u8]>,
}

/// A verified request: its body and its message id.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub body: Verified<'a>,
    /// The `webhook-id`: visible ASCII, 1 to [`MAX_ID_LEN`] bytes.
    pub id: &'a str,
}

/// Verifies Standard Webhooks signatures against one or more keys.
#[derive(Clone)]
pub struct StandardVerifier {
    keys: Vec<HmacSha256>,
    tolerance_secs: i64,
}

impl fmt::Debug for StandardVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandardVerifier")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

impl StandardVerifier {
    /// A verifier accepting a signature made with any of `keys` (decoded
    /// key bytes, see [`decode_secret`]), with timestamps at most
    /// `tolerance_secs` away from the clock.
    pub fn new<K: AsRef<[u8]>>(keys: impl IntoIterator<Item = K>, tolerance_secs: u64) -> Self {
        let keys = keys
            .into_iter()
            .map(|k| {
                <HmacSha256 as KeyInit>::new_from_slice(k.as_ref())
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
            })
            .collect();
        StandardVerifier {
            keys,
            tolerance_secs: i64::try_from(tolerance_secs).unwrap_or(i64::MAX),
        }
    }

    /// How far a timestamp may be from the clock, in seconds.
    pub fn tolerance_secs(&self) -> u64 {
        self.tolerance_secs.unsigned_abs()
    }

    /// Checks a request against the clock `now` (Unix seconds).
    pub fn verify<'a>(
        &self,
        headers: Headers<'a>,
        body: &'a [u8],
        now: i64,
    ) -> Result<Message<'a>, VerifyError> {
        let present = |h: Option<&'a [u8]>| h.filter(|v| !v.is_empty());
        let (Some(id), Some(timestamp), Some(signature)) = (
            present(headers.id),
            present(headers.timestamp),
            present(headers.signature),
        ) else {
            return Err(VerifyError::Missing);
        };
        let id = message_id(id).ok_or(VerifyError::Malformed)?;
        let sent_at = unix_seconds(timestamp).ok_or(VerifyError::Malformed)?;
        if !entries(signature).any(|entry| entry.is_some()) {
            return Err(VerifyError::Malformed);
        }
        if sent_at.abs_diff(now) > self.tolerance_secs.unsigned_abs() {
            return Err(VerifyError::Expired);
        }
        // Which key matched is not secret (the sender signed with it), so
        // stopping at the first match leaks nothing; each comparison is
        // constant-time, and every entry is compared with each digest.
        let matched = self.keys.iter().any(|key| {
            let mut mac = key.clone();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp);
            mac.update(b".");
            mac.update(body);
            let digest = mac.finalize().into_bytes();
            entries(signature)
                .flatten()
                .fold(subtle::Choice::from(0), |found, entry| {
                    found | entry.ct_eq(digest.as_slice())
                })
                .into()
        });
        if matched {
            Ok(Message {
                body: Verified::new(body),
                id,
            })
        } else {
            Err(VerifyError::Mismatch)
        }
    }
}

/// The `webhook-id` as text: 1 to [`MAX_ID_LEN`] visible ASCII characters.
pub fn message_id(raw: &[u8]) -> Option<&str> {
    if raw.len() > MAX_ID_LEN || !raw.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    std::str::from_utf8(raw).ok()
}

/// Unix seconds: 1 to 12 digits, nothing else (no sign, no fraction).
fn unix_seconds(raw: &[u8]) -> Option<i64> {
    if raw.is_empty() || raw.len() > 12 {
        return None;
    }
    raw.iter().try_fold(0i64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        (digit <= 9).then(|| n * 10 + i64::from(digit))
    })
}

/// The decoded `v1` digests of a signature list, in order: `Some` for each
/// `v1` entry that decodes to 32 bytes, `None` for any other entry (another
/// version, no comma, bad base64). Entries are separated by spaces.
fn entries(list: &[u8]) -> impl Iterator<Item = Option<[u8; DIGEST_LEN]>> + '_ {
    list.split(|&b| b == b' ')
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let encoded = entry.strip_prefix(b"v1,")?;
            // 32 bytes are 43 or 44 characters; the buffer takes what the
            // decoder's estimate asks for, and the length is checked after.
            if !(43..=44).contains(&encoded.len()) {
                return None;
            }
            let mut out = [0u8; DIGEST_LEN + 3];
            let n = BASE64.decode_slice(encoded, &mut out).ok()?;
            (n == DIGEST_LEN).then(|| {
                let mut digest = [0u8; DIGEST_LEN];
                digest.copy_from_slice(&out[..DIGEST_LEN]);
                digest
            })
        })
}

/// The `webhook-signature` value (`v1,<base64>`) of a message under `key`
/// (decoded key bytes): what a sender puts in the header.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published test vector of the Standard Webhooks libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn verifier() -> StandardVerifier {
        StandardVerifier::new([decode_secret(SECRET.as_bytes()).unwrap()], 300)
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> Headers<'a> {
        Headers {
            id: Some(id.as_bytes()),
            timestamp: Some(ts.as_bytes()),
            signature: Some(sig.as_bytes()),
        }
    }

    #[test]
    fn the_published_vector_signs_and_verifies() {
        let key = decode_secret(SECRET.as_bytes()).unwrap();
        assert_eq!(sign(&key, ID, TS, BODY), SIGNATURE);
        let ts = TS.to_string();
        let message = verifier()
            .verify(headers(ID, &ts, SIGNATURE), BODY, TS)
            .unwrap();
        assert_eq!(message.id, ID);
        assert_eq!(message.body.bytes(), BODY);
        // Without the padding the digest is the same.
        let unpadded = SIGNATURE.trim_end_matches('=');
        assert!(
            verifier()
                .verify(headers(ID, &ts, unpadded), BODY, TS)
                .is_ok()
        );
    }

    #[test]
    fn any_v1_entry_may_match_and_other_versions_are_skipped() {
        let ts = TS.to_string();
        let wrong = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        let v2 = SIGNATURE.replacen("v1,", "v2,", 1);
        let list = format!("{wrong} {v2}  v1a,xyz {SIGNATURE} {wrong}");
        assert!(verifier().verify(headers(ID, &ts, &list), BODY, TS).is_ok());
        // The right digest under another version does not count.
        let only_v2 = format!("{v2} v1a,{}", &SIGNATURE[3..]);
        assert_eq!(
            verifier()
                .verify(headers(ID, &ts, &only_v2), BODY, TS)
                .unwrap_err(),
            VerifyError::Malformed
        );
        assert_eq!(
            verifier()
                .verify(headers(ID, &ts, &format!("{wrong} {v2}")), BODY, TS)
                .unwrap_err(),
            VerifyError::Mismatch
        );
    }

    #[test]
    fn rotation_accepts_every_listed_key() {
        let old = decode_secret(b"whsec_b2xkLWtleQ==").unwrap();
        let new = decode_secret(SECRET.as_bytes()).unwrap();
        let v = StandardVerifier::new([new.clone(), old.clone()], 300);
        let ts = TS.to_string();
        for key in [&new, &old] {
            let sig = sign(key, ID, TS, BODY);
            assert!(v.verify(headers(ID, &ts, &sig), BODY, TS).is_ok());
        }
        let other = sign(b"another key", ID, TS, BODY);
        assert_eq!(
            v.verify(headers(ID, &ts, &other), BODY, TS).unwrap_err(),
            VerifyError::Mismatch
        );
    }

    #[test]
    fn classifies_every_bad_request() {
        let ts = TS.to_string();
        let v = verifier();
        let check = |h: Headers<'_>, body: &[u8], now: i64| v.verify(h, body, now).unwrap_err();
        let ok = headers(ID, &ts, SIGNATURE);
        use VerifyError::*;
        assert_eq!(check(Headers { id: None, ..ok }, BODY, TS), Missing);
        assert_eq!(
            check(
                Headers {
                    id: Some(b""),
                    ..ok
                },
                BODY,
                TS
            ),
            Missing
        );
        assert_eq!(
            check(
                Headers {
                    timestamp: None,
                    ..ok
                },
                BODY,
                TS
            ),
            Missing
        );
        assert_eq!(
            check(
                Headers {
                    signature: None,
                    ..ok
                },
                BODY,
                TS
            ),
            Missing
        );
        for bad_ts in [
            "-1614265330",
            "1614265330.5",
            "+1614265330",
            "1e9",
            "0x10",
            "1234567890123",
        ] {
            let h = Headers {
                timestamp: Some(bad_ts.as_bytes()),
                ..ok
            };
            assert_eq!(check(h, BODY, TS), Malformed, "{bad_ts}");
        }
        let long_id = "m".repeat(MAX_ID_LEN + 1);
        for bad_id in ["msg 1", "msg\u{e9}", long_id.as_str()] {
            let h = Headers {
                id: Some(bad_id.as_bytes()),
                ..ok
            };
            assert_eq!(check(h, BODY, TS), Malformed, "{bad_id}");
        }
        let short = &SIGNATURE[..SIGNATURE.len() - 4];
        for bad_sig in [
            &SIGNATURE[3..],
            "v1",
            "v1,",
            short,
            "v1,!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
            "v1:g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "sha256=g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1,g0hM9SsE-OTPJTGt_tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            let h = Headers {
                signature: Some(bad_sig.as_bytes()),
                ..ok
            };
            assert_eq!(check(h, BODY, TS), Malformed, "{bad_sig}");
        }
        // Body, id or timestamp changed after signing.
        assert_eq!(check(ok, br#"{"test": 2432232315}"#, TS), Mismatch);
        let other_id = headers("msg_other", &ts, SIGNATURE);
        assert_eq!(check(other_id, BODY, TS), Mismatch);
        let later = (TS + 1).to_string();
        assert_eq!(check(headers(ID, &later, SIGNATURE), BODY, TS), Mismatch);
    }

    #[test]
    fn tolerance_applies_in_both_directions() {
        let v = verifier();
        let ts = TS.to_string();
        let h = headers(ID, &ts, SIGNATURE);
        for now in [TS - 300, TS - 295, TS + 295, TS + 300] {
            assert!(v.verify(h, BODY, now).is_ok(), "now = ts {:+}", now - TS);
        }
        for now in [TS - 305, TS - 301, TS + 301, TS + 305, 0, i64::MAX] {
            assert_eq!(
                v.verify(h, BODY, now).unwrap_err(),
                VerifyError::Expired,
                "now = {now}"
            );
        }
    }

    #[test]
    fn secrets_need_the_prefix_and_base64() {
        assert_eq!(
            decode_secret(b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(KeyError::NoPrefix)
        );
        assert_eq!(decode_secret(b"whsec_"), Err(KeyError::Empty));
        assert_eq!(
            decode_secret(b"whsec_not base64!"),
            Err(KeyError::NotBase64)
        );
        assert_eq!(decode_secret(b"whsec_===="), Err(KeyError::NotBase64));
        assert_eq!(decode_secret(b"whsec_b2xkLWtleQ==").unwrap(), b"old-key");
        assert_eq!(decode_secret(b"whsec_b2xkLWtleQ").unwrap(), b"old-key");
    }

    #[test]
    fn debug_does_not_show_keys() {
        let text = format!("{:?}", verifier());
        assert!(text.contains("redacted"), "{text}");
        assert!(!text.contains("MfKQ"), "{text}");
    }
}
