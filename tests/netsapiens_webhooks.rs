//! Black-box tests of NetSapiens ingestion: correlation-id authentication,
//! the presence and call models, geo duplicates, and every bad input.

mod common;

use common::{Gateway, TOKEN, assert_problem, fixture};
use serde_json::{Value, json};

/// The subscription id of the fixtures (tests/fixtures/keys.toml).
const SUBSCRIPTION: &str = "sub-7d1f0c52-4b1e-4f0e-9a55-0e5b2f0a8c31";
const CALL_SUBSCRIPTION: &str = "sub-calls-0b3e";

fn config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 4096

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "ns"
kind = "netsapiens"
correlation_ids = ["{SUBSCRIPTION}", {{ id = "{CALL_SUBSCRIPTION}", model = "call" }}]
{extra}
"#
    )
}

async fn post(gw: &Gateway, source: &str, id: Option<&str>, body: &str) -> reqwest::Response {
    let mut request = gw
        .client
        .post(gw.url(&format!("/webhooks/{source}")))
        .body(body.to_owned());
    if let Some(id) = id {
        request = request.header("X-Correlation-ID", id);
    }
    request.send().await.expect("post")
}

async fn record(gw: &Gateway, principal: &str) -> Value {
    let (status, record) = gw.get(&format!("/v1/presence/ns/{principal}")).await;
    assert_eq!(status, 200, "{principal}: {record}");
    record
}

#[tokio::test]
async fn presence_fixture_end_to_end() {
    let gw = Gateway::start(&config("")).await;
    let response = post(
        &gw,
        "ns",
        Some(SUBSCRIPTION),
        &fixture("netsapiens-presence.json"),
    )
    .await;
    assert_eq!(response.status(), 204);

    let ada = record(&gw, "1001@acme.example").await;
    assert_eq!(ada["availability"], "available");
    assert_eq!(ada["raw_status"], "open");
    assert_eq!(ada["observed_at"], "2026-11-24T10:15:30.000Z");
    let alan = record(&gw, "1002@acme.example").await;
    assert_eq!(alan["availability"], "busy");
    assert_eq!(alan["status_text"], "On the phone");
    assert_eq!(gw.counter("ns", "changed").await, 2);
    let (_, sources) = gw.get("/v1/sources").await;
    assert_eq!(sources["sources"][0]["kind"], "netsapiens");
    assert!(
        !sources.to_string().contains(SUBSCRIPTION),
        "subscription ids are secrets"
    );
}

#[tokio::test]
async fn geo_duplicates_are_applied_once() {
    let gw = Gateway::start(&config("")).await;
    let body = fixture("netsapiens-presence.json");
    for _ in 0..2 {
        // Two servers of the cluster post the same objects.
        assert_eq!(
            post(&gw, "ns", Some(SUBSCRIPTION), &body).await.status(),
            204
        );
    }
    assert_eq!(gw.counter("ns", "changed").await, 2);
    assert_eq!(gw.counter("ns", "duplicate").await, 2);
    assert_eq!(record(&gw, "1002@acme.example").await["seq"], 2);
}

#[tokio::test]
async fn calls_set_and_restore_activity_by_subscription_model() {
    let gw = Gateway::start(&config("")).await;
    let presence = json!([{"user": "1001", "domain": "acme.example", "presence": "open",
                           "message": "", "time": "2026-11-24 10:00:00"}]);
    let response = post(&gw, "ns", Some(SUBSCRIPTION), &presence.to_string()).await;
    assert_eq!(response.status(), 204);

    let calls: Vec<Value> = serde_json::from_str(&fixture("netsapiens-call.json")).unwrap();
    let (start, end) = (json!([calls[0]]), json!([calls[1]]));
    // The call subscription's id makes these call objects.
    let response = post(&gw, "ns", Some(CALL_SUBSCRIPTION), &start.to_string()).await;
    assert_eq!(response.status(), 204);
    let ada = record(&gw, "1001@acme.example").await;
    assert_eq!(ada["activity"], "in_a_call");
    assert_eq!(ada["availability"], "available", "presence is kept");
    // The other party had no presence yet: a record with unknown availability.
    let alan = record(&gw, "1002@acme.example").await;
    assert_eq!(
        (alan["availability"].as_str(), alan["activity"].as_str()),
        (Some("unknown"), Some("in_a_call"))
    );

    // The same start again (failover) changes nothing a consumer sees.
    let seqs = |records: Vec<Value>| {
        records
            .iter()
            .map(|r| {
                (
                    r["principal"].clone(),
                    r["seq"].clone(),
                    r["activity"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = gw.snapshot().await;
    let response = post(&gw, "ns", Some(CALL_SUBSCRIPTION), &start.to_string()).await;
    assert_eq!(response.status(), 204);
    let after = gw.snapshot().await;
    assert_eq!(seqs(after.records), seqs(before.records));
    assert_eq!(after.last_seq, before.last_seq);

    let response = post(&gw, "ns", Some(CALL_SUBSCRIPTION), &end.to_string()).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        record(&gw, "1001@acme.example").await["activity"],
        Value::Null
    );
    assert_eq!(
        record(&gw, "1002@acme.example").await["activity"],
        Value::Null
    );

    // Posted with the presence subscription's id, a call object is a
    // presence object without a status: a bad payload.
    let response = post(&gw, "ns", Some(SUBSCRIPTION), &start.to_string()).await;
    assert_problem(response, 400).await;
}

#[tokio::test]
async fn other_models_are_acknowledged_and_counted_as_ignored() {
    let text = format!(
        "{}\n[[sources]]\nid = \"ns-cdr\"\nkind = \"netsapiens\"\nmodel = \"cdr\"\ncorrelation_ids = [\"sub-cdr\"]\n",
        config("")
    );
    let gw = Gateway::start(&text).await;
    let response = post(
        &gw,
        "ns-cdr",
        Some("sub-cdr"),
        r#"[{"cdr_id":"1"},{"cdr_id":"2"}]"#,
    )
    .await;
    assert_eq!(response.status(), 204);
    assert_eq!(gw.counter("ns-cdr", "ignored").await, 2);
    assert!(gw.snapshot().await.records.is_empty());
}

#[tokio::test]
async fn bad_requests_get_their_status_and_change_nothing() {
    let gw = Gateway::start(&config("")).await;
    post(
        &gw,
        "ns",
        Some(SUBSCRIPTION),
        &fixture("netsapiens-presence.json"),
    )
    .await;
    let good = r#"[{"user":"1003","domain":"acme.example","presence":"away"}]"#;
    let cases: [(Option<&str>, String, u16, &str); 8] = [
        (None, good.into(), 401, "signature_missing"),
        (Some(""), good.into(), 401, "signature_missing"),
        (Some("sub-unknown"), good.into(), 401, "signature_mismatch"),
        (
            Some("has spaces in it"),
            good.into(),
            401,
            "signature_malformed",
        ),
        (
            Some(SUBSCRIPTION),
            r#"{"user":"1003","domain":"acme.example","presence":"away"}"#.into(),
            400,
            "bad_payload",
        ),
        (
            Some(SUBSCRIPTION),
            format!(r#"[{}, "not an object"]"#, &good[1..good.len() - 1]),
            400,
            "bad_payload",
        ),
        (
            Some(SUBSCRIPTION),
            r#"[{"user":["1003"],"domain":"d","presence":"away"}]"#.into(),
            400,
            "bad_payload",
        ),
        (Some(SUBSCRIPTION), "[{".into(), 400, "bad_payload"),
    ];
    for (id, body, status, reason) in cases {
        let before = gw.snapshot().await;
        let rejected_before = gw.counter("ns", &format!("rejected.{reason}")).await;
        let response = post(&gw, "ns", id, &body).await;
        let problem = assert_problem(response, status).await;
        assert!(
            !problem.to_string().contains(SUBSCRIPTION),
            "no secret in {problem}"
        );
        let after = gw.snapshot().await;
        assert_eq!(after.records, before.records, "{body}");
        assert_eq!(after.last_seq, before.last_seq, "{body}");
        assert_eq!(
            gw.counter("ns", &format!("rejected.{reason}")).await,
            rejected_before + 1,
            "{body}"
        );
    }
    assert_eq!(gw.counter("ns", "received").await, 2, "only the first post");
    assert_eq!(gw.get("/v1/presence/ns/1003@acme.example").await.0, 404);
}

#[tokio::test]
async fn allow_ips_is_checked_before_the_correlation_id() {
    let gw = Gateway::start(&config(r#"allow_ips = ["198.51.100.0/24"]"#)).await;
    let before = gw.snapshot().await;
    let response = post(
        &gw,
        "ns",
        Some(SUBSCRIPTION),
        &fixture("netsapiens-presence.json"),
    )
    .await;
    assert_problem(response, 403).await;
    assert_eq!(gw.counter("ns", "rejected.ip_not_allowed").await, 1);
    assert_eq!(gw.snapshot().await.records, before.records);
}
