//! `store.max_records`: beyond it, events of new principals are refused with
//! 503 + `Retry-After` (never 204 for what was not kept), counted, and
//! logged at most once a minute; known principals are still updated. Its
//! own test binary, because it installs a process-wide log subscriber to
//! read that line. Runs on every backend (`PG_TEST_STORE`).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Gateway, MITEL_KEY, T0, assert_problem, metric_value, sign};
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn presence(principal: &str, status: &str, at: i64) -> String {
    json!({"topic": "platform-api-presence", "subject": format!("/presentities/{principal}"),
           "content": {"presence": status, "timestamp": T0 + at, "eventId": format!("{principal}-{at}")}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_principals_beyond_max_records_get_503_and_known_ones_still_update() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter("presence_gateway=info")
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();

    let gw = Gateway::start(&common::mitel_config("[store]\nmax_records = 2\n")).await;
    for principal in ["a", "b"] {
        gw.post_signed("mitel", MITEL_KEY, &presence(principal, "Busy", 1))
            .await;
    }
    for (i, principal) in ["c", "d", "c"].into_iter().enumerate() {
        let before = gw.snapshot().await;
        let body = presence(principal, "Busy", 1);
        let response = gw
            .post_webhook(
                "mitel",
                body.clone(),
                Some(&sign(MITEL_KEY, body.as_bytes())),
            )
            .await;
        assert_eq!(response.headers()["retry-after"], "60");
        let problem = assert_problem(response, 503).await;
        assert_eq!(problem["type"], "urn:presence-gateway:problem:store-full");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("store.max_records"), "{detail}");
        let after = gw.snapshot().await;
        assert_eq!(after.records, before.records, "{principal}: stored");
        assert_eq!(after.last_seq, before.last_seq);
        assert_eq!(
            gw.counter("mitel", "rejected.store_full").await,
            i as u64 + 1
        );
        assert_eq!(
            gw.get(&format!("/v1/presence/mitel/{principal}")).await.0,
            404
        );
    }
    // Known principals are still updated.
    gw.post_signed("mitel", MITEL_KEY, &presence("a", "Away", 2))
        .await;
    assert_eq!(
        gw.get("/v1/presence/mitel/a").await.1["availability"],
        "away"
    );

    let text = gw
        .client
        .get(gw.url("/metrics"))
        .header("accept", "text/plain; version=0.0.4")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, value) in [
        ("presence_gateway_store_max_records", 2.0),
        ("presence_gateway_store_records_held", 2.0),
        ("presence_gateway_store_refused_principals_total", 3.0),
    ] {
        assert_eq!(metric_value(&text, name), Some(value), "{name} in\n{text}");
    }
    assert!(text.contains(
        "presence_gateway_webhook_rejections_total{source=\"mitel\",reason=\"store_full\"} 3"
    ));
    gw.stop().await;

    // One clear line for the three refusals, naming the key.
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let full: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("the store is full"))
        .collect();
    assert_eq!(full.len(), 1, "{logs}");
    assert!(full[0].contains("WARN") && full[0].contains("store.max_records"));
    assert!(full[0].contains("max_records=2"), "{}", full[0]);
}
