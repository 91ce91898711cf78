//! The `netsapiens` kind: the source keys only NetSapiens uses (`model`,
//! `correlation_ids`, `timezone`) and the NetSapiens keys of a managed
//! `[sources.subscription]` (`model`, one subscription per model; `reseller`,
//! `domain`, `user`, `geo_support` and `preferred_server` are carried into
//! [`Managed`](super::Managed) as given). The shared keys (`api_base`,
//! `[sources.auth]`) are checked in `sources.rs`.

use serde::Deserialize;

use super::secrets::{Secret, resolve_secret};
use super::sources::RawSubscription;
use crate::providers::netsapiens::Model;

/// A NetSapiens subscription id: just the id (the source's `model`), or
/// `{ id = "...", model = "call" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawCorrelationId {
    Id(String),
    WithModel { id: String, model: String },
}

/// The typed `model`, `correlation_ids` and `timezone` of a source. Every
/// kind gets them (with their defaults); only NetSapiens may set them.
pub(super) struct SourceSettings {
    pub(super) model: Model,
    pub(super) correlation_ids: Vec<(Secret, Model)>,
    pub(super) timezone: jiff::tz::TimeZone,
}

/// Checks `model`, `correlation_ids` and `timezone` and resolves the ids,
/// reporting each bad key (named by `key`) through `problem`.
pub(super) fn source_settings(
    model: Option<&str>,
    correlation_ids: &[RawCorrelationId],
    timezone: Option<&str>,
    key: &impl Fn(&str) -> String,
    lookup: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(String, String),
) -> SourceSettings {
    let model = match model.map(model_named).transpose() {
        Ok(model) => model.unwrap_or(Model::Presence),
        Err(m) => {
            problem(key("model"), m);
            Model::Presence
        }
    };
    let mut ids = Vec::with_capacity(correlation_ids.len());
    for (i, entry) in correlation_ids.iter().enumerate() {
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
            Ok(secret) => ids.push((secret, id_model)),
            Err(m) => problem(field, m),
        }
    }
    let timezone = match timezone {
        None | Some("UTC") => jiff::tz::TimeZone::UTC,
        Some(name) => jiff::tz::TimeZone::get(name).unwrap_or_else(|e| {
            problem(key("timezone"), format!("{name:?}: {e}"));
            jiff::tz::TimeZone::UTC
        }),
    };
    SourceSettings {
        model,
        correlation_ids: ids,
        timezone,
    }
}

/// The models of a managed NetSapiens subscription (one subscription each):
/// `subscription.model`, else the source's `model`. Returns the names as
/// given and the parsed models; problems as `(field, message)`.
pub(super) fn subscription_models(
    sub: &RawSubscription,
    default_model: &str,
    problems: &mut Vec<(String, String)>,
) -> (Vec<String>, Vec<Model>) {
    let names: Vec<String> = match &sub.model {
        None => vec![default_model.to_owned()],
        Some(crate::providers::fields::OneOrMany::One(m)) => vec![m.clone()],
        Some(crate::providers::fields::OneOrMany::Many(list)) => list.clone(),
    };
    if names.is_empty() {
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
    (names, models)
}

fn model_named(name: &str) -> Result<Model, String> {
    Model::from_name(name).ok_or_else(|| {
        format!(
            "{name:?} is not a NetSapiens model (one of: {})",
            Model::NAMES.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_support::parse;
    use crate::config::{Auth, ConfigError, SourceKind};
    use crate::providers::netsapiens::Model;

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
}
