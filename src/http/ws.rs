//! `GET /v1/ws`: the presence stream over WebSocket.
//!
//! Same query as `GET /v1/stream` (`source`, `principal`, `snapshot`,
//! `last_event_id`, `access_token`) and the same order: replay or snapshot,
//! then live changes. Every message is one JSON text frame:
//!
//! - `{"event":"presence","id":<seq>,"data":<record>}`
//! - `{"event":"reset","data":{"reason":"history"}}`, then the snapshot
//!
//! The consumer may send `{"resume":<seq>}` at any time (at most once a
//! second; more often closes with 1008): the stream starts over after that
//! seq, exactly as a new connection with `last_event_id` would. A consumer that falls behind the live fan-out is closed with code
//! 4000 and the reason `lagged; resume from <seq>` (the last seq it was
//! sent); at shutdown the gateway closes with 1001. Pings keep idle
//! connections alive through proxies. Opens with a snapshot or a replay
//! count against the same per-consumer limit as on `/v1/stream` (429
//! before the upgrade; see [`super::opens`]).

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::listener::Peer;
use super::problem::Problem;
use super::stream::{Filter, Item, KEEP_ALIVE, OnLag, Reset, Streamer, admit, itoa_u64};
use crate::telemetry::{OpenStream, StreamKind};

/// Close code for a consumer that fell behind (private-use range).
pub const CLOSE_LAGGED: u16 = 4000;

/// The largest message a consumer may send (they only send resumes).
const MAX_INCOMING: usize = 4096;

/// The shortest time between two resume messages of one consumer.
const MIN_RESUME_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What a consumer may send.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resume {
    resume: u64,
}

/// `GET /v1/ws`.
pub async fn ws(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let filter = match Filter::parse(query.as_deref(), &headers) {
        Ok(f) => f,
        Err(problem) => return problem.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        // (HEAD reaches here too: the route's GET answers it.)
        Err(rejection) if rejection.status() == axum::http::StatusCode::METHOD_NOT_ALLOWED => {
            return Problem::method_not_allowed("GET").into_response();
        }
        Err(rejection) => {
            return Problem::new(
                rejection.status(),
                "websocket-required",
                "this resource speaks WebSocket only (GET with Upgrade: websocket)",
            )
            .into_response();
        }
    };
    if let Err(problem) = admit(
        &state,
        &filter,
        peer,
        &headers,
        query.as_deref(),
        StreamKind::WebSocket,
    ) {
        return problem.into_response();
    }
    // Positioned now, before the 101 goes out: nothing committed after the
    // consumer sees the upgrade can be missed.
    state
        .store()
        .catch_up(filter.last_event_id.unwrap_or(0))
        .await;
    let open = OpenStream::new(state.global_arc(), StreamKind::WebSocket);
    let streamer = Streamer::start(&state, filter, OnLag::Close, open);
    // Tracked, so that shutdown waits for the close frame to go out.
    let detached = state.detached().clone();
    upgrade
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| detached.track_future(serve(streamer, socket)))
}

async fn serve(mut streamer: Streamer, mut socket: WebSocket) {
    let mut last_resume: Option<tokio::time::Instant> = None;
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let outgoing = tokio::select! {
            item = streamer.next() => match item {
                Some(Item::Lagged { after }) => {
                    close(socket, CLOSE_LAGGED, &format!("lagged; resume from {after}")).await;
                    return;
                }
                Some(item) => message(&item),
                None => {
                    close(socket, close_code::AWAY, "shutdown").await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<Resume>(&text) {
                    Ok(Resume { resume }) => {
                        // A resume copies history and may take a snapshot:
                        // one per interval per consumer.
                        let now = tokio::time::Instant::now();
                        if last_resume.is_some_and(|t| now < t + MIN_RESUME_INTERVAL) {
                            close(socket, close_code::POLICY, "resume at most once a second").await;
                            return;
                        }
                        last_resume = Some(now);
                        streamer.state().store().catch_up(resume).await;
                        streamer.resume(resume);
                        continue;
                    }
                    Err(_) => {
                        close(socket, close_code::INVALID, r#"expected {"resume":<seq>}"#).await;
                        return;
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    close(socket, close_code::UNSUPPORTED, "text frames only").await;
                    return;
                }
                // Pings are answered by the library.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                // The library queued the echo of the close: flush it.
                Some(Ok(Message::Close(_))) => {
                    let _ = futures_util::SinkExt::flush(&mut socket).await;
                    return;
                }
                Some(Err(_)) | None => return,
            },
            _ = keep_alive.tick() => Message::Ping(Default::default()),
        };
        if socket.send(outgoing).await.is_err() {
            // The peer is gone or stopped reading (write timeout).
            return;
        }
    }
}

/// The JSON frame for an item: one allocation, the record's JSON shared
/// with every other consumer of the change.
fn message(item: &Item) -> Message {
    let text = match item {
        Item::Record(change) => {
            let json = change.json();
            let mut text = String::with_capacity(json.len() + 48);
            text.push_str(r#"{"event":""#);
            text.push_str(change.event.name());
            text.push_str(r#"","id":"#);
            text.push_str(itoa_u64(change.seq(), &mut [0u8; 20]));
            text.push_str(r#","data":"#);
            text.push_str(json);
            text.push('}');
            Utf8Bytes::from(text)
        }
        Item::Reset(Reset::History) => {
            Utf8Bytes::from_static(r#"{"event":"reset","data":{"reason":"history"}}"#)
        }
        Item::Reset(Reset::Lagged) => {
            Utf8Bytes::from_static(r#"{"event":"reset","data":{"reason":"lagged"}}"#)
        }
        // Closed instead (OnLag::Close).
        Item::Lagged { .. } => Utf8Bytes::from_static(""),
    };
    Message::Text(text)
}

async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    // Best effort: the peer may already be gone.
    let _ = socket.send(Message::Close(Some(frame))).await;
}
