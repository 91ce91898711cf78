//! The verifiers do no heap allocation per request: Mitel's hex HMAC and
//! Standard Webhooks'. Their own test binary, because it installs a
//! counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::standard::{self, Headers, decode_secret};
use presence_gateway::verify::{HmacHexVerifier, StandardVerifier, VerifyError};

struct Counting;

thread_local! {
    /// Allocations made by this thread; counted per thread so that the test
    /// harness's own threads cannot disturb the figure.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the counter
// is a const-initialized thread-local, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What `verify` should return for a case.
type Expected = Result<(), VerifyError>;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn verifier_does_not_allocate_per_request() {
    let keys = ["old-application-id", "829e823f-f27e-47ee-a101-5d5e9c6266bf"];
    let verifier = HmacHexVerifier::new(keys);
    for size in [0usize, 512, 4096, 65_536] {
        let body = vec![b'x'; size];
        let good = sign_hex(keys[1].as_bytes(), &body);
        let upper = good.to_uppercase();
        let wrong = "0".repeat(64);
        let cases: [(Option<&[u8]>, Expected); 6] = [
            (Some(good.as_bytes()), Ok(())),
            (Some(upper.as_bytes()), Ok(())),
            (Some(wrong.as_bytes()), Err(VerifyError::Mismatch)),
            (Some(b"sha256=abc"), Err(VerifyError::Malformed)),
            (Some(b""), Err(VerifyError::Missing)),
            (None, Err(VerifyError::Missing)),
        ];
        for (header, expected) in cases {
            let mut result = None;
            let count = allocations_during(|| {
                result = Some(verifier.verify(header, &body).map(|_| ()));
            });
            assert_eq!(result, Some(expected), "size {size}");
            assert_eq!(
                count, 0,
                "size {size}, case {expected:?}: {count} allocations"
            );
        }
    }
    // The counter works: a real allocation is seen.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 16]))) > 0);
}

#[test]
fn standard_verifier_does_not_allocate_per_request() {
    // The public Standard Webhooks test secret, and an older one kept for
    // rotation (listed first, so a match on the new key hashes both).
    let old = decode_secret(b"whsec_b2xkLXN0YW5kYXJkLWtleS0yMDI1").unwrap();
    let key = decode_secret(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let verifier = StandardVerifier::new([&old, &key], 300);
    // A fixed clock: the verifier takes `now` as an argument.
    let now: i64 = 1_764_000_930;
    let id = "msg_2pQ7vXk3N8aLmR4tYc9WjE1bZfH";
    let ts = now.to_string();
    let skewed_ts = (now - 299).to_string();
    let stale_ts = (now - 301).to_string();
    for size in [0usize, 512, 4096, 65_536] {
        let body = vec![b'x'; size];
        let good = standard::sign(&key, id, now, &body);
        let skewed = standard::sign(&key, id, now - 299, &body);
        let stale = standard::sign(&key, id, now - 301, &body);
        let forged = standard::sign(b"not-a-configured-key", id, now, &body);
        let unpadded = good.trim_end_matches('=');
        // Entries of other versions, a wrong v1 digest and junk around the
        // matching one: only the v1 entries count.
        let several = format!(
            "v1a,{0} v2,{0} {forged}  garbage {good} v1,{1}",
            &good[3..],
            "A".repeat(43)
        );
        let only_other_versions = format!("v1a,{0} v2,{0}", &good[3..]);
        let cases: Vec<(Headers<'_>, Expected)> = vec![
            (with(&ts, &good, id), Ok(())),
            (with(&ts, unpadded, id), Ok(())),
            (with(&ts, &several, id), Ok(())),
            (with(&skewed_ts, &skewed, id), Ok(())),
            (with(&ts, &forged, id), Err(VerifyError::Mismatch)),
            (with(&ts, &good, "msg_other"), Err(VerifyError::Mismatch)),
            (with(&stale_ts, &stale, id), Err(VerifyError::Expired)),
            (
                with(&ts, &only_other_versions, id),
                Err(VerifyError::Malformed),
            ),
            (with(&ts, "v1,not base64!", id), Err(VerifyError::Malformed)),
            (with("1764000930.5", &good, id), Err(VerifyError::Malformed)),
            (with(&ts, &good, "msg id"), Err(VerifyError::Malformed)),
            (with(&ts, "", id), Err(VerifyError::Missing)),
            (
                Headers {
                    signature: None,
                    ..with(&ts, &good, id)
                },
                Err(VerifyError::Missing),
            ),
        ];
        for (i, (presented, expected)) in cases.into_iter().enumerate() {
            let mut result = None;
            let count = allocations_during(|| {
                result = Some(verifier.verify(presented, &body, now).map(|_| ()));
            });
            assert_eq!(result, Some(expected), "size {size}, case {i}");
            assert_eq!(
                count, 0,
                "size {size}, case {i} ({expected:?}): {count} allocations"
            );
        }
    }
}

/// The three headers of a Standard Webhooks request.
fn with<'a>(timestamp: &'a str, signature: &'a str, id: &'a str) -> Headers<'a> {
    Headers {
        id: Some(id.as_bytes()),
        timestamp: Some(timestamp.as_bytes()),
        signature: Some(signature.as_bytes()),
    }
}
