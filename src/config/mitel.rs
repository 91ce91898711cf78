//! The Mitel kinds, `mitel` (webhooks) and `mitel_ws` (MQTT over
//! WebSocket): the Mitel keys of a managed `[sources.subscription]`
//! (`principals`, `media`, `media_subject_filter`, `method_filter`,
//! `check_interval_secs`, `client_id`) and the typed [`MitelManaged`]. The
//! shared keys (`signing_keys`, `api_base`, `auth_base`, `[sources.auth]`)
//! are checked in `sources.rs`.

use std::time::Duration;

use super::secrets::Secret;
use super::sources::RawSubscription;

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

/// Validates the Mitel keys of `[sources.subscription]`; problems as
/// `(field, message)`.
pub(super) fn managed(
    source_id: &str,
    sub: &RawSubscription,
    websocket: bool,
    auth_base: &str,
    first_signing_key: Option<&Secret>,
    problems: &mut Vec<(String, String)>,
) -> Option<MitelManaged> {
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
        auth_base: auth_base.to_owned(),
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
