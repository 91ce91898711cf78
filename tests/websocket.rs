//! `GET /v1/ws`: the presence stream as WebSocket JSON messages, with the
//! same filters, snapshot and replay as `/v1/stream`, a `{"resume":<seq>}`
//! message, a close frame for a consumer that falls behind, and a close at
//! shutdown.

mod common;

use std::time::Duration;

use common::{Gateway, MITEL_KEY, TOKEN};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(gw: &Gateway, query: &str) -> Socket {
    let mut request = format!("ws://{}/v1/ws{query}", gw.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    assert_eq!(response.status(), 101);
    socket
}

/// What the next frame was.
#[derive(Debug)]
enum Frame {
    Json(Value),
    Close(Option<CloseFrame>),
    End,
}

/// The next data or close frame, within 5 s (pings skipped).
async fn next(socket: &mut Socket) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    return Frame::Json(serde_json::from_str(&text).expect("JSON message"));
                }
                Some(Ok(Message::Close(frame))) => return Frame::Close(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Frame::End,
            }
        }
    })
    .await
    .expect("a frame within 5 s")
}

/// The next frame, which must be a close frame: its code and reason.
async fn close_frame(socket: &mut Socket) -> (u16, String) {
    match next(socket).await {
        Frame::Close(Some(frame)) => (u16::from(frame.code), frame.reason.as_str().to_owned()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// The next `n` messages as (event, id, principal).
async fn take(socket: &mut Socket, n: usize) -> Vec<(String, Option<u64>, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        match next(socket).await {
            Frame::Json(m) => out.push((
                m["event"].as_str().unwrap_or_default().to_owned(),
                m["id"].as_u64(),
                m["data"]["principal"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    out
}

fn p(id: u64, principal: &str) -> (String, Option<u64>, String) {
    ("presence".into(), Some(id), principal.into())
}

/// Posts a presence change observed `ts` ms after [`common::T0`].
async fn post(gw: &Gateway, principal: &str, status: &str, ts: i64) {
    let body = json!({"topic": "platform-api-presence",
        "subject": format!("/presentities/{principal}"),
        "content": {"presence": status, "timestamp": common::T0 + ts}})
    .to_string();
    gw.post_signed("mitel", MITEL_KEY, &body).await;
}

#[tokio::test]
async fn messages_follow_the_filters_snapshot_and_live_changes() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    post(&gw, "u1", "Busy", 1).await;
    post(&gw, "u2", "Away", 2).await;
    let mut all = connect(&gw, "").await;
    let mut only_u2 = connect(&gw, "?principal=u2&snapshot=false").await;
    assert_eq!(take(&mut all, 2).await, [p(1, "u1"), p(2, "u2")]);
    post(&gw, "u1", "Available", 3).await;
    post(&gw, "u2", "Busy", 4).await;
    assert_eq!(take(&mut all, 2).await, [p(3, "u1"), p(4, "u2")]);
    assert_eq!(take(&mut only_u2, 1).await, [p(4, "u2")]);
    // The record is the same JSON as the REST API's.
    let (_, record) = gw.get("/v1/presence/mitel/u2").await;
    post(&gw, "u2", "Busy", 5).await; // a duplicate status: no change
    post(&gw, "u3", "Busy", 6).await;
    let Frame::Json(message) = next(&mut all).await else {
        panic!("expected a message")
    };
    assert_eq!(message["id"], 5);
    assert_eq!(message["data"]["principal"], "u3");
    assert_eq!(record["availability"], "busy");
}

#[tokio::test]
async fn resume_by_message_or_query_replays_exactly_the_missed_changes() {
    let gw = Gateway::start(&common::mitel_config("\n[store]\nhistory = 3\n")).await;
    let mut socket = connect(&gw, "?snapshot=false").await;
    post(&gw, "a", "Busy", 1).await;
    assert_eq!(take(&mut socket, 1).await, [p(1, "a")]);
    drop(socket);
    post(&gw, "b", "Busy", 2).await;
    post(&gw, "c", "Busy", 3).await;
    // A new connection resumes with a message carrying the last seq seen.
    let mut socket = connect(&gw, "?snapshot=false").await;
    socket
        .send(Message::Text(r#"{"resume":1}"#.into()))
        .await
        .unwrap();
    assert_eq!(take(&mut socket, 2).await, [p(2, "b"), p(3, "c")]);
    post(&gw, "d", "Busy", 4).await;
    assert_eq!(take(&mut socket, 1).await, [p(4, "d")], "then live, once");
    // Or with last_event_id in the URL.
    let mut by_query = connect(&gw, "?last_event_id=2&principal=d").await;
    assert_eq!(take(&mut by_query, 1).await, [p(4, "d")]);
    // Older than the history (keeps 3..5): reset, then the snapshot (on
    // a new connection: one resume a second per connection).
    post(&gw, "e", "Busy", 5).await;
    assert_eq!(take(&mut socket, 1).await, [p(5, "e")]);
    let mut socket = connect(&gw, "?snapshot=false").await;
    socket
        .send(Message::Text(r#"{"resume":0}"#.into()))
        .await
        .unwrap();
    let Frame::Json(reset) = next(&mut socket).await else {
        panic!("expected reset")
    };
    assert_eq!(
        reset,
        json!({"event": "reset", "data": {"reason": "history"}})
    );
    assert_eq!(
        take(&mut socket, 5).await,
        [p(1, "a"), p(2, "b"), p(3, "c"), p(4, "d"), p(5, "e")]
    );
}

#[tokio::test]
async fn a_consumer_that_falls_behind_is_closed_with_the_seq_to_resume_from() {
    // The write timeout is long: only the lag may end this consumer.
    let config = common::mitel_config("")
        .replace(
            "body_limit_bytes = 4096",
            "body_limit_bytes = 8192\nwrite_timeout_secs = 60",
        )
        .replace("[consumers]\n", "[consumers]\nstream_buffer = 64\n");
    let gw = Gateway::start(&config).await;
    // A 4 KiB receive window, and nobody reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.addr).await.unwrap();
    let url = format!("ws://{}/v1/ws?snapshot=false&access_token={TOKEN}", gw.addr);
    let (mut slow, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .expect("upgrade");
    gw.flood(0, 3000).await;
    let mut last = 0;
    let close = loop {
        match next(&mut slow).await {
            Frame::Json(m) => {
                let id = m["id"].as_u64().expect("presence id");
                assert_eq!(id, last + 1, "in order, none skipped");
                last = id;
            }
            Frame::Close(frame) => break frame.expect("a close frame with a reason"),
            Frame::End => panic!("closed without a close frame"),
        }
    };
    assert_eq!(u16::from(close.code), 4000);
    assert_eq!(close.reason.as_str(), format!("lagged; resume from {last}"));
    assert!(last < 3000);
    // Resuming from there gets exactly the rest.
    let mut resumed = connect(&gw, "?snapshot=false").await;
    resumed
        .send(Message::Text(format!(r#"{{"resume":{last}}}"#).into()))
        .await
        .unwrap();
    for expected in last + 1..=3000 {
        let Frame::Json(m) = next(&mut resumed).await else {
            panic!("expected a message")
        };
        assert_eq!(m["id"], expected);
    }
}

#[tokio::test]
async fn bad_requests_and_messages_are_refused() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    // No token; a wrong token in the query.
    for url in [
        format!("ws://{}/v1/ws", gw.addr),
        format!("ws://{}/v1/ws?access_token=wrong", gw.addr),
    ] {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // The token in the query is enough for browsers.
    let url = format!("ws://{}/v1/ws?access_token={TOKEN}&snapshot=false", gw.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // A plain GET is not a WebSocket; a bad filter is a 400 problem.
    let plain = gw.get_raw("/v1/ws").await;
    assert!(plain.status().is_client_error(), "{}", plain.status());
    let bad = gw.get_raw("/v1/ws?snapshot=maybe").await;
    common::assert_problem(bad, 400).await;
    // A message that is not a resume closes the connection (1007).
    socket
        .send(Message::Text(r#"{"resume":"soon"}"#.into()))
        .await
        .unwrap();
    assert_eq!(close_frame(&mut socket).await.0, 1007);
    // Nothing was stored by any of it.
    assert_eq!(gw.snapshot().await.records.len(), 0);
}

/// As in the binary: the runtime is dropped as soon as `run` returns, so
/// the close frames must have gone out before.
#[tokio::test]
async fn the_close_frame_goes_out_before_the_gateway_returns() {
    let config = presence_gateway::Config::parse_with_env(
        &common::mitel_config(""),
        std::path::Path::new("test.toml"),
        Vec::new(),
        |_| None,
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            presence_gateway::run(config, listener, token)
                .await
                .unwrap();
        });
        drop(runtime);
    });
    let mut sockets = Vec::new();
    for _ in 0..10 {
        let url = format!("ws://{addr}/v1/ws?snapshot=false&access_token={TOKEN}");
        sockets.push(tokio_tungstenite::connect_async(url).await.unwrap().0);
    }
    shutdown.cancel();
    tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    for socket in &mut sockets {
        assert_eq!(close_frame(socket).await.0, 1001);
    }
}

#[tokio::test]
async fn resuming_more_than_once_a_second_is_refused() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let mut socket = connect(&gw, "?snapshot=false").await;
    for _ in 0..2 {
        socket
            .send(Message::Text(r#"{"resume":0}"#.into()))
            .await
            .unwrap();
    }
    assert_eq!(close_frame(&mut socket).await.0, 1008);
}

#[tokio::test]
async fn shutdown_closes_with_going_away() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let mut socket = connect(&gw, "?snapshot=false").await;
    gw.shutdown_token().cancel();
    assert_eq!(
        close_frame(&mut socket).await,
        (1001, "shutdown".to_owned())
    );
}

#[tokio::test]
async fn snapshot_and_replay_opens_share_the_per_consumer_limit() {
    let config = common::mitel_config("").replace(
        "[consumers]\n",
        "[consumers]\nstream_open_burst = 1\nstream_opens_per_minute = 1\n",
    );
    let gw = Gateway::start(&config).await;
    let _first = connect(&gw, "").await;
    for query in ["", "?last_event_id=0"] {
        let url = format!("ws://{}/v1/ws{query}", gw.addr);
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429);
                assert!(response.headers().contains_key("retry-after"));
            }
            other => panic!("expected 429, got {other:?}"),
        }
    }
    // Live only: not counted.
    let mut live = connect(&gw, "?snapshot=false").await;
    post(&gw, "u1", "Busy", 1).await;
    assert_eq!(take(&mut live, 1).await, [p(1, "u1")]);
}
