//! Several replicas on one Redis server (`[store] backend = "redis"`,
//! DESIGN §8): each test runs two or three gateways against the shared Redis
//! at 127.0.0.1:6379 under a key prefix of its own (removed at the end), or
//! against a private `redis-server` it stops and starts.

mod common;

use std::time::{Duration, Instant};

use common::redis::{PrivateRedis, cleanup, shared_url, unique_prefix};
use common::{Gateway, MITEL_KEY, TOKEN, mitel_config, sign};
use futures_util::StreamExt;
use serde_json::{Value, json};

fn redis_config(url: &str, prefix: &str, replica: &str) -> String {
    mitel_config(&format!(
        r#"
[store]
backend = "redis"
dedup_window_secs = 600

[store.redis]
url = "{url}"
key_prefix = "{prefix}"
lease_ttl_secs = 2
"#
    ))
    .replace(
        "[server]\n",
        &format!("[server]\nreplica_id = \"{replica}\"\n"),
    )
}

/// A presence envelope observed `at` ms after [`common::T0`].
fn presence(principal: &str, status: &str, at: i64, event_id: &str) -> String {
    json!({
        "publicationId": "p",
        "topic": "platform-api-presence",
        "method": "PUT",
        "subject": format!("/presentities/{principal}"),
        "content": {"eventId": event_id, "timestamp": common::T0 + at, "presence": status, "note": ""},
    })
    .to_string()
}

async fn post(gateway: &Gateway, body: &str) -> reqwest::Response {
    gateway
        .client
        .post(gateway.url("/webhooks/mitel"))
        .header("x-notify-signature", sign(MITEL_KEY, body.as_bytes()))
        .body(body.to_owned())
        .send()
        .await
        .expect("post")
}

/// Waits (bounded) until `f` holds.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(gateway: &Gateway) {
    eventually("readiness", || async { gateway.readyz().await == 200 }).await;
}

async fn record(gateway: &Gateway, principal: &str) -> Option<Value> {
    let (status, body) = gateway
        .get(&format!("/v1/presence/mitel/{principal}"))
        .await;
    (status == 200).then_some(body)
}

/// Reads SSE events until `count` `presence` events arrived; returns their
/// `(id, data)`.
async fn read_events(response: reqwest::Response, count: usize) -> Vec<(u64, Value)> {
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while events.len() < count {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events in time")
            .expect("stream open")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            let mut kind = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse().ok();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).ok();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = Some(v.to_owned());
                }
            }
            assert_ne!(kind.as_deref(), Some("reset"), "unexpected reset: {frame}");
            if let (Some("presence"), Some(id), Some(data)) = (kind.as_deref(), id, data) {
                events.push((id, data));
            }
        }
    }
    events
}

async fn stream(gateway: &Gateway, query: &str, last_event_id: Option<u64>) -> reqwest::Response {
    let mut request = gateway
        .client
        .get(gateway.url(&format!("/v1/stream{query}")))
        .bearer_auth(TOKEN);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.expect("stream");
    assert_eq!(response.status(), 200);
    response
}

#[tokio::test]
async fn writes_on_one_replica_are_read_and_streamed_on_the_others_in_order() {
    let url = shared_url();
    let prefix = unique_prefix("fanout");
    let replicas = [
        Gateway::start(&redis_config(&url, &prefix, "gw-a")).await,
        Gateway::start(&redis_config(&url, &prefix, "gw-b")).await,
        Gateway::start(&redis_config(&url, &prefix, "gw-c")).await,
    ];
    for r in &replicas {
        ready(r).await;
    }
    // One live stream on C sees what every replica applies, in seq order.
    let live = stream(&replicas[2], "?snapshot=false", None).await;
    let mut sent = Vec::new();
    for i in 0..30 {
        let body = presence(
            &format!("p{}", i % 7),
            ["Busy", "Away", "Available"][i % 3],
            1_000 + i as i64,
            &format!("e{i}"),
        );
        let response = post(&replicas[i % 3], &body).await;
        assert_eq!(response.status(), 204);
        sent.push(i);
    }
    let events = read_events(live, 30).await;
    let ids: Vec<u64> = events.iter().map(|(id, _)| *id).collect();
    let first = ids[0];
    assert_eq!(
        ids,
        (first..first + 30).collect::<Vec<_>>(),
        "one global seq, in order"
    );
    // Every replica serves the same records.
    for i in 0..7 {
        let principal = format!("p{i}");
        let expected = record(&replicas[0], &principal).await;
        for r in &replicas[1..] {
            eventually("the same record on every replica", || async {
                record(r, &principal).await == expected
            })
            .await;
        }
    }
    for r in replicas {
        r.stop().await;
    }
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn a_retry_on_another_replica_is_a_duplicate() {
    let url = shared_url();
    let prefix = unique_prefix("dedup");
    let a = Gateway::start(&redis_config(&url, &prefix, "gw-a")).await;
    let b = Gateway::start(&redis_config(&url, &prefix, "gw-b")).await;
    ready(&a).await;
    ready(&b).await;
    let body = presence("ana", "Busy", 5_000, "evt-1");
    assert_eq!(post(&a, &body).await.status(), 204);
    // The retry carries another timestamp, as a redelivery may.
    let retry = presence("ana", "Away", 6_000, "evt-1");
    assert_eq!(post(&b, &retry).await.status(), 204);
    let sources = b.get("/v1/sources").await.1;
    assert_eq!(common::source_counter(&sources, "mitel", "duplicate"), 1);
    let on_b = record(&b, "ana").await.expect("record on b");
    assert_eq!(on_b["availability"], "busy");
    a.stop().await;
    b.stop().await;
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn a_consumer_resumes_on_another_replica_with_its_last_event_id() {
    let url = shared_url();
    let prefix = unique_prefix("resume");
    let a = Gateway::start(&redis_config(&url, &prefix, "gw-a")).await;
    let b = Gateway::start(&redis_config(&url, &prefix, "gw-b")).await;
    ready(&a).await;
    ready(&b).await;
    let on_a = stream(&a, "?snapshot=false", None).await;
    for i in 0..5 {
        post(
            &a,
            &presence(
                "u1",
                ["Busy", "Away"][i % 2],
                100 + i as i64,
                &format!("r{i}"),
            ),
        )
        .await;
    }
    let seen = read_events(on_a, 5).await;
    let last = seen[2].0;
    // It reconnects to B with the third id: exactly the last two follow.
    let on_b = stream(&b, "", Some(last)).await;
    let replay = read_events(on_b, 2).await;
    assert_eq!(
        replay.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![seen[3].0, seen[4].0]
    );
    // A change A has just made, resumed from on B at once (B's feed may not
    // have brought it yet): replayed, not a reset.
    for round in 0..20 {
        post(
            &a,
            &presence(
                "u2",
                ["Busy", "Away"][round % 2],
                1_000 + round as i64,
                &format!("q{round}"),
            ),
        )
        .await;
        let seq = record(&a, "u2").await.expect("u2 on a")["seq"]
            .as_u64()
            .unwrap();
        let on_b = stream(&b, "?principal=u2", Some(seq - 1)).await;
        let events = read_events(on_b, 1).await;
        assert_eq!(events[0].0, seq, "round {round}");
    }
    a.stop().await;
    b.stop().await;
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn while_redis_is_away_webhooks_get_503_and_reads_still_work_then_it_recovers() {
    let mut redis = PrivateRedis::start().await;
    let prefix = unique_prefix("outage");
    let gateway = Gateway::start(&redis_config(&redis.url(), &prefix, "gw-a")).await;
    ready(&gateway).await;
    assert_eq!(
        post(&gateway, &presence("x", "Busy", 1, "o1"))
            .await
            .status(),
        204
    );

    redis.stop().await;
    let body = presence("y", "Away", 2, "o2");
    let mut answer = post(&gateway, &body).await;
    // The first request may still find the connection open; the next ones
    // know.
    for _ in 0..20 {
        if answer.status() == 503 {
            break;
        }
        answer = post(&gateway, &body).await;
    }
    assert_eq!(answer.status(), 503);
    assert!(answer.headers().contains_key("retry-after"));
    assert_eq!(answer.headers()["content-type"], "application/problem+json");
    assert!(
        record(&gateway, "x").await.is_some(),
        "reads are served from the last known state"
    );
    assert!(
        record(&gateway, "y").await.is_none(),
        "nothing stored for a 503"
    );
    eventually("readyz 503", || async { gateway.readyz().await == 503 }).await;

    redis.start_again().await;
    eventually("recovery", || async {
        post(&gateway, &body).await.status() == 204
    })
    .await;
    ready(&gateway).await;
    let (x, y) = (
        record(&gateway, "x").await.unwrap(),
        record(&gateway, "y").await.unwrap(),
    );
    // This Redis keeps nothing across its restart; seq still never goes back.
    assert!(y["seq"].as_u64() > x["seq"].as_u64(), "{x} {y}");
    gateway.stop().await;
}

/// A NetSapiens API that keeps subscriptions and logs calls.
#[derive(Clone, Default)]
struct Provider(std::sync::Arc<parking_lot::Mutex<(Vec<Value>, Vec<String>)>>);

impl Provider {
    fn calls(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .1
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    fn ids(&self) -> Vec<String> {
        self.0
            .lock()
            .0
            .iter()
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect()
    }

    async fn serve(self) -> String {
        use axum::extract::{Path, State};
        use axum::routing::{get, put};
        async fn list(State(p): State<Provider>) -> axum::Json<Value> {
            let mut guard = p.0.lock();
            guard.1.push("GET".into());
            axum::Json(Value::Array(guard.0.clone()))
        }
        async fn create(
            State(p): State<Provider>,
            axum::Json(mut body): axum::Json<Value>,
        ) -> axum::Json<Value> {
            let mut guard = p.0.lock();
            guard.1.push("POST".into());
            body["id"] = json!(format!("sub-{}", guard.0.len() + 1));
            guard.0.push(body.clone());
            axum::Json(body)
        }
        async fn renew(
            State(p): State<Provider>,
            Path(id): Path<String>,
            axum::Json(body): axum::Json<Value>,
        ) -> axum::response::Response {
            use axum::response::IntoResponse;
            let mut guard = p.0.lock();
            guard.1.push(format!("PUT {id}"));
            match guard.0.iter_mut().find(|s| s["id"] == id.as_str()) {
                Some(s) => {
                    s["subscription-expires-datetime"] =
                        body["subscription-expires-datetime"].clone();
                    axum::Json(s.clone()).into_response()
                }
                None => axum::http::StatusCode::NOT_FOUND.into_response(),
            }
        }
        let app = axum::Router::new()
            .route("/ns-api/v2/subscriptions", get(list).post(create))
            .route("/ns-api/v2/subscriptions/{id}", put(renew))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }
}

fn managed_config(url: &str, prefix: &str, replica: &str, api_base: &str) -> String {
    redis_config(url, prefix, replica).replace(
        "[store]",
        &format!(
            r#"[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "{api_base}"

[sources.auth]
type = "bearer"
token = "tok-1"

[sources.subscription]
callback_url = "http://127.0.0.1:9/webhooks/ns"
lifetime_secs = 4
renew_before_secs = 2
model = "presence"
domain = "acme"

[store]"#
        ),
    )
}

async fn lease(gateway: &Gateway) -> Value {
    let sources = gateway.get("/v1/sources").await.1;
    sources["sources"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["id"] == "ns"))
        .map(|s| s["lease"].clone())
        .unwrap_or(Value::Null)
}

async fn post_ns(gateway: &Gateway, correlation: &str) -> u16 {
    let body = json!([{"user": "1001", "domain": "acme", "presence": "open", "time": "2026-11-24 10:00:00"}]).to_string();
    gateway
        .client
        .post(gateway.url("/webhooks/ns"))
        .header("x-correlation-id", correlation)
        .body(body)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

#[tokio::test]
async fn one_replica_manages_a_source_and_another_takes_over_without_a_second_subscription() {
    let url = shared_url();
    let prefix = unique_prefix("lease");
    let provider = Provider::default();
    let api = provider.clone().serve().await;
    let a = Gateway::start(&managed_config(&url, &prefix, "gw-a", &api)).await;
    ready(&a).await;
    eventually("A holds the lease", || async {
        lease(&a).await["held_here"] == true
    })
    .await;
    let b = Gateway::start(&managed_config(&url, &prefix, "gw-b", &api)).await;
    ready(&b).await;
    eventually("one subscription", || async { provider.ids().len() == 1 }).await;
    let id = provider.ids()[0].clone();
    assert_eq!(
        lease(&b).await,
        json!({"holder": "gw-a", "held_here": false})
    );
    // The replica that does not manage the source authenticates its posts.
    eventually("B accepts the subscription's id", || async {
        post_ns(&b, &id).await == 204
    })
    .await;
    assert_eq!(post_ns(&b, "not-a-subscription").await, 401);

    // A stops (releasing the lease); B takes over and renews the same
    // subscription instead of creating another.
    a.stop().await;
    eventually("B holds the lease", || async {
        lease(&b).await["held_here"] == true
    })
    .await;
    let renewals = provider.calls(&format!("PUT {id}"));
    eventually("B renews", || async {
        provider.calls(&format!("PUT {id}")) > renewals
    })
    .await;
    assert_eq!(provider.calls("POST"), 1, "no second subscription");
    assert_eq!(post_ns(&b, &id).await, 204);
    b.stop().await;
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn a_replica_started_before_its_redis_answers_503_and_becomes_ready_when_redis_is() {
    let mut redis = PrivateRedis::start().await;
    redis.stop().await;
    let prefix = unique_prefix("late");
    let gateway = Gateway::start(&redis_config(&redis.url(), &prefix, "gw-a")).await;
    // It serves (liveness) without its Redis, but is not ready and keeps
    // nothing.
    eventually("healthz", || async {
        gateway.get("/healthz").await.0 == 200
    })
    .await;
    assert_eq!(gateway.readyz().await, 503);
    let body = presence("z", "Busy", 1, "late-1");
    let answer = post(&gateway, &body).await;
    assert_eq!(answer.status(), 503);
    assert!(answer.headers().contains_key("retry-after"));
    redis.start_again().await;
    ready(&gateway).await;
    assert_eq!(post(&gateway, &body).await.status(), 204);
    assert!(record(&gateway, "z").await.is_some());
    gateway.stop().await;
}

/// Cuts every pub/sub connection of a private Redis: the gateway's change
/// feed resubscribes only after its backoff.
async fn cut_feed(redis: &PrivateRedis) {
    let mut admin = common::redis::connect(&redis.url()).await;
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .exec_async(&mut admin)
        .await
        .expect("CLIENT KILL");
}

/// A replica's mirror takes a write at once (a read right after the answer
/// sees it) while the change reaches its change log through the feed: a
/// stream opened in between must not get the change twice, once in the
/// snapshot and again live (the feed here is cut and resubscribes after its
/// backoff, so the gap is wide).
#[tokio::test]
async fn a_snapshot_taken_before_the_feed_caught_up_repeats_nothing() {
    let redis = PrivateRedis::start().await;
    let prefix = unique_prefix("snapshot");
    let gateway = Gateway::start(&redis_config(&redis.url(), &prefix, "gw-a")).await;
    ready(&gateway).await;
    cut_feed(&redis).await;
    assert_eq!(
        post(&gateway, &presence("u1", "Busy", 1, "s1"))
            .await
            .status(),
        204
    );
    let events = stream(&gateway, "?principal=u1", None).await;
    assert_eq!(
        post(&gateway, &presence("u1", "Away", 2, "s2"))
            .await
            .status(),
        204
    );
    let got = read_events(events, 2).await;
    assert_eq!(
        got.iter()
            .map(|(id, data)| (*id, data["availability"].as_str().unwrap_or_default()))
            .collect::<Vec<_>>(),
        [(1, "busy"), (2, "away")]
    );
    gateway.stop().await;
}

/// `seq` never goes back, also for a write whose change had not yet reached
/// this replica's change log when Redis lost everything (the feed is cut
/// first so that it cannot deliver it in time).
#[tokio::test]
async fn seq_never_goes_back_after_redis_loses_a_write_the_feed_had_not_delivered() {
    let mut redis = PrivateRedis::start().await;
    let prefix = unique_prefix("lost");
    let gateway = Gateway::start(&redis_config(&redis.url(), &prefix, "gw-a")).await;
    ready(&gateway).await;
    cut_feed(&redis).await;
    assert_eq!(
        post(&gateway, &presence("x", "Busy", 1, "l1"))
            .await
            .status(),
        204
    );
    // Redis restarts without its data before the feed is back.
    redis.start_again().await;
    let body = presence("y", "Away", 2, "l2");
    eventually("recovery", || async {
        post(&gateway, &body).await.status() == 204
    })
    .await;
    let (x, y) = (
        record(&gateway, "x").await.unwrap(),
        record(&gateway, "y").await.unwrap(),
    );
    assert!(y["seq"].as_u64() > x["seq"].as_u64(), "{x} {y}");
    gateway.stop().await;
}

/// Two replicas with one people file: Ana's softphone changes on one
/// replica while her desk phone changes on the other, at once. Each
/// replica's person stream gets the person events of both through the
/// feed, numbered from the one `seq`, and both replicas end with a record
/// derived from both identities (DESIGN §8, §9).
#[tokio::test]
async fn person_events_of_any_replica_reach_every_replica_derived_from_every_identity() {
    let url = shared_url();
    let prefix = unique_prefix("people");
    let dir = std::env::temp_dir().join(unique_prefix("people-file"));
    std::fs::create_dir_all(&dir).expect("people dir");
    let file = dir.join("people.toml");
    std::fs::write(
        &file,
        "[[person]]\nid = \"ana\"\nname = \"Ana\"\nidentities = [\
         { source = \"mitel\", principal = \"ana-soft\" }, \
         { source = \"desk\", principal = \"ana-desk\" }]\n",
    )
    .expect("people file");
    let config = |replica: &str| {
        format!(
            "{}\n[[sources]]\nid = \"desk\"\nkind = \"mitel\"\nsigning_keys = [\"{MITEL_KEY}\"]\n\n\
             [people]\nfile = \"{}\"\n",
            redis_config(&url, &prefix, replica),
            file.display()
        )
    };
    let (a, b) = (
        Gateway::start(&config("gw-a")).await,
        Gateway::start(&config("gw-b")).await,
    );
    for r in [&a, &b] {
        ready(r).await;
        eventually("the people mapping", || async {
            r.get("/v1/people/ana").await.0 == 200
        })
        .await;
    }
    let mut on_a = common::sse::Client::open(&a, "?person=ana&snapshot=false", None).await;
    let mut on_b = common::sse::Client::open(&b, "?person=ana&snapshot=false", None).await;
    let event = |principal: &str, status: &str, at: i64| {
        json!({"topic": "platform-api-presence",
            "subject": format!("/presentities/{principal}"),
            "content": {"presence": status, "timestamp": common::T0 + at,
                        "eventId": format!("{principal}-{at}")}})
        .to_string()
    };
    let (soft, desk) = (
        event("ana-soft", "Busy", 1_000),
        event("ana-desk", "DoNotDisturb", 1_001),
    );
    tokio::join!(
        a.post_signed("mitel", MITEL_KEY, &soft),
        b.post_signed("desk", MITEL_KEY, &desk),
    );
    for r in [&a, &b] {
        eventually("ana derived from both identities", || async {
            let (_, ana) = r.get("/v1/people/ana").await;
            ana["availability"] == "do_not_disturb"
                && ana["decided_by"]["source"] == "desk"
                && ana["sources"].as_array().map(Vec::len) == Some(2)
        })
        .await;
    }
    // Both streams carry the same person events, ending with that record.
    let last = |events: &[common::sse::Sse]| events.last().map(|e| e.data.clone());
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    while last(&seen_a).is_none_or(|d| d["availability"] != "do_not_disturb") {
        seen_a.push(on_a.next().await.expect("a person event on A"));
    }
    while seen_b.len() < seen_a.len() {
        seen_b.push(on_b.next().await.expect("a person event on B"));
    }
    assert_eq!(seen_a, seen_b, "the same events on both replicas");
    assert!(seen_a.iter().all(|e| e.event == "person"));
    let ids: Vec<u64> = seen_a.iter().filter_map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let (_, ana) = a.get("/v1/people/ana").await;
    assert_eq!(Some(ana["seq"].as_u64().unwrap()), ids.last().copied());
    for r in [a, b] {
        r.stop().await;
    }
    cleanup(&url, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}
