//! Black-box tests of the consumer read API under /v1.

mod common;

use std::collections::BTreeSet;

use common::{Gateway, MITEL_KEY, TOKEN, assert_problem, sign};
use serde_json::{Value, json};

/// A presence envelope observed `at` ms after [`common::T0`].
fn presence(principal: &str, status: &str, at: i64) -> String {
    json!({
        "topic": "platform-api-presence",
        "subject": format!("/presentities/{principal}"),
        "content": {"eventId": format!("{principal}-{at}"), "timestamp": common::T0 + at, "presence": status},
    })
    .to_string()
}

async fn gateway_with(principals: usize) -> Gateway {
    let gw = Gateway::start(&common::mitel_config(
        r#"
[[sources]]
id = "other"
kind = "mitel"
signing_keys = ["other-key"]
"#,
    ))
    .await;
    for i in 0..principals {
        let status = if i % 3 == 0 { "Away" } else { "Busy" };
        gw.post_signed(
            "mitel",
            MITEL_KEY,
            &presence(&format!("user-{i:03}"), status, 1_000),
        )
        .await;
    }
    gw
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401() {
    let gw = gateway_with(1).await;
    for path in ["/v1/presence", "/v1/sources", "/v1/presence/mitel/user-000"] {
        let response = gw.client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"presence-gateway\""
        );
        assert_problem(response, 401).await;
        let response = gw
            .client
            .get(gw.url(path))
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();
        assert_problem(response, 401).await;
        let response = gw
            .client
            .get(gw.url(path))
            .basic_auth("user", Some(TOKEN))
            .send()
            .await
            .unwrap();
        assert_problem(response, 401).await;
    }
    let response = gw
        .client
        .post(gw.url("/v1/presence/query"))
        .json(&json!({"principals": []}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 401).await;
    // The token works, in any case of the scheme word.
    let response = gw
        .client
        .get(gw.url("/v1/sources"))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn without_configured_tokens_the_api_is_open() {
    let text = r#"
[[sources]]
id = "open"
kind = "mitel"
signing_keys = ["k"]
"#;
    let gw = Gateway::start(text).await;
    let response = gw.client.get(gw.url("/v1/sources")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unknown_principal_or_source_is_404() {
    let gw = gateway_with(1).await;
    let response = gw.get_raw("/v1/presence/mitel/nobody").await;
    assert_problem(response, 404).await;
    let response = gw.get_raw("/v1/presence/nosource/user-000").await;
    assert_problem(response, 404).await;
    let response = gw.get_raw("/v1/presence?source=nosource").await;
    assert_problem(response, 404).await;
    let response = gw.get_raw("/v1/nothing-here").await;
    assert_problem(response, 404).await;
}

#[tokio::test]
async fn pages_cover_every_record_once_in_a_stable_order() {
    let gw = gateway_with(25).await;
    gw.post_signed(
        "other",
        "other-key",
        &presence("other-user", "Available", 5),
    )
    .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/presence?limit=10&cursor={c}"),
            None => "/v1/presence?limit=10".to_owned(),
        };
        let (status, page) = gw.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 10);
        seen.extend(items.iter().map(|r| {
            (
                r["source"].as_str().unwrap().to_owned(),
                r["principal"].as_str().unwrap().to_owned(),
            )
        }));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 26);
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>().len(),
        26,
        "no record twice"
    );
    // Sources come in id order: all of "mitel" before "other".
    let first_other = seen.iter().position(|(s, _)| s == "other").unwrap();
    assert_eq!(first_other, 25);

    // The same walk again gives the same order.
    let (_, again) = gw.get("/v1/presence?limit=10").await;
    let again: Vec<&str> = again["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["principal"].as_str().unwrap())
        .collect();
    let first: Vec<&str> = seen[..10].iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(again, first);
}

#[tokio::test]
async fn list_filters_by_source_and_availability() {
    let gw = gateway_with(9).await;
    gw.post_signed("other", "other-key", &presence("other-user", "Away", 5))
        .await;
    let (_, page) = gw.get("/v1/presence?availability=away&limit=1000").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{page}");
    assert!(items.iter().all(|r| r["availability"] == "away"));
    let (_, page) = gw.get("/v1/presence?source=mitel&availability=away").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let (_, page) = gw
        .get("/v1/presence?source=mitel&availability=away,busy")
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 9);
    assert_eq!(page["next_cursor"], Value::Null);
}

#[tokio::test]
async fn bad_list_parameters_are_400() {
    let gw = gateway_with(3).await;
    for query in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "availability=sleepy",
        "availability=",
        "availability=busy,,away",
        "cursor=%%%",
        "cursor=bm9wZQ",
        "colour=red",
    ] {
        let response = gw.get_raw(&format!("/v1/presence?{query}")).await;
        assert_problem(response, 400).await;
    }
    // A cursor of another listing (another source) is refused too.
    let (_, page) = gw.get("/v1/presence?source=mitel&limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap();
    let response = gw
        .get_raw(&format!("/v1/presence?source=other&cursor={cursor}"))
        .await;
    assert_problem(response, 400).await;
}

#[tokio::test]
async fn query_returns_the_principals_that_have_a_record() {
    let gw = gateway_with(5).await;
    gw.post_signed("other", "other-key", &presence("user-001", "Available", 5))
        .await;
    let (status, result) = gw
        .post_json(
            "/v1/presence/query",
            &json!({"principals": ["user-001", "user-004", "ghost"], "source": "mitel"}),
        )
        .await;
    assert_eq!(status, 200);
    let items = result["items"].as_array().unwrap();
    let principals: Vec<&str> = items
        .iter()
        .map(|r| r["principal"].as_str().unwrap())
        .collect();
    assert_eq!(principals, ["user-001", "user-004"]);
    // Without a source: every source's record for those principals.
    let (_, result) = gw
        .post_json("/v1/presence/query", &json!({"principals": ["user-001"]}))
        .await;
    assert_eq!(result["items"].as_array().unwrap().len(), 2);

    for bad in [
        json!({"principal": ["x"]}),
        json!([1, 2]),
        json!({"principals": "x"}),
    ] {
        let response = gw
            .client
            .post(gw.url("/v1/presence/query"))
            .bearer_auth(TOKEN)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_problem(response, 400).await;
    }
    let too_many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let response = gw
        .client
        .post(gw.url("/v1/presence/query"))
        .bearer_auth(TOKEN)
        .json(&json!({"principals": too_many}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 400).await;
    let response = gw
        .client
        .post(gw.url("/v1/presence/query"))
        .bearer_auth(TOKEN)
        .json(&json!({"principals": [], "source": "nope"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 404).await;
}

#[tokio::test]
async fn sources_report_kind_counters_and_last_event() {
    let gw = gateway_with(2).await;
    let body = presence("user-000", "Away", 1_000);
    let response = gw
        .post_webhook("mitel", body.clone(), Some(&sign("nope", body.as_bytes())))
        .await;
    assert_eq!(response.status(), 401);
    let (_, sources) = gw.get("/v1/sources").await;
    let list = sources["sources"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let mitel = &list[0];
    assert_eq!(mitel["id"], "mitel");
    assert_eq!(mitel["kind"], "mitel");
    assert_eq!(mitel["records"], 2);
    assert_eq!(mitel["counters"]["received"], 2);
    assert_eq!(mitel["counters"]["accepted"], 2);
    assert_eq!(mitel["counters"]["rejected"]["signature_mismatch"], 1);
    assert!(mitel["last_event_at"].as_str().is_some());
    assert_eq!(mitel["subscriptions"], json!([]));
    assert_eq!(list[1]["id"], "other");
    assert_eq!(list[1]["last_event_at"], Value::Null);
}
