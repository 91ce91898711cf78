//! The client address used for `allow_ips` and logs.
//!
//! It is the socket peer, unless the peer is a trusted proxy: then the
//! right-most `X-Forwarded-For` hop that is not itself a trusted proxy. Hops to
//! the left of that one were written by the client and cannot be believed.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&ip))
}

/// Derives the client address from the peer and the forwarding headers.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted(peer, proxies) {
        return peer;
    }
    let mut last_trusted = peer;
    // Several headers are one list, in order (RFC 9110 §5.3).
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|value| {
            value
                .to_str()
                .unwrap_or("")
                .rsplit(',')
                .map(str::trim)
                .collect::<Vec<_>>()
        });
    for hop in hops {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                if !trusted(ip, proxies) {
                    return ip;
                }
                last_trusted = ip;
            }
            // A hop we cannot read ends the chain we can vouch for.
            Err(_) => return last_trusted,
        }
    }
    last_trusted
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_addr(ip("203.0.113.9"), &headers(&["1.2.3.4"]), &proxies),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn right_most_untrusted_hop_behind_trusted_proxies() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&["6.6.6.6, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(
            client_addr(ip("10.0.0.1"), &h, &proxies),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn all_trusted_or_garbage_falls_back_to_the_last_trusted_hop() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_addr(ip("10.0.0.1"), &headers(&[]), &proxies),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_addr(ip("10.0.0.1"), &headers(&["10.0.0.5"]), &proxies),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_addr(ip("10.0.0.1"), &headers(&["bogus, 10.0.0.7"]), &proxies),
            ip("10.0.0.7")
        );
    }

    #[test]
    fn ipv4_mapped_peers_are_canonical() {
        let proxies: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_addr(ip("::ffff:127.0.0.1"), &headers(&["192.0.2.1"]), &proxies),
            ip("192.0.2.1")
        );
    }
}
