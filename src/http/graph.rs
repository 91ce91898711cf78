//! The webhook of a Graph source (`kind = "graph"`): validation requests and
//! change notification batches.
//!
//! - A POST with `?validationToken=` is answered 200 `text/plain` (with
//!   `nosniff`) with the token decoded as a query value, whatever the body,
//!   without any other check: Graph sends it when a subscription is created
//!   and gives up after 10 seconds.
//! - A notification batch is authentic when every item's `clientState` is
//!   the configured one (constant time); otherwise 401 and nothing is
//!   applied. Then each item: a lifecycle event goes to the source's
//!   lifecycle task; a rich notification is decrypted (its HMAC checked
//!   first; a failing item is counted as a rejected signature and skipped);
//!   presence carried in `resourceData` is applied; an item that only names
//!   a user queues a read of that user. Presence is applied before the
//!   answer (a 202 is never given for what was not kept); reads and
//!   lifecycle work happen after it, so the answer comes well inside Graph's
//!   3 seconds even while Graph is slow to answer the gateway.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::webhooks::{Rejected, apply_error};
use crate::presence::Millis;
use crate::providers::graph::{Kind, parse_batch, parse_presence, presence_update};
use crate::providers::{ParseError, Parsed};
use crate::sources::{GraphReceiver, Rejection, Source};
use crate::upstream::graph::LifecycleEvent;

/// The decoded `validationToken` of a request's query, if it has one.
pub(super) fn validation_token(uri: &Uri) -> Option<String> {
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "validationToken")
        .map(|(_, value)| value.into_owned())
}

/// The answer to a validation request: the token as plain text.
pub(super) fn validation_answer(token: String) -> Response {
    let mut response = (StatusCode::OK, token).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Handles one authentic-or-not notification batch (its body read).
pub(super) async fn notifications(
    state: &AppState,
    source: &Source,
    receiver: &GraphReceiver,
    body: &[u8],
) -> Result<Response, Rejected> {
    let bad = |e: ParseError| {
        Rejected::new(
            Rejection::BadPayload,
            StatusCode::BAD_REQUEST,
            "bad-payload",
            e.to_string(),
        )
    };
    let batch = parse_batch(body).map_err(bad)?;
    for (i, item) in batch.value.iter().enumerate() {
        receiver
            .client_state
            .check(item.client_state.as_deref())
            .map_err(|e| {
                let reason = Rejection::from(e);
                let what = if reason == Rejection::SignatureMissing {
                    "has no clientState"
                } else {
                    "has a clientState that does not match"
                };
                Rejected::new(
                    reason,
                    StatusCode::UNAUTHORIZED,
                    reason.slug(),
                    format!(
                        "item {i} {what} the one of source {:?}; nothing was applied",
                        &*source.id
                    ),
                )
            })?;
    }
    // Rich items first: their plain text must outlive the updates made
    // from it. Each costs an RSA private-key operation (milliseconds), so
    // they are decrypted off the async workers.
    let decrypted = decrypt_all(source, receiver, &batch).await;
    let now = Millis::now();
    let mut parsed = Parsed::default();
    let mut reads: Vec<&str> = Vec::new();
    for (item, plain) in batch.value.iter().zip(&decrypted) {
        match item.kind() {
            Kind::Lifecycle {
                event: Some(event),
                subscription_id: Some(id),
            } => receiver.inbox.lifecycle(LifecycleEvent {
                event,
                subscription_id: id.to_owned(),
            }),
            Kind::Lifecycle { .. } | Kind::Unusable => parsed.ignored += 1,
            Kind::Rich(_) => {
                let Some(text) = plain else {
                    // Not decryptable here (no key configured): read the
                    // user instead, when the item names one.
                    if receiver.rich.is_none()
                        && let Some(id) = item.resource_data.as_ref().and_then(|d| d.id.as_deref())
                    {
                        reads.push(id);
                    }
                    continue;
                };
                let presence = parse_presence(text).map_err(bad)?;
                let principal = presence
                    .id
                    .clone()
                    .or_else(|| item.resource_data.as_ref().and_then(|d| d.id.clone()))
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        bad(ParseError::Missing {
                            field: "principal",
                            tried: "the decrypted id, /resourceData/id".into(),
                        })
                    })?;
                let update =
                    presence_update(principal, &presence, &receiver.statuses, now).map_err(bad)?;
                parsed.updates.push(owned(update));
            }
            Kind::Carried(presence) => {
                let principal =
                    presence
                        .id
                        .clone()
                        .filter(|id| !id.is_empty())
                        .ok_or_else(|| {
                            bad(ParseError::Missing {
                                field: "principal",
                                tried: "/resourceData/id".into(),
                            })
                        })?;
                let update =
                    presence_update(principal, presence, &receiver.statuses, now).map_err(bad)?;
                parsed.updates.push(owned(update));
            }
            Kind::Read(id) => reads.push(id),
        }
    }
    crate::sources::apply(state.store(), source, &parsed)
        .await
        .map_err(|e| apply_error(source, e))?;
    for id in reads {
        receiver.inbox.read(id);
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

/// The plain text of each rich item of `batch` (`None` for other items, and
/// for rich items that fail, which are counted as rejected signatures).
async fn decrypt_all(
    source: &Source,
    receiver: &GraphReceiver,
    batch: &crate::providers::graph::Batch<'_>,
) -> Vec<Option<String>> {
    let Some(key) = &receiver.rich else {
        return vec![None; batch.value.len()];
    };
    let sealed: Vec<Option<[String; 3]>> = batch
        .value
        .iter()
        .map(|item| match item.kind() {
            Kind::Rich(c) => Some([
                c.data_key.to_string(),
                c.data_signature.to_string(),
                c.data.to_string(),
            ]),
            _ => None,
        })
        .collect();
    if sealed.iter().all(Option::is_none) {
        return vec![None; sealed.len()];
    }
    let key = std::sync::Arc::clone(key);
    let count = sealed.len();
    let opened = tokio::task::spawn_blocking(move || {
        sealed
            .into_iter()
            .map(|item| item.map(|[k, s, d]| key.decrypt(&k, &s, &d)))
            .collect::<Vec<_>>()
    })
    .await
    // A panic in the decryption is no decryption.
    .unwrap_or_else(|_| (0..count).map(|_| None).collect());
    opened
        .into_iter()
        .map(|result| match result? {
            Ok(plain) => match String::from_utf8(plain) {
                Ok(text) => Some(text),
                Err(_) => {
                    source.stats.reject(Rejection::BadPayload);
                    None
                }
            },
            Err(error) => {
                source.stats.reject(Rejection::SignatureMismatch);
                tracing::info!(source = %source.id, %error, "rich notification item rejected");
                None
            }
        })
        .collect()
}

/// An update that owns its text, so it can outlive the decrypted buffer
/// it was read from.
fn owned(update: crate::presence::PresenceUpdate<'_>) -> crate::presence::PresenceUpdate<'static> {
    let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
    crate::presence::PresenceUpdate {
        principal: own(update.principal),
        availability: update.availability,
        activity: update.activity.map(own),
        status_text: update.status_text.map(own),
        raw_status: update.raw_status.map(own),
        observed_at: update.observed_at,
        event_id: update.event_id.map(own),
    }
}
