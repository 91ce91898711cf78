//! Black-box tests of Standard Webhooks ingestion (`kind = "standard"`):
//! requests signed by the reference library, rotation, dedup across
//! re-signing, the timestamp tolerance on both sides, event types, a custom
//! schema by configuration, and every bad input.
//!
//! `webhook-timestamp` is checked against the gateway's clock, so requests
//! are signed at the current time (offsets of a few minutes around it);
//! nothing depends on the date. Body timestamps are fixed ([`common::T0`]).

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Gateway, TOKEN, assert_problem, bump, fixture};
use presence_gateway::verify::standard::{decode_secret, sign};
use serde_json::json;

/// The Standard Webhooks secret of the fixtures (tests/fixtures/keys.toml).
const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A second secret, for rotation.
const OLD_KEY: &str = "whsec_b2xkLXZlbmRvci1rZXktZm9yLXJvdGF0aW9u";

/// A config with one `standard` source `vendor` and whatever `extra` adds.
fn config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 4096

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "vendor"
kind = "standard"
signing_keys = ["{KEY}"]
{extra}
"#
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The three headers of a request, as sent (`None`: left out).
#[derive(Clone, Debug)]
struct Headers {
    id: Option<String>,
    timestamp: Option<String>,
    signature: Option<String>,
}

impl Headers {
    /// Signed with `key` (a `whsec_` secret) for `id` at `timestamp`.
    fn signed(key: &str, id: &str, timestamp: i64, body: &str) -> Headers {
        let key = decode_secret(key.as_bytes()).expect("test key");
        Headers {
            id: Some(id.to_owned()),
            timestamp: Some(timestamp.to_string()),
            signature: Some(sign(&key, id, timestamp, body.as_bytes())),
        }
    }
}

async fn post(gw: &Gateway, source: &str, headers: &Headers, body: &str) -> reqwest::Response {
    let mut request = gw
        .client
        .post(gw.url(&format!("/webhooks/{source}")))
        .body(body.to_owned());
    for (name, value) in [
        ("webhook-id", &headers.id),
        ("webhook-timestamp", &headers.timestamp),
        ("webhook-signature", &headers.signature),
    ] {
        if let Some(value) = value {
            request = request.header(name, value);
        }
    }
    request.send().await.expect("webhook request")
}

/// Posts `body` signed with [`KEY`] now, and asserts 204.
async fn post_ok(gw: &Gateway, id: &str, body: &str) {
    let headers = Headers::signed(KEY, id, now(), body);
    let response = post(gw, "vendor", &headers, body).await;
    let status = response.status();
    assert_eq!(status, 204, "{}", response.text().await.unwrap_or_default());
}

/// A presence event for `user` with `status`, changed `at` ms after T0.
fn event(user: &str, status: &str, at: i64) -> String {
    json!({
        "type": "presence.updated",
        "timestamp": "2025-01-01T00:00:00Z",
        "data": {"user_id": user, "status": status, "message": format!("{status} now"),
                 "changed_at": common::T0 + at},
    })
    .to_string()
}

#[tokio::test]
async fn requests_signed_by_the_reference_library_are_accepted() {
    let gw = Gateway::start(&config("")).await;
    let reference = standardwebhooks::Webhook::new(KEY).expect("reference key");
    // The fixture, with a fixed body time instead of its date.
    let body =
        fixture("standard-presence.json").replace("2026-11-24T10:15:30Z", "2025-01-01T00:00:30Z");
    let id = "msg_2ZbWpFJ1x3kU8rYq5Tq0dE6mHvA";
    let timestamp = now();
    let signature = reference
        .sign(id, timestamp, body.as_bytes())
        .expect("reference signature");
    let headers = Headers {
        id: Some(id.into()),
        timestamp: Some(timestamp.to_string()),
        signature: Some(signature),
    };
    let response = post(&gw, "vendor", &headers, &body).await;
    assert_eq!(
        response.status(),
        204,
        "{}",
        response.text().await.unwrap_or_default()
    );

    let (status, record) = gw.get("/v1/presence/vendor/u-4411").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["source"], "vendor");
    assert_eq!(record["availability"], "away");
    assert_eq!(record["raw_status"], "away");
    assert_eq!(record["status_text"], "back at 3");
    assert_eq!(record["observed_at"], "2025-01-01T00:00:30.000Z");
    assert_eq!(gw.counter("vendor", "changed").await, 1);

    // The same message delivered again by the library (a retry, signed
    // anew a few seconds later) is a duplicate.
    let retry = Headers {
        timestamp: Some((timestamp + 7).to_string()),
        signature: Some(reference.sign(id, timestamp + 7, body.as_bytes()).unwrap()),
        ..headers
    };
    assert_eq!(post(&gw, "vendor", &retry, &body).await.status(), 204);
    assert_eq!(gw.counter("vendor", "duplicate").await, 1);

    // The other direction: the reference library verifies what the
    // gateway's own signer (the `sign --standard` subcommand) produces.
    let ours = Headers::signed(KEY, "msg_other", now(), &body);
    let mut map = http::HeaderMap::new();
    map.insert("webhook-id", ours.id.unwrap().parse().unwrap());
    map.insert(
        "webhook-timestamp",
        ours.timestamp.unwrap().parse().unwrap(),
    );
    map.insert(
        "webhook-signature",
        ours.signature.unwrap().parse().unwrap(),
    );
    reference
        .verify(body.as_bytes(), &map)
        .expect("the reference library accepts the gateway's signature");
    gw.stop().await;
}

#[tokio::test]
async fn a_signature_list_with_other_versions_and_old_keys_is_accepted() {
    let gw = Gateway::start(&config("")).await;
    let body = event("u-list", "busy", 1_000);
    let good = Headers::signed(KEY, "msg_list", now(), &body);
    let stranger = Headers::signed(OLD_KEY, "msg_list", now(), &body);
    let v1 = good.signature.clone().unwrap();
    let list = format!(
        "v1a,{} {} v2,{} {v1}",
        "A".repeat(86),
        stranger.signature.unwrap(),
        &v1[3..]
    );
    let headers = Headers {
        signature: Some(list),
        ..good
    };
    assert_eq!(post(&gw, "vendor", &headers, &body).await.status(), 204);
    assert_eq!(
        gw.get("/v1/presence/vendor/u-list").await.1["availability"],
        "busy"
    );
}

#[tokio::test]
async fn rotated_keys_verify_until_removed() {
    let rotating = format!(
        r#"
[[sources]]
id = "rotating"
kind = "standard"
signing_keys = ["{KEY}", "{OLD_KEY}"]
"#
    );
    let gw = Gateway::start(&config(&rotating)).await;
    let first = event("u-rot", "available", 1_000);
    let headers = Headers::signed(KEY, "msg_r1", now(), &first);
    assert_eq!(post(&gw, "rotating", &headers, &first).await.status(), 204);
    let second = event("u-rot", "away", 2_000);
    let headers = Headers::signed(OLD_KEY, "msg_r2", now(), &second);
    assert_eq!(post(&gw, "rotating", &headers, &second).await.status(), 204);
    assert_eq!(
        gw.get("/v1/presence/rotating/u-rot").await.1["availability"],
        "away"
    );
    gw.stop().await;

    // The old key removed: its signatures are refused.
    let rotated = format!(
        r#"
[[sources]]
id = "rotating"
kind = "standard"
signing_keys = ["{KEY}"]
"#
    );
    let gw = Gateway::start(&config(&rotated)).await;
    let third = event("u-rot2", "busy", 3_000);
    let headers = Headers::signed(OLD_KEY, "msg_r3", now(), &third);
    assert_problem(post(&gw, "rotating", &headers, &third).await, 401).await;
    assert_eq!(gw.get("/v1/presence/rotating/u-rot2").await.0, 404);
    assert_eq!(
        gw.counter("rotating", "rejected.signature_mismatch").await,
        1
    );
}

#[tokio::test]
async fn a_retry_is_a_duplicate_even_resigned_with_another_timestamp_or_body() {
    let gw = Gateway::start(&config("")).await;
    let body = event("u-dup", "busy", 1_000);
    let sent_at = now();
    let headers = Headers::signed(KEY, "msg_dup", sent_at, &body);
    assert_eq!(post(&gw, "vendor", &headers, &body).await.status(), 204);
    let before = gw.snapshot().await;
    // The sender's retry: same message id, new timestamp, new signature;
    // even a body that would change the record is not applied again.
    for (offset, body) in [(30, body.clone()), (60, event("u-dup", "away", 5_000))] {
        let headers = Headers::signed(KEY, "msg_dup", sent_at + offset, &body);
        assert_eq!(post(&gw, "vendor", &headers, &body).await.status(), 204);
    }
    let after = gw.snapshot().await;
    assert_eq!(after.records, before.records);
    assert_eq!(after.last_seq, before.last_seq);
    assert_eq!(gw.counter("vendor", "duplicate").await, 2);
    // Another message id is a new event.
    let body = event("u-dup", "away", 5_000);
    post_ok(&gw, "msg_dup_2", &body).await;
    assert_eq!(
        gw.get("/v1/presence/vendor/u-dup").await.1["availability"],
        "away"
    );
}

#[tokio::test]
async fn the_tolerance_holds_on_both_sides() {
    let gw = Gateway::start(&config("")).await;
    // Default tolerance 300 s: 5 s inside is accepted, 5 s outside is not.
    for (n, offset) in [-295i64, 295].into_iter().enumerate() {
        let body = event(&format!("u-in-{n}"), "busy", 1_000);
        let headers = Headers::signed(KEY, &format!("msg_in_{n}"), now() + offset, &body);
        let response = post(&gw, "vendor", &headers, &body).await;
        assert_eq!(response.status(), 204, "offset {offset}");
    }
    for (n, offset) in [-305i64, 305].into_iter().enumerate() {
        let body = event(&format!("u-out-{n}"), "busy", 1_000);
        let headers = Headers::signed(KEY, &format!("msg_out_{n}"), now() + offset, &body);
        let problem = assert_problem(post(&gw, "vendor", &headers, &body).await, 401).await;
        assert_eq!(
            problem["type"], "urn:presence-gateway:problem:signature-expired",
            "offset {offset}"
        );
        assert_eq!(
            gw.get(&format!("/v1/presence/vendor/u-out-{n}")).await.0,
            404
        );
    }
    assert_eq!(gw.counter("vendor", "rejected.signature_expired").await, 2);
    gw.stop().await;

    // A configured tolerance moves the edges.
    let narrow = config("tolerance_secs = 60\n");
    let gw = Gateway::start(&narrow).await;
    let body = event("u-narrow", "busy", 1_000);
    let inside = Headers::signed(KEY, "msg_n1", now() - 55, &body);
    assert_eq!(post(&gw, "vendor", &inside, &body).await.status(), 204);
    let outside = Headers::signed(KEY, "msg_n2", now() + 65, &body);
    assert_problem(post(&gw, "vendor", &outside, &body).await, 401).await;
}

#[tokio::test]
async fn other_event_types_are_acknowledged_and_ignored() {
    let all_types = r#"
[[sources]]
id = "everything"
kind = "standard"
signing_keys = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
event_types = []
"#;
    let gw = Gateway::start(&config(all_types)).await;
    let invoice = json!({"type": "invoice.paid", "data": {"amount": 3}}).to_string();
    let before = gw.snapshot().await;
    post_ok(&gw, "msg_inv", &invoice).await;
    let after = gw.snapshot().await;
    assert_eq!(after.records, before.records);
    assert_eq!(gw.counter("vendor", "ignored").await, 1);
    assert_eq!(gw.counter("vendor", "received").await, 1);

    // With event_types = [] every event is presence, typed or not.
    let untyped = json!({"data": {"user_id": "u-any", "status": "busy"}}).to_string();
    let headers = Headers::signed(KEY, "msg_any", now(), &untyped);
    assert_eq!(
        post(&gw, "everything", &headers, &untyped).await.status(),
        204
    );
    assert_eq!(
        gw.get("/v1/presence/everything/u-any").await.1["availability"],
        "busy"
    );
}

#[tokio::test]
async fn a_custom_schema_by_configuration() {
    let custom = r#"
[[sources]]
id = "contact-center"
kind = "standard"
signing_keys = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
event_types = ["agent.state_changed", "agent.logged_out"]
[sources.fields]
type = "/event"
principal = ["/payload/agent/email", "/payload/agent/id"]
status = "/payload/state/code"
activity = "/payload/state/reason"
note = "/payload/state/label"
timestamp = "/payload/at"
[sources.status_map]
on_call = "busy"
wrap_up = "busy"
ready = "available"
logged_out = "offline"
"#;
    let gw = Gateway::start(&config(custom)).await;
    let body = json!({
        "event": "agent.state_changed",
        "payload": {
            "agent": {"id": 7, "email": "ana@example.com"},
            "state": {"code": "ON_CALL", "reason": "InboundCall", "label": "Line 2"},
            "at": common::T0 + 1_000,
        }
    })
    .to_string();
    let headers = Headers::signed(KEY, "evt_1", now(), &body);
    assert_eq!(
        post(&gw, "contact-center", &headers, &body).await.status(),
        204
    );
    let (status, record) = gw.get("/v1/presence/contact-center/ana@example.com").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["availability"], "busy");
    assert_eq!(record["raw_status"], "ON_CALL");
    assert_eq!(record["activity"], "inbound_call");
    assert_eq!(record["status_text"], "Line 2");
    assert_eq!(record["observed_at"], "2025-01-01T00:00:01.000Z");

    // The second pointer of a list, and a second event type.
    let body = json!({
        "event": "agent.logged_out",
        "payload": {"agent": {"id": 8}, "state": {"code": "logged_out"}, "at": common::T0 + 2_000}
    })
    .to_string();
    let headers = Headers::signed(KEY, "evt_2", now(), &body);
    assert_eq!(
        post(&gw, "contact-center", &headers, &body).await.status(),
        204
    );
    assert_eq!(
        gw.get("/v1/presence/contact-center/8").await.1["availability"],
        "offline"
    );

    // The default locations do not apply any more: 400, nothing stored.
    let default_shape =
        event("u-default", "busy", 3_000).replace("presence.updated", "agent.state_changed");
    let default_shape = default_shape.replace("\"type\"", "\"event\"");
    let headers = Headers::signed(KEY, "evt_3", now(), &default_shape);
    assert_problem(
        post(&gw, "contact-center", &headers, &default_shape).await,
        400,
    )
    .await;
}

/// One bad request: what it sends and what it gets.
struct Case {
    name: &'static str,
    headers: Headers,
    body: String,
    method: &'static str,
    source: &'static str,
    status: u16,
    /// The `/v1/sources` counter of `vendor` that grows by one.
    counter: Option<&'static str>,
}

fn bad_input_cases() -> Vec<Case> {
    let body = event("u-bad", "away", 9_000);
    let at = now();
    let good = Headers::signed(KEY, "msg_bad", at, &body);
    let v1 = good.signature.clone().unwrap();
    let digest = v1[3..].to_owned();
    let case = |name, headers: Headers, body: &str, status, counter| Case {
        name,
        headers,
        body: body.to_owned(),
        method: "POST",
        source: "vendor",
        status,
        counter: Some(counter),
    };
    let with_sig = |s: &str| Headers {
        signature: Some(s.to_owned()),
        ..good.clone()
    };
    let with_ts = |t: &str| Headers {
        timestamp: Some(t.to_owned()),
        ..good.clone()
    };
    let with_id = |i: &str| Headers {
        id: Some(i.to_owned()),
        ..good.clone()
    };
    let signed = |b: &str| Headers::signed(KEY, "msg_bad", at, b);
    let invalid_json = r#"{"type": "presence.updated","#;
    let array = format!("[{body}]");
    let no_principal = json!({"type": "presence.updated", "data": {"status": "away"}}).to_string();
    let no_status = json!({"type": "presence.updated", "data": {"user_id": "u-bad"}}).to_string();
    let bad_time = json!({"type": "presence.updated",
        "data": {"user_id": "u-bad", "status": "away", "changed_at": "yesterday"}})
    .to_string();
    let untyped = json!({"data": {"user_id": "u-bad", "status": "away"}}).to_string();
    let big = json!({"type": "presence.updated",
        "data": {"user_id": "u-bad", "status": "away", "message": "x".repeat(5000)}})
    .to_string();
    let long_id = "m".repeat(257);
    vec![
        case(
            "no webhook-id",
            Headers {
                id: None,
                ..good.clone()
            },
            &body,
            401,
            "rejected.signature_missing",
        ),
        case(
            "no webhook-timestamp",
            Headers {
                timestamp: None,
                ..good.clone()
            },
            &body,
            401,
            "rejected.signature_missing",
        ),
        case(
            "no webhook-signature",
            Headers {
                signature: None,
                ..good.clone()
            },
            &body,
            401,
            "rejected.signature_missing",
        ),
        case(
            "empty webhook-signature",
            with_sig(""),
            &body,
            401,
            "rejected.signature_missing",
        ),
        case(
            "timestamp in milliseconds",
            with_ts(&format!("{}000", at)),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "timestamp with a fraction",
            with_ts(&format!("{at}.5")),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "timestamp as a date",
            with_ts("2025-01-01T00:00:00Z"),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "negative timestamp",
            with_ts(&format!("-{at}")),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "id with a space",
            with_id("msg bad"),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "id over 256 characters",
            with_id(&long_id),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "signature without a version",
            with_sig(&digest),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "only a v2 entry",
            with_sig(&format!("v2,{digest}")),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "v1 entry that is not base64",
            with_sig("v1,@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@="),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "v1 entry of the wrong length",
            with_sig(&v1[..v1.len() - 8]),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "hex digest (Mitel style)",
            with_sig(&format!("v1,{}", "ab".repeat(32))),
            &body,
            401,
            "rejected.signature_malformed",
        ),
        case(
            "signed by another key",
            Headers::signed(OLD_KEY, "msg_bad", at, &body),
            &body,
            401,
            "rejected.signature_mismatch",
        ),
        case(
            "body changed after signing",
            good.clone(),
            &body.replace("away", "busy"),
            401,
            "rejected.signature_mismatch",
        ),
        case(
            "id changed after signing",
            with_id("msg_other"),
            &body,
            401,
            "rejected.signature_mismatch",
        ),
        case(
            "timestamp changed after signing",
            with_ts(&(at + 1).to_string()),
            &body,
            401,
            "rejected.signature_mismatch",
        ),
        case(
            "stale timestamp",
            Headers::signed(KEY, "msg_bad", at - 3_600, &body),
            &body,
            401,
            "rejected.signature_expired",
        ),
        case(
            "future timestamp",
            Headers::signed(KEY, "msg_bad", at + 3_600, &body),
            &body,
            401,
            "rejected.signature_expired",
        ),
        case(
            "timestamp zero",
            Headers::signed(KEY, "msg_bad", 0, &body),
            &body,
            401,
            "rejected.signature_expired",
        ),
        case(
            "invalid JSON, signed",
            signed(invalid_json),
            invalid_json,
            400,
            "rejected.bad_payload",
        ),
        case(
            "JSON array, signed",
            signed(&array),
            &array,
            400,
            "rejected.bad_payload",
        ),
        case(
            "no principal, signed",
            signed(&no_principal),
            &no_principal,
            400,
            "rejected.bad_payload",
        ),
        case(
            "no status, signed",
            signed(&no_status),
            &no_status,
            400,
            "rejected.bad_payload",
        ),
        case(
            "unreadable changed_at, signed",
            signed(&bad_time),
            &bad_time,
            400,
            "rejected.bad_payload",
        ),
        case(
            "no type, signed",
            signed(&untyped),
            &untyped,
            400,
            "rejected.bad_payload",
        ),
        case(
            "body over the limit",
            signed(&big),
            &big,
            413,
            "rejected.body_too_large",
        ),
        Case {
            method: "GET",
            ..case("GET", good.clone(), "", 405, "rejected.method_not_allowed")
        },
        Case {
            source: "no-such-source",
            counter: None,
            ..case("unknown source", good.clone(), &body, 404, "")
        },
    ]
}

#[tokio::test]
async fn bad_inputs_get_their_status_and_change_nothing_else() {
    let gw = Gateway::start(&config("")).await;
    // Something in the store first, so "unchanged" is not trivially empty.
    post_ok(&gw, "msg_first", &event("u-first", "busy", 1_000)).await;
    for case in bad_input_cases() {
        let before = gw.snapshot().await;
        let url = gw.url(&format!("/webhooks/{}", case.source));
        let mut request = match case.method {
            "GET" => gw.client.get(url),
            _ => gw.client.post(url).body(case.body.clone()),
        };
        for (name, value) in [
            ("webhook-id", &case.headers.id),
            ("webhook-timestamp", &case.headers.timestamp),
            ("webhook-signature", &case.headers.signature),
        ] {
            if let Some(value) = value {
                request = request.header(name, value);
            }
        }
        let response = request.send().await.expect("request");
        let problem = assert_problem(response, case.status).await;
        let detail = problem["detail"].as_str().unwrap_or("");
        assert!(
            !detail.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "{}: detail leaks the key",
            case.name
        );
        if let Some(expected) = &good_signature_of(&case) {
            assert!(
                !detail.contains(expected.as_str()),
                "{}: detail leaks the signature",
                case.name
            );
        }
        let after = gw.snapshot().await;
        assert_eq!(
            after.records, before.records,
            "{}: records changed",
            case.name
        );
        assert_eq!(
            after.last_seq, before.last_seq,
            "{}: seq changed",
            case.name
        );
        let mut expected = before.sources.clone();
        if let Some(counter) = case.counter {
            bump(&mut expected, "vendor", counter);
        }
        assert_eq!(after.sources, expected, "{}: counters", case.name);
    }
    // Nothing of u-bad was kept by any of them.
    assert_eq!(gw.get("/v1/presence/vendor/u-bad").await.0, 404);
}

/// The signature the gateway would have expected for a case's body, to
/// check that no answer shows it.
fn good_signature_of(case: &Case) -> Option<String> {
    let id = case.headers.id.as_deref()?;
    let timestamp = case.headers.timestamp.as_deref()?.parse().ok()?;
    let key = decode_secret(KEY.as_bytes()).ok()?;
    let signature = sign(&key, id, timestamp, case.body.as_bytes());
    Some(signature[3..].to_owned())
}
