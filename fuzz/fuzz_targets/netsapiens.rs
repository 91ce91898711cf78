//! The NetSapiens post parser (src/providers/netsapiens.rs): any bytes as a
//! verified webhook body, read as every model a subscription can have, with
//! the default field locations in a zone with daylight saving time (the
//! cluster's local `YYYY-MM-DD HH:MM:SS` times go through it). It must answer
//! `Ok` or `Err`, never panic.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use presence_gateway::providers::netsapiens::{self, CallFieldOverrides, Model, NetSapiensParser};
use presence_gateway::providers::{FieldOverrides, StatusMap};
use presence_gateway::verify::Verified;

static PARSER: LazyLock<NetSapiensParser> = LazyLock::new(|| {
    // A fixed rule (no time zone database needed) with a DST gap and fold:
    // UTC-6, UTC-5 in summer (as America/Chicago).
    let zone = jiff::tz::TimeZone::posix("CST6CDT,M3.2.0,M11.1.0").expect("a valid POSIX zone");
    NetSapiensParser::new(
        &FieldOverrides::default(),
        &CallFieldOverrides::default(),
        StatusMap::new(netsapiens::STATUS_WORDS, []),
        zone,
    )
    .expect("the default fields compile")
});

const MODELS: [Model; 6] = [
    Model::Presence,
    Model::Agent,
    Model::Subscriber,
    Model::Call,
    Model::CallOrigid,
    Model::Other,
];

fuzz_target!(|data: &[u8]| {
    for model in MODELS {
        match PARSER.parse(Verified::assume_verified_for_tests(data), model) {
            Ok(parsed) => {
                for update in &parsed.updates {
                    assert!(!update.principal.is_empty());
                    assert!(update.event_id.is_some(), "the object is the event id");
                }
                for call in &parsed.calls {
                    assert!(!call.principal.is_empty());
                    assert!(!call.call_id.trim().is_empty());
                }
                if model == Model::Other {
                    assert!(parsed.updates.is_empty() && parsed.calls.is_empty());
                }
            }
            Err(e) => drop(e.to_string()),
        }
    }
});
