//! The proof header parsers (src/verify/): Mitel's hex HMAC signature,
//! NetSapiens' correlation id and the three Standard Webhooks headers.
//! Input: the header value, a newline, the body; the Standard Webhooks
//! verifier reads the same bytes as `webhook-id`, `webhook-timestamp`,
//! `webhook-signature` and the body, one newline after each header (a
//! header whose line is missing is absent).
//!
//! Each verifier must classify exactly: no header or an empty one is
//! `Missing`; a signature that is not 64 hex digits (either case), or an id
//! that is longer than 256 bytes or not printable ASCII, is `Malformed`; a
//! well-formed proof is accepted only when it is the right one.
//!
//! For Standard Webhooks, against a fixed clock ([`NOW`], the published test
//! vector's time, so that its seed verifies): an id that is not 1 to 256
//! printable ASCII bytes, a timestamp that is not 1 to 12 digits, or a
//! signature list without a `v1,` entry holding the canonical base64 of 32
//! bytes is `Malformed`; a timestamp more than the tolerance away from the
//! clock is `Expired`; otherwise the request is accepted exactly when one
//! `v1` entry is the base64 (padded or not) of the HMAC-SHA256 of
//! `id.timestamp.body` under one of the keys. The reference digest is
//! computed here from the raw header bytes, not with the gateway's `sign`.
//! Then the fuzzed signature list is kept and the right entry added before
//! or after it (with a valid id and a current timestamp where the fuzzed
//! ones are not): other entries, whatever they hold, never turn a valid
//! request away.

#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::standard::{self, Headers, decode_secret};
use presence_gateway::verify::{CorrelationIds, HmacHexVerifier, StandardVerifier, VerifyError};
use sha2::Sha256;

const KEY: &[u8] = b"829e823f-f27e-47ee-a101-5d5e9c6266bf";
const OLD_KEY: &[u8] = b"rotated-out";
const IDS: [&str; 2] = ["sub-7d1f0c52-4b1e-4f0e-9a55-0e5b2f0a8c31", "sub-calls"];

static HMAC: LazyLock<HmacHexVerifier> = LazyLock::new(|| HmacHexVerifier::new([OLD_KEY, KEY]));
static CORRELATION: LazyLock<CorrelationIds<usize>> = LazyLock::new(|| {
    let ids = CorrelationIds::new();
    for (i, id) in IDS.iter().enumerate() {
        ids.insert(id, i);
    }
    ids
});

/// The public Standard Webhooks test secret, and an older one (rotation).
const STANDARD_SECRETS: [&[u8]; 2] = [
    b"whsec_b2xkLXN0YW5kYXJkLWtleS0yMDI1",
    b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
];
/// The clock the Standard Webhooks requests are checked against.
const NOW: i64 = 1_614_265_330;
const TOLERANCE_SECS: i64 = 300;

static STANDARD_KEYS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    STANDARD_SECRETS
        .iter()
        .map(|s| decode_secret(s).expect("a valid test secret"))
        .collect()
});
static STANDARD: LazyLock<StandardVerifier> =
    LazyLock::new(|| StandardVerifier::new(STANDARD_KEYS.iter(), TOLERANCE_SECS as u64));

fuzz_target!(|data: &[u8]| {
    hex_and_correlation(data);
    standard_webhooks(data);
});

fn hex_and_correlation(data: &[u8]) {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };

    // Hex HMAC-SHA256.
    let got = HMAC.verify(header, body);
    let expected = match header {
        None | Some([]) => Err(VerifyError::Missing),
        Some(h) if h.len() != 64 || !h.iter().all(u8::is_ascii_hexdigit) => {
            Err(VerifyError::Malformed)
        }
        Some(h)
            if [KEY, OLD_KEY]
                .iter()
                .any(|k| h.eq_ignore_ascii_case(sign_hex(k, body).as_bytes())) =>
        {
            Ok(())
        }
        Some(_) => Err(VerifyError::Mismatch),
    };
    match (got, expected) {
        (Ok(verified), Ok(())) => assert_eq!(verified.bytes(), body),
        (got, expected) => assert_eq!(got.map(|_| ()), expected, "header {header:?}"),
    }

    // Correlation ids.
    let got = CORRELATION.verify(header, body);
    let expected = match header {
        None | Some([]) => Err(VerifyError::Missing),
        Some(h) if h.len() > 256 || !h.iter().all(u8::is_ascii_graphic) => {
            Err(VerifyError::Malformed)
        }
        Some(h) => IDS
            .iter()
            .position(|id| id.as_bytes() == h)
            .ok_or(VerifyError::Mismatch),
    };
    match (got, expected) {
        (Ok((verified, index)), Ok(expected)) => {
            assert_eq!(verified.bytes(), body);
            assert_eq!(index, expected);
        }
        (got, expected) => assert_eq!(got.map(|(_, i)| i), expected, "header {header:?}"),
    }
}

fn standard_webhooks(data: &[u8]) {
    let mut lines = data.splitn(4, |&b| b == b'\n');
    let presented = Headers {
        id: lines.next(),
        timestamp: lines.next(),
        signature: lines.next(),
    };
    let body = lines.next().unwrap_or_default();

    let got = STANDARD.verify(presented, body, NOW);
    let expected = expected_standard(presented, body);
    match (got, expected) {
        (Ok(message), Ok(())) => {
            assert_eq!(message.body.bytes(), body);
            assert_eq!(Some(message.id.as_bytes()), presented.id);
        }
        (got, expected) => assert_eq!(got.map(|_| ()), expected, "headers {presented:?}"),
    }

    // The right entry among whatever the fuzzer put in the list.
    let id = presented
        .id
        .filter(|id| well_formed_id(id))
        .unwrap_or(b"msg_fuzz");
    let now_text = NOW.to_string();
    let timestamp = presented
        .timestamp
        .filter(|ts| unix_seconds(ts).is_some_and(|t| (t - NOW).abs() <= TOLERANCE_SECS))
        .unwrap_or(now_text.as_bytes());
    let others = presented.signature.unwrap_or_default();
    for key in STANDARD_KEYS.iter() {
        let right = format!("v1,{}", digest_base64(key, id, timestamp, body));
        for list in [
            [others, b" ", right.as_bytes()].concat(),
            [right.as_bytes(), b" ", others].concat(),
        ] {
            let valid = Headers {
                id: Some(id),
                timestamp: Some(timestamp),
                signature: Some(&list),
            };
            match STANDARD.verify(valid, body, NOW) {
                Ok(message) => {
                    assert_eq!(message.id.as_bytes(), id);
                    assert_eq!(message.body.bytes(), body);
                }
                Err(e) => panic!("a valid request was refused ({e:?}): {valid:?}"),
            }
        }
    }
    // The gateway's own signing agrees with the reference.
    if let (Ok(id), Some(t)) = (std::str::from_utf8(id), unix_seconds(timestamp))
        && timestamp == t.to_string().as_bytes()
    {
        let key = &STANDARD_KEYS[1];
        assert_eq!(
            standard::sign(key, id, t, body),
            format!("v1,{}", digest_base64(key, id.as_bytes(), timestamp, body))
        );
    }
}

/// What the Standard Webhooks verifier must answer, from the rules above.
fn expected_standard<'a>(headers: Headers<'a>, body: &[u8]) -> Result<(), VerifyError> {
    let present = |h: Option<&'a [u8]>| h.filter(|v| !v.is_empty());
    let (Some(id), Some(timestamp), Some(signature)) = (
        present(headers.id),
        present(headers.timestamp),
        present(headers.signature),
    ) else {
        return Err(VerifyError::Missing);
    };
    let sent_at = unix_seconds(timestamp).filter(|_| well_formed_id(id));
    let v1: Vec<&[u8]> = signature
        .split(|&b| b == b' ')
        .filter_map(|entry| entry.strip_prefix(b"v1,"))
        .filter(|encoded| canonical_digest(encoded))
        .collect();
    let Some(sent_at) = sent_at.filter(|_| !v1.is_empty()) else {
        return Err(VerifyError::Malformed);
    };
    if (sent_at - NOW).abs() > TOLERANCE_SECS {
        return Err(VerifyError::Expired);
    }
    let matched = STANDARD_KEYS.iter().any(|key| {
        let padded = digest_base64(key, id, timestamp, body);
        let unpadded = padded.trim_end_matches('=');
        v1.iter()
            .any(|&e| e == padded.as_bytes() || e == unpadded.as_bytes())
    });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// 1 to 256 printable ASCII bytes.
fn well_formed_id(id: &[u8]) -> bool {
    (1..=256).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic)
}

/// 1 to 12 decimal digits, as a number.
fn unix_seconds(raw: &[u8]) -> Option<i64> {
    if raw.is_empty() || raw.len() > 12 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The base64 of 32 bytes as an encoder writes it: 43 characters of the
/// standard alphabet, the last one carrying 4 bits of data and 2 zero
/// bits, then one optional `=`.
fn canonical_digest(encoded: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let chars = encoded.strip_suffix(b"=").unwrap_or(encoded);
    let value = |c: &u8| ALPHABET.iter().position(|a| a == c);
    chars.len() == 43
        && chars.iter().all(|c| value(c).is_some())
        && value(&chars[42]).is_some_and(|v| v % 4 == 0)
}

/// The padded base64 of HMAC-SHA256(key, `id.timestamp.body`).
fn digest_base64(key: &[u8], id: &[u8], timestamp: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    for part in [id, b".", timestamp, b".", body] {
        mac.update(part);
    }
    BASE64.encode(mac.finalize().into_bytes())
}
