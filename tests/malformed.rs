//! Every route, walked with malformed input: odd paths, queries, headers,
//! bodies and methods, sent as raw bytes over TCP so that nothing is
//! normalised on the way.
//!
//! Whatever arrives, the gateway answers (a dropped connection is a
//! failure), never with a 5xx, and every error is an RFC 9457 problem
//! document (DESIGN §1); nothing is stored. The routes come from the
//! router's own tables (`http::route_templates`), so a new route is walked
//! without being added here.
//!
//! Requests that hyper cannot parse as HTTP (a raw non-ASCII byte in the
//! target, a bad `Content-Length`) never reach the router: hyper answers
//! those itself with an empty 4xx; [`unparseable_requests_are_answered_4xx`]
//! holds it to that.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use common::{Gateway, MITEL_KEY, TOKEN, sign};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The NetSapiens subscription (correlation) id of the test source.
const NS_SUBSCRIPTION: &str = "ns-subscription-1";

/// Larger than any limit (webhook bodies 4 KiB here, consumer queries 2 MiB).
const HUGE: usize = 3 * 1024 * 1024;

/// Request heads up to 128 KiB: the longest targets walked here (60 000
/// bytes, near hyper's own limit) must reach the router, where with the
/// default `server.max_header_bytes` (16 KiB) hyper would answer its own
/// empty 431 (tests/overload.rs holds the default to that).
fn config() -> String {
    common::mitel_config(&format!(
        r#"
[[sources]]
id = "ns"
kind = "netsapiens"
correlation_ids = ["{NS_SUBSCRIPTION}"]
"#
    ))
    .replacen("[server]\n", "[server]\nmax_header_bytes = 131072\n", 1)
}

/// How the body goes out.
#[derive(Clone, Debug)]
enum Body {
    None,
    /// With `Content-Length`.
    Fixed(Vec<u8>),
    /// `Transfer-Encoding: chunked`, in 64 KiB chunks.
    Chunked(Vec<u8>),
    /// `Content-Length` and `Expect: 100-continue`, and the body is never
    /// sent: the answer must come without it.
    DeclaredOnly(u64),
}

/// One request, byte for byte.
#[derive(Clone, Debug)]
struct Raw {
    method: String,
    target: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    body: Body,
}

impl Raw {
    fn new(method: &str, target: impl Into<Vec<u8>>) -> Raw {
        Raw {
            method: method.to_owned(),
            target: target.into(),
            headers: vec![(
                "authorization".to_owned(),
                format!("Bearer {TOKEN}").into_bytes(),
            )],
            body: Body::None,
        }
    }

    /// Adds a header, replacing one of the same name.
    fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Raw {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn without(mut self, name: &str) -> Raw {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    fn body(mut self, body: Body) -> Raw {
        self.body = body;
        self
    }

    /// For webhook routes: the body signed for the source the path names
    /// (Mitel signature, NetSapiens correlation id), so that malformed
    /// bodies get past authentication to the parsers.
    fn authentic(self, source: &str) -> Raw {
        let Body::Fixed(bytes) = &self.body else {
            return self;
        };
        match source {
            "mitel" => {
                let signature = sign(MITEL_KEY, bytes);
                self.header("x-notify-signature", signature)
            }
            "ns" => self.header("x-correlation-id", NS_SUBSCRIPTION),
            _ => self,
        }
    }

    fn describe(&self) -> String {
        let target = String::from_utf8_lossy(&self.target);
        let target: String = if target.len() > 120 {
            format!("{}…({} bytes)", &target[..120], self.target.len())
        } else {
            target.into_owned()
        };
        let headers: Vec<String> = self
            .headers
            .iter()
            .filter(|(n, _)| n != "authorization")
            .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(&v[..v.len().min(60)])))
            .collect();
        let body = match &self.body {
            Body::None => String::new(),
            Body::Fixed(b) | Body::Chunked(b) if b.len() > 80 => format!("{} bytes", b.len()),
            Body::Fixed(b) | Body::Chunked(b) => String::from_utf8_lossy(b).into_owned(),
            Body::DeclaredOnly(n) => format!("declared {n}, not sent"),
        };
        format!("{} {target} {headers:?} {body}", self.method)
    }

    fn head_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        match &self.body {
            Body::None => {}
            Body::Fixed(b) => {
                out.extend_from_slice(format!("content-length: {}\r\n", b.len()).as_bytes())
            }
            Body::Chunked(_) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Body::DeclaredOnly(n) => out.extend_from_slice(
                format!("content-length: {n}\r\nexpect: 100-continue\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// An answer as it came over the wire.
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
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads more into `buf`; 0 at the end (or a reset after the answer).
async fn read_more(stream: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            n
        }
        Err(_) => 0,
    }
}

/// Sends `raw` on a new connection and reads the final answer (after any
/// `100 Continue`). A stream that starts (SSE 200, WebSocket 101) is
/// returned without its body. `None` when the connection ended without an
/// answer.
async fn send(addr: SocketAddr, raw: &Raw) -> Option<Answer> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = raw.head_bytes();
    let body = raw.body.clone();
    // The body goes out while the answer is read: the gateway may answer
    // (and close) before it has read it all, and a write that fails then is
    // no failure of the test.
    let _writing = AbortOnDrop(tokio::spawn(async move {
        writer.write_all(&head).await?;
        match body {
            Body::None | Body::DeclaredOnly(_) => {}
            Body::Fixed(bytes) => writer.write_all(&bytes).await?,
            Body::Chunked(bytes) => {
                for chunk in bytes.chunks(64 * 1024) {
                    writer
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await?;
                    writer.write_all(chunk).await?;
                    writer.write_all(b"\r\n").await?;
                }
                writer.write_all(b"0\r\n\r\n").await?;
            }
        }
        writer.flush().await?;
        // Held open until the answer has been read (dropping it would
        // half-close the connection).
        Ok::<_, std::io::Error>(writer)
    }));
    let mut buf = Vec::new();
    let answer = loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if read_more(&mut reader, &mut buf).await == 0 {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        if status == 100 {
            continue;
        }
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        break Answer {
            status,
            headers,
            body: buf,
        };
    };
    let mut answer = answer;
    let streaming = answer.status == 101
        || answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"));
    if streaming || raw.method == "HEAD" {
        answer.body.clear();
        return Some(answer);
    }
    let mut body = std::mem::take(&mut answer.body);
    if let Some(length) = answer.header("content-length") {
        let length: usize = length.parse().expect("content-length");
        while body.len() < length {
            if read_more(&mut reader, &mut body).await == 0 {
                panic!("answer cut short: {answer:?}");
            }
        }
        body.truncate(length);
    } else if answer
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        while find(&body, b"0\r\n\r\n").is_none() {
            if read_more(&mut reader, &mut body).await == 0 {
                break;
            }
        }
        body = dechunk(&body);
    } else {
        while read_more(&mut reader, &mut body).await > 0 {}
    }
    answer.body = body;
    Some(answer)
}

/// Stops the body writer of [`send`] when the answer is in (a stream's
/// writer may be blocked on a body the gateway never reads).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(raw, b"\r\n") {
        let size = std::str::from_utf8(&raw[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let data = &raw[i + 2..];
        out.extend_from_slice(&data[..size.min(data.len())]);
        raw = &data[(size + 2).min(data.len())..];
    }
    out
}

/// Sends `raw` and holds the answer to the rules: answered, no 5xx, and
/// every error a problem document. Returns the answer for further checks.
async fn check(addr: SocketAddr, raw: &Raw) -> Answer {
    let answer = tokio::time::timeout(Duration::from_secs(30), send(addr, raw))
        .await
        .unwrap_or_else(|_| panic!("no answer within 30 s: {}", raw.describe()))
        .unwrap_or_else(|| panic!("connection closed without an answer: {}", raw.describe()));
    let what = || {
        format!(
            "{} -> {} {:?}",
            raw.describe(),
            answer.status,
            answer.headers
        )
    };
    assert!(answer.status < 500, "server error: {}", what());
    if answer.status >= 400 {
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json"),
            "not a problem document: {} {}",
            what(),
            String::from_utf8_lossy(&answer.body)
        );
        if raw.method != "HEAD" {
            let problem: Value = serde_json::from_slice(&answer.body)
                .unwrap_or_else(|e| panic!("problem body is not JSON ({e}): {}", what()));
            assert_eq!(problem["status"], answer.status, "{}", what());
            assert!(
                problem["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("urn:presence-gateway:problem:")),
                "{problem} {}",
                what()
            );
            for field in ["title", "detail"] {
                assert!(
                    problem[field].as_str().is_some_and(|t| !t.is_empty()),
                    "{problem} {}",
                    what()
                );
            }
        }
        if answer.status == 405 {
            assert!(
                answer.header("allow").is_some(),
                "405 without Allow: {}",
                what()
            );
        }
        if answer.status == 401 {
            assert!(
                answer.header("www-authenticate").is_some()
                    || raw.target.starts_with(b"/webhooks/"),
                "401 without a challenge: {}",
                what()
            );
        }
    }
    answer
}

/// The path of `template` with each `{param}` replaced by `fill(name)`.
fn fill(template: &str, mut fill: impl FnMut(&str) -> Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.extend_from_slice(&rest.as_bytes()[..open]);
        let close = rest[open..].find('}').expect("closing brace") + open;
        out.extend(fill(&rest[open + 1..close]));
        rest = &rest[close + 1..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

fn params(template: &str) -> Vec<String> {
    template
        .split('{')
        .skip(1)
        .map(|s| s.split('}').next().unwrap_or("").to_owned())
        .collect()
}

/// A value that names something that exists (or might) for a parameter.
fn good(source: &str, name: &str) -> Vec<u8> {
    match name {
        "source" | "source_id" => source.as_bytes().to_vec(),
        _ => b"someone".to_vec(),
    }
}

/// Path segments, percent-encoded as hyper lets them through to the router.
fn bad_segments() -> Vec<Vec<u8>> {
    let mut segments: Vec<Vec<u8>> = [
        "%ff",
        "%FF%FE",
        "%c3%28",
        "%e2%82",
        "%ed%a0%80",
        "%f4%90%80%80",
        "%c0%af",
        "%00",
        "%0a%0d",
        "%",
        "%zz",
        "a%2",
        "%2f",
        "a%2fb",
        "%2e%2e",
        "..",
        ".",
        "a%20b",
        "%f0%9f%98%80",
        "~!$&'()*+,;=:@",
        "%25ff",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    segments.push(b"a".repeat(10_000));
    segments.push(b"%ff".repeat(5_000));
    // Near the longest target hyper accepts (64 KiB).
    segments.push(b"x".repeat(60_000));
    segments
}

fn bad_queries() -> Vec<Vec<u8>> {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let mut queries: Vec<Vec<u8>> = [
        "%ff=1".to_owned(),
        "source=%ff".to_owned(),
        "source=".to_owned(),
        "source=nope".to_owned(),
        "principal=%ff".to_owned(),
        "limit=abc".to_owned(),
        "limit=0".to_owned(),
        "limit=-1".to_owned(),
        "limit=1.5".to_owned(),
        "limit=99999999999999999999999".to_owned(),
        "limit=1&limit=2".to_owned(),
        "source=mitel&source=ns".to_owned(),
        "cursor=%ff".to_owned(),
        "cursor=!!!".to_owned(),
        format!(
            "cursor={}",
            b64("mitel/18446744073709551615/18446744073709551615")
        ),
        format!("cursor={}", b64("mitel/-1/0")),
        format!("cursor={}", b64("nope/0/0")),
        format!("cursor={}", b64("\u{0}/\u{0}/\u{0}")),
        format!("source=ns&cursor={}", b64("mitel/0/0")),
        "availability=bogus".to_owned(),
        "availability=,,,".to_owned(),
        "availability=%ff".to_owned(),
        "snapshot=maybe".to_owned(),
        "snapshot=false&snapshot=%ff".to_owned(),
        "last_event_id=-1".to_owned(),
        "last_event_id=%ff".to_owned(),
        "last_event_id=99999999999999999999999".to_owned(),
        "&&&==&=".to_owned(),
        "a".to_owned(),
        "=x".to_owned(),
        "%".to_owned(),
        "a=%zz".to_owned(),
        "access_token=wrong".to_owned(),
        "validationToken=%ff".to_owned(),
        "source[]=x&source[0]=y".to_owned(),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut long = b"x=".to_vec();
    long.extend(b"a".repeat(30_000));
    queries.push(long);
    queries.push(b"principal=a&".repeat(2_000));
    queries
}

/// Header sets that are odd but parse as HTTP.
fn bad_headers() -> Vec<Vec<(&'static str, Vec<u8>)>> {
    let h = |n: &'static str, v: &[u8]| vec![(n, v.to_vec())];
    let upgrade = |extra: &[(&'static str, &[u8])]| {
        let mut set = vec![
            ("connection", b"upgrade".to_vec()),
            ("upgrade", b"websocket".to_vec()),
        ];
        set.extend(extra.iter().map(|(n, v)| (*n, v.to_vec())));
        set
    };
    vec![
        h("authorization", b"Bearer wrong"),
        h("authorization", b"Basic dGVzdDp0ZXN0"),
        h("authorization", b"Bearer \xff\xfe"),
        h("authorization", b"Bearer"),
        h(
            "authorization",
            &[b"Bearer ".as_slice(), &[b'a'; 8000]].concat(),
        ),
        h("last-event-id", b"abc"),
        h("last-event-id", b"-1"),
        h("last-event-id", b"\xff"),
        h("last-event-id", b"99999999999999999999999"),
        h("x-notify-signature", b"zz"),
        h("x-notify-signature", &[0xff; 64]),
        h("x-correlation-id", b"\xff"),
        h("x-forwarded-for", b"not-an-ip, \xff, 300.1.1.1"),
        h("x-request-id", b"\xff odd id"),
        h("content-type", b"application/json; charset=\xff"),
        h("accept", b"\xff"),
        h("expect", b"something-else"),
        upgrade(&[]),
        upgrade(&[("sec-websocket-version", b"13")]),
        upgrade(&[
            ("sec-websocket-version", b"99"),
            ("sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        ]),
        upgrade(&[
            ("sec-websocket-version", b"13"),
            ("sec-websocket-key", b"\xff"),
        ]),
    ]
}

/// Bodies that are not what any route takes. None of them is a valid
/// presence event of any provider, signed or not.
fn bad_bodies() -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = [
        "",
        "{",
        "null",
        "0",
        "\"text\"",
        "[]",
        "[{}]",
        "{}",
        r#"{"principals": 3}"#,
        r#"{"principals": [1, 2]}"#,
        r#"{"principals": [1e999]}"#,
        r#"{"principals": ["a"], "source": 5}"#,
        r#"{"principals": ["a"], "source": "%ff"}"#,
        r#"{"principals": ["a"], "extra": true}"#,
        r#"{"principals": ["\ud800"]}"#,
        r#"{"topic": 5, "subject": []}"#,
        r#"{"topic": "platform-api-presence", "subject": "/presentities/x", "content": {"presence": 7, "timestamp": "soon"}}"#,
        r#"{"topic": "platform-api-presence", "subject": 5, "content": []}"#,
        r#"[{"user": 5, "domain": {}, "presence": []}]"#,
        r#"[{"user": "1001", "domain": "d", "presence": "open", "time": "not a time", "#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    bodies.push(b"\xff\xfe\x00garbage".to_vec());
    bodies.push(b"[".repeat(100_000));
    bodies.push(b"{\"a\":".repeat(10_000));
    bodies
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO",
];

/// Every request of the walk for one route template.
fn walk(template: &str) -> Vec<Raw> {
    let sources: &[&str] = if template.contains("{source") {
        &["mitel", "ns"]
    } else {
        &["mitel"]
    };
    let mut requests = Vec::new();
    for &source in sources {
        let base = fill(template, |name| good(source, name));
        // Methods, with and without a body.
        for method in METHODS {
            requests.push(Raw::new(method, base.clone()));
            requests.push(Raw::new(method, base.clone()).body(Body::Fixed(b"{}".to_vec())));
        }
        // Paths: one parameter malformed at a time.
        let names = params(template);
        for (i, _) in names.iter().enumerate() {
            for segment in bad_segments() {
                let mut index = 0;
                let path = fill(template, |name| {
                    let value = if index == i {
                        segment.clone()
                    } else {
                        good(source, name)
                    };
                    index += 1;
                    value
                });
                for method in ["GET", "POST"] {
                    requests.push(Raw::new(method, path.clone()));
                }
            }
        }
        // Paths next to the route.
        let mut near = vec![
            [base.as_slice(), b"/"].concat(),
            [base.as_slice(), b"/extra"].concat(),
            [base.as_slice(), b"%ff"].concat(),
            [base.as_slice(), b"/%ff"].concat(),
            [b"/".as_slice(), &base].concat(),
        ];
        if let Some(last) = base.iter().rposition(|&b| b == b'/')
            && last > 0
        {
            near.push([&base[..last], b"//", &base[last + 1..]].concat());
        }
        for path in near {
            requests.push(Raw::new("GET", path.clone()));
            requests.push(Raw::new("POST", path));
        }
        // Queries.
        for query in bad_queries() {
            let target = [base.as_slice(), b"?", &query].concat();
            requests.push(Raw::new("GET", target.clone()));
            requests.push(Raw::new("POST", target).body(Body::Fixed(b"{}".to_vec())));
        }
        // Headers.
        for set in bad_headers() {
            for method in ["GET", "POST"] {
                let mut raw = Raw::new(method, base.clone());
                for (name, value) in &set {
                    raw = raw.header(name, value.clone());
                }
                requests.push(raw);
            }
        }
        requests.push(Raw::new("GET", base.clone()).without("authorization"));
        // Bodies, plain and (for webhooks) authentic.
        for body in bad_bodies() {
            let raw = Raw::new("POST", base.clone()).body(Body::Fixed(body.clone()));
            requests.push(raw.clone().authentic(source));
            requests.push(raw);
            requests.push(Raw::new("POST", base.clone()).body(Body::Chunked(body.clone())));
            requests.push(Raw::new("GET", base.clone()).body(Body::Fixed(body)));
        }
        // Bodies over every limit.
        let huge = vec![b'['; HUGE];
        requests.push(
            Raw::new("POST", base.clone())
                .body(Body::Fixed(huge.clone()))
                .authentic(source),
        );
        requests.push(Raw::new("POST", base.clone()).body(Body::Chunked(huge.clone())));
        requests.push(Raw::new("GET", base.clone()).body(Body::Fixed(huge)));
        requests.push(Raw::new("POST", base.clone()).body(Body::DeclaredOnly(1 << 40)));
    }
    requests
}

/// Nothing the walk sent may have been kept.
async fn assert_nothing_stored(gw: &Gateway) {
    let snapshot = gw.snapshot().await;
    assert!(snapshot.records.is_empty(), "{:?}", snapshot.records);
    assert!(
        snapshot.last_seq.unwrap_or(0.0) == 0.0,
        "last seq {:?}",
        snapshot.last_seq
    );
    for source in ["mitel", "ns"] {
        for counter in ["accepted", "changed", "duplicate", "stale"] {
            assert_eq!(
                common::source_counter(&snapshot.sources, source, counter),
                0,
                "{source} {counter}"
            );
        }
    }
}

#[tokio::test]
async fn every_route_answers_malformed_input_with_problem_documents() {
    let gw = Gateway::start(&config()).await;
    let templates = presence_gateway::http::route_templates();
    // The tables the router is built from, as the contract lists them.
    for expected in [
        "/webhooks/{source_id}",
        "/v1/presence",
        "/v1/presence/query",
        "/v1/presence/{source}/{principal}",
        "/v1/sources",
        "/v1/stream",
        "/v1/ws",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
    ] {
        assert!(
            templates.iter().any(|t| t == expected),
            "{expected} missing from {templates:?}"
        );
    }
    let mut sent = 0;
    for template in &templates {
        // Each template is a route the router serves: some method of it
        // reaches a handler rather than the "no such resource" fallback.
        let base = fill(template, |name| good("mitel", name));
        let mut routed = false;
        for method in ["GET", "POST"] {
            let answer = check(gw.addr, &Raw::new(method, base.clone())).await;
            routed |= !String::from_utf8_lossy(&answer.body).contains("no such resource");
        }
        assert!(routed, "{template} is not routed");
        for raw in walk(template) {
            check(gw.addr, &raw).await;
            sent += 1;
        }
    }
    eprintln!("{sent} malformed requests over {} routes", templates.len());
    assert_nothing_stored(&gw).await;
    gw.stop().await;
}

/// The cases the issue measured, and what they must be.
#[tokio::test]
async fn undecodable_path_parameters_are_404_problems() {
    let gw = Gateway::start(&config()).await;
    // The webhook route takes every method (404 comes before 405 there).
    let webhook: &[&str] = &["POST", "GET", "PUT"];
    for (target, methods) in [
        ("/webhooks/%ff", webhook),
        ("/webhooks/%c3%28", webhook),
        ("/v1/presence/a/%ff", &["GET"]),
        ("/v1/presence/%ff/x", &["GET"]),
        ("/v1/presence/mitel/%ff", &["GET"]),
    ] {
        for method in methods {
            let answer = check(gw.addr, &Raw::new(method, target)).await;
            assert_eq!(answer.status, 404, "{method} {target}");
        }
    }
    assert_nothing_stored(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn consumer_query_bodies_over_the_limit_are_413_problems() {
    let gw = Gateway::start(&config()).await;
    let huge = Raw::new("POST", "/v1/presence/query");
    for body in [
        Body::Fixed(vec![b' '; HUGE]),
        Body::Chunked(vec![b' '; HUGE]),
        Body::DeclaredOnly(HUGE as u64),
    ] {
        let raw = huge.clone().body(body);
        let answer = check(gw.addr, &raw).await;
        assert_eq!(answer.status, 413, "{}", raw.describe());
    }
    // Within the limit, the same endpoint still answers.
    let raw = huge.body(Body::Fixed(br#"{"principals": ["nobody"]}"#.to_vec()));
    assert_eq!(check(gw.addr, &raw).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn websocket_route_answers_head_with_405_and_allow() {
    let gw = Gateway::start(&config()).await;
    let answer = check(gw.addr, &Raw::new("HEAD", "/v1/ws")).await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("allow"), Some("GET"));
    gw.stop().await;
}

/// Requests hyper refuses before the router sees them: answered with a 4xx
/// (hyper's own, empty), never a 5xx or silence.
#[tokio::test]
async fn unparseable_requests_are_answered_4xx() {
    let gw = Gateway::start(&config()).await;
    let cases: Vec<Vec<u8>> = vec![
        b"GET /webhooks/\xff HTTP/1.1\r\nhost: g\r\n\r\n".to_vec(),
        b"GET /v1/presence/a b/c HTTP/1.1\r\nhost: g\r\n\r\n".to_vec(),
        b"GET /v1/presence?\x01 HTTP/1.1\r\nhost: g\r\n\r\n".to_vec(),
        b"POST /webhooks/mitel HTTP/1.1\r\nhost: g\r\ncontent-length: abc\r\n\r\n".to_vec(),
        b"POST /webhooks/mitel HTTP/1.1\r\nhost: g\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
            .to_vec(),
        b"POST /webhooks/mitel HTTP/1.1\r\nhost: g\r\ntransfer-encoding: gzip\r\n\r\n".to_vec(),
        b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n".to_vec(),
        b"GET /healthz HTTP/9.9\r\nhost: g\r\n\r\n".to_vec(),
        [b"GET /".as_slice(), &b"a".repeat(70_000), b" HTTP/1.1\r\nhost: g\r\n\r\n"].concat(),
    ];
    for request in cases {
        let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
        stream.write_all(&request).await.expect("write");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            let mut chunk = [0u8; 4096];
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let what = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
        assert!(read.is_ok(), "no answer within 30 s: {what:?}");
        let status: u16 = String::from_utf8_lossy(&answer)
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no answer to {what:?}: {answer:?}"));
        assert!((400..500).contains(&status), "{what:?} -> {status}");
    }
    assert_nothing_stored(&gw).await;
    gw.stop().await;
}
