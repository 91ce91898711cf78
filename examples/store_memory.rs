//! Memory figure of the presence store: loads N principals (36-character
//! ids, default 1 000 000) with a typical record each and prints the bytes
//! held per principal, measured by a counting global allocator (live bytes
//! requested, so allocator rounding is not included) and by RSS.
//!
//! `cargo run --release --example store_memory [-- N]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use presence_gateway::presence::store::StoreLimits;
use presence_gateway::presence::{Availability, Millis, PresenceUpdate, Records};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    const ID_LEN: usize = 36;
    // No history and no dedup entries: this measures the records themselves.
    let store = Records::new(
        &[Arc::from("mitel")],
        StoreLimits {
            history: 0,
            dedup_window_ms: 600_000,
            dedup_capacity: 1,
            stream_buffer: 64,
            max_future_skew_ms: 300_000,
        },
    );
    let ids: Vec<String> = (0..n)
        .map(|i| format!("{:08x}-5a9e-4a57-9d1e-{:012x}", i as u32, i))
        .collect();
    assert!(ids.iter().all(|id| id.len() == ID_LEN));

    let live_before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss_bytes();
    for (i, id) in ids.iter().enumerate() {
        let update = PresenceUpdate {
            principal: Cow::Borrowed(id),
            availability: Availability::Busy,
            activity: None,
            status_text: None,
            raw_status: Some(Cow::Borrowed("Busy")),
            observed_at: Some(Millis(1_764_000_000_000 + i as i64)),
            event_id: None,
        };
        store.apply(0, &update, Millis(1_764_000_000_000));
    }
    let live = (LIVE.load(Ordering::Relaxed) - live_before) as f64;
    let rss = match (rss_before, rss_bytes()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
        _ => None,
    };
    assert_eq!(store.len(0), n as usize);
    let per = live / n as f64;
    println!(
        "principals: {n} (ids of {ID_LEN} bytes), records: {}",
        store.len(0)
    );
    println!(
        "allocated: {:.1} MiB = {per:.1} bytes per principal, {:.1} beyond the id's own {ID_LEN} bytes",
        live / 1_048_576.0,
        per - ID_LEN as f64
    );
    if let Some(rss) = rss {
        println!(
            "RSS growth: {:.1} MiB = {:.1} bytes per principal",
            rss / 1_048_576.0,
            rss / n as f64
        );
    }
    std::hint::black_box(&store);
}
