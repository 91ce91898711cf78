//! Shared test harness: starts the gateway through the library's `run` on
//! 127.0.0.1:0 and talks to it over real HTTP.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod graph;
pub mod mitel_ws;
pub mod netsapiens;
pub mod process;
pub mod redis;
pub mod scripted;
pub mod sse;
pub mod ucwa;

use std::net::SocketAddr;
use std::path::Path;

use presence_gateway::Config;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The Mitel signing key of the fixtures (tests/fixtures/keys.toml).
pub const MITEL_KEY: &str = "829e823f-f27e-47ee-a101-5d5e9c6266bf";
/// The consumer token the test configs use.
pub const TOKEN: &str = "test-consumer-token";
/// The time test events are stamped from, epoch ms (2025-01-01T00:00:00Z):
/// fixed, never today's date, and realistic, as the gateway distrusts
/// provider timestamps before 2000 (and ahead of its clock; DESIGN §2).
/// Tests add the offsets that order their events.
pub const T0: i64 = 1_735_689_600_000;

/// A fixture file's text.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Hex HMAC-SHA256 as Mitel computes it.
pub fn sign(key: &str, body: &[u8]) -> String {
    presence_gateway::verify::hmac_hex::sign_hex(key.as_bytes(), body)
}

/// A config with one Mitel source `mitel` signed with [`MITEL_KEY`] and the
/// consumer token [`TOKEN`], plus whatever `extra` adds.
pub fn mitel_config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 4096

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["{MITEL_KEY}"]
{extra}
"#
    )
}

/// A listener on a free loopback port, and the webhook URL of `source` on
/// a gateway served there: for tests that must give a provider that URL
/// before the gateway starts. Hand the listener to
/// [`Gateway::start_on_listener`]; the port is held from here on, so no
/// other process can take it in between.
pub async fn webhook_listener(source: &str) -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, format!("http://{addr}/webhooks/{source}"))
}

/// Under tokio's paused clock: lets every task run until all of them wait
/// for a timer (each sleep lets the runtime poll everything that is ready).
pub async fn settle() {
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Polls `condition` (real time, every 10 ms) until it holds; panics
/// after `within`. For tests that wait for something to happen, not for
/// time to pass.
pub async fn wait_until<F, Fut>(what: &str, within: std::time::Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), presence_gateway::RunError>>>,
    /// Where `PG_TEST_STORE` put this gateway's state; removed when the
    /// gateway is stopped or dropped (declared last: dropped after the
    /// gateway was told to stop).
    _test_store: Option<TestStore>,
}

impl Gateway {
    /// Starts a gateway with the given config text.
    pub async fn start(config: &str) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on_listener(config, listener).await
    }

    /// Starts a gateway on a listener the test bound itself (on port 0),
    /// for tests that must know the gateway's URL before it starts.
    pub async fn start_on_listener(config: &str, listener: TcpListener) -> Gateway {
        let mut config =
            Config::parse_with_env(config, Path::new("test.toml"), Vec::new(), |_| None)
                .unwrap_or_else(|e| panic!("test config is invalid: {e}"));
        let test_store = TestStore::apply(&mut config);
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(presence_gateway::run(config, listener, shutdown.clone()));
        let redis = matches!(test_store, Some(TestStore::Redis { .. }));
        let gateway = Gateway {
            addr,
            client: {
                presence_gateway::upstream::install_crypto_provider();
                reqwest::Client::new()
            },
            shutdown,
            task: Some(task),
            _test_store: test_store,
        };
        if redis {
            gateway.wait_for_redis_state().await;
        }
        gateway
    }

    /// The memory backend has its state before the listener serves; the
    /// Redis backend loads its mirror after, answering 503 meanwhile
    /// (DESIGN §8), as a proxy would learn from `/readyz`. Tests written
    /// against the first post at once, so a gateway `PG_TEST_STORE` put on
    /// Redis is waited for until its store takes writes. One that still
    /// waits for its upstream subscriptions (`not-ready`) is not: its tests
    /// wait for readiness themselves.
    async fn wait_for_redis_state(&self) {
        wait_until(
            "the Redis store to load",
            std::time::Duration::from_secs(10),
            || async {
                let response = self.client.get(self.url("/readyz")).send().await;
                let Ok(response) = response else {
                    return false;
                };
                if response.status() == 200 {
                    return true;
                }
                let problem: Value = response.json().await.unwrap_or(Value::Null);
                problem["type"] != "urn:presence-gateway:problem:store-unavailable"
            },
        )
        .await;
    }

    /// `GET /readyz`'s status.
    pub async fn readyz(&self) -> u16 {
        self.client
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .status()
            .as_u16()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Posts `body` to `/webhooks/{source}` with the given signature header.
    pub async fn post_webhook(
        &self,
        source: &str,
        body: impl Into<reqwest::Body>,
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url(&format!("/webhooks/{source}")))
            .body(body);
        if let Some(sig) = signature {
            request = request.header("x-notify-signature", sig);
        }
        request.send().await.expect("webhook request")
    }

    /// Posts `body` signed with `key`, and asserts 204.
    pub async fn post_signed(&self, source: &str, key: &str, body: &str) {
        let response = self
            .post_webhook(source, body.to_owned(), Some(&sign(key, body.as_bytes())))
            .await;
        let status = response.status();
        assert_eq!(status, 204, "{}", response.text().await.unwrap_or_default());
    }

    /// GET with the consumer token; the raw response.
    pub async fn get_raw(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET")
    }

    /// GET with the consumer token; returns status and JSON (Null if none).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.get_raw(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with the consumer token.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Everything a rejected request must leave alone: all records, all
    /// counters of every source, and the last seq (once the change log has
    /// caught up with the records).
    pub async fn snapshot(&self) -> Snapshot {
        let (_, sources) = self.get("/v1/sources").await;
        let mut records = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/presence?limit=1000&cursor={c}"),
                None => "/v1/presence?limit=1000".to_owned(),
            };
            let (status, page) = self.get(&path).await;
            assert_eq!(status, 200);
            records.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        // The change log has every change the records show (on Redis it
        // catches up through pub/sub shortly after a write's answer).
        let newest = records.iter().filter_map(|r| r["seq"].as_u64()).max();
        if let Some(newest) = newest {
            self.wait_for_seq(newest).await;
        }
        let metrics = self.metrics().await;
        let last_seq = metric_value(&metrics, "presence_gateway_store_last_seq");
        Snapshot {
            sources,
            records,
            last_seq,
        }
    }

    /// Posts `count` signed Mitel changes to source `mitel` (principals
    /// `p{from}`.., each new, each with a 3.5 KB status message so that
    /// a stream's socket buffers fill after a few hundred), 16 in flight, as
    /// a provider's burst would arrive; asserts 204 for each.
    pub async fn flood(&self, from: usize, count: usize) {
        use futures_util::StreamExt;
        let note = "n".repeat(3500);
        futures_util::stream::iter(from..from + count)
            .for_each_concurrent(16, |i| {
                let body = serde_json::json!({"topic": "platform-api-presence",
                    "subject": format!("/presentities/p{i}"),
                    "content": {"presence": "Busy", "statusMessage": note, "timestamp": T0 + i as i64 + 1}})
                .to_string();
                async move { self.post_signed("mitel", MITEL_KEY, &body).await }
            })
            .await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until the change log streams are fed from has reached `seq`
    /// (`presence_gateway_store_last_seq`): at once on the memory backend;
    /// on Redis a change reaches it through pub/sub shortly after the
    /// webhook's answer.
    pub async fn wait_for_seq(&self, seq: u64) {
        wait_until(
            &format!("the change log to reach seq {seq}"),
            std::time::Duration::from_secs(5),
            || async {
                let text = self.metrics().await;
                metric_value(&text, "presence_gateway_store_last_seq")
                    .is_some_and(|last| last >= seq as f64)
            },
        )
        .await;
    }

    /// Counter `name` of source `id` in `/v1/sources`.
    pub async fn counter(&self, id: &str, name: &str) -> u64 {
        let (_, sources) = self.get("/v1/sources").await;
        source_counter(&sources, id, name)
    }

    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("gateway task").expect("gateway result");
        }
    }

    /// The token that stops this gateway.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Takes the task running `run`.
    pub fn take_task(&mut self) -> JoinHandle<Result<(), presence_gateway::RunError>> {
        self.task.take().expect("task already taken")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The store backend the black-box suites run against, chosen by the
/// environment variable `PG_TEST_STORE` (DESIGN §8: the tests of §1–§4 run
/// against both backends):
/// - unset or `memory`: what the test's config says;
/// - `data_dir`: the memory backend persisted to a fresh temporary
///   directory per gateway;
/// - `redis`: the Redis backend on the shared test server
///   ([`redis::shared_url`]) under a key prefix per gateway; not for tests
///   on tokio's paused clock, which cannot wait for another process.
///
/// A config that chose its own backend or `data_dir` is left alone.
/// Whatever a gateway kept is deleted when it is stopped or dropped.
pub enum TestStore {
    DataDir(std::path::PathBuf),
    Redis { url: String, prefix: String },
}

impl TestStore {
    /// Points `config` at the store `PG_TEST_STORE` asks for, unless the
    /// test chose one itself.
    pub fn apply(config: &mut Config) -> Option<TestStore> {
        use presence_gateway::config::StoreBackend;
        if config.store.backend != StoreBackend::Memory || config.store.data_dir.is_some() {
            return None;
        }
        // Two gateways of one test may start within the clock's resolution.
        static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wanted = std::env::var("PG_TEST_STORE").unwrap_or_default();
        match wanted.as_str() {
            "" | "memory" => None,
            "data_dir" => {
                let dir = std::env::temp_dir().join(redis::unique_prefix(&format!("data{n}")));
                config.store.data_dir = Some(dir.clone());
                Some(TestStore::DataDir(dir))
            }
            "redis" if clock_paused() => {
                // The gateway's Redis client times its answers out with
                // tokio timers, and a paused clock jumps ahead whenever the
                // runtime waits for another process: every answer would
                // come too late. Such a test keeps the memory backend.
                eprintln!("PG_TEST_STORE=redis: not under tokio's paused clock; memory backend");
                None
            }
            "redis" => {
                let url = redis::shared_url();
                let prefix = redis::unique_prefix(&format!("suite{n}"));
                config.store.backend = StoreBackend::Redis;
                config.store.redis.url = presence_gateway::config::Secret::new(url.clone());
                config.store.redis.key_prefix = prefix.clone();
                Some(TestStore::Redis { url, prefix })
            }
            other => panic!("PG_TEST_STORE={other:?}: expected memory, data_dir or redis"),
        }
    }
}

/// Whether the test runs on tokio's paused clock (`start_paused`), which
/// stands still while real time passes.
fn clock_paused() -> bool {
    let before = tokio::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(1));
    tokio::time::Instant::now() == before
}

impl Drop for TestStore {
    fn drop(&mut self) {
        // Never panics: a panic in a drop during a failing test's unwinding
        // would abort the whole test binary.
        match self {
            TestStore::DataDir(dir) => {
                if let Err(e) = std::fs::remove_dir_all(&*dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    eprintln!("PG_TEST_STORE: could not remove {}: {e}", dir.display());
                }
            }
            TestStore::Redis { url, prefix } => {
                // Drop cannot await: the redis crate's blocking client, on a
                // thread of its own so that no runtime worker is involved.
                let (url, owned) = (url.clone(), prefix.clone());
                let done = std::thread::spawn(move || redis::cleanup_blocking(&url, &owned)).join();
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("PG_TEST_STORE: could not delete {prefix}:*: {e}"),
                    Err(_) => eprintln!("PG_TEST_STORE: cleanup of {prefix}:* panicked"),
                }
            }
        }
    }
}

/// State that rejected requests must not change.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub sources: Value,
    pub records: Vec<Value>,
    pub last_seq: Option<f64>,
}

/// A counter of `/v1/sources` output (`rejected.x` for rejection reasons).
pub fn source_counter(sources: &Value, id: &str, name: &str) -> u64 {
    let source = sources["sources"]
        .as_array()
        .and_then(|list| list.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no source {id}"));
    let value = match name.strip_prefix("rejected.") {
        Some(reason) => &source["counters"]["rejected"][reason],
        None => &source["counters"][name],
    };
    value
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {source}"))
}

/// Increments `counter` (`rejected.x` for a rejection reason) of source
/// `id` in a `/v1/sources` document: what one request is expected to change.
pub fn bump(sources: &mut Value, id: &str, counter: &str) {
    let source = sources["sources"]
        .as_array_mut()
        .and_then(|l| l.iter_mut().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no source {id}"));
    let slot = match counter.strip_prefix("rejected.") {
        Some(reason) => &mut source["counters"]["rejected"][reason],
        None => &mut source["counters"][counter],
    };
    let value = slot
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {counter}"));
    *slot = serde_json::json!(value + 1);
}

/// The value of an unlabelled metric sample, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Asserts a problem document with this status and returns its JSON.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status);
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    body
}
