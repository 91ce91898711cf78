//! The consumer read API under `/v1`: one record, pages, batch queries and
//! per-source state. Guarded by bearer tokens (see [`require_token`]).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{LimitedBody, PathParams};
use super::problem::Problem;
use crate::presence::{Availability, Cursor, Millis, PresenceRecord};
use crate::sources::{Rejection, Source};
use crate::upstream::manager::SubscriptionView;

/// Default and largest page size of `GET /v1/presence`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Most principals one `POST /v1/presence/query` may ask for.
const MAX_QUERY_PRINCIPALS: usize = 1000;
/// Largest body of `POST /v1/presence/query`: room for the most principals
/// with long ids (it was axum's default limit before it was named here).
const MAX_QUERY_BODY: usize = 2 * 1024 * 1024;

/// Rejects requests without a valid bearer token (when tokens are configured).
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.consumer_auth().is_open() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    // Browsers cannot set headers on EventSource or WebSocket: the streams
    // also take the token as `access_token` (paths are logged, query
    // strings never). (Inside the nested /v1 router the path is seen
    // without its prefix.)
    let from_query = (presented.is_none()
        && matches!(
            request.uri().path(),
            "/stream" | "/v1/stream" | "/ws" | "/v1/ws"
        ))
    .then(|| {
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    })
    .flatten();
    let presented = presented.map(str::to_owned).or(from_query);
    if presented.is_some_and(|t| state.consumer_auth().accepts(t.as_bytes())) {
        return next.run(request).await;
    }
    state
        .global()
        .consumer_unauthorized
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Problem::unauthorized_consumer().into_response()
}

fn source_or_404<'a>(state: &'a AppState, id: &str) -> Result<&'a Source, Problem> {
    state
        .sources()
        .get(id)
        .ok_or_else(|| Problem::not_found(format!("no source with id {id:?}")))
}

/// `GET /v1/presence/{source}/{principal}`.
pub async fn get_one(
    State(state): State<AppState>,
    PathParams((source, principal)): PathParams<(String, String)>,
) -> Result<Json<PresenceRecord>, Problem> {
    let src = source_or_404(&state, &source)?;
    state
        .store()
        .get(src.index, &principal)
        .map(Json)
        .ok_or_else(|| {
            Problem::not_found(format!(
                "no presence for {principal:?} in source {source:?}"
            ))
        })
}

/// Query of `GET /v1/presence`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    source: Option<String>,
    availability: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListPage {
    items: Vec<PresenceRecord>,
    next_cursor: Option<String>,
}

/// `GET /v1/presence?source=&availability=&limit=&cursor=`.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListPage>, Problem> {
    let Query(q) = query.map_err(|e| Problem::bad_request("bad-query", e.body_text()))?;
    let sources: Vec<usize> = match q.source.as_deref() {
        Some(id) => vec![source_or_404(&state, id)?.index],
        None => state.sources().sorted_indexes().to_vec(),
    };
    let wanted = availabilities(q.availability.as_deref())?;
    let limit = page_size(q.limit.as_deref())?;
    let from = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(decode_cursor(&state, text, &sources)?),
    };
    let page = state
        .store()
        .page(&sources, from, limit, |p| wanted(p.availability));
    Ok(Json(ListPage {
        items: page.items,
        next_cursor: page.next.map(|c| encode_cursor(&state, c)),
    }))
}

/// The `availability` filter of a listing: a comma-separated list, every
/// item an availability; absent: any.
pub(super) fn availabilities(
    list: Option<&str>,
) -> Result<impl Fn(Availability) -> bool + use<>, Problem> {
    let mut wanted = [false; Availability::ALL.len()];
    if let Some(list) = list {
        // Every item must name one: an empty item (`availability=`,
        // `busy,,away`) is a mistake to report, not "any availability".
        for name in list.split(',').map(str::trim) {
            let a = Availability::from_name(name).ok_or_else(|| {
                Problem::bad_request("bad-query", format!("{name:?} is not an availability"))
            })?;
            wanted[a as usize] = true;
        }
    }
    let any = !wanted.contains(&true);
    Ok(move |a: Availability| any || wanted[a as usize])
}

/// The `limit` of a listing: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
pub(super) fn page_size(limit: Option<&str>) -> Result<usize, Problem> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                Problem::bad_request(
                    "bad-query",
                    format!("limit must be an integer from 1 to {MAX_LIMIT}"),
                )
            }),
    }
}

/// Cursors are opaque to clients: base64url of `source-id / shard / index`.
fn encode_cursor(state: &AppState, c: Cursor) -> String {
    let id = state.sources().by_index(c.source).map_or("", |s| &s.id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{id}/{}/{}", c.shard, c.index))
}

fn decode_cursor(state: &AppState, text: &str, sources: &[usize]) -> Result<Cursor, Problem> {
    let invalid = || Problem::bad_request("bad-cursor", "cursor is not one this listing returned");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let mut parts = raw.rsplitn(3, '/');
    let index = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(invalid)?;
    let shard = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(invalid)?;
    let source = parts
        .next()
        .and_then(|id| state.sources().get(id))
        .ok_or_else(invalid)?;
    if !sources.contains(&source.index) {
        return Err(invalid());
    }
    Ok(Cursor {
        source: source.index,
        shard,
        index,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    principals: Vec<String>,
    source: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct QueryResult {
    items: Vec<PresenceRecord>,
}

/// `POST /v1/presence/query` `{"principals": [...], "source": "..."}`.
pub async fn query(
    State(state): State<AppState>,
    LimitedBody(body): LimitedBody<MAX_QUERY_BODY>,
) -> Result<Json<QueryResult>, Problem> {
    let q: QueryBody = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request(
            "bad-query",
            format!("expected {{\"principals\": [...], \"source\": \"...\"}}: {e}"),
        )
    })?;
    if q.principals.len() > MAX_QUERY_PRINCIPALS {
        return Err(Problem::bad_request(
            "bad-query",
            format!("at most {MAX_QUERY_PRINCIPALS} principals per query"),
        ));
    }
    let sources: Vec<usize> = match q.source.as_deref() {
        Some(id) => vec![source_or_404(&state, id)?.index],
        None => state.sources().sorted_indexes().to_vec(),
    };
    let items = q
        .principals
        .iter()
        .flat_map(|p| sources.iter().filter_map(|&s| state.store().get(s, p)))
        .collect();
    Ok(Json(QueryResult { items }))
}

#[derive(Debug, Serialize)]
pub struct SourcesView {
    sources: Vec<SourceView>,
}

#[derive(Debug, Serialize)]
struct SourceView {
    id: String,
    kind: &'static str,
    records: usize,
    /// The source's current records per availability (every value a key).
    availability: AvailabilityCounts,
    last_event_at: Option<Millis>,
    counters: Counters,
    /// `accepted` per minute over the last hour, oldest first; the last is
    /// the current minute (this replica's count).
    accepted_per_minute: Vec<u32>,
    /// Managed upstream subscriptions; none for sources without a
    /// `[sources.subscription]` table. Secret ids appear as fingerprints.
    subscriptions: Vec<SubscriptionView>,
    /// With several replicas (Redis backend), for managed sources: which
    /// replica manages the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseView>,
    /// Graph sources: the resyncs that read every configured user.
    #[serde(skip_serializing_if = "Option::is_none")]
    resync: Option<crate::upstream::graph::ResyncView>,
}

/// Record counts by availability, as a JSON object with every availability
/// as a key, in the documented order.
#[derive(Debug)]
struct AvailabilityCounts([u64; Availability::ALL.len()]);

impl Serialize for AvailabilityCounts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for a in Availability::ALL {
            map.serialize_entry(a.as_str(), &self.0[a as usize])?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
struct LeaseView {
    holder: Option<String>,
    held_here: bool,
}

#[derive(Debug, Serialize)]
struct Counters {
    received: u64,
    accepted: u64,
    changed: u64,
    duplicate: u64,
    stale: u64,
    clock_skew: u64,
    ignored: u64,
    rejected: BTreeMap<&'static str, u64>,
}

/// `GET /v1/sources`.
pub async fn sources(State(state): State<AppState>) -> Json<SourcesView> {
    Json(sources_view(&state, Millis::now()))
}

/// The state of every source at `now` (which ends the last minute of
/// `accepted_per_minute`).
fn sources_view(state: &AppState, now: Millis) -> SourcesView {
    use std::sync::atomic::Ordering::Relaxed;
    let sources = state
        .sources()
        .iter_sorted()
        .map(|s| {
            let st = &s.stats;
            SourceView {
                id: s.id.to_string(),
                kind: s.kind.as_str(),
                records: state.store().len(s.index),
                availability: AvailabilityCounts(state.store().availability_counts(s.index)),
                accepted_per_minute: st.accepted_per_minute.last_hour(now),
                last_event_at: st.last_event_at(),
                counters: Counters {
                    received: st.received.load(Relaxed),
                    accepted: st.accepted.load(Relaxed),
                    changed: st.changed.load(Relaxed),
                    duplicate: st.duplicate.load(Relaxed),
                    stale: st.stale.load(Relaxed),
                    clock_skew: st.clock_skew.load(Relaxed),
                    ignored: st.ignored.load(Relaxed),
                    rejected: Rejection::ALL
                        .iter()
                        .map(|&r| (r.as_str(), st.rejected(r)))
                        .collect(),
                },
                subscriptions: s.subscriptions.snapshot(),
                resync: s.graph_resync.get(),
                lease: s.lease.get().map(|lease| {
                    let lease = lease.borrow();
                    LeaseView {
                        holder: lease.holder.clone(),
                        held_here: lease.held_here,
                    }
                }),
            }
        })
        .collect();
    SourcesView { sources }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::presence::{ApplyOutcome, PresenceUpdate};

    #[tokio::test]
    async fn sources_shows_the_hour_of_accepted_events_and_the_availabilities() {
        let state = crate::http::test_state(16);
        let source = state.sources().get("m").expect("source m");
        // Any fixed time: the minutes come from it, not from today.
        let now = Millis(1_700_000_075_000);
        for (principal, availability) in [("a", Availability::Busy), ("b", Availability::Busy)] {
            let update = PresenceUpdate {
                principal: Cow::Borrowed(principal),
                availability,
                activity: None,
                status_text: None,
                raw_status: None,
                observed_at: Some(now),
                event_id: None,
            };
            let outcome = state.store().apply(0, &update, now).await.expect("apply");
            source.stats.applied(outcome, now);
        }
        source
            .stats
            .applied(ApplyOutcome::Refreshed, Millis(now.0 - 60_000));
        let view = serde_json::to_value(sources_view(&state, now)).expect("JSON");
        let m = &view["sources"][0];
        let per_minute = m["accepted_per_minute"].as_array().expect("array");
        assert_eq!(per_minute.len(), 60);
        assert_eq!(per_minute[58], 1);
        assert_eq!(per_minute[59], 2);
        let availability = m["availability"].as_object().expect("object");
        let keys: Vec<&str> = availability.keys().map(String::as_str).collect();
        let mut all: Vec<&str> = Availability::ALL.iter().map(|a| a.as_str()).collect();
        all.sort_unstable();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, all);
        assert_eq!(m["availability"]["busy"], 2);
        assert_eq!(m["availability"]["available"], 0);
        // An hour later the minutes have left the window.
        let later =
            serde_json::to_value(sources_view(&state, Millis(now.0 + 3_600_000))).expect("JSON");
        assert!(
            later["sources"][0]["accepted_per_minute"]
                .as_array()
                .expect("array")
                .iter()
                .all(|n| n == 0)
        );
    }
}
