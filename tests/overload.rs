//! The network edge under slow, many, huge and badly timed requests: what
//! an attacker without a key can do to a gateway that is exposed directly,
//! and what load and a stop under load must never lose.
//!
//! - slow request bodies do not hold the webhook capacity
//!   (`server.max_in_flight`): a slow body is cut off after
//!   `server.body_timeout_secs` (408), and one client address may have only
//!   `server.max_requests_per_client` bodies arriving at once (429);
//! - connections beyond `server.max_connections` are refused at once;
//!   request heads over `server.max_header_bytes` get 431, unfinished ones
//!   are closed after `server.header_read_timeout_secs`;
//! - `Expect: 100-continue` with a declared body over the limit gets 413
//!   without `100 Continue`;
//! - beyond `max_in_flight` every request is answered (503 + Retry-After)
//!   and every 204 was applied;
//! - a rejected webhook changes only its rejection counter;
//! - while draining, an open keep-alive connection sees `/readyz` 503, and
//!   a stop under load answers every request it took.
//!
//! Requests are written on raw sockets where the bytes on the wire are the
//! point (what the gateway sends before reading a body, whether a
//! connection ends with or without an answer). Attackers may connect from
//! other 127.0.0.x addresses, which Linux routes to loopback like
//! 127.0.0.1, to be clients of their own.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::process::TestDir;
use common::{Gateway, MITEL_KEY, TOKEN, metric_value, sign};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long any single step of these tests may take before it fails.
const STEP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------

/// One HTTP/1.1 answer as read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the gateway said it closes the connection after this answer.
    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Asserts a problem document with this status; returns its `type`.
    fn assert_problem(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let body = self.json();
        assert_eq!(body["status"], status, "{body}");
        body["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// A client connection that writes requests byte for byte.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> std::io::Result<Raw> {
        Self::connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), addr).await
    }

    /// A connection from another loopback address (127.0.0.x).
    async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<Raw> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Raw {
            stream,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads one answer; `None` when the connection ends (EOF or reset)
    /// before a whole answer arrived.
    async fn answer(&mut self) -> Option<Answer> {
        loop {
            if let Some(answer) = self.take_answer() {
                return Some(answer);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// [`Raw::answer`], failing the test after [`STEP`].
    async fn answer_within(&mut self) -> Option<Answer> {
        tokio::time::timeout(STEP, self.answer())
            .await
            .expect("an answer or the end of the connection in time")
    }

    /// Whether the gateway has closed the connection (nothing more to read).
    async fn ends(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout(STEP, self.stream.read(&mut chunk)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    }

    /// A whole answer at the start of the buffer, taken out of it.
    fn take_answer(&mut self) -> Option<Answer> {
        let end = self.buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&self.buf[..end]).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.strip_prefix("HTTP/1.1 ")?[..3].parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| {
                let (name, value) = line.split_once(':')?;
                Some((name.trim().to_owned(), value.trim().to_owned()))
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("a content-length"));
        let total = end + 4 + length;
        if self.buf.len() < total {
            return None;
        }
        let body = self.buf[end + 4..total].to_vec();
        self.buf.drain(..total);
        Some(Answer {
            status,
            headers,
            body,
        })
    }

    /// Sends a GET and reads its answer.
    async fn get(&mut self, path: &str) -> Option<Answer> {
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
        self.send(request.as_bytes()).await.ok()?;
        self.answer_within().await
    }
}

/// A signed Mitel notification for `principal`, as one write: head and
/// body, as a provider's client sends a small body.
fn signed_webhook(principal: &str, timestamp: u64) -> Vec<u8> {
    let body = serde_json::json!({
        "topic": "platform-api-presence",
        "subject": format!("/presentities/{principal}"),
        "content": {"presence": "Busy", "timestamp": timestamp},
    })
    .to_string();
    webhook_request(&body, &sign(MITEL_KEY, body.as_bytes()))
}

fn webhook_request(body: &str, signature: &str) -> Vec<u8> {
    let mut request = format!(
        "POST /webhooks/mitel HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         x-notify-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

/// A config with one Mitel source and these `[server]` keys.
fn config(server: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server}

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["{MITEL_KEY}"]
"#
    )
}

fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// The value of a labelled sample (`name{labels} value`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------
// Slow bodies
// ---------------------------------------------------------------------

/// A webhook whose body never completes: the head with a fake signature
/// and a declared length, then one byte every 200 ms until the gateway
/// answers. Returns the answer (`None`: closed without one).
async fn slow_body(from: IpAddr, addr: SocketAddr) -> Option<Answer> {
    let mut raw = Raw::connect_from(from, addr).await.expect("connect");
    let head = format!(
        "POST /webhooks/mitel HTTP/1.1\r\nhost: test\r\nx-notify-signature: {}\r\n\
         content-length: 1000\r\n\r\n{{",
        "0".repeat(64)
    );
    raw.send(head.as_bytes()).await.expect("head");
    let answer = tokio::time::timeout(STEP, async {
        let mut drip = tokio::time::interval(Duration::from_millis(200));
        drip.tick().await;
        loop {
            tokio::select! {
                answer = raw.answer() => return answer,
                _ = drip.tick() => {
                    // The gateway may have closed its side already: its
                    // answer is still read.
                    let _ = raw.stream.write_all(b" ").await;
                }
            }
        }
    })
    .await;
    answer.expect("a slow body gets an answer in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_neither_hold_the_webhook_capacity_nor_outlast_the_body_timeout() {
    let gw = Gateway::start(&config(
        "max_in_flight = 4\nmax_requests_per_client = 8\nbody_timeout_secs = 3",
    ))
    .await;
    let before = gw.snapshot().await;

    // Two attacking addresses, each with 2 requests more than it may have
    // bodies in progress: 16 slow bodies (4 times max_in_flight) are held,
    // and 4 requests are refused at once. One of them is the address the
    // real webhooks come from, whose bodies arrive with their heads and so
    // are never counted against it.
    let mut slow = Vec::new();
    for from in [attacker(1), attacker(2)] {
        for _ in 0..10 {
            slow.push(tokio::spawn(slow_body(from, gw.addr)));
        }
    }
    let early = Arc::new(Mutex::new(Vec::new()));
    let mut held = Vec::new();
    for task in slow {
        held.push(tokio::spawn({
            let early = Arc::clone(&early);
            async move {
                let answer = task.await.unwrap();
                early.lock().push(answer.as_ref().map(|a| a.status));
                answer
            }
        }));
    }
    // The first answers are the refusals of the extra requests; then each
    // address has 8 bodies in progress.
    common::wait_until("4 requests answered", STEP, || async {
        early.lock().len() >= 4
    })
    .await;
    assert_eq!(early.lock()[..4], [Some(429); 4]);

    // Meanwhile, signed webhooks go through, from the same address too.
    let mut client = Raw::connect(gw.addr).await.unwrap();
    for i in 0..20 {
        client
            .send(&signed_webhook(&format!("real-{i}"), 1_764_000_000_000 + i))
            .await
            .unwrap();
        let answer = client.answer_within().await.expect("an answer");
        assert_eq!(answer.status, 204, "{answer:?}");
    }

    // Then the slow ones run out of time: 408 with a problem document, and
    // the connection closes.
    let mut statuses = Vec::new();
    for task in held {
        let answer = task.await.unwrap().expect("every slow body is answered");
        let kind = answer.assert_problem(answer.status);
        match answer.status {
            429 => {
                assert!(answer.header("retry-after").is_some(), "{answer:?}");
                assert!(kind.ends_with(":too-many-requests"), "{kind}");
            }
            408 => assert!(kind.ends_with(":body-timeout"), "{kind}"),
            other => panic!("unexpected {other}: {answer:?}"),
        }
        assert!(answer.closes(), "{answer:?}");
        statuses.push(answer.status);
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 4);
    assert_eq!(statuses.iter().filter(|&&s| s == 408).count(), 16);

    // Each rejection counted once, under its reason; nothing of theirs kept.
    assert_eq!(gw.counter("mitel", "rejected.overloaded").await, 4);
    assert_eq!(gw.counter("mitel", "rejected.bad_payload").await, 16);
    assert_eq!(gw.counter("mitel", "accepted").await, 20);
    let after = gw.snapshot().await;
    assert_eq!(after.records.len(), before.records.len() + 20);
}

// ---------------------------------------------------------------------
// Connections and heads
// ---------------------------------------------------------------------

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_at_once() {
    let mut gw = Gateway::start(&config("max_connections = 4")).await;
    // The harness's HTTP client may keep a pooled connection (PG_TEST_STORE
    // = redis waits for readiness with it): dropped, so that these are the
    // only connections.
    gw.client = reqwest::Client::new();
    let mut first = Raw::connect(gw.addr).await.unwrap();
    assert_eq!(first.get("/healthz").await.unwrap().status, 200);
    wait_for_open(&mut first, 1).await;
    let mut open = vec![first];
    for _ in 0..3 {
        let mut raw = Raw::connect(gw.addr).await.unwrap();
        // An answer: the gateway has taken the connection.
        assert_eq!(raw.get("/healthz").await.unwrap().status, 200);
        open.push(raw);
    }
    let metrics = open[0].get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(
        metric_value(&text, "presence_gateway_connections_open"),
        Some(4.0)
    );

    // The fifth is answered 503 before it sends anything, and closed.
    let mut fifth = Raw::connect(gw.addr).await.unwrap();
    let answer = fifth.answer_within().await.expect("a refusal");
    answer.assert_problem(503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(answer.closes());
    assert!(fifth.ends().await);
    // A sixth that sends its request at once is refused too, with or
    // without the answer arriving (its unread request may reset the
    // connection), but never left waiting.
    let mut sixth = Raw::connect(gw.addr).await.unwrap();
    let _ = sixth
        .send(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    if let Some(answer) = sixth.answer_within().await {
        assert_eq!(answer.status, 503);
    }

    let metrics = open[0].get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(
        metric_value(&text, "presence_gateway_connections_refused_total"),
        Some(2.0)
    );

    // Once one closes, a new connection is served again.
    drop(open.pop());
    wait_for_open(&mut open[0], 3).await;
    let mut again = Raw::connect(gw.addr).await.unwrap();
    assert_eq!(again.get("/healthz").await.unwrap().status, 200);
}

/// Waits (bounded) until `/metrics`, read on `raw`, counts `count` open
/// connections.
async fn wait_for_open(raw: &mut Raw, count: u32) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let metrics = raw.get("/metrics").await.expect("metrics");
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        if metric_value(&text, "presence_gateway_connections_open") == Some(f64::from(count)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {count} open connections:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn heads_are_bounded_in_size_and_time_but_responses_are_not() {
    let gw = Gateway::start(&config(
        "max_header_bytes = 8192\nheader_read_timeout_secs = 1",
    ))
    .await;
    // 300 KB of one header that never ends: 431 once the limit is
    // reached, not 300 KB buffered per connection.
    let mut big = Raw::connect(gw.addr).await.unwrap();
    let mut head = b"GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: ".to_vec();
    head.resize(head.len() + 300 * 1024, b'a');
    let writer = tokio::spawn(async move {
        // The gateway stops reading at the limit; the write may fail.
        let _ = big.send(&head).await;
        big
    });
    let mut big = writer.await.unwrap();
    let answer = big.answer_within().await.expect("431");
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(big.ends().await);

    // A finished head just over the limit: 431 as well.
    let mut over = Raw::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let _ = over.send(request.as_bytes()).await;
    assert_eq!(over.answer_within().await.expect("431").status, 431);

    // One under it is served.
    let mut under = Raw::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
        "a".repeat(6000)
    );
    under.send(request.as_bytes()).await.unwrap();
    assert_eq!(under.answer_within().await.expect("200").status, 200);

    // A head that stops halfway is closed after header_read_timeout_secs
    // (the bounded wait of `ends` is far longer).
    let mut stalled = Raw::connect(gw.addr).await.unwrap();
    stalled
        .send(b"GET /healthz HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    assert!(stalled.ends().await);

    // The head timeout is not a limit on a response: an event stream
    // outlives it.
    let mut stream = Raw::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /v1/stream?snapshot=false HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
    );
    stream.send(request.as_bytes()).await.unwrap();
    let seen = |raw: &Raw, what: &str| String::from_utf8_lossy(&raw.buf).contains(what);
    while !seen(&stream, "\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(STEP, stream.stream.read(&mut chunk))
            .await
            .expect("the stream's head")
            .unwrap();
        assert!(n > 0, "the stream ended before its head");
        stream.buf.extend_from_slice(&chunk[..n]);
    }
    assert!(seen(&stream, "HTTP/1.1 200"));
    // Twice the head timeout: the only fixed wait of this file, since what
    // is shown is that nothing happens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    gw.post_signed("mitel", MITEL_KEY, &common::fixture("mitel-presence.json"))
        .await;
    while !seen(&stream, "event: presence") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(STEP, stream.stream.read(&mut chunk))
            .await
            .expect("the event")
            .unwrap();
        assert!(n > 0, "the stream ended");
        stream.buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn expect_continue_over_the_body_limit_gets_413_without_100_continue() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let before = gw.snapshot().await;
    let mut raw = Raw::connect(gw.addr).await.unwrap();
    // body_limit_bytes is 4096 in mitel_config.
    let head = format!(
        "POST /webhooks/mitel HTTP/1.1\r\nhost: test\r\nx-notify-signature: {}\r\n\
         content-length: 5000\r\nexpect: 100-continue\r\n\r\n",
        "0".repeat(64)
    );
    raw.send(head.as_bytes()).await.unwrap();
    // The very first bytes are the 413: no `100 Continue` invites the body.
    let answer = raw.answer_within().await.expect("an answer");
    let kind = answer.assert_problem(413);
    assert!(kind.ends_with(":body-too-large"), "{kind}");
    assert!(answer.closes(), "{answer:?}");
    assert!(raw.ends().await, "the unsent body is not waited for");

    // Within the limit, the body is invited as before.
    let body = common::fixture("mitel-presence.json");
    let mut ok = Raw::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /webhooks/mitel HTTP/1.1\r\nhost: test\r\nx-notify-signature: {}\r\n\
         content-length: {}\r\nexpect: 100-continue\r\n\r\n",
        sign(MITEL_KEY, body.as_bytes()),
        body.len()
    );
    ok.send(head.as_bytes()).await.unwrap();
    assert_eq!(ok.answer_within().await.unwrap().status, 100);
    ok.send(body.as_bytes()).await.unwrap();
    assert_eq!(ok.answer_within().await.unwrap().status, 204);

    assert_eq!(gw.counter("mitel", "rejected.body_too_large").await, 1);
    let after = gw.snapshot().await;
    assert_eq!(after.records.len(), before.records.len() + 1);
}

// ---------------------------------------------------------------------
// Beyond max_in_flight
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beyond_max_in_flight_every_request_is_answered_and_every_204_applied() {
    // Bodies padded with 1 MiB of JSON whitespace make each verification
    // (HMAC over the whole body) take long enough that requests of 16
    // clients meet inside the one in-flight slot.
    let gw = Gateway::start(&config("max_in_flight = 1\nbody_limit_bytes = 4194304")).await;
    let padding = " ".repeat(1024 * 1024);
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let overloaded = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (accepted, overloaded, sent) =
                (Arc::clone(&accepted), Arc::clone(&overloaded), Arc::clone(&sent));
            let (addr, padding) = (gw.addr, padding.clone());
            tokio::spawn(async move {
                let mut raw = Raw::connect(addr).await.unwrap();
                // Until some requests were refused, within a bound.
                for i in 0..40 {
                    if overloaded.load(Ordering::SeqCst) >= 5 {
                        break;
                    }
                    let principal = format!("c{c}-{i}");
                    let body = format!(
                        r#"{{"topic":"platform-api-presence","subject":"/presentities/{principal}",{padding}"content":{{"presence":"Busy","timestamp":1764000000000}}}}"#
                    );
                    let request = webhook_request(&body, &sign(MITEL_KEY, body.as_bytes()));
                    sent.fetch_add(1, Ordering::SeqCst);
                    raw.send(&request).await.expect("the connection stays open");
                    let answer = raw
                        .answer_within()
                        .await
                        .expect("every request is answered");
                    match answer.status {
                        204 => {
                            accepted.lock().insert(principal);
                        }
                        503 => {
                            let kind = answer.assert_problem(503);
                            assert!(kind.ends_with(":overloaded"), "{kind}");
                            assert_eq!(answer.header("retry-after"), Some("1"));
                            overloaded.fetch_add(1, Ordering::SeqCst);
                        }
                        other => panic!("unexpected {other}: {answer:?}"),
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let accepted = accepted.lock().clone();
    let overloaded = overloaded.load(Ordering::SeqCst);
    assert!(overloaded > 0, "the single slot was never contended");
    assert_eq!(accepted.len() + overloaded, sent.load(Ordering::SeqCst));
    assert_eq!(
        gw.counter("mitel", "rejected.overloaded").await,
        overloaded as u64
    );
    // Exactly the acknowledged ones are kept.
    let kept: BTreeSet<String> = gw
        .snapshot()
        .await
        .records
        .iter()
        .map(|r| r["principal"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kept, accepted);
}

// ---------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------

#[tokio::test]
async fn a_rejected_webhook_changes_only_its_rejection_counter() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    const COUNT: &str = "presence_gateway_webhook_request_duration_seconds_count{source=\"mitel\"}";
    const MISMATCH: &str =
        "presence_gateway_webhook_rejections_total{source=\"mitel\",reason=\"signature_mismatch\"}";
    let before = gw.metrics().await;
    assert_eq!(sample(&before, COUNT), Some(0.0));

    let body = common::fixture("mitel-presence.json");
    let response = gw
        .post_webhook("mitel", body.clone(), Some(&"0".repeat(64)))
        .await;
    assert_eq!(response.status(), 401);
    let after = gw.metrics().await;
    assert_eq!(sample(&after, MISMATCH), Some(1.0));
    // Every other line is as it was (the process collector's lines
    // describe the process, which moves on by itself).
    let changed: Vec<(&str, &str)> = before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b && !a.starts_with("process_"))
        .collect();
    assert_eq!(
        changed.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
        [
            "presence_gateway_webhook_requests_total{source=\"mitel\",outcome=\"rejected\"} 1",
            "presence_gateway_webhook_rejections_total{source=\"mitel\",reason=\"signature_mismatch\"} 1",
            "presence_gateway_verification_failures_total{source=\"mitel\",reason=\"mismatch\"} 1",
        ],
        "{changed:?}"
    );

    // An accepted one is timed.
    gw.post_signed("mitel", MITEL_KEY, &body).await;
    assert_eq!(sample(&gw.metrics().await, COUNT), Some(1.0));
}

// ---------------------------------------------------------------------
// Stopping
// ---------------------------------------------------------------------

/// Sends the head of a signed webhook with `Expect: 100-continue` and waits
/// for `100 Continue`: the request is then in progress in the handler.
async fn start_held_webhook(addr: SocketAddr) -> (Raw, String) {
    let body = common::fixture("mitel-presence.json");
    let mut raw = Raw::connect(addr).await.unwrap();
    let head = format!(
        "POST /webhooks/mitel HTTP/1.1\r\nhost: test\r\nx-notify-signature: {}\r\n\
         content-length: {}\r\nexpect: 100-continue\r\n\r\n",
        sign(MITEL_KEY, body.as_bytes()),
        body.len()
    );
    raw.send(head.as_bytes()).await.unwrap();
    assert_eq!(raw.answer_within().await.unwrap().status, 100);
    (raw, body)
}

async fn wait_until_refused(addr: SocketAddr) {
    common::wait_until("the listener to close", STEP, || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_on_an_open_keep_alive_connection_while_draining() {
    let mut gw = Gateway::start(&common::mitel_config("")).await;
    let mut idle = Raw::connect(gw.addr).await.unwrap();
    let answer = idle.get("/readyz").await.unwrap();
    assert_eq!(answer.status, 200);
    assert!(!answer.closes());
    let mut upgrading = Raw::connect(gw.addr).await.unwrap();
    assert_eq!(upgrading.get("/healthz").await.unwrap().status, 200);
    // A request in progress keeps the drain going while this test looks.
    let (mut held, body) = start_held_webhook(gw.addr).await;

    gw.shutdown_token().cancel();
    wait_until_refused(gw.addr).await;

    // The idle keep-alive connection is still answered, with the drain's
    // 503 and the end of the connection.
    let answer = idle.get("/readyz").await.expect("an answer while draining");
    let kind = answer.assert_problem(503);
    assert!(kind.ends_with(":not-ready"), "{kind}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(answer.closes(), "{answer:?}");
    assert!(idle.ends().await);

    // A WebSocket opened on another one is switched (the drain does not
    // turn its `Connection: upgrade` into `close`), and closed as a
    // stream is at shutdown.
    let url = format!("ws://{}/v1/ws?access_token={TOKEN}", gw.addr);
    let (mut socket, response) = tokio_tungstenite::client_async(url, upgrading.stream)
        .await
        .expect("the upgrade while draining");
    assert_eq!(response.status(), 101);
    use futures_util::StreamExt;
    let close = tokio::time::timeout(STEP, async {
        while let Some(Ok(message)) = socket.next().await {
            if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("a close frame in time");
    assert_eq!(close, Some(1001));

    // The request in progress completes, and closes its connection too.
    held.send(body.as_bytes()).await.unwrap();
    let answer = held
        .answer_within()
        .await
        .expect("the held request's answer");
    assert_eq!(answer.status, 204);
    assert!(answer.closes(), "{answer:?}");
    let result = tokio::time::timeout(STEP, gw.take_task()).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "run returned cleanly");
}

/// What one load client saw.
#[derive(Default)]
struct Seen {
    /// Principals answered 204.
    accepted: Vec<String>,
    /// Answers other than 204 (status, Retry-After, Connection: close).
    refused: Vec<(u16, bool, bool)>,
    /// Requests written whose connection ended without an answer.
    unanswered: Vec<String>,
}

/// Sends signed webhooks on keep-alive connections, reconnecting when the
/// gateway closes one, until a connection is refused (the listener has
/// closed) or `max` requests.
async fn load_client(addr: SocketAddr, name: String, max: usize, total: Arc<AtomicUsize>) -> Seen {
    let mut seen = Seen::default();
    let mut n = 0;
    'connect: while n < max {
        let Ok(mut raw) = Raw::connect(addr).await else {
            return seen;
        };
        loop {
            if n >= max {
                break 'connect;
            }
            let principal = format!("{name}-{n}");
            n += 1;
            if raw
                .send(&signed_webhook(&principal, 1_764_000_000_000))
                .await
                .is_err()
            {
                seen.unanswered.push(principal);
                continue 'connect;
            }
            match raw.answer_within().await {
                None => {
                    seen.unanswered.push(principal);
                    continue 'connect;
                }
                Some(answer) => {
                    let closes = answer.closes();
                    if answer.status == 204 {
                        seen.accepted.push(principal);
                        total.fetch_add(1, Ordering::SeqCst);
                    } else {
                        seen.refused.push((
                            answer.status,
                            answer.header("retry-after").is_some(),
                            closes,
                        ));
                    }
                    if closes {
                        continue 'connect;
                    }
                }
            }
        }
    }
    seen
}

/// Like [`load_client`] with a new connection for every request (a new
/// provider connection arriving while the gateway stops).
async fn connecting_client(
    addr: SocketAddr,
    name: String,
    max: usize,
    total: Arc<AtomicUsize>,
) -> Seen {
    let mut seen = Seen::default();
    for n in 0..max {
        let Ok(mut raw) = Raw::connect(addr).await else {
            return seen;
        };
        let principal = format!("{name}-{n}");
        if raw
            .send(&signed_webhook(&principal, 1_764_000_000_000))
            .await
            .is_err()
        {
            seen.unanswered.push(principal);
            continue;
        }
        match raw.answer_within().await {
            None => seen.unanswered.push(principal),
            Some(answer) if answer.status == 204 => {
                seen.accepted.push(principal);
                total.fetch_add(1, Ordering::SeqCst);
            }
            Some(answer) => seen.refused.push((
                answer.status,
                answer.header("retry-after").is_some(),
                answer.closes(),
            )),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_request_and_keeps_every_204() {
    let dir = TestDir::new("overload-sigterm");
    let data = dir.data();
    let config = move |addr: SocketAddr| {
        format!(
            r#"
[server]
listen = "{addr}"
shutdown_grace_secs = 10

[store]
data_dir = "{}"

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["{MITEL_KEY}"]
"#,
            data.display()
        )
    };
    let gw = common::process::Gateway::start(&dir, &config).await;
    let addr = gw.addr;
    let total = Arc::new(AtomicUsize::new(0));
    // Far more than they can send before the stop: every client runs
    // until the gateway refuses its connection.
    let mut clients = Vec::new();
    for c in 0..16 {
        clients.push(tokio::spawn(load_client(
            addr,
            format!("k{c}"),
            1_000_000,
            Arc::clone(&total),
        )));
    }
    for c in 0..4 {
        clients.push(tokio::spawn(connecting_client(
            addr,
            format!("n{c}"),
            1_000_000,
            Arc::clone(&total),
        )));
    }
    common::wait_until("load to be under way", STEP, || async {
        total.load(Ordering::SeqCst) >= 2000
    })
    .await;

    // SIGTERM; exit code 0 is asserted by `stop`.
    let output = gw.stop().await;
    assert!(output.contains("draining"), "{output}");

    let mut accepted = Vec::new();
    for client in clients {
        let seen = tokio::time::timeout(STEP, client)
            .await
            .expect("the clients stop once refused")
            .unwrap();
        assert!(
            seen.unanswered.is_empty(),
            "requests left without an answer: {:?}",
            seen.unanswered
        );
        for (status, retry_after, closes) in &seen.refused {
            assert!(
                *status == 503 && *retry_after && *closes,
                "a refusal is 503 + Retry-After + Connection: close: {:?}",
                seen.refused
            );
        }
        accepted.extend(seen.accepted);
    }

    // Every 204 was kept: a gateway started on the same data_dir has each.
    let gw = common::process::Gateway::start(&dir, &config).await;
    for chunk in accepted.chunks(1000) {
        let response = gw
            .client
            .post(gw.url("/v1/presence/query"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"source": "mitel", "principals": chunk}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let found: Value = response.json().await.unwrap();
        let found = found["items"].as_array().map_or(0, Vec::len);
        assert_eq!(found, chunk.len(), "acknowledged notifications were lost");
    }
    gw.stop().await;
}
