//! The UCWA readers (src/providers/ucwa.rs): any bytes as an event-channel
//! answer and as a contact's presence resource, and the text helpers those
//! answers feed (addresses to principals, `/Date(...)/` times). UCWA bodies
//! come from the provider's API, not from webhooks, but they are network
//! bytes all the same. Nothing may panic.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use presence_gateway::presence::Millis;
use presence_gateway::providers::{StatusMap, ucwa};

static STATUSES: LazyLock<StatusMap> = LazyLock::new(|| StatusMap::new(ucwa::STATUS_WORDS, []));

fuzz_target!(|data: &[u8]| {
    // Upstream answers are read as text first (reqwest's `text()`), lossily.
    let body = String::from_utf8_lossy(data);
    if let Ok(events) = ucwa::events(&body) {
        let mut seen = events.presence.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), events.presence.len(), "each presence link once");
    }
    for fallback in [None, Some(Millis(1))] {
        match ucwa::presence_update("sarad@contoso.com", &body, &STATUSES, fallback) {
            Ok(update) => {
                assert!(update.raw_status.is_some_and(|s| !s.trim().is_empty()));
                if fallback.is_some() {
                    assert_eq!(update.observed_at, fallback);
                }
            }
            Err(e) => drop(e.to_string()),
        }
    }
    // The helpers on the whole text: links and times come from answers.
    let principal = ucwa::principal(&body);
    assert!(principal.len() <= body.len());
    let _ = ucwa::parse_date(&body);
});
