//! `GET /v1/stream` (Server-Sent Events): filters, snapshot, resume with
//! `Last-Event-ID`, reset when the history no longer has the missed
//! changes, the `access_token` query parameter, and the end at shutdown.

mod common;

use std::time::Duration;

use common::{Gateway, MITEL_KEY, TOKEN};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// One received SSE event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: Value,
}

/// An open event stream.
struct Client {
    body: std::pin::Pin<
        Box<dyn futures_core::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>,
    >,
    buffer: String,
}

impl Client {
    async fn open(gw: &Gateway, query: &str, last_event_id: Option<u64>) -> Client {
        let mut request = gw
            .client
            .get(gw.url(&format!("/v1/stream{query}")))
            .bearer_auth(TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("stream");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Client {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), within 5 s.
    async fn next(&mut self) -> Option<Sse> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut e = Sse {
                        event: "message".into(),
                        id: None,
                        data: Value::Null,
                    };
                    let mut any = false;
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            e.event = v.trim().into();
                            any = true;
                        } else if let Some(v) = line.strip_prefix("id:") {
                            e.id = v.trim().parse().ok();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            e.data = serde_json::from_str(v.trim()).expect("JSON data");
                            any = true;
                        }
                    }
                    if any {
                        return Some(e);
                    }
                    continue;
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                    _ => return None,
                }
            }
        })
        .await
        .expect("an event within 5 s")
    }

    /// The next `n` events.
    async fn take(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next().await.expect("stream ended"));
        }
        out
    }
}

fn body(principal: &str, status: &str, ts: i64) -> String {
    json!({"topic": "platform-api-presence", "subject": format!("/presentities/{principal}"),
           "content": {"presence": status, "timestamp": ts, "eventId": format!("{principal}-{ts}")}})
    .to_string()
}

async fn post(gw: &Gateway, principal: &str, status: &str, ts: i64) {
    gw.post_signed("mitel", MITEL_KEY, &body(principal, status, ts))
        .await;
}

fn summary(events: &[Sse]) -> Vec<(String, Option<u64>, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.event.clone(),
                e.id,
                e.data["principal"].as_str().unwrap_or_default().to_owned(),
                e.data["availability"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

fn config(history: usize) -> String {
    common::mitel_config(&format!("\n[store]\nhistory = {history}\n"))
}

#[tokio::test]
async fn filtered_clients_get_exactly_their_changes() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    post(&gw, "u1", "Busy", 1).await; // seq 1, before anyone listens
    let mut all = Client::open(&gw, "?snapshot=false", None).await;
    let mut only_u2 = Client::open(&gw, "?principal=u2&source=mitel", None).await;
    post(&gw, "u2", "Away", 2).await; // seq 2
    post(&gw, "u1", "Available", 3).await; // seq 3
    post(&gw, "u2", "Busy", 4).await; // seq 4
    let s =
        |e: &str, id: u64, p: &str, a: &str| (e.to_owned(), Some(id), p.to_owned(), a.to_owned());
    assert_eq!(
        summary(&all.take(3).await),
        [
            s("presence", 2, "u2", "away"),
            s("presence", 3, "u1", "available"),
            s("presence", 4, "u2", "busy"),
        ]
    );
    assert_eq!(
        summary(&only_u2.take(2).await),
        [
            s("presence", 2, "u2", "away"),
            s("presence", 4, "u2", "busy")
        ]
    );
    // The snapshot comes first when asked for (default): current records.
    let mut fresh = Client::open(&gw, "", None).await;
    assert_eq!(
        summary(&fresh.take(2).await),
        [
            s("presence", 3, "u1", "available"),
            s("presence", 4, "u2", "busy")
        ]
    );
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_changes_then_goes_live() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let mut client = Client::open(&gw, "?snapshot=false", None).await;
    post(&gw, "u1", "Busy", 1).await;
    let last = client.take(1).await[0].id.unwrap();
    drop(client);
    post(&gw, "u2", "Away", 2).await;
    post(&gw, "u3", "Busy", 3).await;
    post(&gw, "u2", "Available", 4).await;
    let mut resumed = Client::open(&gw, "", Some(last)).await;
    let replay = resumed.take(3).await;
    assert_eq!(
        replay.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        [2, 3, 4],
        "in order, none twice"
    );
    post(&gw, "u1", "Away", 5).await;
    assert_eq!(resumed.next().await.unwrap().id, Some(5));
    // The query parameter works too, for clients that cannot set headers.
    let mut by_query = Client::open(&gw, "?last_event_id=3&principal=u2", None).await;
    assert_eq!(by_query.next().await.unwrap().id, Some(4));
}

#[tokio::test]
async fn an_id_older_than_the_history_gets_reset_and_the_snapshot() {
    let gw = Gateway::start(&config(2)).await;
    for (i, p) in ["a", "b", "c", "d"].into_iter().enumerate() {
        post(&gw, p, "Busy", i as i64 + 1).await;
    }
    // History keeps seq 3 and 4 only: resuming after 1 misses seq 2.
    let mut client = Client::open(&gw, "", Some(1)).await;
    let first = client.next().await.unwrap();
    assert_eq!(
        (first.event.as_str(), &first.data),
        ("reset", &json!({"reason": "history"}))
    );
    let snapshot = client.take(4).await;
    assert_eq!(
        snapshot.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // Within the history: a plain replay.
    let mut client = Client::open(&gw, "", Some(2)).await;
    assert_eq!(
        client
            .take(2)
            .await
            .iter()
            .map(|e| e.id.unwrap())
            .collect::<Vec<_>>(),
        [3, 4]
    );
}

#[tokio::test]
async fn browsers_may_pass_the_token_in_the_query_and_bad_input_is_refused() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let ok = gw
        .client
        .get(gw.url(&format!("/v1/stream?access_token={TOKEN}&snapshot=false")))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let no = gw
        .client
        .get(gw.url("/v1/stream?access_token=wrong"))
        .send()
        .await
        .unwrap();
    common::assert_problem(no, 401).await;
    // The query token is for the stream only.
    let list = gw
        .client
        .get(gw.url(&format!("/v1/presence?access_token={TOKEN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 401);
    for query in ["?snapshot=maybe", "?last_event_id=x", "?colour=blue"] {
        let bad = gw
            .client
            .get(gw.url(&format!("/v1/stream{query}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        common::assert_problem(bad, 400).await;
    }
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let mut client = Client::open(&gw, "?snapshot=false", None).await;
    let token = gw.shutdown_token();
    token.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), client.body.next()).await;
    assert!(
        matches!(ended, Ok(None) | Ok(Some(Err(_)))),
        "the stream ended"
    );
}
