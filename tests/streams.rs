//! `GET /v1/stream` (Server-Sent Events): filters, snapshot, resume with
//! `Last-Event-ID`, reset when the history no longer has the missed
//! changes, the `access_token` query parameter, slow consumers (reset when
//! they fall behind, cut off when they stop reading, never slowing the
//! others or ingestion), and the end at shutdown.

mod common;

use std::time::Duration;

use common::{Gateway, MITEL_KEY, TOKEN};
use futures_util::StreamExt;
use serde_json::json;

use common::sse::{Client, Sse};

/// A presence envelope observed `ts` ms after [`common::T0`].
fn body(principal: &str, status: &str, ts: i64) -> String {
    json!({"topic": "platform-api-presence", "subject": format!("/presentities/{principal}"),
           "content": {"presence": status, "timestamp": common::T0 + ts, "eventId": format!("{principal}-{ts}")}})
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
    gw.wait_for_seq(1).await;
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
    // A position this gateway never handed out (from before a restart):
    // the same reset, so the consumer does not wait for seq to catch up.
    let mut client = Client::open(&gw, "", Some(99)).await;
    let first = client.next().await.unwrap();
    assert_eq!(
        (first.event.as_str(), &first.data),
        ("reset", &json!({"reason": "history"}))
    );
    assert_eq!(client.take(4).await.len(), 4);
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

/// A gateway whose stream consumers may fall `stream_buffer` changes behind
/// and whose connections close after `write_timeout_secs` without progress.
fn slow_consumer_config(stream_buffer: usize, write_timeout_secs: u64) -> String {
    common::mitel_config("")
        .replace(
            "body_limit_bytes = 4096",
            &format!("body_limit_bytes = 8192\nwrite_timeout_secs = {write_timeout_secs}"),
        )
        .replace(
            "[consumers]\n",
            &format!("[consumers]\nstream_buffer = {stream_buffer}\n"),
        )
}

/// The value of `name{transport="sse"}` (or another label set).
fn labelled(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Every `presence` id is the one after the previous: nothing skipped,
/// nothing twice.
fn assert_contiguous(events: &[Sse], first: u64) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            (e.event.as_str(), e.id),
            ("presence", Some(first + i as u64))
        );
    }
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_cut_off_while_another_keeps_receiving() {
    const TOTAL: usize = 3000;
    let gw = Gateway::start(&slow_consumer_config(4096, 1)).await;
    let mut stalled = Client::open_small_window(&gw, "?snapshot=false").await;
    // (It may fall up to 4096 changes behind: more than are posted, so
    // only the stalled one can be cut off, whatever the machine's speed.)
    let mut reader = Client::open(&gw, "?snapshot=false", None).await;
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(e) = reader.next().await {
            got.push(e);
            if got.len() == TOTAL {
                break;
            }
        }
        (got, reader)
    });
    // Bursts until the gateway gives up on the consumer that stopped
    // reading; every post is answered 204 meanwhile (post() asserts it).
    let mut posted = 0;
    while labelled(&gw.metrics().await, "presence_gateway_write_timeouts_total") == 0 {
        assert!(posted < TOTAL, "the stalled consumer was never cut off");
        gw.flood(posted, 100).await;
        posted += 100;
        // Real time for the write timeout to pass (1 s) in small steps.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.flood(posted, TOTAL - posted).await;
    // The reading consumer got every change, in order.
    let (got, _still_open) = reading.await.unwrap();
    assert_contiguous(&got, 1);
    // The stalled one gets what was in the buffers, in order, then the end.
    let partial = stalled.drain().await;
    assert!(
        !partial.is_empty() && partial.len() < posted,
        "{}",
        partial.len()
    );
    assert_contiguous(&partial, 1);
    let text = gw.metrics().await;
    assert_eq!(labelled(&text, "presence_gateway_write_timeouts_total"), 1);
    assert_eq!(
        labelled(
            &text,
            r#"presence_gateway_stream_consumers{transport="sse"}"#
        ),
        1,
        "only the reader is still connected"
    );
    assert_eq!(gw.counter("mitel", "accepted").await, TOTAL as u64);
}

#[tokio::test]
async fn a_consumer_that_falls_behind_gets_reset_and_the_snapshot() {
    let gw = Gateway::start(&slow_consumer_config(64, 60)).await;
    let mut slow = Client::open_small_window(&gw, "?snapshot=false").await;
    // Far more changes than the socket buffers and the 64 the fan-out
    // keeps for one consumer, while it does not read.
    gw.flood(0, 3000).await;
    let mut got = Vec::new();
    let reset_at = loop {
        let e = slow.next().await.expect("stream open");
        if e.event == "reset" {
            assert_eq!(e.data, json!({"reason": "lagged"}));
            break got.len();
        }
        got.push(e);
    };
    assert_contiguous(&got, 1);
    assert!(reset_at < 3000);
    // Then the snapshot: every current record, in seq order, then live.
    let snapshot = slow.take(3000).await;
    assert_contiguous(&snapshot, 1);
    post(&gw, "late", "Away", 9999).await;
    let live = slow.next().await.unwrap();
    assert_eq!(
        (live.id, &live.data["principal"]),
        (Some(3001), &json!("late"))
    );
    let text = gw.metrics().await;
    assert_eq!(
        labelled(
            &text,
            r#"presence_gateway_stream_lagged_total{transport="sse"}"#
        ),
        1
    );
}

#[tokio::test]
async fn snapshot_and_replay_opens_are_limited_per_consumer_and_nobody_else_waits() {
    const OTHER: &str = "another-consumer-token";
    let config = common::mitel_config("")
        .replace(
            "[consumers]\n",
            "[consumers]\nstream_open_burst = 2\nstream_opens_per_minute = 1\n",
        )
        .replace(
            &format!("tokens = [\"{TOKEN}\"]"),
            &format!("tokens = [\"{TOKEN}\", \"{OTHER}\"]"),
        );
    let gw = Gateway::start(&config).await;
    post(&gw, "u1", "Busy", 1).await;
    // Two opens that cost work (a snapshot, a replay): the burst.
    let mut snapshot = Client::open(&gw, "", None).await;
    assert_eq!(snapshot.next().await.unwrap().id, Some(1));
    let mut replay = Client::open(&gw, "", Some(0)).await;
    assert_eq!(replay.next().await.unwrap().id, Some(1));
    // The third, either kind: 429, a problem, and when to come back (one
    // open a minute).
    for last_event_id in [None, Some(1)] {
        let mut request = gw.client.get(gw.url("/v1/stream")).bearer_auth(TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let refused = request.send().await.unwrap();
        let retry_after: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        let problem = common::assert_problem(refused, 429).await;
        assert_eq!(
            problem["type"],
            "urn:presence-gateway:problem:too-many-stream-opens"
        );
    }
    // Live-only opens cost nothing and are not counted; another consumer
    // (another token) has its own allowance; webhooks and /healthz are
    // answered as ever (post() asserts the 204).
    let mut live = Client::open(&gw, "?snapshot=false", None).await;
    let mut other = Client::open_as(&gw, OTHER, "", None).await;
    assert_eq!(other.next().await.unwrap().id, Some(1));
    post(&gw, "u2", "Away", 2).await;
    let health = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Every open stream, the limited consumer's included, goes on live.
    for client in [&mut snapshot, &mut replay, &mut live, &mut other] {
        assert_eq!(client.next().await.unwrap().id, Some(2));
    }
    assert_eq!(
        labelled(
            &gw.metrics().await,
            r#"presence_gateway_stream_opens_refused_total{transport="sse"}"#
        ),
        2
    );
}
