//! Recently seen provider event ids, for duplicate detection.
//!
//! A fixed, set-associative table of 64-bit slots, allocated once: an id's
//! keyed digest picks one bucket of eight slots (one cache line) and a 40-bit
//! fingerprint; the slot also holds the time the id was first seen, in ticks
//! of 1/4096 of the window. Looking an id up costs one cache line and no lock
//! (slots are atomics), which matters at a million principals, where every
//! other memory access of an update is a cache miss too.
//!
//! An id is remembered for the window (to within one tick). Memory is
//! bounded: when all eight slots of a bucket hold live ids, the oldest is
//! forgotten early. The table has twice `capacity` slots, so with `capacity`
//! ids arriving per window a bucket receives four on average, and overflows
//! (eight or more) for about one id in twenty; at half that rate for about
//! one in a thousand.
//!
//! Fingerprints are 40 bits of a keyed digest: two different ids are taken
//! for one another with probability 2⁻⁴⁰ per live slot of their bucket.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots per bucket: 8 × 8 bytes, one cache line.
const WAYS: usize = 8;
const TICK_BITS: u32 = 24;
const TICK_MASK: u64 = (1 << TICK_BITS) - 1;
/// Ticks per window: fine enough that "within one tick" is a small error,
/// coarse enough that the 24-bit clock wraps only after 4096 windows.
const TICKS_PER_WINDOW: i64 = 4096;

#[repr(align(64))]
struct Bucket([AtomicU64; WAYS]);

/// The event ids one source has seen recently.
pub(crate) struct Dedup {
    buckets: Box<[Bucket]>,
    /// Milliseconds per tick; 0 disables duplicate detection (empty window).
    tick_ms: i64,
    /// The window in ticks.
    window: u64,
}

impl Dedup {
    /// A table remembering ids for `window_ms`, sized for `capacity` ids per
    /// window.
    pub(crate) fn new(window_ms: i64, capacity: usize) -> Self {
        if window_ms <= 0 {
            return Dedup {
                buckets: Box::new([]),
                tick_ms: 0,
                window: 0,
            };
        }
        let tick_ms = (window_ms + TICKS_PER_WINDOW - 1) / TICKS_PER_WINDOW;
        let buckets = (capacity.max(1).saturating_mul(2)).div_ceil(WAYS);
        let buckets = buckets.checked_next_power_of_two().unwrap_or(1 << 40);
        Dedup {
            buckets: (0..buckets).map(|_| Bucket(Default::default())).collect(),
            tick_ms,
            window: ((window_ms + tick_ms - 1) / tick_ms) as u64,
        }
    }

    /// Whether duplicates are detected at all (a non-empty window).
    pub(crate) fn enabled(&self) -> bool {
        self.tick_ms != 0
    }

    /// Starts reading the bucket of `bucket_hash` and returns a handle for
    /// [`Dedup::seen`]. Reading it before the caller's own lookups lets the
    /// CPU wait for both cache misses at once instead of one after the other
    /// (measured: a third off a duplicate check at a million ids).
    pub(crate) fn probe(&self, bucket_hash: u64) -> Probe<'_> {
        let bucket = self
            .buckets
            .get(bucket_hash as usize & self.buckets.len().wrapping_sub(1))
            .map(|b| &b.0);
        let first = bucket.map_or(0, |b| b[0].load(Ordering::Relaxed));
        Probe { bucket, first }
    }

    /// Records the id with digest `(bucket_hash, fingerprint_hash)` seen at
    /// `now_ms`; returns whether it was seen within the window before.
    #[cfg(test)]
    pub(crate) fn seen(&self, bucket_hash: u64, fingerprint_hash: u64, now_ms: i64) -> bool {
        self.probe(bucket_hash).seen(self, fingerprint_hash, now_ms)
    }
}

/// A bucket being read; see [`Dedup::probe`].
pub(crate) struct Probe<'a> {
    bucket: Option<&'a [AtomicU64; WAYS]>,
    first: u64,
}

impl Probe<'_> {
    /// Records the id with fingerprint `fingerprint_hash` seen at `now_ms`
    /// in this bucket of `dedup`; returns whether it was seen within the
    /// window before.
    pub(crate) fn seen(self, dedup: &Dedup, fingerprint_hash: u64, now_ms: i64) -> bool {
        let Some(bucket) = self.bucket else {
            return false; // empty window: detection disabled
        };
        let now = (now_ms.div_euclid(dedup.tick_ms) as u64) & TICK_MASK;
        // Never 0, which marks an empty slot.
        let fingerprint = (fingerprint_hash >> TICK_BITS) | 1;
        let age = |slot: u64| now.wrapping_sub(slot & TICK_MASK) & TICK_MASK;

        let mut victim = 0;
        let mut victim_age = 0;
        for (i, slot) in bucket.iter().enumerate() {
            let value = if i == 0 {
                self.first
            } else {
                slot.load(Ordering::Relaxed)
            };
            let value_age = if value == 0 { u64::MAX } else { age(value) };
            if value != 0 && value >> TICK_BITS == fingerprint && value_age < dedup.window {
                return true;
            }
            // An empty or expired slot first, else the oldest.
            let value_age = if value_age >= dedup.window {
                u64::MAX
            } else {
                value_age
            };
            if value_age > victim_age || i == 0 {
                victim = i;
                victim_age = value_age;
            }
        }
        // A racing writer of the same bucket (another shard) may overwrite
        // this slot; the id is then forgotten early, nothing worse.
        bucket[victim].store((fingerprint << TICK_BITS) | now, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_for_one_window() {
        let d = Dedup::new(1_000, 1_000);
        let (a, b) = (11 << 25, 12 << 25);
        assert!(!d.seen(1, a, 0));
        assert!(d.seen(1, a, 999));
        // Same bucket, other fingerprint: a different id.
        assert!(!d.seen(1, b, 500));
        // Expired one tick after the window.
        assert!(!d.seen(1, a, 1_001));
        // ...and remembered again from then on.
        assert!(d.seen(1, a, 1_500));
    }

    #[test]
    fn a_full_bucket_forgets_its_oldest_id_first() {
        let d = Dedup::new(1_000_000, 1);
        // One bucket of eight slots: ids 1..=8 fill it, 9 evicts 1.
        // (Fingerprints are the top 40 bits with the lowest forced to 1.)
        let id = |n: u64| n << 25;
        for n in 1..=9 {
            assert!(!d.seen(0, id(n), n as i64 * 1_000));
        }
        assert!(!d.seen(0, id(1), 20_000), "the oldest was forgotten");
        for n in 3..=9 {
            assert!(d.seen(0, id(n), 20_000), "id {n}");
        }
    }

    #[test]
    fn empty_window_disables_detection() {
        let d = Dedup::new(0, 100);
        assert!(!d.seen(1, 1 << 24, 0));
        assert!(!d.seen(1, 1 << 24, 0));
    }

    #[test]
    fn survives_clock_wrap_and_steps_back() {
        let d = Dedup::new(100, 10);
        let tick = 1; // 100 ms / 4096 rounds up to 1 ms
        let wrap = (1i64 << 24) * tick;
        let (a, b) = (5 << 25, 6 << 25);
        assert!(!d.seen(3, a, wrap - 10));
        assert!(d.seen(3, a, wrap + 50), "across the 24-bit wrap");
        // A clock that steps back makes the id look expired, not stuck.
        assert!(!d.seen(3, b, 10_000));
        assert!(!d.seen(3, b, 9_000));
    }
}
