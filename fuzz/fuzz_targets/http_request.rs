//! The HTTP request path: raw bytes from a client, through hyper's HTTP/1
//! connection, the edge service and the router, to the handlers, the
//! verifiers, the parsers and the store (src/http, src/lib.rs). Input: what
//! a client sends on one connection (any number of pipelined requests).
//!
//! The app is built once, as `run` builds it, from a test config: a Mitel
//! source `m` (signing key below), a NetSapiens source `ns` (correlation
//! id below), a Standard Webhooks source `std` (the public test secret),
//! one consumer token (`fuzz-token`), 127.0.0.0/8 as trusted proxies, a
//! memory store. Each input gets a fresh in-memory connection on
//! one current-thread runtime whose clock is paused: a stream or a request
//! waiting for more bytes ends as soon as nothing else can happen, instead
//! of after real seconds.
//!
//! The Standard Webhooks verifier reads the real clock (not the paused
//! one), so a committed seed, signed at the time `bash fuzz/make-seeds`
//! ran, is answered 401 (expired) once the source's tolerance (a day, the
//! longest allowed) has passed: requests to `std` then exercise the header
//! extraction and the verifier's checks up to the clock, and reach the
//! Standard Webhooks parser only on seeds made within the day.
//!
//! Checks: nothing panics (a handler's panic would be caught and answered
//! 500, and libFuzzer's panic hook aborts on it first), no answer is a 500,
//! and the connection finishes within its bound.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use presence_gateway::Config;
use presence_gateway::http::listener::Peer;
use presence_gateway::http::{self, AppState, StateParts};
use presence_gateway::presence::Store;
use presence_gateway::presence::store::StoreLimits;
use presence_gateway::sources::Sources;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test config; the secrets are the fixtures' (tests/fixtures/keys.toml).
const CONFIG: &str = r#"
[server]
body_limit_bytes = 65536
max_in_flight = 16
trusted_proxies = ["127.0.0.0/8"]

[consumers]
tokens = ["fuzz-token"]
stream_buffer = 64

[[sources]]
id = "m"
kind = "mitel"
signing_keys = ["829e823f-f27e-47ee-a101-5d5e9c6266bf"]
allow_ips = ["127.0.0.0/8", "10.0.0.0/8", "2001:db8::/32"]

[[sources]]
id = "ns"
kind = "netsapiens"
correlation_ids = [
  "sub-7d1f0c52-4b1e-4f0e-9a55-0e5b2f0a8c31",
  { id = "sub-calls", model = "call" },
]

[[sources]]
id = "std"
kind = "standard"
signing_keys = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
tolerance_secs = 86400
"#;

/// Most response bytes read per input (a stream goes on forever).
const READ_LIMIT: usize = 1 << 20;

/// How long (on the paused clock) one connection may take.
const CONNECTION_BOUND: Duration = Duration::from_secs(120);

/// `FUZZ_SHOW_ANSWERS=1` prints every answer (to look at what seeds reach:
/// `cargo fuzz run -s none http_request fuzz/seeds/http_request -- -runs=0`).
static SHOW: LazyLock<bool> = LazyLock::new(|| std::env::var_os("FUZZ_SHOW_ANSWERS").is_some());

struct Harness {
    runtime: tokio::runtime::Runtime,
    app: http::edge::Edge<axum::Router>,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let config = Config::parse_with_env(
        CONFIG,
        std::path::Path::new("fuzz.toml"),
        Vec::new(),
        |_| None,
    )
    .expect("the test config is valid");
    let app = runtime.block_on(async {
        let sources = Arc::new(Sources::new(&config.sources).expect("sources"));
        let limits = StoreLimits {
            history: 1024,
            dedup_window_ms: 600_000,
            dedup_capacity: 4096,
            stream_buffer: config.consumers.stream_buffer,
            max_future_skew_ms: 300_000,
        };
        let state = AppState::new(StateParts {
            store: Arc::new(Store::new(&sources.ids(), limits)),
            sources,
            global: Arc::default(),
            consumer_tokens: config.consumers.tokens.clone(),
            max_in_flight: config.server.max_in_flight,
            body_limit: config.server.body_limit_bytes,
            body_timeout: config.server.body_timeout,
            max_requests_per_client: config.server.max_requests_per_client,
            stream_opens: http::opens::OpenLimit {
                burst: config.consumers.stream_open_burst,
                per_minute: config.consumers.stream_opens_per_minute,
            },
            trusted_proxies: config.server.trusted_proxies.clone(),
        });
        state.set_ready(true);
        http::router(state)
    });
    Harness { runtime, app }
});

fuzz_target!(|data: &[u8]| {
    let harness = &*HARNESS;
    let mut answer = Vec::new();
    let finished = harness
        .runtime
        .block_on(exchange(harness.app.clone(), data, &mut answer));
    let text = String::from_utf8_lossy(&answer);
    if *SHOW {
        eprintln!(
            "---- answer ({} bytes, closed: {finished})\n{text}",
            answer.len()
        );
    }
    if !finished {
        // Only streams stay open: an SSE answer or a WebSocket upgrade.
        assert!(
            text.contains("content-type: text/event-stream")
                || text.starts_with("HTTP/1.1 101 ")
                || text.contains("\nHTTP/1.1 101 "),
            "the connection did not finish within {CONNECTION_BOUND:?}: {text}"
        );
    }
    // Status lines start the answer or follow a line end (a header value
    // cannot hold a line end, and problem bodies are JSON-escaped).
    let server_errors = answer
        .windows(13)
        .enumerate()
        .filter(|(at, w)| (*at == 0 || answer[at - 1] == b'\n') && *w == b"HTTP/1.1 500 ")
        .count();
    assert_eq!(server_errors, 0, "a 500 answer: {text}");
});

/// Sends `input` on a fresh connection and collects into `answer` what the
/// server answered (at most [`READ_LIMIT`] bytes); whether the server closed
/// the connection within [`CONNECTION_BOUND`].
async fn exchange(app: http::edge::Edge<axum::Router>, input: &[u8], answer: &mut Vec<u8>) -> bool {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer: SocketAddr = ([127, 0, 0, 1], 40000).into();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut request = request.map(Body::new);
        request
            .extensions_mut()
            .insert(ConnectInfo(Peer::now(peer)));
        tower::ServiceExt::oneshot(app.clone(), request)
    });
    // As src/http/server.rs builds it, but answering what was asked even
    // after the client stopped sending (the input ends with a half-close).
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_header_size(16 * 1024)
        .half_close(true);
    let connection = builder
        .serve_connection(TokioIo::new(server), service)
        .with_upgrades();
    let (mut reader, mut writer) = tokio::io::split(client);
    let send = async move {
        // The server may close before reading everything: not an error.
        let _ = writer.write_all(input).await;
        let _ = writer.shutdown().await;
    };
    let receive = async {
        let mut chunk = [0u8; 8192];
        while answer.len() < READ_LIMIT {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        // Past the limit (a stream): keep draining so the server is not
        // stuck writing.
        while let Ok(1..) = reader.read(&mut chunk).await {}
    };
    let all = async {
        // A peer that sent garbage ends the connection with an error: fine.
        let ((), (), _ended) = tokio::join!(send, receive, connection);
    };
    tokio::time::timeout(CONNECTION_BOUND, all).await.is_ok()
}
