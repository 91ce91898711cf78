//! Hex-encoded HMAC-SHA256 of the raw body (Mitel `x-notify-signature`).
//!
//! The header must be exactly 64 hex digits, either case; anything else (a
//! `sha256=` prefix, whitespace, base64) is malformed. Keys are kept as keyed
//! HMAC states and cloned per request, which copies a few hundred bytes on the
//! stack instead of re-deriving the key; the digest is decoded into a stack
//! array and compared with `Mac::verify_slice` (constant time).

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{Verified, VerifyError};

type HmacSha256 = Hmac<Sha256>;

/// Length of the hex signature: 32 bytes of SHA-256 output.
const HEX_LEN: usize = 64;

/// Verifies hex HMAC-SHA256 signatures against one or more keys (rotation).
#[derive(Clone)]
pub struct HmacHexVerifier {
    keys: Vec<HmacSha256>,
}

impl fmt::Debug for HmacHexVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacHexVerifier")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .finish()
    }
}

impl HmacHexVerifier {
    /// A verifier accepting a signature made with any of `keys`.
    pub fn new<K: AsRef<[u8]>>(keys: impl IntoIterator<Item = K>) -> Self {
        let keys = keys
            .into_iter()
            .map(|k| {
                // HMAC accepts keys of any length, so this cannot fail.
                <HmacSha256 as KeyInit>::new_from_slice(k.as_ref())
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
            })
            .collect();
        HmacHexVerifier { keys }
    }

    /// Checks `signature` (the header value, if any) against `body`.
    pub fn verify<'a>(
        &self,
        signature: Option<&[u8]>,
        body: &'a [u8],
    ) -> Result<Verified<'a>, VerifyError> {
        let signature = match signature {
            None | Some([]) => return Err(VerifyError::Missing),
            Some(s) => s,
        };
        if signature.len() != HEX_LEN {
            return Err(VerifyError::Malformed);
        }
        let expected = decode_hex(signature).ok_or(VerifyError::Malformed)?;
        // Which key matched is not secret (the caller signed with it), so
        // stopping at the first match leaks nothing; each comparison itself
        // is constant-time.
        let matched = self.keys.iter().any(|key| {
            let mut mac = key.clone();
            mac.update(body);
            mac.verify_slice(&expected).is_ok()
        });
        if matched {
            Ok(Verified::new(body))
        } else {
            Err(VerifyError::Mismatch)
        }
    }
}

/// Value of each byte as a hex digit, or [`NOT_HEX`].
const HEX_VALUES: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};
const NOT_HEX: u8 = 0x10;

/// Decodes the 64 hex digits of a signature, either case, or `None` if any
/// is not a hex digit. One table lookup per digit and no branch per digit
/// (a general decoder's per-digit checks cost more than the rest of
/// verification besides hashing); the input is the caller's, not a secret.
fn decode_hex(digits: &[u8]) -> Option<[u8; HEX_LEN / 2]> {
    let digits: &[u8; HEX_LEN] = digits.try_into().ok()?;
    let mut out = [0u8; HEX_LEN / 2];
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = HEX_VALUES[usize::from(pair[0])];
        let low = HEX_VALUES[usize::from(pair[1])];
        invalid |= high | low;
        *byte = (high << 4) | (low & 0xf);
    }
    (invalid & NOT_HEX == 0).then_some(out)
}

/// The lowercase hex signature of `body` under `key`: what a provider sends.
pub fn sign_hex(key: &[u8], body: &[u8]) -> String {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"829e823f-f27e-47ee-a101-5d5e9c6266bf";

    #[test]
    fn accepts_both_hex_cases_and_any_listed_key() {
        let body = b"{\"a\":1}";
        let v = HmacHexVerifier::new([b"old".as_slice(), KEY]);
        let sig = sign_hex(KEY, body);
        assert!(v.verify(Some(sig.as_bytes()), body).is_ok());
        let upper = sig.to_uppercase();
        assert!(v.verify(Some(upper.as_bytes()), body).is_ok());
        let old = sign_hex(b"old", body);
        assert!(v.verify(Some(old.as_bytes()), body).is_ok());
    }

    #[test]
    fn classifies_bad_signatures() {
        let body = b"{}";
        let v = HmacHexVerifier::new([KEY]);
        let sig = sign_hex(KEY, body);
        assert_eq!(v.verify(None, body).unwrap_err(), VerifyError::Missing);
        assert_eq!(v.verify(Some(b""), body).unwrap_err(), VerifyError::Missing);
        let prefixed = format!("sha256={sig}");
        assert_eq!(
            v.verify(Some(prefixed.as_bytes()), body).unwrap_err(),
            VerifyError::Malformed
        );
        let spaced = format!(" {}", &sig[1..]);
        assert_eq!(
            v.verify(Some(spaced.as_bytes()), body).unwrap_err(),
            VerifyError::Malformed
        );
        assert_eq!(
            v.verify(Some(&sig.as_bytes()[1..]), body).unwrap_err(),
            VerifyError::Malformed
        );
        let mut wrong = sig.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            v.verify(Some(&wrong), body).unwrap_err(),
            VerifyError::Mismatch
        );
        assert_eq!(
            v.verify(Some(sig.as_bytes()), b"{ }").unwrap_err(),
            VerifyError::Mismatch
        );
    }

    #[test]
    fn decodes_hex_like_the_hex_crate() {
        let mut digits = *b"00ff7a0B9cDe12345678aAbBcCdDeEfF0123456789abcdef0123456789ABCDEF";
        assert_eq!(
            decode_hex(&digits).unwrap().to_vec(),
            hex::decode(digits).unwrap()
        );
        for bad in [b'g', b'G', b' ', b'/', b':', b'@', b'`', 0, 0x80, 0xff] {
            for at in [0, 1, 31, 62, 63] {
                let saved = digits[at];
                digits[at] = bad;
                assert_eq!(decode_hex(&digits), None, "{bad:#x} at {at}");
                digits[at] = saved;
            }
        }
        assert_eq!(decode_hex(&digits[1..]), None);
    }

    #[test]
    fn debug_output_hides_keys() {
        let v = HmacHexVerifier::new([KEY]);
        let shown = format!("{v:?}");
        assert!(!shown.contains("829e823f"));
        assert!(shown.contains("redacted"));
    }

    proptest! {
        #[test]
        fn only_the_right_signature_verifies(body in proptest::collection::vec(any::<u8>(), 0..512),
                                             header in proptest::collection::vec(any::<u8>(), 0..80)) {
            let v = HmacHexVerifier::new([KEY]);
            let good = sign_hex(KEY, &body);
            prop_assert!(v.verify(Some(good.as_bytes()), &body).is_ok());
            if !header.eq_ignore_ascii_case(good.as_bytes()) {
                prop_assert!(v.verify(Some(&header), &body).is_err());
            }
        }
    }
}
