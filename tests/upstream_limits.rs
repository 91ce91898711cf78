//! Provider answers are read with a size limit: an API or token endpoint
//! that answers without end (chunked) or declares a body of a terabyte fails
//! that call with the size error, shown as the subscription's `last_error`
//! in `/v1/sources`, instead of filling memory until the request timeout.
//!
//! The bound is asserted by the error: without the limit these calls would
//! fail only after `REQUEST_TIMEOUT` (20 s) as "timed out", having read
//! gigabytes; the test waits less than that for the size error.

mod common;

use std::time::Duration;

use common::{Gateway, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the hostile provider answers one kind of call.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// 200, chunked, and chunks for as long as the client reads.
    Endless,
    /// 200 with `Content-Length: 1 TiB`, one byte, then nothing.
    HugeDeclared,
    /// A valid token answer.
    Token,
}

/// Starts a provider on 127.0.0.1:0 that answers token requests (paths
/// ending in `/tokens`) with `token` and every other call with `api`.
async fn hostile_provider(api: Answer, token: Answer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer(socket, api, token));
        }
    });
    base
}

async fn answer(mut socket: TcpStream, api: Answer, token: Answer) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let path = request_line.split(' ').nth(1).unwrap_or_default();
    let kind = if path
        .split('?')
        .next()
        .unwrap_or_default()
        .ends_with("/tokens")
    {
        token
    } else {
        api
    };
    match kind {
        Answer::Endless => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
            // Until the client gives up and closes.
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        }
        Answer::HugeDeclared => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        content-length: 1099511627776\r\n\r\n[";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // Hold the connection until the client closes it.
            while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        Answer::Token => {
            let body = r#"{"access_token":"t0ken","expires_in":3600}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    }
}

/// A NetSapiens source managed through `base`, with static bearer auth or
/// the password grant (which asks the token endpoint first).
fn config(base: &str, password_grant: bool) -> String {
    let auth = if password_grant {
        "type = \"password\"\nclient_id = \"gw\"\nclient_secret = \"s3cret\"\n\
         username = \"admin@acme\"\npassword = \"pw\""
    } else {
        "type = \"bearer\"\ntoken = \"ns-api-key\""
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[consumers]
tokens = ["{token}"]

[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "{base}"

[sources.auth]
{auth}

[sources.subscription]
callback_url = "http://127.0.0.1:9/webhooks/ns"
domain = "acme.example"
retry_initial_ms = 200
"#,
        token = common::TOKEN
    )
}

/// Waits (less than the request timeout) for the subscription's first
/// failure and returns its `last_error`; asserts `/v1/sources` shows the
/// failed state too.
async fn first_error(gw: &Gateway) -> String {
    let seen = std::sync::Mutex::new(serde_json::Value::Null);
    let seen_ref = &seen;
    wait_until(
        "the subscription call to fail",
        Duration::from_secs(15),
        move || async move {
            let (_, sources) = gw.get("/v1/sources").await;
            let sub = sources["sources"][0]["subscriptions"][0].clone();
            let failed = !sub["last_error"].is_null();
            *seen_ref.lock().unwrap() = sub;
            failed
        },
    )
    .await;
    let sub = seen.into_inner().unwrap();
    assert!(
        sub["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed")),
        "{sub}"
    );
    sub["last_error"].as_str().unwrap_or_default().to_owned()
}

async fn assert_fails_at_the_limit(api: Answer, token: Answer, password_grant: bool, what: &str) {
    let base = hostile_provider(api, token).await;
    let gw = Gateway::start(&config(&base, password_grant)).await;
    let error = first_error(&gw).await;
    assert!(
        error.contains(what) && error.contains("larger than the limit"),
        "{api:?}/{token:?}: {error}"
    );
    // The gateway itself is unharmed.
    assert_eq!(gw.get("/healthz").await.0, 200);
    gw.stop().await;
}

#[tokio::test]
async fn an_endless_api_answer_fails_the_call_at_the_size_limit() {
    assert_fails_at_the_limit(Answer::Endless, Answer::Token, false, "API answer").await;
}

#[tokio::test]
async fn a_huge_declared_api_answer_fails_the_call_unread() {
    assert_fails_at_the_limit(Answer::HugeDeclared, Answer::Token, false, "API answer").await;
}

#[tokio::test]
async fn an_endless_token_answer_fails_the_call_at_the_size_limit() {
    assert_fails_at_the_limit(Answer::Endless, Answer::Endless, true, "token answer").await;
}

#[tokio::test]
async fn a_huge_declared_token_answer_fails_the_call_unread() {
    assert_fails_at_the_limit(
        Answer::HugeDeclared,
        Answer::HugeDeclared,
        true,
        "token answer",
    )
    .await;
}
