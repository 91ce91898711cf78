//! Hot path of every Mitel webhook: hex HMAC-SHA256 verification.
//!
//! Body sizes span a small presence notification (512 B), a large one (4 KiB)
//! and a body near the size where hashing dominates everything else (64 KiB).
//! The rotation case puts the matching key second, so the first key's HMAC is
//! computed and rejected before the match: the cost of keeping an old key
//! configured during a rotation. The mismatch case is what a forged or
//! misconfigured sender costs: every configured key is tried.
//!
//! NetSapiens posts are authenticated by their `X-Correlation-ID` instead: the
//! presented id is digested under the per-process key and looked up among the
//! source's ids, here 10 000 of them (a hit, a well-formed miss).
//!
//! Run: `cargo bench --bench verify`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::{CorrelationIds, HmacHexVerifier, VerifyError};

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
    correlation_lookup
);
criterion_main!(benches);
