//! The `graph` kind (Microsoft Teams presence through Graph change
//! notifications): the Graph keys of `[sources.auth]` (`token_url`,
//! `client_id`, `client_secret`, `scope`, `refresh_tokens`) and of
//! `[sources.subscription]` (`lifecycle_url`, `users`, `client_state`,
//! `lifetime_mins`, `renew_before_secs`, `resync_interval_secs`, the
//! encryption certificate, its id and key), with the typed
//! [`GraphManaged`]. The shared keys (`api_base`, `callback_url`,
//! `delete_on_shutdown`, retries) are checked in `sources.rs`.
//!
//! Graph allows presence subscriptions only with a delegated token, one per
//! signed-in account and application, for at most 650 users and 60 minutes:
//! users are split in config order into groups of 650, group *i* using
//! `refresh_tokens[i]`.

use std::time::Duration;

use super::secrets::{Secret, resolve_secret};
use super::sources::{RawAuth, RawSubscription};
use crate::providers::graph_rich::RichKey;

/// Users per subscription (and per `getPresencesByUserId` call).
pub const USERS_PER_GROUP: usize = 650;

/// The Graph API root unless `api_base` says otherwise.
pub const DEFAULT_API_BASE: &str = "https://graph.microsoft.com";

/// The scope asked for unless `scope` says otherwise.
pub const DEFAULT_SCOPE: &str = "https://graph.microsoft.com/Presence.Read.All offline_access";

/// Graph's limit on `clientState`.
pub const MAX_CLIENT_STATE: usize = 128;

/// Graph's limit on a presence subscription's lifetime.
pub const MAX_LIFETIME_MINS: u64 = 60;

/// One service account: the token endpoint form of its refresh-token grant.
#[derive(Clone, Debug)]
pub struct Account {
    /// `grant_type`, `refresh_token`, `client_id`, `client_secret` (when
    /// configured) and `scope`, form-encoded in this order.
    pub form: Vec<(&'static str, Secret)>,
}

/// Graph-specific parts of a managed source.
#[derive(Clone, Debug)]
pub struct GraphManaged {
    pub token_url: String,
    /// One per group of users, in order (extra accounts are not used).
    pub accounts: Vec<Account>,
    /// The users, split into groups of at most [`USERS_PER_GROUP`].
    pub groups: Vec<Vec<String>>,
    /// Where Graph posts lifecycle events (default: `callback_url`).
    pub lifecycle_url: String,
    /// The secret every notification item carries.
    pub client_state: Secret,
    /// Resync every configured user this often.
    pub resync_interval: Duration,
    /// Rich notifications: the certificate and key, when configured.
    pub rich: Option<std::sync::Arc<RichKey>>,
}

/// Validates the Graph keys; problems as `(field, message)`. Returns the
/// typed parts and the subscription lifetime and renewal margin.
pub(super) fn managed(
    auth: Option<&RawAuth>,
    sub: &RawSubscription,
    callback_url: &str,
    url_ok: &dyn Fn(&str) -> bool,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<(String, String)>,
) -> Option<(GraphManaged, Duration, Duration)> {
    let before = problems.len();
    let (token_url, accounts) = match auth {
        None => {
            secret(problems, lookup, "auth", None, true);
            (String::new(), Vec::new())
        }
        Some(a) => {
            if a.kind != "refresh_token" {
                problems.push((
                    "auth.type".into(),
                    "must be \"refresh_token\": Graph presence subscriptions need delegated tokens"
                        .into(),
                ));
            }
            for (field, set) in [
                ("token", a.token.is_some()),
                ("username", a.username.is_some()),
                ("password", a.password.is_some()),
                ("account_id", a.account_id.is_some()),
                ("refresh_token", a.refresh_token.is_some()),
            ] {
                if set {
                    let hint = if field == "refresh_token" {
                        "not used by kind = \"graph\": list one per account in refresh_tokens"
                    } else {
                        "not used by kind = \"graph\""
                    };
                    problems.push((format!("auth.{field}"), hint.into()));
                }
            }
            let client_id = secret(
                problems,
                lookup,
                "auth.client_id",
                a.client_id.as_ref(),
                true,
            );
            let client_secret = secret(
                problems,
                lookup,
                "auth.client_secret",
                a.client_secret.as_ref(),
                false,
            );
            let scope = a.scope.clone().unwrap_or_else(|| DEFAULT_SCOPE.to_owned());
            let token_url = match &a.token_url {
                Some(url) if url_ok(url) => url.clone(),
                Some(_) => {
                    problems.push((
                        "auth.token_url".into(),
                        "is not an http(s) URL with a host".into(),
                    ));
                    String::new()
                }
                None => {
                    problems.push((
                        "auth.token_url".into(),
                        "required (the tenant's token endpoint, \
                         https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token)"
                            .into(),
                    ));
                    String::new()
                }
            };
            let tokens = a.refresh_tokens.as_deref().unwrap_or_default();
            if tokens.is_empty() {
                problems.push((
                    "auth.refresh_tokens".into(),
                    "list one refresh token per service account".into(),
                ));
            }
            let accounts = tokens
                .iter()
                .enumerate()
                .filter_map(|(i, reference)| {
                    let field = format!("auth.refresh_tokens[{i}]");
                    let token = secret(problems, lookup, &field, Some(reference), true)?;
                    let mut form = vec![
                        ("grant_type", Secret::new("refresh_token")),
                        ("refresh_token", token),
                    ];
                    if let Some(id) = &client_id {
                        form.push(("client_id", id.clone()));
                    }
                    if let Some(s) = &client_secret {
                        form.push(("client_secret", s.clone()));
                    }
                    form.push(("scope", Secret::new(scope.as_str())));
                    Some(Account { form })
                })
                .collect();
            (token_url, accounts)
        }
    };
    if sub.users.is_empty() {
        problems.push((
            "subscription.users".into(),
            "list the users' object ids".into(),
        ));
    }
    for (i, user) in sub.users.iter().enumerate() {
        let ok = !user.is_empty()
            && user.len() <= 64
            && user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            problems.push((
                format!("subscription.users[{i}]"),
                format!("{user:?} is not a user object id (letters, digits and -)"),
            ));
        }
    }
    if let Some((i, _)) = sub
        .users
        .iter()
        .enumerate()
        .find(|(i, u)| sub.users[..*i].contains(u))
    {
        problems.push((format!("subscription.users[{i}]"), "listed twice".into()));
    }
    let accounts_given = auth
        .and_then(|a| a.refresh_tokens.as_ref())
        .map_or(0, Vec::len);
    if accounts_given > 0 && sub.users.len() > USERS_PER_GROUP * accounts_given {
        problems.push((
            "subscription.users".into(),
            format!(
                "{} users need {} refresh tokens (one account per {USERS_PER_GROUP} users), \
                 {accounts_given} given",
                sub.users.len(),
                sub.users.len().div_ceil(USERS_PER_GROUP)
            ),
        ));
    }
    let client_state = secret(
        problems,
        lookup,
        "subscription.client_state",
        sub.client_state.as_ref(),
        true,
    );
    if let Some(state) = &client_state
        && state.expose().len() > MAX_CLIENT_STATE
    {
        problems.push((
            "subscription.client_state".into(),
            format!("longer than Graph's {MAX_CLIENT_STATE} characters"),
        ));
    }
    let lifecycle_url = match &sub.lifecycle_url {
        Some(url) if url_ok(url) => url.clone(),
        Some(_) => {
            problems.push((
                "subscription.lifecycle_url".into(),
                "is not an http(s) URL with a host".into(),
            ));
            String::new()
        }
        None => callback_url.to_owned(),
    };
    let lifetime_mins = sub.lifetime_mins.unwrap_or(MAX_LIFETIME_MINS);
    if !(1..=MAX_LIFETIME_MINS).contains(&lifetime_mins) {
        problems.push((
            "subscription.lifetime_mins".into(),
            format!("must be 1 to {MAX_LIFETIME_MINS} (Graph's limit for presence)"),
        ));
    }
    let renew_before = sub.renew_before_secs.unwrap_or(600);
    if renew_before >= lifetime_mins * 60 {
        problems.push((
            "subscription.renew_before_secs".into(),
            "must be less than lifetime_mins".into(),
        ));
    }
    let resync = sub.resync_interval_secs.unwrap_or(900);
    if resync == 0 {
        problems.push((
            "subscription.resync_interval_secs".into(),
            "must be at least 1".into(),
        ));
    }
    let certificate = secret(
        problems,
        lookup,
        "subscription.encryption_certificate",
        sub.encryption_certificate.as_ref(),
        false,
    );
    let key = secret(
        problems,
        lookup,
        "subscription.encryption_key",
        sub.encryption_key.as_ref(),
        false,
    );
    let rich = match (&certificate, &key, &sub.encryption_certificate_id) {
        (None, None, None) => None,
        (Some(certificate), Some(key), Some(id)) => {
            let text = |s: &Secret| String::from_utf8_lossy(s.expose()).into_owned();
            match RichKey::from_pem(&text(certificate), &text(key), id) {
                Ok(rich) => Some(std::sync::Arc::new(rich)),
                Err(e) => {
                    // The message names what is wrong, never key material.
                    problems.push(("subscription.encryption_certificate".into(), e.to_string()));
                    None
                }
            }
        }
        _ => {
            problems.push((
                "subscription.encryption_certificate".into(),
                "encryption_certificate, encryption_certificate_id and encryption_key \
                 go together"
                    .into(),
            ));
            None
        }
    };
    if problems.len() > before {
        return None;
    }
    let groups: Vec<Vec<String>> = sub
        .users
        .chunks(USERS_PER_GROUP)
        .map(<[String]>::to_vec)
        .collect();
    let accounts = accounts.into_iter().take(groups.len()).collect();
    Some((
        GraphManaged {
            token_url,
            accounts,
            groups,
            lifecycle_url,
            client_state: client_state?,
            resync_interval: Duration::from_secs(resync),
            rich,
        },
        Duration::from_secs(lifetime_mins * 60),
        Duration::from_secs(renew_before),
    ))
}

/// Resolves a secret reference, reporting a missing required one or one
/// that cannot be resolved as a problem of `field`.
fn secret(
    problems: &mut Vec<(String, String)>,
    lookup: &dyn Fn(&str) -> Option<String>,
    field: &str,
    reference: Option<&String>,
    required: bool,
) -> Option<Secret> {
    match reference {
        None if required => {
            problems.push((field.into(), "required for kind = \"graph\"".into()));
            None
        }
        None => None,
        Some(reference) => resolve_secret(reference, lookup)
            .map_err(|m| problems.push((field.into(), m)))
            .ok(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ConfigError;
    use crate::config::test_support::parse;

    fn source(auth: &str, subscription: &str) -> String {
        format!(
            r#"
[[sources]]
id = "teams"
kind = "graph"
[sources.auth]
{auth}
[sources.subscription]
callback_url = "https://gw.example.com/webhooks/teams"
{subscription}
"#
        )
    }

    const AUTH: &str = r#"type = "refresh_token"
token_url = "https://login.example.com/t/oauth2/v2.0/token"
client_id = "app"
client_secret = "env:GRAPH_SECRET"
refresh_tokens = ["env:RT1", "env:RT2"]"#;

    #[test]
    fn users_are_split_per_account_in_config_order() {
        let users: Vec<String> = (0..700).map(|i| format!("\"u-{i}\"")).collect();
        let text = source(
            AUTH,
            &format!(
                "users = [{}]\nclient_state = \"state\"\nlifetime_mins = 30\n",
                users.join(",")
            ),
        );
        let c = parse(
            &text,
            &[("GRAPH_SECRET", "s"), ("RT1", "rt-1"), ("RT2", "rt-2")],
        )
        .unwrap();
        let managed = c.sources[0].managed.as_ref().unwrap();
        let g = managed.graph.as_ref().unwrap();
        assert_eq!(managed.api_base, "https://graph.microsoft.com");
        assert_eq!(g.groups.len(), 2);
        assert_eq!(g.groups[0].len(), 650);
        let rest: Vec<String> = (650..700).map(|i| format!("u-{i}")).collect();
        assert_eq!(g.groups[1], rest);
        assert_eq!(g.accounts.len(), 2);
        let form: Vec<&str> = g.accounts[1].form.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            form,
            [
                "grant_type",
                "refresh_token",
                "client_id",
                "client_secret",
                "scope"
            ]
        );
        assert_eq!(g.accounts[1].form[1].1.expose(), b"rt-2");
        assert_eq!(managed.lifetime.as_secs(), 1800);
        assert_eq!(managed.renew_before.as_secs(), 600);
        assert_eq!(g.lifecycle_url, "https://gw.example.com/webhooks/teams");
        assert_eq!(g.resync_interval.as_secs(), 900);
    }

    #[test]
    fn every_bad_key_is_named() {
        let users: Vec<String> = (0..1301).map(|i| format!("\"u-{i}\"")).collect();
        let text = source(
            r#"type = "password"
client_id = "app"
username = "x"
refresh_tokens = ["a", "b"]"#,
            &format!(
                "users = [{}, \"bad'id\", \"u-1\"]\nclient_state = \"{}\"\nlifetime_mins = 90\n\
                 renew_before_secs = 6000\nresync_interval_secs = 0\nlifecycle_url = \"nope\"\n\
                 encryption_certificate_id = \"c1\"\nlifetime_secs = 60\nmodel = \"presence\"\n",
                users.join(","),
                "s".repeat(129)
            ),
        );
        let Err(ConfigError::Invalid(problems)) = parse(&text, &[]) else {
            panic!("expected problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].auth.type",
            "sources[0].auth.username",
            "sources[0].auth.token_url",
            "sources[0].subscription.users",
            "sources[0].subscription.users[1301]",
            "sources[0].subscription.users[1302]",
            "sources[0].subscription.client_state",
            "sources[0].subscription.lifetime_mins",
            "sources[0].subscription.renew_before_secs",
            "sources[0].subscription.resync_interval_secs",
            "sources[0].subscription.lifecycle_url",
            "sources[0].subscription.encryption_certificate",
            "sources[0].subscription.lifetime_secs",
            "sources[0].subscription.model",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        assert!(!format!("{problems:?}").contains(&"s".repeat(129)));
    }

    #[test]
    fn graph_needs_its_subscription_and_refuses_other_kinds_keys() {
        let text = r#"
[[sources]]
id = "teams"
kind = "graph"
signing_keys = ["k"]
correlation_ids = ["x"]
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "sources[0].subscription",
            "sources[0].signing_keys",
            "sources[0].correlation_ids",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }
}
