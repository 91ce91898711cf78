//! The verifier does no heap allocation per request. Its own test binary,
//! because it installs a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::{HmacHexVerifier, VerifyError};

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
