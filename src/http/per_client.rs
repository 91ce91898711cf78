//! Webhook requests in progress per client address, for the bodies that
//! are still arriving.
//!
//! A client that sends a request head and then its body a byte at a time
//! costs itself nothing and the gateway a connection, a task and a buffer
//! for up to `server.body_timeout_secs`. One client address may have at
//! most `server.max_requests_per_client` such requests at once; beyond that
//! a request is refused (429) as soon as its body stalls, so that one
//! address cannot hold the body-reading capacity that other senders share.
//!
//! Only requests whose body did not arrive with their head are counted:
//! a webhook body normally comes in the same segments as its head and is
//! read without ever touching this table, which keeps it off the hot path.
//! The table is sharded by a keyed hash of the address, and an entry lives
//! only while its address has a body in transit.
//!
//! An IPv6 client is counted by its /64 prefix: one host is routinely
//! given a whole /64, so its single addresses are free for it to pick.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};

use parking_lot::Mutex;

/// Shards of the table: more than the cores that may contend for it.
const SHARDS: usize = 16;

/// Requests with a body in transit, per client address.
pub struct PerClient {
    limit: u32,
    hasher: foldhash::fast::RandomState,
    shards: [Mutex<HashMap<IpAddr, u32, foldhash::fast::RandomState>>; SHARDS],
}

impl std::fmt::Debug for PerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerClient")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// One request counted for its client until dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    owner: &'a PerClient,
    key: IpAddr,
}

impl PerClient {
    /// At most `limit` requests per client address.
    pub fn new(limit: usize) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        PerClient {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::with_hasher(hasher.clone()))),
            hasher,
        }
    }

    /// Counts a request of `client`, unless it already has `limit`.
    pub fn enter(&self, client: IpAddr) -> Option<Slot<'_>> {
        let key = key(client);
        let mut shard = self.shard(&key).lock();
        let count = shard.entry(key).or_insert(0);
        if *count >= self.limit {
            if *count == 0 {
                shard.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Slot { owner: self, key })
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<HashMap<IpAddr, u32, foldhash::fast::RandomState>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Requests counted now, over every client.
    #[cfg(test)]
    fn total(&self) -> u32 {
        self.shards
            .iter()
            .map(|s| s.lock().values().sum::<u32>())
            .sum()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut shard = self.owner.shard(&self.key).lock();
        if let Some(count) = shard.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

/// The address a client is counted under: IPv4 as it is, IPv6 by /64.
fn key(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_gets_at_most_its_limit_and_others_are_not_affected() {
        let table = PerClient::new(2);
        let a1 = table.enter(ip("192.0.2.1")).unwrap();
        let _a2 = table.enter(ip("192.0.2.1")).unwrap();
        assert!(table.enter(ip("192.0.2.1")).is_none());
        let _b = table.enter(ip("192.0.2.2")).unwrap();
        drop(a1);
        let _a3 = table.enter(ip("192.0.2.1")).unwrap();
        assert_eq!(table.total(), 3);
    }

    #[test]
    fn entries_go_away_with_their_last_request() {
        let table = PerClient::new(4);
        let slots: Vec<_> = (0..4)
            .map(|_| table.enter(ip("192.0.2.1")).unwrap())
            .collect();
        drop(slots);
        assert_eq!(table.total(), 0);
        assert!(table.shards.iter().all(|s| s.lock().is_empty()));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix() {
        let table = PerClient::new(1);
        let _one = table.enter(ip("2001:db8:1:2::1")).unwrap();
        assert!(table.enter(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(table.enter(ip("2001:db8:1:3::1")).is_some());
        // An IPv4-mapped address is its IPv4 client.
        let _v4 = table.enter(ip("::ffff:192.0.2.7")).unwrap();
        assert!(table.enter(ip("192.0.2.7")).is_none());
    }
}
