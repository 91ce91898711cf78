//! Typed configuration: one TOML file, environment overrides, secret
//! references, and validation whose messages name the offending key.
//!
//! Loading happens in three steps. The file is parsed strictly with `toml`
//! first, so syntax errors, unknown keys and wrong types are reported with
//! their line, column and key path (worded by `report`, which never quotes
//! the file's text or a value). Then the `config` crate layers `PRESENCE_GATEWAY__SECTION__KEY`
//! environment variables over it. Finally `Config::resolve` resolves secret
//! references (`env:NAME`, `file:PATH`, literal) once, into [`Secret`]s, and
//! checks every value, collecting all problems rather than stopping at the
//! first. Nothing here logs, and no error message contains a secret's value.
//!
//! This module owns the loading and the error types; each section (and each
//! source kind) has its own module with its raw form, its defaults, its
//! checks and its typed result, and everything public is re-exported here.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

pub mod consumers;
pub mod graph;
pub mod mitel;
pub mod netsapiens;
pub mod people;
mod report;
pub mod secrets;
pub mod server;
pub mod sources;
pub mod standard;
pub mod store;
pub mod ucwa;

pub use consumers::ConsumersConfig;
pub use graph::GraphManaged;
pub use mitel::MitelManaged;
pub use people::PeopleConfig;
pub use secrets::Secret;
pub use server::ServerConfig;
pub use sources::{Auth, Managed, SourceConfig, SourceKind};
pub use standard::StandardSettings;
pub use store::{RedisConfig, StoreBackend, StoreConfig};
pub use ucwa::UcwaManaged;

/// Prefix of environment overrides: `PRESENCE_GATEWAY__SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "PRESENCE_GATEWAY";

/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/presence-gateway.toml";

/// Keys whose environment override is a comma-separated list.
const LIST_KEYS: [&str; 2] = ["consumers.tokens", "server.trusted_proxies"];

/// The validated configuration of the whole daemon.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub consumers: ConsumersConfig,
    pub sources: Vec<SourceConfig>,
    /// `[people]`; `None`: no people (DESIGN §9).
    pub people: Option<PeopleConfig>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("environment override: {0}")]
    Override(String),
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

/// One validation problem: the key and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

// ---- raw (deserialized) form -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: server::RawServer,
    #[serde(default)]
    store: store::RawStore,
    #[serde(default)]
    consumers: consumers::RawConsumers,
    #[serde(default)]
    sources: Vec<sources::RawSource>,
    people: Option<people::RawPeople>,
}

// ---- loading -----------------------------------------------------------------

impl Config {
    /// Loads `path` with overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars(), |name| std::env::var(name).ok())
    }

    /// Loads `path` with the given environment: `vars` for overrides,
    /// `lookup` for `env:` secret references (and `HOSTNAME`, for the
    /// default replica id). Tests pass their own.
    pub fn load_with_env(
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_env(&text, path, vars, lookup)
    }

    /// Parses config text (as if read from `path`) with the given environment.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // Strict first pass: line numbers for syntax errors, unknown keys, types.
        // (Worded by `report`: key and position, never the value.)
        report::strict::<RawConfig>(text).map_err(|message| ConfigError::Syntax {
            path: path.to_owned(),
            message,
        })?;
        // `PRESENCE_GATEWAY__STORE__REDIS__URL` is `store.redis.url`: the
        // crate lowercases the name and turns each `__` into a level, so
        // nested tables need nothing more. Only list values go through its
        // `try_parsing` (which is what splits them at commas): it would also
        // turn any value that looks like a number or a boolean into one, so
        // `REPLICA_ID=007` would become "7". Every other value is passed as
        // written and converted to its key's type when deserialized.
        let prefix = format!("{ENV_PREFIX}__");
        let (lists, scalars): (config::Map<String, String>, config::Map<String, String>) = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .partition(|(k, _)| {
                let key = k[prefix.len()..].to_lowercase().replace("__", ".");
                LIST_KEYS.contains(&key.as_str())
            });
        let environment = |overrides| {
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(overrides))
        };
        let lists = LIST_KEYS.iter().fold(
            environment(lists).try_parsing(true).list_separator(","),
            |env, key| env.with_list_parse_key(key),
        );
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(lists)
            .add_source(environment(scalars))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError::Override(report::override_error(&e)))?;
        Self::resolve(raw, &lookup)
    }

    fn resolve(
        raw: RawConfig,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        let server = server::resolve(raw.server, lookup, &mut problem);
        let store = store::resolve(raw.store, lookup, &mut problem);
        let consumers = consumers::resolve(raw.consumers, lookup, &mut problem);
        let sources = sources::resolve(raw.sources, lookup, &mut problem);
        let people = raw.people.map(|p| people::resolve(p, &mut problem));

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            server,
            store,
            consumers,
            sources,
            people,
        })
    }
}

/// CIDR blocks, or bare addresses meaning a single host.
fn parse_nets(items: &[String], key: &str, problem: &mut impl FnMut(String, String)) -> Vec<IpNet> {
    items
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let text = text.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    problem(
                        format!("{key}[{i}]"),
                        format!("{text:?} is not a CIDR block (like 10.0.0.0/8) or an IP address"),
                    )
                })
                .ok()
        })
        .collect()
}

/// What the unit tests of every section share.
#[cfg(test)]
mod test_support {
    use std::path::Path;

    use super::{Config, ConfigError};

    /// Parses `text` with `vars` as both the overrides and the variables
    /// that `env:` references see.
    pub(super) fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup_env = env.clone();
        Config::parse_with_env(text, Path::new("test.toml"), env, move |name| {
            lookup_env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    /// One Mitel source with an `env:KEY` and a literal signing key.
    pub(super) const MINIMAL: &str = r#"
[[sources]]
id = "mitel-prod"
kind = "mitel"
signing_keys = ["env:KEY", "literal-old-key"]
"#;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ConfigError;
    use super::test_support::{MINIMAL, parse};

    #[test]
    fn defaults_and_secret_references() {
        let c = parse(MINIMAL, &[("KEY", "new-key")]).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.server.body_limit_bytes, 262_144);
        assert_eq!(c.store.history, 65_536);
        assert_eq!(c.store.dedup_window, Duration::from_secs(600));
        assert_eq!(c.sources[0].signing_keys[0].expose(), b"new-key");
        assert_eq!(c.sources[0].signing_keys[1].expose(), b"literal-old-key");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("new-key") && !shown.contains("literal-old-key"),
            "{shown}"
        );
    }

    #[test]
    fn environment_overrides_scalars_and_lists() {
        let c = parse(
            MINIMAL,
            &[
                ("KEY", "k"),
                ("PRESENCE_GATEWAY__SERVER__LISTEN", "127.0.0.1:9999"),
                ("PRESENCE_GATEWAY__STORE__HISTORY", "10"),
                ("PRESENCE_GATEWAY__CONSUMERS__TOKENS", "a,b"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.store.history, 10);
        assert_eq!(c.consumers.tokens.len(), 2);
    }

    #[test]
    fn environment_overrides_reach_nested_tables() {
        let c = parse(
            "[store.redis]\nkey_prefix = \"from-file\"\n",
            &[
                ("PRESENCE_GATEWAY__STORE__BACKEND", "redis"),
                ("PRESENCE_GATEWAY__STORE__REDIS__URL", "env:PG_REDIS_URL"),
                ("PG_REDIS_URL", "redis://:pw@10.0.0.5:6379/3"),
                ("PRESENCE_GATEWAY__STORE__REDIS__KEY_PREFIX", "from-env"),
                ("PRESENCE_GATEWAY__STORE__REDIS__LEASE_TTL_SECS", "4"),
                ("PRESENCE_GATEWAY__SERVER__REPLICA_ID", "gw-2"),
            ],
        )
        .unwrap();
        assert_eq!(c.store.backend, super::StoreBackend::Redis);
        assert_eq!(c.store.redis.url.expose(), b"redis://:pw@10.0.0.5:6379/3");
        assert_eq!(c.store.redis.key_prefix, "from-env");
        assert_eq!(c.store.redis.lease_ttl, Duration::from_secs(4));
        assert_eq!(c.server.replica_id, "gw-2");

        let c = parse("", &[("PRESENCE_GATEWAY__STORE__DATA_DIR", "/x")]).unwrap();
        assert_eq!(
            c.store.data_dir.as_deref(),
            Some(std::path::Path::new("/x"))
        );

        let err = parse("", &[("PRESENCE_GATEWAY__STORE__REDIS__URLL", "redis://h")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn string_overrides_are_taken_as_written() {
        // What looks like a number or a boolean must not be read as one:
        // "007" stays "007", not "7".
        let c = parse(
            "",
            &[
                ("PRESENCE_GATEWAY__SERVER__REPLICA_ID", "007"),
                ("PRESENCE_GATEWAY__STORE__REDIS__KEY_PREFIX", "TRUE"),
                ("PRESENCE_GATEWAY__STORE__DATA_DIR", "1e3"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.replica_id, "007");
        assert_eq!(c.store.redis.key_prefix, "TRUE");
        assert_eq!(
            c.store.data_dir.as_deref(),
            Some(std::path::Path::new("1e3"))
        );
    }

    #[test]
    fn numeric_overrides_must_be_integers() {
        // Not rounded: 1.5 seconds is not silently 2.
        for value in ["1.5", "1e3", "-1", "ten"] {
            let err = parse(
                "",
                &[("PRESENCE_GATEWAY__STORE__REDIS__LEASE_TTL_SECS", value)],
            )
            .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Override(m) if m.contains("store.redis.lease_ttl_secs")),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn overrides_are_validated_like_the_file() {
        // A file that persists to data_dir can be switched to Redis by the
        // environment alone (data_dir is then ignored), but bad values are
        // problems wherever they come from.
        let Err(ConfigError::Invalid(problems)) = parse(
            "[store]\ndata_dir = \"var/state\"\n",
            &[
                ("PRESENCE_GATEWAY__STORE__BACKEND", "redis"),
                ("PRESENCE_GATEWAY__STORE__REDIS__LEASE_TTL_SECS", "1"),
                ("PRESENCE_GATEWAY__SERVER__REPLICA_ID", "gw 1"),
            ],
        ) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["server.replica_id", "store.redis.lease_ttl_secs"]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err = parse("[server]\nlisten = \"0.0.0.0:1\"\nlistn = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn") && err.contains("line 3"), "{err}");
        let err = parse(
            MINIMAL,
            &[("KEY", "k"), ("PRESENCE_GATEWAY__SERVER__LISTN", "x")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listn"), "{err}");
        let err = parse("[[sources]]\nid = \"a\"\nkind = \"carrier-pigeon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("carrier-pigeon") && err.contains("line 3"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_every_bad_key() {
        let text = r#"
[server]
listen = "nowhere"
trusted_proxies = ["10.0.0.0/33"]

[consumers]
tokens = ["env:MISSING_TOKEN"]

[[sources]]
id = "a"
kind = "mitel"
signing_keys = []
allow_ips = ["not-an-ip"]
status_map = { Lunch = "hungry" }

[[sources]]
id = "a"
kind = "mitel"
signing_keys = [""]
fields = { status = "content/presence" }

[[sources]]
id = "has space"
kind = "mitel"
signing_keys = ["k"]
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "server.listen",
            "server.trusted_proxies[0]",
            "consumers.tokens[0]",
            "sources[0].signing_keys",
            "sources[0].allow_ips[0]",
            "sources[0].status_map.\"Lunch\"",
            "sources[1].id",
            "sources[1].signing_keys[0]",
            "sources[1].fields",
            "sources[2].id",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        let all = ConfigError::Invalid(problems).to_string();
        assert!(
            all.contains("duplicate source id \"a\" (also sources[0])"),
            "{all}"
        );
        assert!(all.contains("MISSING_TOKEN is not set"), "{all}");
    }
}
