//! The `ucwa` kind (Skype for Business): the UCWA keys of
//! `[sources.subscription]` (`contacts`, `duration_mins`,
//! `event_timeout_secs`) and the typed [`UcwaManaged`]. The shared keys
//! (`api_base`, `[sources.auth]`) are checked in `sources.rs`.

use std::time::Duration;

use super::sources::RawSubscription;

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

/// Validates the UCWA keys of `[sources.subscription]`.
pub(super) fn managed(sub: &RawSubscription, problems: &mut Vec<(String, String)>) -> UcwaManaged {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::ConfigError;
    use crate::config::test_support::parse;

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
}
