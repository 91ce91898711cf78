//! The Mitel CloudLink envelope parser (src/providers/mitel.rs): any bytes
//! as a verified webhook body, with the default field locations and status
//! words. It must answer `Ok` or `Err`, never panic, and what it returns
//! must hold together.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use presence_gateway::providers::mitel::{self, MitelParser};
use presence_gateway::providers::netsapiens::CallFieldOverrides;
use presence_gateway::providers::{FieldOverrides, StatusMap};
use presence_gateway::verify::Verified;

static PARSER: LazyLock<MitelParser> = LazyLock::new(|| {
    MitelParser::new(
        &FieldOverrides::default(),
        &CallFieldOverrides::default(),
        StatusMap::new(mitel::STATUS_WORDS, []),
    )
    .expect("the default fields compile")
});

fuzz_target!(|data: &[u8]| {
    match PARSER.parse(Verified::assume_verified_for_tests(data)) {
        Ok(parsed) => {
            // One envelope says one thing.
            let said = parsed.updates.len() + parsed.calls.len() + parsed.ignored as usize;
            assert_eq!(said, 1, "{parsed:?}");
            for update in &parsed.updates {
                assert!(!update.principal.is_empty());
                assert!(
                    update
                        .raw_status
                        .as_ref()
                        .is_some_and(|s| !s.trim().is_empty())
                );
            }
            for call in &parsed.calls {
                assert!(!call.call_id.trim().is_empty());
            }
        }
        // The message is returned to the sender: it must format.
        Err(e) => drop(e.to_string()),
    }
});
