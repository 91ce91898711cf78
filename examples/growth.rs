//! Pauses while the store grows: applies N new principals (default
//! 2 000 000) to one source, RUNS times (default 3) on fresh stores, and
//! reports per run the slowest applies and where they happened.
//!
//! A pause the store causes itself (a table rebuilt under a shard's lock)
//! happens where a shard's index fills up: with 16 shards of tables that
//! double at three quarters full, near 16 × ¾ × 2^k principals (≈ 393 k,
//! 786 k, 1.57 M). Slow applies elsewhere are the scheduler and other
//! processes; compare two builds side by side in one run of
//! `benches/growth/run.sh`, on the same machine at the same time.
//!
//! `cargo run --release --example growth [-- N RUNS]`

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use presence_gateway::presence::store::StoreLimits;
use presence_gateway::presence::{Availability, Millis, PresenceUpdate, Records};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().ok());
    let n = args.next().flatten().unwrap_or(2_000_000);
    let runs = args.next().flatten().unwrap_or(3).max(1);
    let ids: Vec<String> = (0..n)
        .map(|i| format!("{:08x}-5a9e-4a57-9d1e-{:012x}", i as u32, i))
        .collect();
    for run in 1..=runs {
        let store = Records::new(
            &[Arc::from("mitel")],
            StoreLimits {
                history: 65_536,
                dedup_window_ms: 600_000,
                dedup_capacity: n,
                stream_buffer: 64,
                max_future_skew_ms: 300_000,
            },
        );
        let mut took = Vec::with_capacity(n);
        let started = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let update = PresenceUpdate {
                principal: Cow::Borrowed(id),
                availability: Availability::Busy,
                activity: None,
                status_text: None,
                raw_status: Some(Cow::Borrowed("Busy")),
                observed_at: Some(Millis(1_764_000_000_000 + i as i64)),
                event_id: Some(Cow::Owned(format!("event-{i}"))),
            };
            let t = Instant::now();
            store.apply(0, &update, Millis(1_764_000_000_000));
            took.push((t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32, i));
        }
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(&store);
        took.sort_unstable_by(|a, b| b.cmp(a));
        let at = |rank: usize| took[rank.min(n - 1)].0;
        let over_ms = took.iter().take_while(|(us, _)| *us >= 1_000).count();
        println!(
            "RESULT growth run={run} principals={n} secs={secs:.2} max_us={} p9999_us={} p999_us={} over_1ms={over_ms}",
            at(0),
            at(n / 10_000),
            at(n / 1_000),
        );
        let top: Vec<String> = took
            .iter()
            .take(12)
            .map(|(us, i)| format!("{us}us@{}k", i / 1000))
            .collect();
        println!("  slowest (latency@insert position): {}", top.join(" "));
    }
}
