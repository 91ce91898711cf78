//! `[store]` and `[store.redis]`: how much the presence store keeps (replay
//! history, the duplicate-event window and its capacity) and where it keeps
//! it (`backend`: in memory, optionally persisted to `data_dir`, or on a
//! Redis server shared by several replicas). Raw form, defaults, validation
//! and the typed [`StoreConfig`]. Only the settings live here; the store
//! itself reads them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secrets::{Secret, resolve_secret};

/// `[store]`.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub history: usize,
    pub dedup_window: Duration,
    pub dedup_capacity: usize,
    /// A provider timestamp further than this ahead of the gateway's clock
    /// is not trusted (DESIGN §2).
    pub max_future_skew: Duration,
    /// Records held before events of new principals are refused (503); 0:
    /// no limit. Protects memory from a subscription wider than intended.
    pub max_records: usize,
    pub backend: StoreBackend,
    /// `backend = "memory"`: the directory state is persisted to; `None`:
    /// nothing persists. A relative path is relative to the working
    /// directory, as given.
    pub data_dir: Option<PathBuf>,
    /// `[store.redis]`; checked whatever the backend, used by `Redis`.
    pub redis: RedisConfig,
}

/// `[store] backend`: where presence state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    /// In this process (persisted to `data_dir` when it is set).
    Memory,
    /// On a Redis server, shared by every replica that names it.
    Redis,
}

impl StoreBackend {
    const ALL: [StoreBackend; 2] = [StoreBackend::Memory, StoreBackend::Redis];

    /// The name used in config.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoreBackend::Memory => "memory",
            StoreBackend::Redis => "redis",
        }
    }
}

/// `[store.redis]`.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// redis://, rediss:// or redis+unix:// / unix:// URL; may carry a password, so it is a Secret.
    pub url: Secret,
    pub key_prefix: String,
    pub lease_ttl: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    history: u64,
    dedup_window_secs: u64,
    dedup_capacity: u64,
    max_future_skew_secs: u64,
    max_records: u64,
    backend: String,
    data_dir: Option<String>,
    redis: RawRedis,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            history: 65_536,
            dedup_window_secs: 600,
            dedup_capacity: 1_000_000,
            max_future_skew_secs: 300,
            max_records: 5_000_000,
            backend: StoreBackend::Memory.as_str().into(),
            data_dir: None,
            redis: RawRedis::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    url: String,
    key_prefix: String,
    lease_ttl_secs: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "presence-gateway".into(),
            lease_ttl_secs: 15,
        }
    }
}

/// The URL schemes of a Redis server: TCP, TLS, and a Unix socket (both
/// spellings clients use).
const REDIS_SCHEMES: [&str; 4] = ["redis", "rediss", "redis+unix", "unix"];

/// Checks `[store]` and resolves the Redis URL, reporting each bad key
/// through `problem`.
pub(super) fn resolve(
    raw: RawStore,
    lookup: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(String, String),
) -> StoreConfig {
    if raw.history > 10_000_000 {
        problem("store.history".into(), "must be at most 10000000".into());
    }
    if raw.dedup_capacity == 0 {
        problem("store.dedup_capacity".into(), "must be at least 1".into());
    }
    if raw.max_future_skew_secs > 86_400 {
        problem(
            "store.max_future_skew_secs".into(),
            "must be at most 86400 (a day)".into(),
        );
    }
    let backend = StoreBackend::ALL
        .into_iter()
        .find(|b| b.as_str() == raw.backend)
        .unwrap_or_else(|| {
            problem(
                "store.backend".into(),
                format!(
                    "{:?} is not one of: {}",
                    raw.backend,
                    StoreBackend::ALL.map(StoreBackend::as_str).join(", ")
                ),
            );
            StoreBackend::Memory
        });
    // With Redis it is ignored (a warning at start-up): a container image
    // sets it for the memory backend, and the same image must run on Redis
    // by configuration alone.
    if raw.data_dir.as_deref() == Some("") {
        problem(
            "store.data_dir".into(),
            "must not be empty (leave it out to persist nothing)".into(),
        );
    }
    let redis = resolve_redis(raw.redis, lookup, problem);
    StoreConfig {
        history: usize::try_from(raw.history).unwrap_or(usize::MAX),
        dedup_window: Duration::from_secs(raw.dedup_window_secs),
        dedup_capacity: usize::try_from(raw.dedup_capacity).unwrap_or(usize::MAX),
        max_future_skew: Duration::from_secs(raw.max_future_skew_secs),
        max_records: usize::try_from(raw.max_records).unwrap_or(usize::MAX),
        backend,
        data_dir: raw.data_dir.map(PathBuf::from),
        redis,
    }
}

fn resolve_redis(
    raw: RawRedis,
    lookup: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(String, String),
) -> RedisConfig {
    let url = match resolve_secret(&raw.url, lookup) {
        Ok(url) => {
            let scheme_ok = std::str::from_utf8(url.expose())
                .ok()
                .and_then(|text| reqwest::Url::parse(text).ok())
                .is_some_and(|u| REDIS_SCHEMES.contains(&u.scheme()));
            if !scheme_ok {
                // The URL may carry a password: the message quotes none of it.
                problem(
                    "store.redis.url".into(),
                    "must be a redis://, rediss://, redis+unix:// or unix:// URL".into(),
                );
            }
            url
        }
        Err(m) => {
            problem("store.redis.url".into(), m);
            Secret::new(RawRedis::default().url)
        }
    };
    if raw.key_prefix.is_empty() {
        problem("store.redis.key_prefix".into(), "must not be empty".into());
    } else if raw
        .key_prefix
        .chars()
        .any(|c| c.is_whitespace() || c == '{' || c == '}')
    {
        // Braces delimit a Redis Cluster hash tag, which decides the slot
        // of a key: a prefix must not make one by accident.
        problem(
            "store.redis.key_prefix".into(),
            format!(
                "{:?} must not contain whitespace, \"{{\" or \"}}\"",
                raw.key_prefix
            ),
        );
    }
    // The holder renews at a third of the TTL, so 2 s still leaves room
    // (tests use short leases, as they use short subscription lifetimes);
    // a dead holder's sources go unmanaged for up to the TTL, so at most an
    // hour.
    if !(2..=3600).contains(&raw.lease_ttl_secs) {
        problem(
            "store.redis.lease_ttl_secs".into(),
            "must be between 2 and 3600".into(),
        );
    }
    RedisConfig {
        url,
        key_prefix: raw.key_prefix,
        lease_ttl: Duration::from_secs(raw.lease_ttl_secs),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::StoreBackend;
    use crate::config::ConfigError;
    use crate::config::test_support::parse;

    #[test]
    fn memory_backend_without_persistence_by_default() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.store.backend, StoreBackend::Memory);
        assert_eq!(c.store.data_dir, None);
        assert_eq!(c.store.redis.url.expose(), b"redis://127.0.0.1:6379/0");
        assert_eq!(c.store.redis.key_prefix, "presence-gateway");
        assert_eq!(c.store.redis.lease_ttl, Duration::from_secs(15));
    }

    #[test]
    fn relative_data_dir_is_kept_as_given() {
        let c = parse("[store]\ndata_dir = \"var/state\"\n", &[]).unwrap();
        assert_eq!(c.store.data_dir.as_deref(), Some(Path::new("var/state")));
    }

    #[test]
    fn redis_backend_with_a_secret_url() {
        let text = r#"
[store]
backend = "redis"

[store.redis]
url = "env:REDIS_URL"
key_prefix = "pg-test-1"
lease_ttl_secs = 2
"#;
        let c = parse(
            text,
            &[("REDIS_URL", "rediss://:hunter2@redis.internal:6380/1")],
        )
        .unwrap();
        assert_eq!(c.store.backend, StoreBackend::Redis);
        assert_eq!(
            c.store.redis.url.expose(),
            b"rediss://:hunter2@redis.internal:6380/1"
        );
        assert_eq!(c.store.redis.key_prefix, "pg-test-1");
        assert_eq!(c.store.redis.lease_ttl, Duration::from_secs(2));
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn every_redis_url_scheme_is_accepted() {
        for url in [
            "redis://127.0.0.1",
            "rediss://user:pw@redis.example.net:6380/2",
            "redis+unix:///run/redis/redis.sock",
            "unix:///run/redis/redis.sock?db=1",
        ] {
            let text = format!("[store.redis]\nurl = {url:?}\nlease_ttl_secs = 3600\n");
            let c = parse(&text, &[]).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(c.store.redis.url.expose(), url.as_bytes());
        }
    }

    #[test]
    fn store_problems_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[store]\nbackend = \"disk\"",
                "store.backend",
                "\"disk\" is not one of: memory, redis",
            ),
            (
                "[store]\nbackend = \"Redis\"",
                "store.backend",
                "\"Redis\" is not one of: memory, redis",
            ),
            (
                "[store]\ndata_dir = \"\"",
                "store.data_dir",
                "must not be empty (leave it out to persist nothing)",
            ),
            (
                "[store.redis]\nurl = \"http://127.0.0.1:6379\"",
                "store.redis.url",
                "must be a redis://, rediss://, redis+unix:// or unix:// URL",
            ),
            (
                "[store.redis]\nurl = \"127.0.0.1:6379\"",
                "store.redis.url",
                "must be a redis://, rediss://, redis+unix:// or unix:// URL",
            ),
            (
                "[store.redis]\nurl = \"env:PG_REDIS_URL\"",
                "store.redis.url",
                "environment variable PG_REDIS_URL is not set",
            ),
            (
                "[store.redis]\nurl = \"\"",
                "store.redis.url",
                "secret is empty",
            ),
            (
                "[store.redis]\nkey_prefix = \"\"",
                "store.redis.key_prefix",
                "must not be empty",
            ),
            (
                "[store.redis]\nkey_prefix = \"presence gateway\"",
                "store.redis.key_prefix",
                "\"presence gateway\" must not contain whitespace, \"{\" or \"}\"",
            ),
            (
                "[store.redis]\nkey_prefix = \"pg{1}\"",
                "store.redis.key_prefix",
                "\"pg{1}\" must not contain whitespace, \"{\" or \"}\"",
            ),
            (
                "[store.redis]\nkey_prefix = \"pg}\"",
                "store.redis.key_prefix",
                "\"pg}\" must not contain whitespace, \"{\" or \"}\"",
            ),
            (
                "[store.redis]\nlease_ttl_secs = 1",
                "store.redis.lease_ttl_secs",
                "must be between 2 and 3600",
            ),
            (
                "[store.redis]\nlease_ttl_secs = 3601",
                "store.redis.lease_ttl_secs",
                "must be between 2 and 3600",
            ),
        ];
        for (text, key, message) in cases {
            let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
                panic!("{text:?} should be invalid");
            };
            let found: Vec<(&str, &str)> = problems
                .iter()
                .map(|p| (p.key.as_str(), p.message.as_str()))
                .collect();
            assert_eq!(found, [(*key, *message)], "{text:?}");
        }
    }

    #[test]
    fn a_bad_redis_url_is_not_quoted() {
        let text = "[store.redis]\nurl = \"https://:hunter2@redis.internal\"\n";
        let err = parse(text, &[]).unwrap_err().to_string();
        assert!(err.contains("store.redis.url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn unknown_redis_keys_are_rejected_with_their_line() {
        let err = parse(
            "[store.redis]\nurl = \"redis://h\"\npassword = \"x\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("password") && err.contains("line 3"), "{err}");
    }
}
