//! Hot path of every signed webhook: Mitel's hex HMAC-SHA256 and Standard
//! Webhooks' base64 HMAC-SHA256 over `id.timestamp.body`.
//!
//! Body sizes span a small presence notification (512 B), a large one (4 KiB)
//! and a body near the size where hashing dominates everything else (64 KiB).
//! The rotation case puts the matching key second, so the first key's HMAC is
//! computed and rejected before the match: the cost of keeping an old key
//! configured during a rotation. The mismatch case is what a forged or
//! misconfigured sender costs: every configured key is tried.
//!
//! Standard Webhooks requests (`kind = "standard"`) are measured the same
//! way, with the same sizes: one key, the matching key second (rotation),
//! and a forged signature. Their headers add work the Mitel ones lack (the
//! id and timestamp checks, the entry list, base64) and a longer MAC input
//! (`id.timestamp.` in front of the body); an expired request is rejected
//! before any hashing, which the `expired` case shows. The clock is a fixed
//! value passed in, so the figures do not depend on today's date.
//!
//! NetSapiens posts are authenticated by their `X-Correlation-ID` instead: the
//! presented id is digested under the per-process key and looked up among the
//! source's ids, here 10 000 of them (a hit, a well-formed miss).
//!
//! Run: `cargo bench --bench verify`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::standard::{self, Headers, decode_secret};
use presence_gateway::verify::{CorrelationIds, HmacHexVerifier, StandardVerifier, VerifyError};

/// Shaped like Mitel applicationIds (the HMAC key), which are UUIDs.
const KEY: &[u8] = b"829e823f-f27e-47ee-a101-5d5e9c6266bf";
const OLD_KEY: &[u8] = b"5d0c2e61-93b7-4f0a-8c1e-7a2b9d4f6e30";

const SIZES: [usize; 3] = [512, 4 * 1024, 64 * 1024];

/// A deterministic body of `len` bytes. HMAC cost does not depend on the
/// content, only on the length.
fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| b' ' + (i % 95) as u8).collect()
}

fn verify_valid(c: &mut Criterion) {
    let mut group = c.benchmark_group("hmac_hex_verify");
    let one_key = HmacHexVerifier::new([KEY]);
    let rotation = HmacHexVerifier::new([OLD_KEY, KEY]);
    for len in SIZES {
        let body = body(len);
        let signature = sign_hex(KEY, &body);
        // The benchmark is meaningless if the signature does not verify.
        assert!(one_key.verify(Some(signature.as_bytes()), &body).is_ok());
        assert!(rotation.verify(Some(signature.as_bytes()), &body).is_ok());

        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("one_key", len), &body, |b, body| {
            b.iter(|| {
                one_key
                    .verify(black_box(Some(signature.as_bytes())), black_box(body))
                    .is_ok()
            });
        });
        group.bench_with_input(
            BenchmarkId::new("rotation_second_key", len),
            &body,
            |b, body| {
                b.iter(|| {
                    rotation
                        .verify(black_box(Some(signature.as_bytes())), black_box(body))
                        .is_ok()
                });
            },
        );
    }
    group.finish();
}

/// 512 B bodies that differ from one request to the next, as real ones do:
/// with one fixed signature the CPU learns its digits' branches, which hides
/// what decoding a fresh one costs.
fn verify_varied(c: &mut Criterion) {
    const DISTINCT: usize = 1024;
    let verifier = HmacHexVerifier::new([KEY]);
    let requests: Vec<(Vec<u8>, String)> = (0..DISTINCT)
        .map(|i| {
            let mut body = body(512);
            body[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let signature = sign_hex(KEY, &body);
            (body, signature)
        })
        .collect();
    assert!(
        requests
            .iter()
            .all(|(body, sig)| verifier.verify(Some(sig.as_bytes()), body).is_ok())
    );
    let mut group = c.benchmark_group("hmac_hex_verify_varied");
    group.throughput(Throughput::Bytes(512));
    group.bench_function("one_key/512", |b| {
        let mut next = requests.iter().cycle();
        b.iter(|| {
            let (body, signature) = next.next().expect("cycle never ends");
            verifier
                .verify(black_box(Some(signature.as_bytes())), black_box(body))
                .is_ok()
        });
    });
    group.finish();
}

fn verify_mismatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("hmac_hex_verify_mismatch");
    let len = 512;
    let body = body(len);
    // Well-formed hex, signed with a key the verifier does not hold.
    let forged = sign_hex(b"not-a-configured-key", &body);
    let one_key = HmacHexVerifier::new([KEY]);
    let two_keys = HmacHexVerifier::new([OLD_KEY, KEY]);
    assert!(one_key.verify(Some(forged.as_bytes()), &body).is_err());
    assert!(two_keys.verify(Some(forged.as_bytes()), &body).is_err());

    group.throughput(Throughput::Bytes(len as u64));
    group.bench_with_input(BenchmarkId::new("one_key", len), &body, |b, body| {
        b.iter(|| {
            one_key
                .verify(black_box(Some(forged.as_bytes())), black_box(body))
                .is_err()
        });
    });
    group.bench_with_input(BenchmarkId::new("two_keys", len), &body, |b, body| {
        b.iter(|| {
            two_keys
                .verify(black_box(Some(forged.as_bytes())), black_box(body))
                .is_err()
        });
    });
    group.finish();
}

/// The public Standard Webhooks test secret, and a second one for rotation.
const STANDARD_SECRET: &[u8] = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STANDARD_OLD_SECRET: &[u8] = b"whsec_b2xkLXN0YW5kYXJkLWtleS0yMDI1";
/// A message id shaped like the ones Standard Webhooks senders use.
const STANDARD_ID: &str = "msg_2pQ7vXk3N8aLmR4tYc9WjE1bZfH";
/// The request's timestamp, and the clock it is verified against.
const STANDARD_TS: i64 = 1_764_000_930;
/// The spec's default tolerance.
const STANDARD_TOLERANCE_SECS: u64 = 300;

fn standard_key(secret: &[u8]) -> Vec<u8> {
    decode_secret(secret).expect("a valid whsec_ secret")
}

/// The three headers of a request, as sent.
fn standard_headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> Headers<'a> {
    Headers {
        id: Some(id.as_bytes()),
        timestamp: Some(timestamp.as_bytes()),
        signature: Some(signature.as_bytes()),
    }
}

fn standard_valid(c: &mut Criterion) {
    let mut group = c.benchmark_group("standard_verify");
    let key = standard_key(STANDARD_SECRET);
    let one_key = StandardVerifier::new([&key], STANDARD_TOLERANCE_SECS);
    let rotation = StandardVerifier::new(
        [standard_key(STANDARD_OLD_SECRET), key.clone()],
        STANDARD_TOLERANCE_SECS,
    );
    let ts = STANDARD_TS.to_string();
    for len in SIZES {
        let body = body(len);
        let signature = standard::sign(&key, STANDARD_ID, STANDARD_TS, &body);
        let headers = standard_headers(STANDARD_ID, &ts, &signature);
        // The benchmark is meaningless if the signature does not verify.
        assert!(one_key.verify(headers, &body, STANDARD_TS).is_ok());
        assert!(rotation.verify(headers, &body, STANDARD_TS).is_ok());

        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("one_key", len), &body, |b, body| {
            b.iter(|| {
                one_key
                    .verify(black_box(headers), black_box(body), black_box(STANDARD_TS))
                    .is_ok()
            });
        });
        group.bench_with_input(
            BenchmarkId::new("rotation_second_key", len),
            &body,
            |b, body| {
                b.iter(|| {
                    rotation
                        .verify(black_box(headers), black_box(body), black_box(STANDARD_TS))
                        .is_ok()
                });
            },
        );
    }
    group.finish();
}

/// 512 B bodies, ids and signatures that differ from one request to the
/// next, as `hmac_hex_verify_varied` does for Mitel.
fn standard_varied(c: &mut Criterion) {
    const DISTINCT: usize = 1024;
    let key = standard_key(STANDARD_SECRET);
    let verifier = StandardVerifier::new([&key], STANDARD_TOLERANCE_SECS);
    let ts = STANDARD_TS.to_string();
    let requests: Vec<(String, Vec<u8>, String)> = (0..DISTINCT)
        .map(|i| {
            let id = format!("msg_{i:027}");
            let mut body = body(512);
            body[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let signature = standard::sign(&key, &id, STANDARD_TS, &body);
            (id, body, signature)
        })
        .collect();
    assert!(requests.iter().all(|(id, body, signature)| {
        verifier
            .verify(standard_headers(id, &ts, signature), body, STANDARD_TS)
            .is_ok()
    }));
    let mut group = c.benchmark_group("standard_verify_varied");
    group.throughput(Throughput::Bytes(512));
    group.bench_function("one_key/512", |b| {
        let mut next = requests.iter().cycle();
        b.iter(|| {
            let (id, body, signature) = next.next().expect("cycle never ends");
            verifier
                .verify(
                    black_box(standard_headers(id, &ts, signature)),
                    black_box(body),
                    black_box(STANDARD_TS),
                )
                .is_ok()
        });
    });
    group.finish();
}

/// What a forged request costs (every key's HMAC), and a replayed one
/// (outside the tolerance: no HMAC at all).
fn standard_rejected(c: &mut Criterion) {
    let mut group = c.benchmark_group("standard_verify_rejected");
    let len = 512;
    let body = body(len);
    let key = standard_key(STANDARD_SECRET);
    let one_key = StandardVerifier::new([&key], STANDARD_TOLERANCE_SECS);
    let two_keys = StandardVerifier::new(
        [standard_key(STANDARD_OLD_SECRET), key.clone()],
        STANDARD_TOLERANCE_SECS,
    );
    let ts = STANDARD_TS.to_string();
    // Well-formed, signed with a key the verifier does not hold.
    let forged = standard::sign(b"not-a-configured-key", STANDARD_ID, STANDARD_TS, &body);
    let forged = standard_headers(STANDARD_ID, &ts, &forged);
    // Correctly signed, but ten minutes old.
    let stale_ts = STANDARD_TS - 600;
    let stale_ts_text = stale_ts.to_string();
    let stale = standard::sign(&key, STANDARD_ID, stale_ts, &body);
    let stale = standard_headers(STANDARD_ID, &stale_ts_text, &stale);
    for verifier in [&one_key, &two_keys] {
        assert_eq!(
            verifier.verify(forged, &body, STANDARD_TS).map(|_| ()),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verifier.verify(stale, &body, STANDARD_TS).map(|_| ()),
            Err(VerifyError::Expired)
        );
    }

    group.throughput(Throughput::Bytes(len as u64));
    for (name, verifier, headers) in [
        ("mismatch_one_key", &one_key, forged),
        ("mismatch_two_keys", &two_keys, forged),
        ("expired", &one_key, stale),
    ] {
        group.bench_with_input(BenchmarkId::new(name, len), &body, |b, body| {
            b.iter(|| {
                verifier
                    .verify(black_box(headers), black_box(body), black_box(STANDARD_TS))
                    .is_err()
            });
        });
    }
    group.finish();
}

/// NetSapiens-shaped correlation ids (a UUID with a short prefix).
fn correlation_id(n: u32) -> String {
    format!("ns-{n:08x}-7c1e-4b2a-9f30-{:012x}", u64::from(n) * 7919)
}

fn correlation_lookup(c: &mut Criterion) {
    const IDS: u32 = 10_000;
    let ids = CorrelationIds::new();
    for n in 0..IDS {
        ids.insert(correlation_id(n), n);
    }
    assert_eq!(ids.len(), IDS as usize);
    let body = body(512);
    let known = correlation_id(IDS / 2);
    let unknown = correlation_id(IDS + 1);
    assert_eq!(
        ids.verify(Some(known.as_bytes()), &body).map(|(_, n)| n),
        Ok(IDS / 2)
    );
    assert_eq!(
        ids.verify(Some(unknown.as_bytes()), &body).map(|(_, n)| n),
        Err(VerifyError::Mismatch)
    );

    let mut group = c.benchmark_group("correlation_lookup_10000_ids");
    group.bench_function("known", |b| {
        b.iter(|| {
            ids.verify(black_box(Some(known.as_bytes())), black_box(&body))
                .is_ok()
        });
    });
    group.bench_function("unknown", |b| {
        b.iter(|| {
            ids.verify(black_box(Some(unknown.as_bytes())), black_box(&body))
                .is_err()
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    verify_valid,
    verify_varied,
    verify_mismatch,
    standard_valid,
    standard_varied,
    standard_rejected,
    correlation_lookup
);
criterion_main!(benches);
