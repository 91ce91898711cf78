//! The proof header parsers (src/verify/): Mitel's hex HMAC signature and
//! NetSapiens' correlation id. Input: the header value, a newline, the body.
//!
//! Each verifier must classify exactly: no header or an empty one is
//! `Missing`; a signature that is not 64 hex digits (either case), or an id
//! that is longer than 256 bytes or not printable ASCII, is `Malformed`; a
//! well-formed proof is accepted only when it is the right one.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::{CorrelationIds, HmacHexVerifier, VerifyError};

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

fuzz_target!(|data: &[u8]| {
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
});
