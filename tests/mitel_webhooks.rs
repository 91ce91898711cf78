//! Black-box tests of Mitel webhook ingestion: the signed fixture end to end,
//! key rotation, custom field locations, and every bad input.

mod common;

use common::{Gateway, MITEL_KEY, TOKEN, assert_problem, bump, fixture, sign};
use serde_json::{Value, json};

const PRINCIPAL: &str = "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11";

#[tokio::test]
async fn signed_fixture_becomes_a_normalized_record() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let body = fixture("mitel-presence.json");
    let response = gw
        .post_webhook(
            "mitel",
            body.clone(),
            Some(&sign(MITEL_KEY, body.as_bytes())),
        )
        .await;
    assert_eq!(response.status(), 204);
    assert!(response.headers().contains_key("x-request-id"));

    let (status, record) = gw.get(&format!("/v1/presence/mitel/{PRINCIPAL}")).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["source"], "mitel");
    assert_eq!(record["principal"], PRINCIPAL);
    assert_eq!(record["availability"], "busy");
    assert_eq!(record["activity"], Value::Null);
    assert_eq!(record["status_text"], "On a call");
    assert_eq!(record["raw_status"], "Busy");
    assert_eq!(record["observed_at"], "2025-11-24T16:15:30.123Z");
    assert_eq!(record["seq"], 1);
    assert!(
        record["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    assert_eq!(gw.counter("mitel", "received").await, 1);
    assert_eq!(gw.counter("mitel", "accepted").await, 1);
    assert_eq!(gw.counter("mitel", "changed").await, 1);
    gw.stop().await;
}

#[tokio::test]
async fn uppercase_hex_signature_is_accepted() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let body = fixture("mitel-presence.json");
    let sig = sign(MITEL_KEY, body.as_bytes()).to_uppercase();
    assert_eq!(
        gw.post_webhook("mitel", body, Some(&sig)).await.status(),
        204
    );
}

#[tokio::test]
async fn rotated_keys_verify_until_removed() {
    let old = "old-application-id";
    let new = "new-application-id";
    let rotating = format!(
        r#"
[[sources]]
id = "rotating"
kind = "mitel"
signing_keys = ["{new}", "{old}"]
"#
    );
    let gw = Gateway::start(&common::mitel_config(&rotating)).await;
    let body = presence_body("u-rot", "Available", 1_000, "e-1");
    gw.post_signed("rotating", new, &body).await;
    let body = presence_body("u-rot", "Away", 2_000, "e-2");
    gw.post_signed("rotating", old, &body).await;
    let (_, record) = gw.get("/v1/presence/rotating/u-rot").await;
    assert_eq!(record["availability"], "away");
    gw.stop().await;

    // The old key removed from the config: its signatures are rejected.
    let rotated = format!(
        r#"
[[sources]]
id = "rotating"
kind = "mitel"
signing_keys = ["{new}"]
"#
    );
    let gw = Gateway::start(&common::mitel_config(&rotated)).await;
    let body = presence_body("u-rot", "Busy", 3_000, "e-3");
    let response = gw
        .post_webhook("rotating", body.clone(), Some(&sign(old, body.as_bytes())))
        .await;
    assert_problem(response, 401).await;
    assert_eq!(gw.get("/v1/presence/rotating/u-rot").await.0, 404);
    gw.post_signed("rotating", new, &body).await;
    assert_eq!(
        gw.get("/v1/presence/rotating/u-rot").await.1["availability"],
        "busy"
    );
}

#[tokio::test]
async fn custom_field_locations_and_status_map() {
    let custom = r#"
[[sources]]
id = "custom"
kind = "mitel"
signing_keys = ["custom-key"]
[sources.fields]
principal = "/publisher/principalId"
status = ["/content/state/code", "/content/presence"]
activity = "/content/state/activity"
note = "/content/state/text"
timestamp = "/notification/createdOn"
event_id = "/notification/correlationId"
[sources.status_map]
OnThePhone = "busy"
Lunch = "away"
"#;
    let gw = Gateway::start(&common::mitel_config(custom)).await;
    let body = json!({
        "topic": "platform-api-presence",
        "subject": "/presentities/ignored",
        "publisher": {"principalId": "u-custom"},
        "content": {"state": {"code": "onthephone", "activity": "InAConferenceCall", "text": "with a customer"}},
        "notification": {"createdOn": "2026-11-24T10:15:30.140Z", "correlationId": "c-1"}
    })
    .to_string();
    gw.post_signed("custom", "custom-key", &body).await;
    let (status, record) = gw.get("/v1/presence/custom/u-custom").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["availability"], "busy");
    assert_eq!(record["raw_status"], "onthephone");
    assert_eq!(record["activity"], "in_a_conference_call");
    assert_eq!(record["status_text"], "with a customer");
    assert_eq!(record["observed_at"], "2026-11-24T10:15:30.140Z");

    // The same correlation id again is a duplicate under the custom event_id.
    gw.post_signed("custom", "custom-key", &body).await;
    assert_eq!(gw.counter("custom", "duplicate").await, 1);

    // A word in neither table is unknown, and the raw word is kept.
    let body = body
        .replace("onthephone", "Gardening")
        .replace("c-1", "c-2")
        .replace("30.140Z", "31.000Z");
    gw.post_signed("custom", "custom-key", &body).await;
    let (_, record) = gw.get("/v1/presence/custom/u-custom").await;
    assert_eq!(record["availability"], "unknown");
    assert_eq!(record["raw_status"], "Gardening");
}

#[tokio::test]
async fn unchanged_content_refreshes_without_a_new_seq() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    gw.post_signed("mitel", MITEL_KEY, &presence_body("u1", "Busy", 1_000, "a"))
        .await;
    gw.post_signed("mitel", MITEL_KEY, &presence_body("u1", "Busy", 2_000, "b"))
        .await;
    let (_, record) = gw.get("/v1/presence/mitel/u1").await;
    assert_eq!(record["seq"], 1);
    assert_eq!(record["observed_at"], "2025-01-01T00:00:02.000Z");
    assert_eq!(gw.counter("mitel", "accepted").await, 2);
    assert_eq!(gw.counter("mitel", "changed").await, 1);
    // Same observed_at, different content: last writer wins.
    gw.post_signed("mitel", MITEL_KEY, &presence_body("u1", "Away", 2_000, "c"))
        .await;
    let (_, record) = gw.get("/v1/presence/mitel/u1").await;
    assert_eq!(record["availability"], "away");
    assert_eq!(record["seq"], 2);
}

/// A presence envelope for `principal` with the given status and event id,
/// observed `at` ms after [`common::T0`].
fn presence_body(principal: &str, status: &str, at: i64, event_id: &str) -> String {
    presence_body_at(principal, status, common::T0 + at, event_id)
}

/// [`presence_body`] with `timestamp` as sent (epoch ms).
fn presence_body_at(principal: &str, status: &str, timestamp: i64, event_id: &str) -> String {
    json!({
        "publicationId": "p",
        "topic": "platform-api-presence",
        "method": "PUT",
        "subject": format!("/presentities/{principal}"),
        "content": {"eventId": event_id, "timestamp": timestamp, "presence": status, "note": ""},
    })
    .to_string()
}

/// What a bad request sends.
enum Send {
    /// This body with this signature header (None: no header).
    Signed {
        body: String,
        signature: Option<String>,
    },
    /// A body of this size, streamed without Content-Length.
    Chunked { size: usize },
    /// A GET instead of a POST.
    Get,
    /// To a source that does not exist.
    UnknownSource,
}

struct Case {
    name: &'static str,
    send: Send,
    status: u16,
    /// The `/v1/sources` counter that must grow by one (None: no counter).
    counter: Option<&'static str>,
}

fn bad_input_cases() -> Vec<Case> {
    let body = fixture("mitel-presence.json");
    let good = sign(MITEL_KEY, body.as_bytes());
    let signed = |b: &str| Some(sign(MITEL_KEY, b.as_bytes()));
    let with = |signature: Option<String>| Send::Signed {
        body: body.clone(),
        signature,
    };
    let mut wrong_value = good.clone().into_bytes();
    wrong_value[10] = if wrong_value[10] == b'a' { b'b' } else { b'a' };
    let tampered = body.replace("Busy", "Away");
    let big = format!(
        "{{\"topic\":\"platform-api-presence\",\"pad\":\"{}\"}}",
        "x".repeat(5000)
    );
    let invalid_json = "{\"topic\": \"platform-api-presence\",".to_owned();
    let array = format!("[{body}]");
    vec![
        Case {
            name: "missing header",
            send: with(None),
            status: 401,
            counter: Some("rejected.signature_missing"),
        },
        Case {
            name: "empty header",
            send: with(Some(String::new())),
            status: 401,
            counter: Some("rejected.signature_missing"),
        },
        Case {
            name: "non-hex",
            send: with(Some("z".repeat(64))),
            status: 401,
            counter: Some("rejected.signature_malformed"),
        },
        Case {
            name: "odd length",
            send: with(Some(good[..63].to_owned())),
            status: 401,
            counter: Some("rejected.signature_malformed"),
        },
        Case {
            name: "sha256= prefix",
            send: with(Some(format!("sha256={good}"))),
            status: 401,
            counter: Some("rejected.signature_malformed"),
        },
        // Whitespace around a header value is not part of it (RFC 9110 §5.5), so
        // only whitespace inside the digest can reach the verifier.
        Case {
            name: "whitespace inside",
            send: with(Some(format!("{} {}", &good[..32], &good[32..]))),
            status: 401,
            counter: Some("rejected.signature_malformed"),
        },
        Case {
            name: "base64 digest",
            send: with(Some("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=".into())),
            status: 401,
            counter: Some("rejected.signature_malformed"),
        },
        Case {
            name: "right length wrong value",
            send: with(Some(String::from_utf8(wrong_value).unwrap())),
            status: 401,
            counter: Some("rejected.signature_mismatch"),
        },
        Case {
            name: "signed by another key",
            send: with(Some(sign("someone-else", body.as_bytes()))),
            status: 401,
            counter: Some("rejected.signature_mismatch"),
        },
        Case {
            name: "body changed after signing",
            send: Send::Signed {
                body: tampered,
                signature: Some(good.clone()),
            },
            status: 401,
            counter: Some("rejected.signature_mismatch"),
        },
        Case {
            name: "declared body over the limit",
            send: Send::Signed {
                signature: signed(&big),
                body: big,
            },
            status: 413,
            counter: Some("rejected.body_too_large"),
        },
        Case {
            name: "undeclared body over the limit",
            send: Send::Chunked { size: 5000 },
            status: 413,
            counter: Some("rejected.body_too_large"),
        },
        Case {
            name: "unknown source",
            send: Send::UnknownSource,
            status: 404,
            counter: None,
        },
        Case {
            name: "GET on the webhook path",
            send: Send::Get,
            status: 405,
            counter: Some("rejected.method_not_allowed"),
        },
        Case {
            name: "invalid JSON with a valid signature",
            send: Send::Signed {
                signature: signed(&invalid_json),
                body: invalid_json,
            },
            status: 400,
            counter: Some("rejected.bad_payload"),
        },
        Case {
            name: "JSON array with a valid signature",
            send: Send::Signed {
                signature: signed(&array),
                body: array,
            },
            status: 400,
            counter: Some("rejected.bad_payload"),
        },
    ]
}

async fn send(gw: &Gateway, send: Send) -> reqwest::Response {
    match send {
        Send::Signed { body, signature } => {
            gw.post_webhook("mitel", body, signature.as_deref()).await
        }
        Send::Chunked { size } => {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                (0..size / 500).map(|_| Ok(vec![b' '; 500])).collect();
            let body = reqwest::Body::wrap_stream(futures_stream(chunks));
            gw.post_webhook("mitel", body, Some(&"0".repeat(64))).await
        }
        Send::Get => gw
            .client
            .get(gw.url("/webhooks/mitel"))
            .send()
            .await
            .expect("GET"),
        Send::UnknownSource => {
            let body = fixture("mitel-presence.json");
            let sig = sign(MITEL_KEY, body.as_bytes());
            gw.post_webhook("no-such-source", body, Some(&sig)).await
        }
    }
}

/// A stream of ready chunks (reqwest streams need a `Stream`).
fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + std::marker::Send + Sync + 'static
{
    struct Chunks(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Chunks(chunks.into_iter())
}

#[tokio::test]
async fn bad_inputs_get_their_status_and_change_nothing_else() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    // Something in the store first, so "unchanged" is not trivially empty.
    gw.post_signed("mitel", MITEL_KEY, &fixture("mitel-presence.json"))
        .await;
    for case in bad_input_cases() {
        let before = gw.snapshot().await;
        let response = send(&gw, case.send).await;
        assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
        let problem = assert_problem(response, case.status).await;
        let detail = problem["detail"].as_str().unwrap_or("");
        assert!(
            !detail.contains(MITEL_KEY),
            "{}: detail leaks the key",
            case.name
        );
        let after = gw.snapshot().await;
        let mut expected = before.clone();
        if let Some(counter) = case.counter {
            bump(&mut expected.sources, "mitel", counter);
        }
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
        assert_eq!(after.sources, expected.sources, "{}: counters", case.name);
    }
}

#[tokio::test]
async fn mismatch_detail_never_contains_the_expected_signature() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let body = fixture("mitel-presence.json");
    let expected = sign(MITEL_KEY, body.as_bytes());
    let response = gw.post_webhook("mitel", body, Some(&"0".repeat(64))).await;
    let text = response.text().await.unwrap();
    assert!(!text.contains(&expected) && !text.contains(&expected.to_uppercase()));
    assert!(!text.contains(MITEL_KEY));
}

/// Authentic requests the store does not apply: answered 204, counted, no change.
#[tokio::test]
async fn duplicate_stale_and_ignored_events_are_acknowledged_but_not_applied() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let first = presence_body("u1", "Busy", 2_000, "event-1");
    gw.post_signed("mitel", MITEL_KEY, &first).await;
    let cases = [
        ("duplicate (provider retry)", first.clone(), "duplicate"),
        (
            "stale (older than stored)",
            presence_body("u1", "Away", 1_000, "event-0"),
            "stale",
        ),
        (
            "non-presence topic",
            fixture("mitel-media-call.json")
                .replace("platform-api-media", "platform-api-conversations"),
            "ignored",
        ),
    ];
    for (name, body, counter) in cases {
        let before = gw.snapshot().await;
        gw.post_signed("mitel", MITEL_KEY, &body).await;
        let after = gw.snapshot().await;
        assert_eq!(after.records, before.records, "{name}: records changed");
        assert_eq!(after.last_seq, before.last_seq, "{name}: seq changed");
        let mut expected = before.sources.clone();
        bump(&mut expected, "mitel", counter);
        bump(&mut expected, "mitel", "received");
        // last_event_at moves for every authentic request.
        let at = after.sources["sources"][0]["last_event_at"].clone();
        expected["sources"][0]["last_event_at"] = at;
        assert_eq!(after.sources, expected, "{name}: counters");
    }
    let (_, record) = gw.get("/v1/presence/mitel/u1").await;
    assert_eq!(record["availability"], "busy");
}

/// `platform-api-media` events: ringing, then connected, then disconnected
/// restores the activity presence reported; availability stays presence's.
#[tokio::test]
async fn media_events_drive_call_activity() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let with_activity = presence_body(PRINCIPAL, "Busy", 1_000, "p-1").replace(
        r#""presence":"Busy""#,
        r#""presence":"Busy","activity":"InAMeeting""#,
    );
    gw.post_signed("mitel", MITEL_KEY, &with_activity).await;
    let media = fixture("mitel-media-call.json");
    let activity = |record: Value| (record["activity"].clone(), record["availability"].clone());
    let path = format!("/v1/presence/mitel/{PRINCIPAL}");
    assert_eq!(
        activity(gw.get(&path).await.1),
        (json!("in_a_meeting"), json!("busy"))
    );

    let steps = [
        ("ringing", "e-1", json!("ringing")),
        ("connected", "e-2", json!("in_a_call")),
        ("held", "e-3", json!("on_hold")),
        ("connected", "e-4", json!("in_a_call")),
        ("disconnected", "e-5", json!("in_a_meeting")),
    ];
    for (state, event, expected) in steps {
        let body = media
            .replace(r#""state":"ringing""#, &format!(r#""state":"{state}""#))
            .replace("77aa88bb-99cc-4dde-8eff-001122334455", event);
        gw.post_signed("mitel", MITEL_KEY, &body).await;
        assert_eq!(
            activity(gw.get(&path).await.1),
            (expected, json!("busy")),
            "{state}"
        );
    }
    assert_eq!(gw.counter("mitel", "changed").await, 6);
}

#[tokio::test]
async fn content_type_is_not_required() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let body = fixture("mitel-presence.json");
    let response = gw
        .client
        .post(gw.url("/webhooks/mitel"))
        .header("content-type", "text/plain")
        .header("x-notify-signature", sign(MITEL_KEY, body.as_bytes()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn allow_ips_rejects_other_callers_before_verification() {
    let restricted = r#"
[[sources]]
id = "restricted"
kind = "mitel"
signing_keys = ["k"]
allow_ips = ["198.51.100.0/24"]
"#;
    let gw = Gateway::start(&common::mitel_config(restricted)).await;
    let body = presence_body("u", "Busy", 1, "e");
    // Unsigned: 403 still comes first, as the order of checks says.
    let response = gw.post_webhook("restricted", body, None).await;
    assert_problem(response, 403).await;
    assert_eq!(gw.counter("restricted", "rejected.ip_not_allowed").await, 1);
    assert_eq!(
        gw.counter("restricted", "rejected.signature_missing").await,
        0
    );
}

#[tokio::test]
async fn trusted_proxy_forwarded_address_is_checked_against_allow_ips() {
    let text = r#"
[server]
listen = "127.0.0.1:0"
trusted_proxies = ["127.0.0.1"]

[[sources]]
id = "behind-proxy"
kind = "mitel"
signing_keys = ["k"]
allow_ips = ["198.51.100.0/24"]
"#;
    let gw = Gateway::start(text).await;
    let body = presence_body("u", "Busy", 1, "e");
    let post = |xff: &'static str| {
        gw.client
            .post(gw.url("/webhooks/behind-proxy"))
            .header("x-forwarded-for", xff)
            .header("x-notify-signature", sign("k", body.as_bytes()))
            .body(body.clone())
            .send()
    };
    assert_eq!(post("198.51.100.20").await.unwrap().status(), 204);
    // A spoofed left-most hop does not help: the right-most untrusted hop decides.
    assert_eq!(
        post("198.51.100.20, 203.0.113.5").await.unwrap().status(),
        403
    );
}

/// One event stamped decades ahead must not freeze a
/// principal: it is applied with its receive time and counted, and the next
/// real event is applied (DESIGN §2, `store.max_future_skew_secs`).
#[tokio::test]
async fn untrusted_timestamps_are_replaced_by_the_receive_time_and_counted() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let now = jiff::Timestamp::now().as_millisecond();
    let year_2999 = 32_503_680_000_000;
    for (i, stamp) in [year_2999, i64::MAX].into_iter().enumerate() {
        let body = presence_body_at("skewed", ["Busy", "Away"][i], stamp, &format!("skew-{i}"));
        gw.post_signed("mitel", MITEL_KEY, &body).await;
        let (status, record) = gw.get("/v1/presence/mitel/skewed").await;
        assert_eq!(status, 200);
        assert_eq!(record["observed_at"], record["received_at"], "{record}");
        let observed = presence_gateway::presence::Millis::parse_rfc3339(
            record["observed_at"].as_str().expect("RFC 3339 text"),
        )
        .expect("RFC 3339");
        assert!((observed.0 - now).abs() < 600_000, "{record}");
    }
    // A real event after them is not stale.
    let real = presence_body_at("skewed", "Available", now + 1_000, "skew-real");
    gw.post_signed("mitel", MITEL_KEY, &real).await;
    let (_, record) = gw.get("/v1/presence/mitel/skewed").await;
    assert_eq!(record["availability"], "available");
    let sources = gw.get("/v1/sources").await.1;
    assert_eq!(common::source_counter(&sources, "mitel", "clock_skew"), 2);
    assert_eq!(common::source_counter(&sources, "mitel", "stale"), 0);
    // Slightly ahead (within the skew) is trusted as sent.
    let ahead = now + 60_000;
    let body = presence_body_at("ahead", "Busy", ahead, "ahead-1");
    gw.post_signed("mitel", MITEL_KEY, &body).await;
    let (_, record) = gw.get("/v1/presence/mitel/ahead").await;
    assert_eq!(
        presence_gateway::presence::Millis::parse_rfc3339(record["observed_at"].as_str().unwrap()),
        Some(presence_gateway::presence::Millis(ahead))
    );
    gw.stop().await;
}

/// One Mitel source `mitel` with the default body limit (256 KiB), so that
/// bodies are long enough for every field limit to be reached first.
fn roomy_config() -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["{MITEL_KEY}"]
"#
    )
}

/// A presence envelope for `principal` with `content` members as JSON text.
fn envelope(principal: &str, content: &str) -> String {
    format!(
        r#"{{"topic":"platform-api-presence","subject":"/presentities/{principal}","content":{{{content}}}}}"#
    )
}

/// Posts `body` signed; when `status` is 400, asserts a problem of `kind`
/// and that nothing changed but the bad_payload counter.
async fn post_expecting(gw: &Gateway, name: &str, body: String, status: u16, kind: &str) {
    let before = gw.snapshot().await;
    let signature = sign(MITEL_KEY, body.as_bytes());
    let response = gw.post_webhook("mitel", body, Some(&signature)).await;
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
    let mut expected = before.clone();
    bump(&mut expected.sources, "mitel", "rejected.bad_payload");
    assert_eq!(after.records, before.records, "{name}: records changed");
    assert_eq!(after.last_seq, before.last_seq, "{name}: seq changed");
    assert_eq!(after.sources, expected.sources, "{name}: counters");
}

/// DESIGN §2: principal ids, status words and status texts have documented
/// maximum lengths (README); longer ones are 400 and nothing is stored.
#[tokio::test]
async fn fields_longer_than_documented_are_400_and_change_nothing() {
    let gw = Gateway::start(&roomy_config()).await;
    gw.post_signed("mitel", MITEL_KEY, &fixture("mitel-presence.json"))
        .await;
    let run = |n: usize, c: &str| c.repeat(n);
    let busy = r#""presence":"Busy""#;
    let media_with_call_id = |id: &str| {
        fixture("mitel-media-call.json")
            .replace(r#""callId":"f4e3d2c1""#, &format!(r#""callId":"{id}""#))
    };
    let cases = [
        (
            "principal at 256 bytes",
            envelope(&run(256, "p"), busy),
            204,
        ),
        (
            "principal of 257 bytes",
            envelope(&run(257, "p"), busy),
            400,
        ),
        (
            "principal of 200 KB",
            envelope(&run(200_000, "p"), busy),
            400,
        ),
        (
            "principal of 129 two-byte characters",
            envelope(&run(129, "é"), busy),
            400,
        ),
        (
            "status word at 64 bytes",
            envelope("u-word", &format!(r#""presence":"{}""#, run(64, "w"))),
            204,
        ),
        (
            "status word of 65 bytes",
            envelope("u-word", &format!(r#""presence":"{}""#, run(65, "w"))),
            400,
        ),
        (
            "activity of 65 bytes",
            envelope("u-act", &format!(r#"{busy},"activity":"{}""#, run(65, "a"))),
            400,
        ),
        (
            "status text at 4096 bytes",
            envelope("u-note", &format!(r#"{busy},"note":"{}""#, run(4096, "n"))),
            204,
        ),
        (
            "status text of 4097 bytes",
            envelope("u-note", &format!(r#"{busy},"note":"{}""#, run(4097, "n"))),
            400,
        ),
        (
            "status text of 2049 two-byte characters",
            envelope("u-note", &format!(r#"{busy},"note":"{}""#, run(2049, "é"))),
            400,
        ),
        (
            "call id of 257 bytes",
            media_with_call_id(&run(257, "c")),
            400,
        ),
    ];
    for (name, body, status) in cases {
        post_expecting(&gw, name, body, status, "field-too-long").await;
    }
    // What fits is kept whole.
    let (status, record) = gw
        .get(&format!("/v1/presence/mitel/{}", run(256, "p")))
        .await;
    assert_eq!(status, 200, "{record}");
    let (_, record) = gw.get("/v1/presence/mitel/u-note").await;
    assert_eq!(record["status_text"].as_str().map(str::len), Some(4096));
    let (_, record) = gw.get("/v1/presence/mitel/u-word").await;
    assert_eq!(record["raw_status"].as_str().map(str::len), Some(64));
    assert_eq!(record["availability"], "unknown");
    let (_, record) = gw.get(&format!("/v1/presence/mitel/{PRINCIPAL}")).await;
    assert_eq!(
        record["activity"],
        Value::Null,
        "the long call id was not applied"
    );
    gw.stop().await;
}

/// DESIGN §2: epoch milliseconds with a sign, a fraction or beyond 64 bits
/// are no time (400, nothing stored); a time before 2000 or far ahead is
/// not trusted (applied with the receive time, counted as clock_skew), and
/// every time the API returns is RFC 3339.
#[tokio::test]
async fn provider_timestamps_are_read_strictly_and_trusted_from_2000_to_the_clock() {
    let gw = Gateway::start(&roomy_config()).await;
    gw.post_signed("mitel", MITEL_KEY, &fixture("mitel-presence.json"))
        .await;
    let cases: [(&str, &str, u16); 16] = [
        ("negative", "-1764000930123", 400),
        ("negative, as text", r#""-1764000930123""#, 400),
        ("minus one", "-1", 400),
        ("fractional", "1764000930123.5", 400),
        ("fractional, as text", r#""1764000930123.5""#, 400),
        ("with a zero fraction", "1764000930123.0", 400),
        ("exponent", "1.764000930123e12", 400),
        ("beyond 64 bits", "99999999999999999999", 400),
        ("beyond 64 bits, as text", r#""99999999999999999999""#, 400),
        ("zero (1970)", "0", 204),
        ("the last millisecond of 1999", "946684799999", 204),
        ("RFC 3339 in 1999", r#""1999-12-31T23:59:59Z""#, 204),
        ("the largest 64-bit value", "9223372036854775807", 204),
        (
            "the largest 64-bit value, as text",
            r#""9223372036854775807""#,
            204,
        ),
        ("RFC 3339 in 9998", r#""9998-12-31T23:59:59.999Z""#, 204),
        // Beyond the times the gateway represents (jiff's range ends a day
        // early): no time.
        (
            "RFC 3339 at the end of 9999",
            r#""9999-12-31T23:59:59.999Z""#,
            400,
        ),
    ];
    for (i, (name, timestamp, status)) in cases.into_iter().enumerate() {
        let principal = format!("t-{i}");
        let skewed = gw.counter("mitel", "clock_skew").await;
        let body = envelope(
            &principal,
            &format!(r#""presence":"Busy","eventId":"t-{i}","timestamp":{timestamp}"#),
        );
        post_expecting(&gw, name, body, status, "bad-payload").await;
        if status == 400 {
            assert_eq!(
                gw.get(&format!("/v1/presence/mitel/{principal}")).await.0,
                404
            );
            continue;
        }
        let (_, record) = gw.get(&format!("/v1/presence/mitel/{principal}")).await;
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
        assert_eq!(
            gw.counter("mitel", "clock_skew").await,
            skewed + 1,
            "{name}"
        );
    }
    // 2000 itself is trusted as sent.
    let body = envelope("t-2000", r#""presence":"Busy","timestamp":946684800000"#);
    gw.post_signed("mitel", MITEL_KEY, &body).await;
    let (_, record) = gw.get("/v1/presence/mitel/t-2000").await;
    assert_eq!(record["observed_at"], "2000-01-01T00:00:00.000Z");
    gw.stop().await;
}
