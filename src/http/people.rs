//! The people read API under `/v1` (DESIGN §9): one person, pages and
//! batch queries. Person events stream through [`super::stream`] and
//! [`super::ws`].

use axum::Json;
use axum::extract::{Query, State};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::extract::{LimitedBody, PathParams};
use super::problem::Problem;
use super::{AppState, consumers};
use crate::people::MappingStatus;
use crate::presence::PersonRecord;

/// Most ids one `POST /v1/people/query` may ask for.
const MAX_QUERY_IDS: usize = 1000;
/// Largest body of `POST /v1/people/query`.
const MAX_QUERY_BODY: usize = 512 * 1024;

fn not_configured() -> Problem {
    Problem::not_found("no people are configured (the [people] section is absent)")
}

/// `GET /v1/people/{id}`.
pub async fn get_one(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<PersonRecord>, Problem> {
    let store = state.store();
    store
        .people()
        .get(&id, store.records())
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no person with id {id:?}")))
}

/// Query of `GET /v1/people`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    availability: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListPage {
    items: Vec<PersonRecord>,
    next_cursor: Option<String>,
    mapping: MappingStatus,
}

/// `GET /v1/people?availability=&limit=&cursor=`.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListPage>, Problem> {
    let Query(q) = query.map_err(|e| Problem::bad_request("bad-query", e.body_text()))?;
    let store = state.store();
    let mapping = store.people().status().ok_or_else(not_configured)?;
    // Filters and paging as for presence.
    let wanted = consumers::availabilities(q.availability.as_deref())?;
    let limit = consumers::page_size(q.limit.as_deref())?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(decode_cursor(text)?),
    };
    let (items, next) = store
        .people()
        .page(after.as_deref(), limit, wanted, store.records());
    Ok(Json(ListPage {
        items,
        next_cursor: next.map(|id| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&*id)),
        mapping,
    }))
}

/// Cursors are opaque to clients: base64url of the last person id listed.
fn decode_cursor(text: &str) -> Result<String, Problem> {
    let invalid = || Problem::bad_request("bad-cursor", "cursor is not one this listing returned");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| invalid())?;
    String::from_utf8(raw).map_err(|_| invalid())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    ids: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct QueryResult {
    items: Vec<PersonRecord>,
}

/// `POST /v1/people/query` `{"ids": [...]}`: the people of those ids that
/// exist, in the order asked.
pub async fn query(
    State(state): State<AppState>,
    LimitedBody(body): LimitedBody<MAX_QUERY_BODY>,
) -> Result<Json<QueryResult>, Problem> {
    let q: QueryBody = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request("bad-query", format!("expected {{\"ids\": [...]}}: {e}"))
    })?;
    if q.ids.len() > MAX_QUERY_IDS {
        return Err(Problem::bad_request(
            "bad-query",
            format!("at most {MAX_QUERY_IDS} ids per query"),
        ));
    }
    let store = state.store();
    let mut seen = std::collections::HashSet::new();
    let items = q
        .ids
        .iter()
        .filter(|id| seen.insert(id.as_str()))
        .filter_map(|id| store.people().get(id, store.records()))
        .collect();
    Ok(Json(QueryResult { items }))
}
