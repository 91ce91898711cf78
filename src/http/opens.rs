//! How often one consumer may open a stream that costs the gateway work:
//! one that starts with a snapshot (no `Last-Event-ID`) or a replay (with
//! one), on `/v1/stream` and `/v1/ws` alike. A stream opened with
//! `snapshot=false` and no id costs nothing and is never counted.
//!
//! A consumer is a client address (see [`super::client_addr`]; IPv6 by its
//! /64, which one host usually holds whole) together with the token it
//! presented. Each gets a bucket of [`OpenLimit::burst`] opens, refilled at
//! [`OpenLimit::per_minute`]; an open finding it empty is answered 429 with
//! `Retry-After`. Snapshots and replays no longer stall anyone else (see
//! [`crate::presence::snapshot`]), but each still reads the whole store or
//! history for its consumer: the limit keeps one consumer reconnecting in a
//! loop from taking a core.
//!
//! Memory is bounded: at most [`MAX_KEYS`] buckets; when that many are in
//! use, full ones (which say nothing a missing one would not) are dropped,
//! and if none is full, new consumers share one bucket until some are.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Most buckets kept.
pub const MAX_KEYS: usize = 10_000;

/// `consumers.stream_open_burst` and `consumers.stream_opens_per_minute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenLimit {
    /// Opens one consumer may make at once; 0 turns the limit off.
    pub burst: u32,
    /// Opens it regains per minute (at least 1).
    pub per_minute: u32,
}

impl Default for OpenLimit {
    fn default() -> Self {
        OpenLimit {
            burst: 60,
            per_minute: 60,
        }
    }
}

/// Who opens: a client address (an IPv6 one cut to its /64) and a digest
/// of the token presented (never the token itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: IpAddr,
    token: [u8; 8],
}

impl Key {
    fn new(addr: IpAddr, token: Option<&[u8]>) -> Self {
        let addr = match addr.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
            v4 => v4,
        };
        let mut digest = [0u8; 8];
        if let Some(token) = token {
            digest.copy_from_slice(&Sha256::digest(token)[..8]);
        }
        Key {
            addr,
            token: digest,
        }
    }

    /// The bucket new consumers share while every other one is in use.
    const OVERFLOW: Key = Key {
        addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        token: [0xff; 8],
    };
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Opens left, in thousandths (whole opens are taken).
    milli: u64,
    at: Instant,
}

/// The buckets of every consumer.
#[derive(Debug)]
pub struct StreamOpens {
    limit: OpenLimit,
    buckets: Mutex<HashMap<Key, Bucket>>,
}

impl StreamOpens {
    pub fn new(limit: OpenLimit) -> Self {
        StreamOpens {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limit it applies.
    pub fn limit(&self) -> OpenLimit {
        self.limit
    }

    /// Takes one open for the consumer at `addr` with `token`, at `now`;
    /// when none is left, the whole seconds until one is.
    pub fn take(&self, addr: IpAddr, token: Option<&[u8]>, now: Instant) -> Result<(), u32> {
        if self.limit.burst == 0 {
            return Ok(());
        }
        let full = u64::from(self.limit.burst) * 1000;
        let per_minute = u64::from(self.limit.per_minute.max(1));
        let refill = |b: &Bucket| {
            let elapsed_ms = now.saturating_duration_since(b.at).as_millis();
            let gained = elapsed_ms.saturating_mul(u128::from(per_minute)) / 60;
            full.min(
                b.milli
                    .saturating_add(u64::try_from(gained).unwrap_or(u64::MAX)),
            )
        };
        let mut buckets = self.buckets.lock();
        let mut key = Key::new(addr, token);
        if !buckets.contains_key(&key) && buckets.len() >= MAX_KEYS {
            buckets.retain(|_, b| refill(b) < full);
            if buckets.len() >= MAX_KEYS {
                key = Key::OVERFLOW;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            milli: full,
            at: now,
        });
        bucket.milli = refill(bucket);
        bucket.at = now;
        if bucket.milli >= 1000 {
            bucket.milli -= 1000;
            return Ok(());
        }
        // Milliseconds until a whole open is back, in whole seconds.
        let wait_ms = (1000 - bucket.milli) * 60 / per_minute;
        Err(u32::try_from(wait_ms.div_ceil(1000))
            .unwrap_or(u32::MAX)
            .max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_one_open_per_interval_per_consumer() {
        let opens = StreamOpens::new(OpenLimit {
            burst: 3,
            per_minute: 30,
        });
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(opens.take(a, Some(b"t1"), t0), Ok(()));
        }
        assert_eq!(opens.take(a, Some(b"t1"), t0), Err(2), "one every 2 s");
        // Other consumers: another token, another address, no token.
        assert_eq!(opens.take(a, Some(b"t2"), t0), Ok(()));
        assert_eq!(opens.take(ip("192.0.2.2"), Some(b"t1"), t0), Ok(()));
        assert_eq!(opens.take(a, None, t0), Ok(()));
        // Half the interval: not yet; the whole of it: one more, only one.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(opens.take(a, Some(b"t1"), t1), Err(1));
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(opens.take(a, Some(b"t1"), t2), Ok(()));
        assert!(opens.take(a, Some(b"t1"), t2).is_err());
        // Refused opens do not push the next one further away.
        let t3 = t2 + Duration::from_secs(2);
        assert_eq!(opens.take(a, Some(b"t1"), t3), Ok(()));
        // Long idle: the full burst again, never more.
        let later = t3 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(opens.take(a, Some(b"t1"), later), Ok(()));
        }
        assert!(opens.take(a, Some(b"t1"), later).is_err());
    }

    #[test]
    fn one_ipv6_host_is_its_64() {
        let opens = StreamOpens::new(OpenLimit {
            burst: 1,
            per_minute: 1,
        });
        let now = Instant::now();
        assert_eq!(opens.take(ip("2001:db8:1:2::1"), None, now), Ok(()));
        assert_eq!(
            opens.take(ip("2001:db8:1:2:ffff::9"), None, now),
            Err(60),
            "same /64"
        );
        assert_eq!(opens.take(ip("2001:db8:1:3::1"), None, now), Ok(()));
        // An IPv4 client seen as IPv4-mapped is the same client.
        assert_eq!(opens.take(ip("198.51.100.7"), None, now), Ok(()));
        assert!(opens.take(ip("::ffff:198.51.100.7"), None, now).is_err());
    }

    #[test]
    fn zero_burst_is_no_limit() {
        let opens = StreamOpens::new(OpenLimit {
            burst: 0,
            per_minute: 1,
        });
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(opens.take(ip("192.0.2.1"), None, now), Ok(()));
        }
    }

    /// Many addresses (an attacker with a /48 of IPv6) keep at most
    /// MAX_KEYS buckets; beyond them new ones share one, and once buckets
    /// refill they make room again.
    #[test]
    fn buckets_are_bounded() {
        let opens = StreamOpens::new(OpenLimit {
            burst: 1,
            per_minute: 60,
        });
        let now = Instant::now();
        for i in 0..MAX_KEYS as u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(opens.take(addr, None, now), Ok(()));
        }
        assert_eq!(opens.buckets.lock().len(), MAX_KEYS);
        let newcomer = ip("192.0.2.1");
        assert_eq!(opens.take(newcomer, None, now), Ok(()), "the shared one");
        assert!(opens.take(ip("192.0.2.2"), None, now).is_err(), "shared");
        assert_eq!(opens.buckets.lock().len(), MAX_KEYS + 1);
        // A second later every bucket is full again: dropped, room made.
        let later = now + Duration::from_secs(1);
        assert_eq!(opens.take(ip("192.0.2.3"), None, later), Ok(()));
        assert!(opens.buckets.lock().len() <= 2);
    }
}
