//! Log lines written while requests are rejected contain neither the signing
//! key nor the signature the gateway expected. Its own test binary, because it
//! installs a process-wide subscriber at TRACE level for every crate.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Gateway, MITEL_KEY, TOKEN, fixture, sign};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_leave_no_secret_in_the_logs() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();

    let gw = Gateway::start(&common::mitel_config("")).await;
    let body = fixture("mitel-presence.json");
    let tampered = body.replace("Busy", "Away");
    let not_json = "{oops".to_owned();
    let mut expected_signatures = Vec::new();

    // Wrong signature, tampered body, missing and malformed headers.
    for (payload, header) in [
        (body.clone(), Some("0".repeat(64))),
        (tampered.clone(), Some(sign(MITEL_KEY, body.as_bytes()))),
        (body.clone(), None),
        (body.clone(), Some("not-hex".to_owned())),
        (body.clone(), Some(sign("another-key", body.as_bytes()))),
    ] {
        expected_signatures.push(sign(MITEL_KEY, payload.as_bytes()));
        let response = gw.post_webhook("mitel", payload, header.as_deref()).await;
        assert_eq!(response.status(), 401);
    }
    // Authentic but unparseable: rejected after verification. Its signature
    // is the expected one, and must not be logged either.
    expected_signatures.push(sign(MITEL_KEY, not_json.as_bytes()));
    let response = gw
        .post_webhook(
            "mitel",
            not_json.clone(),
            Some(&sign(MITEL_KEY, not_json.as_bytes())),
        )
        .await;
    assert_eq!(response.status(), 400);
    // A consumer with a wrong token.
    let response = gw
        .client
        .get(gw.url("/v1/sources"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    gw.stop().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("webhook rejected"),
        "the capture works:\n{text}"
    );
    assert!(text.contains("signature_mismatch"));
    assert!(!text.contains(MITEL_KEY), "the key is in the logs");
    assert!(!text.contains(TOKEN), "the consumer token is in the logs");
    for expected in expected_signatures {
        assert!(
            !text.contains(&expected),
            "an expected signature is in the logs"
        );
        assert!(!text.contains(&expected.to_uppercase()));
    }
}
