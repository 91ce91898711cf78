//! `[server]`: where the gateway listens, the limits of its HTTP side (body
//! size and time, requests in flight and per client, connections, request
//! heads, write timeout, shutdown grace, trusted proxies) and the name of
//! this process among replicas (`replica_id`). Raw form, defaults,
//! validation and the typed [`ServerConfig`].

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
    /// How long a webhook body may take to arrive, from the request's head.
    pub body_timeout: Duration,
    /// Webhook requests of one client address whose bodies are still
    /// arriving, at most.
    pub max_requests_per_client: usize,
    /// Open connections, at most; more are refused at once.
    pub max_connections: usize,
    /// How long a request head may take to arrive (also how long a
    /// keep-alive connection may sit idle).
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// This process among the replicas sharing a store (lease holder in
    /// `/v1/sources`); default: `<host name>-<process id>`.
    pub replica_id: String,
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
    body_timeout_secs: u64,
    max_requests_per_client: u64,
    max_connections: u64,
    header_read_timeout_secs: u64,
    max_header_bytes: u64,
    replica_id: Option<String>,
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
            body_timeout_secs: 5,
            max_requests_per_client: 64,
            max_connections: 10_000,
            header_read_timeout_secs: 10,
            max_header_bytes: 16 * 1024,
            replica_id: None,
        }
    }
}

/// Checks `[server]`, reporting each bad key through `problem`. `lookup`
/// reads the environment (`HOSTNAME`, for the default replica id).
pub(super) fn resolve(
    raw: RawServer,
    lookup: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(String, String),
) -> ServerConfig {
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
    for (key, value) in [
        ("server.body_timeout_secs", raw.body_timeout_secs),
        (
            "server.header_read_timeout_secs",
            raw.header_read_timeout_secs,
        ),
    ] {
        if !(1..=3600).contains(&value) {
            problem(key.into(), "must be between 1 and 3600".into());
        }
    }
    if raw.max_requests_per_client == 0 {
        problem(
            "server.max_requests_per_client".into(),
            "must be at least 1".into(),
        );
    }
    if !(1..=1_000_000).contains(&raw.max_connections) {
        problem(
            "server.max_connections".into(),
            "must be between 1 and 1000000".into(),
        );
    }
    // hyper reads a head into a buffer of at least 8 KiB.
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&raw.max_header_bytes) {
        problem(
            "server.max_header_bytes".into(),
            format!("must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}"),
        );
    }
    let trusted_proxies = parse_nets(&raw.trusted_proxies, "server.trusted_proxies", problem);
    let replica_id = match raw.replica_id {
        Some(id) => {
            if let Err(m) = check_replica_id(&id) {
                problem("server.replica_id".into(), m);
            }
            id
        }
        None => default_replica_id(
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
            lookup("HOSTNAME"),
            std::process::id(),
        ),
    };
    ServerConfig {
        listen,
        body_limit_bytes: usize::try_from(raw.body_limit_bytes).unwrap_or(usize::MAX),
        trusted_proxies,
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs),
        max_in_flight: usize::try_from(raw.max_in_flight).unwrap_or(usize::MAX),
        write_timeout: Duration::from_secs(raw.write_timeout_secs),
        body_timeout: Duration::from_secs(raw.body_timeout_secs),
        max_requests_per_client: usize::try_from(raw.max_requests_per_client).unwrap_or(usize::MAX),
        max_connections: usize::try_from(raw.max_connections).unwrap_or(usize::MAX),
        header_read_timeout: Duration::from_secs(raw.header_read_timeout_secs),
        max_header_bytes: usize::try_from(raw.max_header_bytes).unwrap_or(usize::MAX),
        replica_id,
    }
}

/// Bounds of `server.max_header_bytes`: hyper's smallest read buffer, and
/// far more than any provider sends.
const MIN_HEADER_BYTES: u64 = 8 * 1024;
const MAX_HEADER_BYTES: u64 = 1024 * 1024;

/// The longest replica id: it is stored with every lease and shown in
/// `/v1/sources`, so it stays a name, not a document.
const MAX_REPLICA_ID: usize = 128;

/// A replica id is one printable word: it appears in logs, in Redis values
/// and in JSON, and two replicas must be told apart at a glance.
fn check_replica_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("must not be empty".into())
    } else if id.chars().count() > MAX_REPLICA_ID {
        Err(format!("must be at most {MAX_REPLICA_ID} characters"))
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "{id:?} must not contain whitespace or control characters"
        ))
    } else {
        Ok(())
    }
}

/// `<host name>-<process id>`: unique among replicas on different hosts
/// (a container's host name is its id or pod name) and among processes on
/// one host. The
/// host name comes from the kernel, else `$HOSTNAME`; one that would not
/// make a valid id is passed over.
fn default_replica_id(kernel: Option<String>, env: Option<String>, pid: u32) -> String {
    let host = [kernel, env]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty() && check_replica_id(&format!("{name}-{pid}")).is_ok())
        .unwrap_or_else(|| "presence-gateway".into());
    format!("{host}-{pid}")
}

#[cfg(test)]
mod tests {
    use super::default_replica_id;
    use crate::config::ConfigError;
    use crate::config::test_support::parse;

    #[test]
    fn edge_limits_have_defaults_and_bounds() {
        let c = parse("", &[]).unwrap().server;
        assert_eq!(c.body_timeout.as_secs(), 5);
        assert_eq!(c.max_requests_per_client, 64);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.header_read_timeout.as_secs(), 10);
        assert_eq!(c.max_header_bytes, 16 * 1024);
        let cases: &[(&str, &str, &str)] = &[
            (
                "max_connections = 0",
                "server.max_connections",
                "must be between 1 and 1000000",
            ),
            (
                "max_requests_per_client = 0",
                "server.max_requests_per_client",
                "must be at least 1",
            ),
            (
                "body_timeout_secs = 0",
                "server.body_timeout_secs",
                "must be between 1 and 3600",
            ),
            (
                "header_read_timeout_secs = 0",
                "server.header_read_timeout_secs",
                "must be between 1 and 3600",
            ),
            (
                "max_header_bytes = 4096",
                "server.max_header_bytes",
                "must be between 8192 and 1048576",
            ),
        ];
        for (line, key, message) in cases {
            let text = format!("[server]\n{line}\n");
            let Err(ConfigError::Invalid(problems)) = parse(&text, &[]) else {
                panic!("{line:?} should be invalid");
            };
            let found: Vec<(&str, &str)> = problems
                .iter()
                .map(|p| (p.key.as_str(), p.message.as_str()))
                .collect();
            assert_eq!(found, [(*key, *message)], "{line:?}");
        }
    }

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

    #[test]
    fn replica_id_is_taken_as_given() {
        let c = parse("[server]\nreplica_id = \"gw-1\"\n", &[]).unwrap();
        assert_eq!(c.server.replica_id, "gw-1");
        let long = "r".repeat(128);
        let c = parse(&format!("[server]\nreplica_id = {long:?}\n"), &[]).unwrap();
        assert_eq!(c.server.replica_id, long);
        let c = parse("[server]\nreplica_id = \"zürich-1\"\n", &[]).unwrap();
        assert_eq!(c.server.replica_id, "zürich-1");
    }

    #[test]
    fn replica_id_problems_name_the_key() {
        let too_long = format!("[server]\nreplica_id = {:?}", "r".repeat(129));
        let cases: &[(&str, &str)] = &[
            ("[server]\nreplica_id = \"\"", "must not be empty"),
            (&too_long, "must be at most 128 characters"),
            (
                "[server]\nreplica_id = \"gw 1\"",
                "\"gw 1\" must not contain whitespace or control characters",
            ),
            (
                "[server]\nreplica_id = \"gw-1\\n\"",
                "\"gw-1\\n\" must not contain whitespace or control characters",
            ),
            (
                "[server]\nreplica_id = \"gw\\u0007\"",
                "\"gw\\u{7}\" must not contain whitespace or control characters",
            ),
        ];
        for (text, message) in cases {
            let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
                panic!("{text:?} should be invalid");
            };
            let found: Vec<(&str, &str)> = problems
                .iter()
                .map(|p| (p.key.as_str(), p.message.as_str()))
                .collect();
            assert_eq!(found, [("server.replica_id", *message)], "{text:?}");
        }
    }

    #[test]
    fn default_replica_id_is_host_name_and_process_id() {
        let c = parse("", &[]).unwrap();
        let pid = std::process::id();
        let suffix = format!("-{pid}");
        let host = c.server.replica_id.strip_suffix(&suffix).unwrap();
        assert!(!host.is_empty() && !host.contains(char::is_whitespace));
    }

    #[test]
    fn default_replica_id_prefers_the_kernel_host_name() {
        let some = |s: &str| Some(s.to_owned());
        let cases = [
            (some("gw-host\n"), some("env-host"), "gw-host-42"),
            (None, some("env-host"), "env-host-42"),
            (some("\n"), some("env-host"), "env-host-42"),
            (some("bad host\n"), some(" env-host "), "env-host-42"),
            (some(&"h".repeat(200)), None, "presence-gateway-42"),
            (None, some(""), "presence-gateway-42"),
            (None, None, "presence-gateway-42"),
        ];
        for (kernel, env, expected) in cases {
            assert_eq!(
                default_replica_id(kernel.clone(), env.clone(), 42),
                expected,
                "{kernel:?} {env:?}"
            );
        }
    }
}
