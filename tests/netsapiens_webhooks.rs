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

/// Posts `body` with the subscription id; when `status` is 400, asserts a
/// problem of `kind` and that nothing changed but the bad_payload counter.
async fn post_expecting(gw: &Gateway, id: &str, name: &str, body: String, status: u16, kind: &str) {
    let before = gw.snapshot().await;
    let rejected = gw.counter("ns", "rejected.bad_payload").await;
    let response = post(gw, "ns", Some(id), &body).await;
    if status != 400 {
        assert_eq!(response.status().as_u16(), status, "{name}");
        return;
    }
    let problem = assert_problem(response, 400).await;
    assert_eq!(
        problem["type"],
        format!("urn:presence-gateway:problem:{kind}"),
        "{name}: {problem}"
    );
    let after = gw.snapshot().await;
    assert_eq!(after.records, before.records, "{name}: records changed");
    assert_eq!(after.last_seq, before.last_seq, "{name}: seq changed");
    assert_eq!(
        gw.counter("ns", "rejected.bad_payload").await,
        rejected + 1,
        "{name}"
    );
    assert_eq!(
        gw.counter("ns", "received").await,
        common::source_counter(&before.sources, "ns", "received"),
        "{name}"
    );
}

/// DESIGN §2's documented maximum lengths (README), for NetSapiens posts:
/// an object with a longer field rejects the whole post (400), and nothing
/// of it is stored.
#[tokio::test]
async fn fields_longer_than_documented_are_400_and_change_nothing() {
    let gw =
        Gateway::start(&config("").replace("body_limit_bytes = 4096", "body_limit_bytes = 65536"))
            .await;
    let object = |user: &str, presence: &str, message: &str| {
        json!({"user": user, "domain": "acme.example", "presence": presence,
               "message": message, "time": "2025-01-01 00:00:00"})
    };
    let one = |o: Value| json!([o]).to_string();
    let n = |count: usize| "x".repeat(count);
    // "@acme.example" is 13 bytes.
    let cases = [
        (
            "principal at 256 bytes",
            one(object(&n(243), "open", "")),
            204,
        ),
        (
            "principal of 257 bytes",
            one(object(&n(244), "open", "")),
            400,
        ),
        (
            "status word at 64 bytes",
            one(object("1010", &n(64), "")),
            204,
        ),
        (
            "status word of 65 bytes",
            one(object("1010", &n(65), "")),
            400,
        ),
        (
            "status text at 4096 bytes",
            one(object("1011", "open", &n(4096))),
            204,
        ),
        (
            "status text of 4097 bytes",
            one(object("1011", "open", &n(4097))),
            400,
        ),
        (
            "a good object, then a long one",
            json!([object("1012", "open", ""), object(&n(300), "open", "")]).to_string(),
            400,
        ),
    ];
    for (name, body, status) in cases {
        post_expecting(&gw, SUBSCRIPTION, name, body, status, "field-too-long").await;
    }
    assert_eq!(gw.get("/v1/presence/ns/1012@acme.example").await.0, 404);
    let call = json!([{"orig_callid": n(257), "orig_user": "1001", "orig_domain": "acme.example"}]);
    post_expecting(
        &gw,
        CALL_SUBSCRIPTION,
        "call id of 257 bytes",
        call.to_string(),
        400,
        "field-too-long",
    )
    .await;
    let record = record(&gw, &format!("{}@acme.example", n(243))).await;
    assert_eq!(record["availability"], "available");
}

/// DESIGN §2 for NetSapiens `time`: epoch values with a sign, a fraction or
/// beyond 64 bits are 400 (nothing stored); times before 2000 or far ahead
/// are applied with the receive time and counted as clock_skew.
#[tokio::test]
async fn provider_times_are_read_strictly_and_trusted_from_2000_to_the_clock() {
    let gw = Gateway::start(&config("")).await;
    // The time as JSON text.
    let cases: [(&str, &str, u16); 12] = [
        ("negative epoch ms", "-1764000930123", 400),
        ("negative epoch ms, as text", r#""-1764000930123""#, 400),
        ("fractional epoch ms", "1764000930123.5", 400),
        ("fractional epoch ms, as text", r#""1764000930123.5""#, 400),
        ("beyond 64 bits", "99999999999999999999", 400),
        ("zero (1970)", "0", 204),
        ("1999", r#""1999-12-31 23:59:59""#, 204),
        ("year 0000", r#""0000-01-01 00:00:00""#, 204),
        ("the largest 64-bit value", "9223372036854775807", 204),
        ("2999", r#""2999-01-01 00:00:00""#, 204),
        ("RFC 3339 in 9998", r#""9998-12-31T23:59:59Z""#, 204),
        (
            "RFC 3339 at the end of 9999",
            r#""9999-12-31T23:59:59Z""#,
            400,
        ),
    ];
    for (i, (name, time, status)) in cases.into_iter().enumerate() {
        let user = format!("20{i:02}");
        let principal = format!("{user}@acme.example");
        let skewed = gw.counter("ns", "clock_skew").await;
        let body = format!(
            r#"[{{"user":"{user}","domain":"acme.example","presence":"open","message":"","time":{time}}}]"#
        );
        post_expecting(&gw, SUBSCRIPTION, name, body, status, "bad-payload").await;
        if status == 400 {
            assert_eq!(
                gw.get(&format!("/v1/presence/ns/{principal}")).await.0,
                404,
                "{name}"
            );
            continue;
        }
        let record = record(&gw, &principal).await;
        assert_eq!(
            record["observed_at"], record["received_at"],
            "{name}: {record}"
        );
        for field in ["observed_at", "received_at"] {
            let text = record[field].as_str().unwrap_or_default();
            assert!(
                presence_gateway::presence::Millis::parse_rfc3339(text).is_some(),
                "{name}: {field} {text:?} is not RFC 3339"
            );
        }
        assert_eq!(gw.counter("ns", "clock_skew").await, skewed + 1, "{name}");
    }
}
