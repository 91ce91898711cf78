//! `[[sources]]`: the keys every kind shares (`id`, `kind`, `signing_keys`,
//! `allow_ips`, `fields`, `status_map`, `call_fields`) and the managed
//! subscription frame (`api_base`, `[sources.auth]`,
//! `[sources.subscription]`), with the table of which keys each kind
//! accepts. What only one kind uses lives beside it: `mitel.rs` (`mitel`,
//! `mitel_ws`), `netsapiens.rs`, `ucwa.rs`, `graph.rs`, `standard.rs`; this module calls
//! into them in the order the problems are reported.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::graph::GraphManaged;
use super::mitel::MitelManaged;
use super::netsapiens::{self, RawCorrelationId};
use super::secrets::{Secret, resolve_secret};
use super::standard::{RawStandard, StandardSettings};
use super::ucwa::UcwaManaged;
use super::{graph, mitel, parse_nets, standard, ucwa};
use crate::presence::Availability;
use crate::providers::mitel::MitelParser;
use crate::providers::netsapiens::{CallFieldOverrides, Model, NetSapiensParser};
use crate::providers::standard::StandardParser;
use crate::providers::{FieldOverrides, StatusMap};

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
    /// Any Standard Webhooks sender (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`), its payload mapped by configuration.
    Standard,
    /// Microsoft Teams presence through Graph change notifications.
    Graph,
}

impl SourceKind {
    /// The name used in config and in `/v1/sources`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mitel => "mitel",
            SourceKind::Netsapiens => "netsapiens",
            SourceKind::MitelWs => "mitel_ws",
            SourceKind::Ucwa => "ucwa",
            SourceKind::Standard => "standard",
            SourceKind::Graph => "graph",
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
    /// `standard`: the decoded keys, timestamp tolerance and event types.
    pub standard: Option<StandardSettings>,
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
    /// Graph sources: accounts, user groups, client state, encryption.
    pub graph: Option<GraphManaged>,
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

impl SourceConfig {
    /// The source's status words: its `status_map` over the kind's table.
    pub fn status_map(&self) -> StatusMap {
        let builtin = match self.kind {
            SourceKind::Mitel | SourceKind::MitelWs => crate::providers::mitel::STATUS_WORDS,
            SourceKind::Netsapiens => crate::providers::netsapiens::STATUS_WORDS,
            SourceKind::Ucwa => crate::providers::ucwa::STATUS_WORDS,
            SourceKind::Standard => crate::providers::standard::STATUS_WORDS,
            SourceKind::Graph => crate::providers::graph::STATUS_WORDS,
        };
        StatusMap::new(
            builtin,
            self.status_map.iter().map(|(k, v)| (k.as_str(), *v)),
        )
    }
}

// ---- raw (deserialized) form -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
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
    tolerance_secs: Option<u64>,
    event_types: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) token: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) refresh_token: Option<String>,
    pub(super) account_id: Option<String>,
    // Graph
    pub(super) scope: Option<String>,
    pub(super) refresh_tokens: Option<Vec<String>>,
}

/// `[sources.subscription]`: one table for every kind (so that unknown keys
/// stay an error); the kind modules read their own keys from it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubscription {
    #[serde(default)]
    pub(super) callback_url: String,
    pub(super) lifetime_secs: Option<u64>,
    pub(super) renew_before_secs: Option<u64>,
    #[serde(default)]
    pub(super) delete_on_shutdown: bool,
    #[serde(default)]
    pub(super) model: Option<crate::providers::fields::OneOrMany>,
    pub(super) reseller: Option<String>,
    pub(super) domain: Option<String>,
    pub(super) user: Option<String>,
    #[serde(default = "default_true")]
    pub(super) geo_support: bool,
    pub(super) preferred_server: Option<String>,
    #[serde(default = "default_retry_initial")]
    pub(super) retry_initial_ms: u64,
    #[serde(default = "default_retry_max")]
    pub(super) retry_max_secs: u64,
    // Mitel
    #[serde(default)]
    pub(super) principals: Vec<String>,
    #[serde(default)]
    pub(super) media: bool,
    pub(super) media_subject_filter: Option<String>,
    pub(super) method_filter: Option<String>,
    pub(super) check_interval_secs: Option<u64>,
    pub(super) client_id: Option<String>,
    // UCWA
    #[serde(default)]
    pub(super) contacts: Vec<String>,
    pub(super) duration_mins: Option<u64>,
    pub(super) event_timeout_secs: Option<u64>,
    // Graph
    pub(super) lifecycle_url: Option<String>,
    #[serde(default)]
    pub(super) users: Vec<String>,
    pub(super) client_state: Option<String>,
    pub(super) lifetime_mins: Option<u64>,
    pub(super) resync_interval_secs: Option<u64>,
    pub(super) encryption_certificate: Option<String>,
    pub(super) encryption_certificate_id: Option<String>,
    pub(super) encryption_key: Option<String>,
}

/// NetSapiens defaults: a day's subscription, renewed an hour ahead.
const DEFAULT_LIFETIME_SECS: u64 = 86_400;
const DEFAULT_RENEW_BEFORE_SECS: u64 = 3_600;
fn default_true() -> bool {
    true
}
fn default_retry_initial() -> u64 {
    1_000
}
fn default_retry_max() -> u64 {
    300
}

// ---- validation --------------------------------------------------------------

/// Checks every `[[sources]]` entry and resolves its secrets, reporting each
/// bad key (as `sources[N].key`) through `problem`.
pub(super) fn resolve(
    raw: Vec<RawSource>,
    lookup: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(String, String),
) -> Vec<SourceConfig> {
    let mut sources: Vec<SourceConfig> = Vec::with_capacity(raw.len());
    for (n, s) in raw.into_iter().enumerate() {
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
            SourceKind::MitelWs | SourceKind::Ucwa | SourceKind::Graph => {
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
                        s.kind != SourceKind::MitelWs && !s.signing_keys.is_empty(),
                    ),
                    (
                        "auth_base",
                        s.kind != SourceKind::MitelWs && s.auth_base.is_some(),
                    ),
                    (
                        "call_fields",
                        s.kind != SourceKind::MitelWs
                            && s.call_fields != CallFieldOverrides::default(),
                    ),
                    (
                        "fields.event_id",
                        s.kind == SourceKind::Graph && s.fields.event_id.is_some(),
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
            SourceKind::Standard => {
                for (field, set) in [
                    ("correlation_ids", !s.correlation_ids.is_empty()),
                    ("model", s.model.is_some()),
                    ("timezone", s.timezone.is_some()),
                    ("fields.domain", s.fields.domain.is_some()),
                    ("auth_base", s.auth_base.is_some()),
                    ("subscription", s.subscription.is_some()),
                    (
                        "call_fields",
                        s.call_fields != CallFieldOverrides::default(),
                    ),
                ] {
                    if set {
                        problem(
                            key(field),
                            "not used by kind = \"standard\" (the sender is set up on its side)"
                                .into(),
                        );
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
        let netsapiens::SourceSettings {
            model,
            correlation_ids,
            timezone,
        } = netsapiens::source_settings(
            s.model.as_deref(),
            &s.correlation_ids,
            s.timezone.as_deref(),
            &key,
            lookup,
            problem,
        );
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
        let allow_ips = parse_nets(&s.allow_ips, &key("allow_ips"), problem);
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
        let mut standard_problems = Vec::new();
        let standard = standard::settings(
            &RawStandard {
                is_standard: s.kind == SourceKind::Standard,
                signing_keys: &signing_keys,
                tolerance_secs: s.tolerance_secs,
                event_types: s.event_types.as_deref(),
                fields: &s.fields,
            },
            &mut standard_problems,
        );
        for (field, message) in standard_problems {
            problem(key(&field), message);
        }
        let standard_kind = s.kind == SourceKind::Standard;
        let managed = s
            .subscription
            .as_ref()
            .filter(|_| !standard_kind)
            .and_then(|sub| {
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
            standard,
        };
        let compiled = match source.kind {
            SourceKind::Mitel | SourceKind::MitelWs => {
                MitelParser::new(&source.fields, &source.call_fields, source.status_map()).map(drop)
            }
            SourceKind::Netsapiens => NetSapiensParser::new(
                &source.fields,
                &source.call_fields,
                source.status_map(),
                source.timezone.clone(),
            )
            .map(drop),
            SourceKind::Ucwa | SourceKind::Graph => Ok(()),
            SourceKind::Standard => source.standard.as_ref().map_or(Ok(()), |settings| {
                StandardParser::new(&source.fields, &settings.event_types, source.status_map())
                    .map(drop)
            }),
        };
        if let Err(e) = compiled {
            problem(key("fields"), e.to_string());
        }
        sources.push(source);
    }
    sources
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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
    let graph_kind = kind == SourceKind::Graph;
    let netsapiens_kind = !mitel && !ucwa && !graph_kind;
    let url_ok = |text: &str| {
        reqwest::Url::parse(text)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .is_some()
    };
    let mut base = |field: &str, given: Option<&str>, default: Option<&str>| match given.or(default)
    {
        Some(base) if url_ok(base) => base.trim_end_matches('/').to_owned(),
        Some(_) => {
            // Not quoted: a URL may carry credentials (`https://user:pw@...`).
            problems.push((field.into(), "is not an http(s) URL with a host".into()));
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
    let default_api = if mitel {
        Some("https://notifications.api.mitel.io")
    } else if graph_kind {
        Some(graph::DEFAULT_API_BASE)
    } else {
        None
    };
    let api_base = base("api_base", bases.api, default_api);
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
        // Not quoted, like the API roots above.
        problems.push((
            "subscription.callback_url".into(),
            "is not an http(s) URL with a host".into(),
        ));
    }
    let lifetime_secs = sub.lifetime_secs.unwrap_or(DEFAULT_LIFETIME_SECS);
    let renew_before_secs = sub.renew_before_secs.unwrap_or(DEFAULT_RENEW_BEFORE_SECS);
    if netsapiens_kind && lifetime_secs == 0 {
        problems.push((
            "subscription.lifetime_secs".into(),
            "must be at least 1".into(),
        ));
    }
    if netsapiens_kind && renew_before_secs >= lifetime_secs {
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
    let graph_keys = [
        ("lifecycle_url", sub.lifecycle_url.is_some()),
        ("users", !sub.users.is_empty()),
        ("client_state", sub.client_state.is_some()),
        ("lifetime_mins", sub.lifetime_mins.is_some()),
        ("resync_interval_secs", sub.resync_interval_secs.is_some()),
        (
            "encryption_certificate",
            sub.encryption_certificate.is_some(),
        ),
        (
            "encryption_certificate_id",
            sub.encryption_certificate_id.is_some(),
        ),
        ("encryption_key", sub.encryption_key.is_some()),
    ];
    let mut foreign: Vec<(&str, bool)> = if graph_kind {
        vec![
            ("model", sub.model.is_some()),
            ("reseller", sub.reseller.is_some()),
            ("domain", sub.domain.is_some()),
            ("user", sub.user.is_some()),
            ("preferred_server", sub.preferred_server.is_some()),
            ("principals", !sub.principals.is_empty()),
            ("media", sub.media),
            ("media_subject_filter", sub.media_subject_filter.is_some()),
            ("method_filter", sub.method_filter.is_some()),
            ("check_interval_secs", sub.check_interval_secs.is_some()),
            ("client_id", sub.client_id.is_some()),
            ("contacts", !sub.contacts.is_empty()),
            ("duration_mins", sub.duration_mins.is_some()),
            ("event_timeout_secs", sub.event_timeout_secs.is_some()),
            ("lifetime_secs", sub.lifetime_secs.is_some()),
        ]
    } else if ucwa {
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
    if !graph_kind {
        foreign.extend(graph_keys);
    }
    for (field, set) in foreign {
        if set {
            problems.push((
                format!("subscription.{field}"),
                format!("not used by kind = \"{}\"", kind.as_str()),
            ));
        }
    }
    let (names, models) = if netsapiens_kind {
        netsapiens::subscription_models(sub, default_model, &mut problems)
    } else {
        (Vec::new(), Vec::new())
    };
    let ucwa_parts = ucwa.then(|| ucwa::managed(sub, &mut problems));
    let mut lifetime = Duration::from_secs(lifetime_secs);
    let mut renew_before = Duration::from_secs(renew_before_secs);
    let mut graph_parts = None;
    let auth = if graph_kind {
        let parts = graph::managed(auth, sub, &sub.callback_url, &url_ok, lookup, &mut problems);
        parts.map(|(parts, life, renew)| {
            (lifetime, renew_before) = (life, renew);
            // Reads (resync, notifications without data) use the first
            // account; each subscription uses its group's.
            let first = parts.accounts.first().map(|a| a.form.clone());
            let token_url = parts.token_url.clone();
            graph_parts = Some(parts);
            Auth::Grant {
                token_url,
                form: first.unwrap_or_default(),
            }
        })
    } else {
        managed_auth(
            auth,
            mitel,
            ucwa,
            &api_base,
            &auth_base,
            lookup,
            &mut problems,
        )
    };
    let mitel_parts = if mitel {
        mitel::managed(
            source_id,
            sub,
            websocket,
            &auth_base,
            first_signing_key,
            &mut problems,
        )
    } else {
        None
    };
    match auth {
        Some(auth) if problems.is_empty() => Ok(Managed {
            api_base,
            auth,
            callback_url: sub.callback_url.clone(),
            lifetime,
            renew_before,
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
            mitel: mitel_parts,
            ucwa: ucwa_parts,
            graph: graph_parts,
        }),
        _ => Err(problems),
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

#[cfg(test)]
mod tests {
    use crate::config::ConfigError;
    use crate::config::test_support::parse;

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
}
