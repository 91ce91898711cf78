//! Typed configuration: one TOML file, environment overrides, secret
//! references, and validation whose messages name the offending key.
//!
//! Loading happens in three steps. The file is parsed strictly with `toml`
//! first, so syntax errors, unknown keys and wrong types are reported with
//! their line. Then the `config` crate layers `PRESENCE_GATEWAY__SECTION__KEY`
//! environment variables over it. Finally `Config::resolve` resolves secret
//! references (`env:NAME`, `file:PATH`, literal) once, into [`Secret`]s, and
//! checks every value, collecting all problems rather than stopping at the
//! first. Nothing here logs, and no error message contains a secret's value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::presence::Availability;
use crate::providers::mitel::MitelParser;
use crate::providers::netsapiens::{CallFieldOverrides, Model, NetSapiensParser};
use crate::providers::{FieldOverrides, StatusMap};

/// Prefix of environment overrides: `PRESENCE_GATEWAY__SERVER__LISTEN`.
pub const ENV_PREFIX: &str = "PRESENCE_GATEWAY";

/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/presence-gateway.toml";

/// A secret value: signing key, token, correlation id.
///
/// `Debug` and `Display` print `[redacted]`, so a secret cannot end up in a
/// log line or an error by formatting the struct that holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Wraps a value (tests and programmatic configuration).
    pub fn new(value: impl AsRef<[u8]>) -> Self {
        Secret(Arc::from(value.as_ref()))
    }

    /// The secret bytes. Callers compare them in constant time and never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The validated configuration of the whole daemon.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub consumers: ConsumersConfig,
    pub sources: Vec<SourceConfig>,
}

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

/// `[store]`.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub history: usize,
    pub dedup_window: Duration,
    pub dedup_capacity: usize,
}

/// `[consumers]`.
#[derive(Clone, Debug, Default)]
pub struct ConsumersConfig {
    /// Bearer tokens accepted on `/v1`; empty means open.
    pub tokens: Vec<Secret>,
    /// Changes a stream consumer may fall behind the live fan-out.
    pub stream_buffer: usize,
}

/// The kinds of source this build receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Mitel CloudLink webhooks signed with `x-notify-signature`.
    Mitel,
    /// NetSapiens v2 event posts authenticated by `X-Correlation-ID`.
    Netsapiens,
    /// Mitel CloudLink notifications over MQTT over WebSocket (outbound).
    MitelWs,
    /// UCWA (Skype for Business): presence subscriptions and the event channel.
    Ucwa,
}

impl SourceKind {
    /// The name used in config and in `/v1/sources`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mitel => "mitel",
            SourceKind::Netsapiens => "netsapiens",
            SourceKind::MitelWs => "mitel_ws",
            SourceKind::Ucwa => "ucwa",
        }
    }
}

/// One `[[sources]]` entry.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub id: String,
    pub kind: SourceKind,
    pub signing_keys: Vec<Secret>,
    pub allow_ips: Vec<IpNet>,
    pub fields: FieldOverrides,
    pub status_map: Vec<(String, Availability)>,
    /// NetSapiens: subscription ids that authenticate posts, with the model
    /// of each subscription.
    pub correlation_ids: Vec<(Secret, Model)>,
    /// NetSapiens: the model of posts whose subscription does not say.
    pub model: Model,
    /// NetSapiens: the zone of `YYYY-MM-DD HH:MM:SS` times.
    pub timezone: jiff::tz::TimeZone,
    /// NetSapiens: where the fields of `call` objects are.
    pub call_fields: CallFieldOverrides,
    /// Subscriptions the gateway creates and keeps alive, if configured.
    pub managed: Option<Managed>,
}

/// `api_base`, `[sources.auth]` and `[sources.subscription]`: what the
/// gateway subscribes to at the provider, and how it authenticates.
#[derive(Clone, Debug)]
pub struct Managed {
    pub api_base: String,
    pub auth: Auth,
    pub callback_url: String,
    pub lifetime: Duration,
    pub renew_before: Duration,
    pub delete_on_shutdown: bool,
    /// NetSapiens: one subscription per model.
    pub models: Vec<Model>,
    pub model_names: Vec<String>,
    pub reseller: Option<String>,
    pub domain: Option<String>,
    pub user: Option<String>,
    pub geo_support: bool,
    pub preferred_server: Option<String>,
    /// First delay after a failed call; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Mitel sources: what to subscribe to (the NetSapiens fields above are
    /// then unused).
    pub mitel: Option<MitelManaged>,
    /// UCWA sources: the contacts and the event channel.
    pub ucwa: Option<UcwaManaged>,
}

/// UCWA-specific parts of a managed source.
#[derive(Clone, Debug)]
pub struct UcwaManaged {
    /// SIP URIs of the contacts to watch.
    pub contacts: Vec<String>,
    /// Presence subscription duration (10–30 minutes).
    pub duration: Duration,
    /// How long the server holds a pending event GET (180–1800 s).
    pub event_timeout: Duration,
}

/// `[sources.auth]`.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A static bearer token (an API key).
    Bearer(Secret),
    /// An OAuth grant: the form (grant_type and credentials) posted to
    /// `token_url`.
    Grant {
        token_url: String,
        form: Vec<(&'static str, Secret)>,
    },
}

/// Mitel-specific parts of a managed source.
#[derive(Clone, Debug)]
pub struct MitelManaged {
    /// The Authentication API root.
    pub auth_base: String,
    /// The `applicationId` of created subscriptions: the first signing key.
    pub application_id: Secret,
    /// One subscription per principal; empty: one for all users.
    pub principals: Vec<String>,
    /// Also subscribe to `platform-api-media` (call events).
    pub media: bool,
    pub media_subject_filter: String,
    /// `methodFilter`; `None` omits it.
    pub method_filter: Option<String>,
    /// How often the subscriptions are listed to recreate missing ones.
    pub check_interval: Duration,
    /// `mitel_ws`: the MQTT client id, also the subscriptions' `deviceId`.
    /// `None` for webhook sources (their `deviceId` is the callback URL).
    pub mqtt_client_id: Option<String>,
}

impl SourceConfig {
    /// The source's status words: its `status_map` over the kind's table.
    pub fn status_map(&self) -> StatusMap {
        let builtin = match self.kind {
            SourceKind::Mitel | SourceKind::MitelWs => crate::providers::mitel::STATUS_WORDS,
            SourceKind::Netsapiens => crate::providers::netsapiens::STATUS_WORDS,
            SourceKind::Ucwa => crate::providers::ucwa::STATUS_WORDS,
        };
        StatusMap::new(
            builtin,
            self.status_map.iter().map(|(k, v)| (k.as_str(), *v)),
        )
    }
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
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    consumers: RawConsumers,
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    history: u64,
    dedup_window_secs: u64,
    dedup_capacity: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            history: 65_536,
            dedup_window_secs: 600,
            dedup_capacity: 1_000_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConsumers {
    tokens: Vec<String>,
    stream_buffer: u64,
}

impl Default for RawConsumers {
    fn default() -> Self {
        RawConsumers {
            tokens: Vec::new(),
            stream_buffer: 4096,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    id: String,
    kind: SourceKind,
    #[serde(default)]
    signing_keys: Vec<String>,
    #[serde(default)]
    allow_ips: Vec<String>,
    #[serde(default)]
    fields: FieldOverrides,
    #[serde(default)]
    status_map: BTreeMap<String, String>,
    #[serde(default)]
    correlation_ids: Vec<RawCorrelationId>,
    model: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    call_fields: CallFieldOverrides,
    api_base: Option<String>,
    auth_base: Option<String>,
    auth: Option<RawAuth>,
    subscription: Option<RawSubscription>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(rename = "type")]
    kind: String,
    token: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    username: Option<String>,
    password: Option<String>,
    refresh_token: Option<String>,
    account_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    #[serde(default)]
    callback_url: String,
    #[serde(default = "default_lifetime")]
    lifetime_secs: u64,
    #[serde(default = "default_renew_before")]
    renew_before_secs: u64,
    #[serde(default)]
    delete_on_shutdown: bool,
    #[serde(default)]
    model: Option<crate::providers::fields::OneOrMany>,
    reseller: Option<String>,
    domain: Option<String>,
    user: Option<String>,
    #[serde(default = "default_true")]
    geo_support: bool,
    preferred_server: Option<String>,
    #[serde(default = "default_retry_initial")]
    retry_initial_ms: u64,
    #[serde(default = "default_retry_max")]
    retry_max_secs: u64,
    // Mitel
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    media: bool,
    media_subject_filter: Option<String>,
    method_filter: Option<String>,
    check_interval_secs: Option<u64>,
    client_id: Option<String>,
    // UCWA
    #[serde(default)]
    contacts: Vec<String>,
    duration_mins: Option<u64>,
    event_timeout_secs: Option<u64>,
}

fn default_lifetime() -> u64 {
    86_400
}
fn default_renew_before() -> u64 {
    3_600
}
fn default_true() -> bool {
    true
}
fn default_retry_initial() -> u64 {
    1_000
}
fn default_retry_max() -> u64 {
    300
}

/// A NetSapiens subscription id: just the id (the source's `model`), or
/// `{ id = "...", model = "call" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum RawCorrelationId {
    Id(String),
    WithModel { id: String, model: String },
}

// ---- loading -----------------------------------------------------------------

impl Config {
    /// Loads `path` with overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars(), |name| std::env::var(name).ok())
    }

    /// Loads `path` with the given environment: `vars` for overrides,
    /// `lookup` for `env:` secret references. Tests pass their own.
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
        toml::from_str::<RawConfig>(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let prefix = format!("{ENV_PREFIX}__");
        let overrides: config::Map<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("consumers.tokens")
            .with_list_parse_key("server.trusted_proxies")
            .source(Some(overrides));
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError::Override(e.to_string()))?;
        Self::resolve(raw, &lookup)
    }

    fn resolve(
        raw: RawConfig,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        let listen = raw.server.listen.parse().unwrap_or_else(|_| {
            problem(
                "server.listen".into(),
                format!("{:?} is not an address:port", raw.server.listen),
            );
            SocketAddr::from(([0, 0, 0, 0], 8080))
        });
        if raw.server.body_limit_bytes == 0 || raw.server.body_limit_bytes > 64 * 1024 * 1024 {
            problem(
                "server.body_limit_bytes".into(),
                "must be between 1 and 67108864 (64 MiB)".into(),
            );
        }
        if raw.server.max_in_flight == 0 {
            problem("server.max_in_flight".into(), "must be at least 1".into());
        }
        if raw.server.shutdown_grace_secs > 3600 {
            problem(
                "server.shutdown_grace_secs".into(),
                "must be at most 3600".into(),
            );
        }
        if !(16..=1 << 20).contains(&raw.consumers.stream_buffer) {
            problem(
                "consumers.stream_buffer".into(),
                "must be between 16 and 1048576".into(),
            );
        }
        if !(1..=3600).contains(&raw.server.write_timeout_secs) {
            problem(
                "server.write_timeout_secs".into(),
                "must be between 1 and 3600".into(),
            );
        }
        let trusted_proxies = parse_nets(
            &raw.server.trusted_proxies,
            "server.trusted_proxies",
            &mut problem,
        );

        if raw.store.history > 10_000_000 {
            problem("store.history".into(), "must be at most 10000000".into());
        }
        if raw.store.dedup_capacity == 0 {
            problem("store.dedup_capacity".into(), "must be at least 1".into());
        }

        let tokens = raw
            .consumers
            .tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                resolve_secret(t, lookup)
                    .map_err(|m| problem(format!("consumers.tokens[{i}]"), m))
                    .ok()
            })
            .collect();

        let mut sources: Vec<SourceConfig> = Vec::with_capacity(raw.sources.len());
        for (n, s) in raw.sources.into_iter().enumerate() {
            let key = |field: &str| format!("sources[{n}].{field}");
            if !valid_id(&s.id) {
                problem(
                    key("id"),
                    format!("{:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -", s.id),
                );
            } else if let Some(first) = sources.iter().position(|o| o.id == s.id) {
                problem(
                    key("id"),
                    format!("duplicate source id {:?} (also sources[{first}])", s.id),
                );
            }
            for field in s.call_fields.foreign_keys(s.kind != SourceKind::Netsapiens) {
                problem(
                    key(&format!("call_fields.{field}")),
                    format!("not used by kind = \"{}\"", s.kind.as_str()),
                );
            }
            let only = |field: &str, kind: SourceKind| {
                format!("{field} is only for kind = \"{}\"", kind.as_str())
            };
            match s.kind {
                SourceKind::MitelWs | SourceKind::Ucwa => {
                    if s.subscription.is_none() {
                        problem(
                            key("subscription"),
                            "this kind needs [sources.subscription] (and [sources.auth])".into(),
                        );
                    }
                    for (field, set) in [
                        ("correlation_ids", !s.correlation_ids.is_empty()),
                        ("model", s.model.is_some()),
                        ("timezone", s.timezone.is_some()),
                        ("allow_ips", !s.allow_ips.is_empty()),
                        (
                            "signing_keys",
                            s.kind == SourceKind::Ucwa && !s.signing_keys.is_empty(),
                        ),
                        (
                            "auth_base",
                            s.kind == SourceKind::Ucwa && s.auth_base.is_some(),
                        ),
                        (
                            "call_fields",
                            s.kind == SourceKind::Ucwa
                                && s.call_fields != CallFieldOverrides::default(),
                        ),
                    ] {
                        if set {
                            problem(
                                key(field),
                                format!("not used by kind = \"{}\"", s.kind.as_str()),
                            );
                        }
                    }
                }
                SourceKind::Mitel => {
                    if s.signing_keys.is_empty() {
                        problem(
                            key("signing_keys"),
                            "must list at least one key (the subscription's applicationId)".into(),
                        );
                    }
                    let netsapiens_only = [
                        ("correlation_ids", !s.correlation_ids.is_empty()),
                        ("model", s.model.is_some()),
                        ("timezone", s.timezone.is_some()),
                        ("fields.domain", s.fields.domain.is_some()),
                    ];
                    for (field, set) in netsapiens_only {
                        if set {
                            problem(key(field), only(field, SourceKind::Netsapiens));
                        }
                    }
                }
                SourceKind::Netsapiens => {
                    if s.correlation_ids.is_empty() && s.subscription.is_none() {
                        problem(
                            key("correlation_ids"),
                            "must list at least one subscription id".into(),
                        );
                    }
                    if !s.signing_keys.is_empty() {
                        problem(key("signing_keys"), only("signing_keys", SourceKind::Mitel));
                    }
                    if s.auth_base.is_some() {
                        problem(key("auth_base"), only("auth_base", SourceKind::Mitel));
                    }
                }
            }
            let model = match s.model.as_deref().map(model_named).transpose() {
                Ok(model) => model.unwrap_or(Model::Presence),
                Err(m) => {
                    problem(key("model"), m);
                    Model::Presence
                }
            };
            let mut correlation_ids = Vec::with_capacity(s.correlation_ids.len());
            for (i, entry) in s.correlation_ids.iter().enumerate() {
                let field = key(&format!("correlation_ids[{i}]"));
                let (reference, id_model) = match entry {
                    RawCorrelationId::Id(id) => (id, model),
                    RawCorrelationId::WithModel { id, model: name } => match model_named(name) {
                        Ok(m) => (id, m),
                        Err(m) => {
                            problem(format!("{field}.model"), m);
                            (id, model)
                        }
                    },
                };
                match resolve_secret(reference, lookup) {
                    Ok(secret) => correlation_ids.push((secret, id_model)),
                    Err(m) => problem(field, m),
                }
            }
            let timezone = match s.timezone.as_deref() {
                None | Some("UTC") => jiff::tz::TimeZone::UTC,
                Some(name) => jiff::tz::TimeZone::get(name).unwrap_or_else(|e| {
                    problem(key("timezone"), format!("{name:?}: {e}"));
                    jiff::tz::TimeZone::UTC
                }),
            };
            let signing_keys: Vec<Secret> = s
                .signing_keys
                .iter()
                .enumerate()
                .filter_map(|(i, k)| {
                    resolve_secret(k, lookup)
                        .map_err(|m| problem(key(&format!("signing_keys[{i}]")), m))
                        .ok()
                })
                .collect();
            let allow_ips = parse_nets(&s.allow_ips, &key("allow_ips"), &mut problem);
            let status_map = s
                .status_map
                .iter()
                .filter_map(|(word, name)| match Availability::from_name(name) {
                    Some(a) => Some((word.clone(), a)),
                    None => {
                        problem(
                            key(&format!("status_map.{word:?}")),
                            format!(
                                "{name:?} is not an availability (one of: {})",
                                Availability::ALL.map(Availability::as_str).join(", ")
                            ),
                        );
                        None
                    }
                })
                .collect();
            let managed = s.subscription.as_ref().and_then(|sub| {
                let default_model = s.model.as_deref().unwrap_or("presence");
                let bases = Bases {
                    api: s.api_base.as_deref(),
                    auth: s.auth_base.as_deref(),
                };
                let first_key = signing_keys.first();
                managed(
                    &s.id,
                    sub,
                    s.kind,
                    bases,
                    s.auth.as_ref(),
                    default_model,
                    first_key,
                    lookup,
                )
                .map_err(|list| {
                    for (field, message) in list {
                        problem(key(&field), message);
                    }
                })
                .ok()
            });
            if s.subscription.is_none() {
                for (field, set) in [
                    ("api_base", s.api_base.is_some()),
                    ("auth_base", s.auth_base.is_some()),
                    ("auth", s.auth.is_some()),
                ] {
                    if set {
                        problem(key(field), "only used with [sources.subscription]".into());
                    }
                }
            }
            let source = SourceConfig {
                id: s.id,
                kind: s.kind,
                signing_keys,
                allow_ips,
                fields: s.fields,
                status_map,
                correlation_ids,
                model,
                timezone,
                call_fields: s.call_fields,
                managed,
            };
            let compiled = match source.kind {
                SourceKind::Mitel | SourceKind::MitelWs => {
                    MitelParser::new(&source.fields, &source.call_fields, source.status_map())
                        .map(drop)
                }
                SourceKind::Netsapiens => NetSapiensParser::new(
                    &source.fields,
                    &source.call_fields,
                    source.status_map(),
                    source.timezone.clone(),
                )
                .map(drop),
                SourceKind::Ucwa => Ok(()),
            };
            if let Err(e) = compiled {
                problem(key("fields"), e.to_string());
            }
            sources.push(source);
        }

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            server: ServerConfig {
                listen,
                body_limit_bytes: usize::try_from(raw.server.body_limit_bytes)
                    .unwrap_or(usize::MAX),
                trusted_proxies,
                shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_secs),
                max_in_flight: usize::try_from(raw.server.max_in_flight).unwrap_or(usize::MAX),
                write_timeout: Duration::from_secs(raw.server.write_timeout_secs),
            },
            store: StoreConfig {
                history: usize::try_from(raw.store.history).unwrap_or(usize::MAX),
                dedup_window: Duration::from_secs(raw.store.dedup_window_secs),
                dedup_capacity: usize::try_from(raw.store.dedup_capacity).unwrap_or(usize::MAX),
            },
            consumers: ConsumersConfig {
                tokens,
                stream_buffer: usize::try_from(raw.consumers.stream_buffer).unwrap_or(usize::MAX),
            },
            sources,
        })
    }
}

/// The provider API roots a managed source uses.
struct Bases<'a> {
    api: Option<&'a str>,
    auth: Option<&'a str>,
}

/// Validates a managed subscription; problems as `(field, message)`.
#[allow(clippy::too_many_arguments)] // one validation step, called once
fn managed(
    source_id: &str,
    sub: &RawSubscription,
    kind: SourceKind,
    bases: Bases<'_>,
    auth: Option<&RawAuth>,
    default_model: &str,
    first_signing_key: Option<&Secret>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Managed, Vec<(String, String)>> {
    let mut problems: Vec<(String, String)> = Vec::new();
    let websocket = kind == SourceKind::MitelWs;
    let mitel = kind == SourceKind::Mitel || websocket;
    let ucwa = kind == SourceKind::Ucwa;
    let url_ok = |text: &str| {
        reqwest::Url::parse(text)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .is_some()
    };
    let mut base = |field: &str, given: Option<&str>, default: Option<&str>| match given.or(default)
    {
        Some(base) if url_ok(base) => base.trim_end_matches('/').to_owned(),
        Some(base) => {
            problems.push((field.into(), format!("{base:?} is not an http(s) URL")));
            String::new()
        }
        None => {
            problems.push((
                field.into(),
                "required with [sources.subscription] (the provider's API root)".into(),
            ));
            String::new()
        }
    };
    let api_base = base(
        "api_base",
        bases.api,
        mitel.then_some("https://notifications.api.mitel.io"),
    );
    let auth_base = if mitel {
        base(
            "auth_base",
            bases.auth,
            Some("https://authentication.api.mitel.io"),
        )
    } else {
        String::new()
    };
    if (websocket || ucwa) && !sub.callback_url.is_empty() {
        problems.push((
            "subscription.callback_url".into(),
            format!(
                "not used by kind = \"{}\" (the gateway reads events itself)",
                kind.as_str()
            ),
        ));
    }
    if !websocket && !ucwa && !url_ok(&sub.callback_url) {
        problems.push((
            "subscription.callback_url".into(),
            format!("{:?} is not an http(s) URL", sub.callback_url),
        ));
    }
    if !mitel && !ucwa && sub.lifetime_secs == 0 {
        problems.push((
            "subscription.lifetime_secs".into(),
            "must be at least 1".into(),
        ));
    }
    if !mitel && !ucwa && sub.renew_before_secs >= sub.lifetime_secs {
        problems.push((
            "subscription.renew_before_secs".into(),
            "must be less than lifetime_secs".into(),
        ));
    }
    if sub.retry_initial_ms == 0 || sub.retry_max_secs == 0 {
        problems.push((
            "subscription.retry_initial_ms".into(),
            "retry_initial_ms and retry_max_secs must be at least 1".into(),
        ));
    }
    let foreign: Vec<(&str, bool)> = if ucwa {
        vec![
            ("model", sub.model.is_some()),
            ("principals", !sub.principals.is_empty()),
            ("media", sub.media),
            ("client_id", sub.client_id.is_some()),
            ("check_interval_secs", sub.check_interval_secs.is_some()),
        ]
    } else if mitel {
        vec![
            ("model", sub.model.is_some()),
            ("reseller", sub.reseller.is_some()),
            ("domain", sub.domain.is_some()),
            ("user", sub.user.is_some()),
            ("preferred_server", sub.preferred_server.is_some()),
        ]
    } else {
        vec![
            ("principals", !sub.principals.is_empty()),
            ("media", sub.media),
            ("media_subject_filter", sub.media_subject_filter.is_some()),
            ("method_filter", sub.method_filter.is_some()),
            ("check_interval_secs", sub.check_interval_secs.is_some()),
            ("client_id", sub.client_id.is_some()),
            ("contacts", !sub.contacts.is_empty()),
            ("duration_mins", sub.duration_mins.is_some()),
            ("event_timeout_secs", sub.event_timeout_secs.is_some()),
        ]
    };
    if kind == SourceKind::Mitel && sub.client_id.is_some() {
        problems.push((
            "subscription.client_id".into(),
            "only for kind = \"mitel_ws\"".into(),
        ));
    }
    for (field, set) in foreign {
        if set {
            problems.push((
                format!("subscription.{field}"),
                format!("not used by kind = \"{}\"", kind.as_str()),
            ));
        }
    }
    let names: Vec<String> = match (&sub.model, mitel || ucwa) {
        (_, true) => Vec::new(),
        (None, false) => vec![default_model.to_owned()],
        (Some(crate::providers::fields::OneOrMany::One(m)), false) => vec![m.clone()],
        (Some(crate::providers::fields::OneOrMany::Many(list)), false) => list.clone(),
    };
    if !mitel && !ucwa && names.is_empty() {
        problems.push((
            "subscription.model".into(),
            "name at least one model".into(),
        ));
    }
    let mut models = Vec::new();
    for name in &names {
        match model_named(name) {
            Ok(m) => models.push(m),
            Err(e) => problems.push(("subscription.model".into(), e)),
        }
    }
    let ucwa_parts = ucwa.then(|| ucwa_managed(sub, &mut problems));
    let auth = managed_auth(
        auth,
        mitel,
        ucwa,
        &api_base,
        &auth_base,
        lookup,
        &mut problems,
    );
    let mitel = if mitel {
        let check = sub.check_interval_secs.unwrap_or(300);
        if check == 0 {
            problems.push((
                "subscription.check_interval_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if sub
            .principals
            .iter()
            .any(|p| p.is_empty() || p.contains('/'))
        {
            problems.push((
                "subscription.principals".into(),
                "principal ids must be non-empty and contain no \"/\"".into(),
            ));
        }
        let application_id = match (first_signing_key, websocket) {
            (Some(key), _) => Some(key.clone()),
            // Over MQTT nothing is signed: any id stable across restarts
            // will do (so the subscriptions are found again).
            (None, true) => Some(Secret::new(stable_guid(source_id))),
            (None, false) => {
                problems.push((
                    "signing_keys".into(),
                    "managed subscriptions use the first key as their applicationId".into(),
                ));
                None
            }
        };
        application_id.map(|key| MitelManaged {
            auth_base: auth_base.clone(),
            application_id: key,
            principals: sub.principals.clone(),
            media: sub.media,
            media_subject_filter: sub
                .media_subject_filter
                .clone()
                .unwrap_or_else(|| ".*".into()),
            method_filter: match sub.method_filter.as_deref() {
                None => Some("PUT".into()),
                Some("") => None,
                Some(m) => Some(m.to_owned()),
            },
            check_interval: Duration::from_secs(check),
            mqtt_client_id: websocket.then(|| {
                sub.client_id
                    .clone()
                    .unwrap_or_else(|| format!("presence-gateway-{source_id}"))
            }),
        })
    } else {
        None
    };
    match auth {
        Some(auth) if problems.is_empty() => Ok(Managed {
            api_base,
            auth,
            callback_url: sub.callback_url.clone(),
            lifetime: Duration::from_secs(sub.lifetime_secs),
            renew_before: Duration::from_secs(sub.renew_before_secs),
            delete_on_shutdown: sub.delete_on_shutdown,
            models,
            model_names: names,
            reseller: sub.reseller.clone(),
            domain: sub.domain.clone(),
            user: sub.user.clone(),
            geo_support: sub.geo_support,
            preferred_server: sub.preferred_server.clone(),
            retry_initial: Duration::from_millis(sub.retry_initial_ms),
            retry_max: Duration::from_secs(sub.retry_max_secs),
            mitel,
            ucwa: ucwa_parts,
        }),
        _ => Err(problems),
    }
}

/// Validates the UCWA keys of `[sources.subscription]`.
fn ucwa_managed(sub: &RawSubscription, problems: &mut Vec<(String, String)>) -> UcwaManaged {
    if sub.contacts.is_empty() {
        problems.push((
            "subscription.contacts".into(),
            "list the SIP URIs to watch (\"sip:user@example.com\")".into(),
        ));
    }
    for (i, contact) in sub.contacts.iter().enumerate() {
        let ok = contact
            .get(..4)
            .is_some_and(|s| s.eq_ignore_ascii_case("sip:"))
            && contact[4..].contains('@')
            && !contact.contains('/');
        if !ok {
            problems.push((
                format!("subscription.contacts[{i}]"),
                format!("{contact:?} is not a SIP URI like \"sip:user@example.com\""),
            ));
        }
    }
    let duration = sub.duration_mins.unwrap_or(30);
    if !(10..=30).contains(&duration) {
        problems.push((
            "subscription.duration_mins".into(),
            "must be between 10 and 30".into(),
        ));
    }
    let timeout = sub.event_timeout_secs.unwrap_or(900);
    if !(180..=1800).contains(&timeout) {
        problems.push((
            "subscription.event_timeout_secs".into(),
            "must be between 180 and 1800".into(),
        ));
    }
    UcwaManaged {
        contacts: sub.contacts.clone(),
        duration: Duration::from_secs(duration * 60),
        event_timeout: Duration::from_secs(timeout),
    }
}

/// `[sources.auth]` of a managed source. NetSapiens: `bearer` or `password`
/// (token URL `{api_base}/ns-api/v2/tokens`); Mitel: `client_credentials`
/// (with optional `account_id`), `password` or `refresh_token` (token URL
/// `{auth_base}/2017-09-01/token`), or `bearer`.
fn managed_auth(
    auth: Option<&RawAuth>,
    mitel: bool,
    ucwa: bool,
    api_base: &str,
    auth_base: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<(String, String)>,
) -> Option<Auth> {
    let types: &[&str] = if mitel || ucwa {
        &["bearer", "client_credentials", "password", "refresh_token"]
    } else {
        &["bearer", "password"]
    };
    let Some(a) = auth else {
        problems.push((
            "auth".into(),
            format!(
                "required with [sources.subscription] (type = one of: {})",
                types.join(", ")
            ),
        ));
        return None;
    };
    if !types.contains(&a.kind.as_str()) {
        problems.push((
            "auth.type".into(),
            format!("{:?} is not one of: {}", a.kind, types.join(", ")),
        ));
        return None;
    }
    let before = problems.len();
    let mut field = |name: &'static str, value: &Option<String>, required: bool| match value {
        None if required => {
            problems.push((format!("auth.{name}"), "required for this auth type".into()));
            None
        }
        None => None,
        Some(reference) => resolve_secret(reference, lookup)
            .map_err(|m| problems.push((format!("auth.{name}"), m)))
            .ok()
            .map(|secret| (name, secret)),
    };
    if a.kind == "bearer" {
        return field("token", &a.token, true).map(|(_, token)| Auth::Bearer(token));
    }
    let mut form = vec![("grant_type", Secret::new(a.kind.as_str()))];
    let wanted: [(&'static str, &Option<String>, bool); 6] = match (mitel || ucwa, a.kind.as_str())
    {
        (false, _) => [
            ("client_id", &a.client_id, true),
            ("client_secret", &a.client_secret, true),
            ("username", &a.username, true),
            ("password", &a.password, true),
            ("refresh_token", &None, false),
            ("account_id", &None, false),
        ],
        (true, "client_credentials") => [
            ("client_id", &a.client_id, true),
            ("client_secret", &a.client_secret, true),
            ("account_id", &a.account_id, false),
            ("username", &None, false),
            ("password", &None, false),
            ("refresh_token", &None, false),
        ],
        (true, "password") => [
            ("username", &a.username, true),
            ("password", &a.password, true),
            ("client_id", &a.client_id, false),
            ("client_secret", &a.client_secret, false),
            ("account_id", &a.account_id, false),
            ("refresh_token", &None, false),
        ],
        (true, _) => [
            ("refresh_token", &a.refresh_token, true),
            ("client_id", &a.client_id, false),
            ("client_secret", &a.client_secret, false),
            ("account_id", &a.account_id, false),
            ("username", &None, false),
            ("password", &None, false),
        ],
    };
    for (name, value, required) in wanted {
        if let Some(pair) = field(name, value, required) {
            form.push(pair);
        }
    }
    if ucwa && a.token_url.is_none() {
        problems.push((
            "auth.token_url".into(),
            "required for OAuth grants (the organisation's token endpoint)".into(),
        ));
    }
    let token_url = a.token_url.clone().unwrap_or_else(|| {
        if mitel {
            format!("{auth_base}/2017-09-01/token")
        } else {
            format!("{api_base}/ns-api/v2/tokens")
        }
    });
    (problems.len() == before).then_some(Auth::Grant { token_url, form })
}

/// A GUID-shaped id derived from the source id: the same on every start.
fn stable_guid(source_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(format!("presence-gateway/{source_id}")));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn model_named(name: &str) -> Result<Model, String> {
    Model::from_name(name).ok_or_else(|| {
        format!(
            "{name:?} is not a NetSapiens model (one of: {})",
            Model::NAMES.join(", ")
        )
    })
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

/// Resolves `env:NAME`, `file:PATH` or a literal. Messages name the variable
/// or file, never the value.
fn resolve_secret(
    reference: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    let value = if let Some(name) = reference.strip_prefix("env:") {
        lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?
    } else if let Some(path) = reference.strip_prefix("file:") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret file {path}: {e}"))?;
        text.strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text)
            .to_owned()
    } else {
        reference.to_owned()
    };
    if value.is_empty() {
        return Err("secret is empty".into());
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
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

    const MINIMAL: &str = r#"
[[sources]]
id = "mitel-prod"
kind = "mitel"
signing_keys = ["env:KEY", "literal-old-key"]
"#;

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
    fn file_secret_reference_strips_one_newline() {
        let dir = std::env::temp_dir().join(format!("pg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[[sources]]\nid = \"m\"\nkind = \"mitel\"\nsigning_keys = [\"file:{}\"]\n",
            file.display()
        );
        let c = parse(&text, &[]).unwrap();
        assert_eq!(c.sources[0].signing_keys[0].expose(), b"from-file");
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

    #[test]
    fn netsapiens_sources_with_models_per_subscription() {
        let text = r#"
[[sources]]
id = "ns"
kind = "netsapiens"
model = "agent"
timezone = "UTC"
correlation_ids = ["env:NS_SUB", { id = "sub-calls", model = "call" }]
call_fields = { remove = "/removed" }
fields = { domain = "/realm" }
"#;
        let c = parse(text, &[("NS_SUB", "sub-presence")]).unwrap();
        let s = &c.sources[0];
        assert_eq!(s.kind, SourceKind::Netsapiens);
        assert_eq!(s.model, Model::Agent);
        let ids: Vec<(&[u8], Model)> = s
            .correlation_ids
            .iter()
            .map(|(id, m)| (id.expose(), *m))
            .collect();
        assert_eq!(
            ids,
            [
                (&b"sub-presence"[..], Model::Agent),
                (&b"sub-calls"[..], Model::Call)
            ]
        );
        assert!(
            !format!("{s:?}").contains("sub-presence"),
            "ids are secrets"
        );
    }

    #[test]
    fn netsapiens_and_mitel_keys_do_not_mix() {
        let text = r#"
[[sources]]
id = "ns"
kind = "netsapiens"
signing_keys = ["k"]
model = "presences"
timezone = "Mars/Olympus_Mons"
correlation_ids = [{ id = "x", model = "nope" }]

[[sources]]
id = "ns2"
kind = "netsapiens"

[[sources]]
id = "m"
kind = "mitel"
signing_keys = ["k"]
correlation_ids = ["x"]
model = "presence"
fields = { domain = "/d" }
call_fields = { remove = "/x", state = "/content/callState" }
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].signing_keys",
            "sources[0].model",
            "sources[0].timezone",
            "sources[0].correlation_ids[0].model",
            "sources[1].correlation_ids",
            "sources[2].correlation_ids",
            "sources[2].model",
            "sources[2].fields.domain",
            "sources[2].call_fields.remove",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn managed_netsapiens_subscriptions() {
        let text = r#"
[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "https://api.ns.example.net/"

[sources.auth]
type = "password"
client_id = "gw"
client_secret = "env:NS_SECRET"
username = "admin@acme"
password = "file:/nonexistent/ns-password"

[sources.subscription]
callback_url = "https://gw.example.com/webhooks/ns"
model = ["presence", "call"]
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[("NS_SECRET", "s")]) else {
            panic!("the password file does not exist");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["sources[0].auth.password"]);

        let text = text.replace("file:/nonexistent/ns-password", "pw");
        let c = parse(&text, &[("NS_SECRET", "s")]).unwrap();
        let m = c.sources[0].managed.as_ref().unwrap();
        assert_eq!(m.api_base, "https://api.ns.example.net");
        assert_eq!(m.models, [Model::Presence, Model::Call]);
        assert_eq!(m.lifetime, Duration::from_secs(86_400));
        assert_eq!(m.renew_before, Duration::from_secs(3_600));
        assert!(m.geo_support && !m.delete_on_shutdown);
        let Auth::Grant { token_url, form } = &m.auth else {
            panic!("password grant");
        };
        assert_eq!(token_url, "https://api.ns.example.net/ns-api/v2/tokens");
        let names: Vec<&str> = form.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "grant_type",
                "client_id",
                "client_secret",
                "username",
                "password"
            ]
        );
        assert!(
            c.sources[0].correlation_ids.is_empty(),
            "ids come from the manager"
        );
        assert!(!format!("{m:?}").contains("pw\""), "secrets are redacted");
    }

    #[test]
    fn managed_subscription_problems_are_named() {
        let text = r#"
[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "ftp://nope"

[sources.auth]
type = "oauth-magic"

[sources.subscription]
callback_url = "not a url"
lifetime_secs = 600
renew_before_secs = 600
model = "presences"

[[sources]]
id = "ns2"
kind = "netsapiens"
correlation_ids = ["x"]
api_base = "https://api.example.net"

[[sources]]
id = "ns3"
kind = "netsapiens"
api_base = "https://api.example.net"
subscription = { callback_url = "https://gw.example.com/webhooks/ns3" }
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].api_base",
            "sources[0].auth.type",
            "sources[0].subscription.callback_url",
            "sources[0].subscription.renew_before_secs",
            "sources[0].subscription.model",
            "sources[1].api_base",
            "sources[2].auth",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn ucwa_sources() {
        let text = r#"
[[sources]]
id = "sfb"
kind = "ucwa"
api_base = "https://lync.contoso.com/ucwa/oauth/v1/applications"
auth = { type = "bearer", token = "env:UCWA_TOKEN" }
subscription = { contacts = ["sip:SaraD@contoso.com"], duration_mins = 20 }
"#;
        let c = parse(text, &[("UCWA_TOKEN", "t")]).unwrap();
        let u = c.sources[0]
            .managed
            .as_ref()
            .unwrap()
            .ucwa
            .as_ref()
            .unwrap();
        assert_eq!(u.contacts, ["sip:SaraD@contoso.com"]);
        assert_eq!(u.duration, Duration::from_secs(20 * 60));
        assert_eq!(u.event_timeout, Duration::from_secs(900));

        let text = r#"
[[sources]]
id = "sfb"
kind = "ucwa"
api_base = "https://lync.contoso.com/ucwa/oauth/v1/applications"
signing_keys = ["k"]
auth = { type = "refresh_token", refresh_token = "r" }
subscription = { contacts = ["sarad@contoso.com"], duration_mins = 45, event_timeout_secs = 60, callback_url = "https://x/y" }

[[sources]]
id = "sfb2"
kind = "ucwa"
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected validation problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].signing_keys",
            "sources[0].auth.token_url",
            "sources[0].subscription.contacts[0]",
            "sources[0].subscription.duration_mins",
            "sources[0].subscription.event_timeout_secs",
            "sources[0].subscription.callback_url",
            "sources[1].subscription",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
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
}
