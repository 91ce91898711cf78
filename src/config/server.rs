//! `[server]`: where the gateway listens and the limits of its HTTP side
//! (body size, requests in flight, write timeout, shutdown grace, trusted
//! proxies). Raw form, defaults, validation and the typed [`ServerConfig`].

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::parse_nets;

/// `[server]`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub body_limit_bytes: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_grace: Duration,
    pub max_in_flight: usize,
    /// A connection whose peer takes no bytes for this long is closed.
    pub write_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    listen: String,
    body_limit_bytes: u64,
    trusted_proxies: Vec<String>,
    shutdown_grace_secs: u64,
    max_in_flight: u64,
    write_timeout_secs: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "0.0.0.0:8080".into(),
            body_limit_bytes: 256 * 1024,
            trusted_proxies: Vec::new(),
            shutdown_grace_secs: 10,
            max_in_flight: 1024,
            write_timeout_secs: 30,
        }
    }
}

/// Checks `[server]`, reporting each bad key through `problem`.
pub(super) fn resolve(raw: RawServer, problem: &mut impl FnMut(String, String)) -> ServerConfig {
    let listen = raw.listen.parse().unwrap_or_else(|_| {
        problem(
            "server.listen".into(),
            format!("{:?} is not an address:port", raw.listen),
        );
        SocketAddr::from(([0, 0, 0, 0], 8080))
    });
    if raw.body_limit_bytes == 0 || raw.body_limit_bytes > 64 * 1024 * 1024 {
        problem(
            "server.body_limit_bytes".into(),
            "must be between 1 and 67108864 (64 MiB)".into(),
        );
    }
    if raw.max_in_flight == 0 {
        problem("server.max_in_flight".into(), "must be at least 1".into());
    }
    if raw.shutdown_grace_secs > 3600 {
        problem(
            "server.shutdown_grace_secs".into(),
            "must be at most 3600".into(),
        );
    }
    if !(1..=3600).contains(&raw.write_timeout_secs) {
        problem(
            "server.write_timeout_secs".into(),
            "must be between 1 and 3600".into(),
        );
    }
    let trusted_proxies = parse_nets(&raw.trusted_proxies, "server.trusted_proxies", problem);
    ServerConfig {
        listen,
        body_limit_bytes: usize::try_from(raw.body_limit_bytes).unwrap_or(usize::MAX),
        trusted_proxies,
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs),
        max_in_flight: usize::try_from(raw.max_in_flight).unwrap_or(usize::MAX),
        write_timeout: Duration::from_secs(raw.write_timeout_secs),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::parse;

    #[test]
    fn bare_ips_are_single_host_networks() {
        let c = parse(
            "[server]\ntrusted_proxies = [\"10.1.2.3\", \"::1\", \"192.168.0.0/16\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.server.trusted_proxies[0].to_string(), "10.1.2.3/32");
        assert_eq!(c.server.trusted_proxies[1].to_string(), "::1/128");
    }
}
