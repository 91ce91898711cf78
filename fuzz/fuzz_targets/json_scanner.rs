//! The JSON field scanner (src/providers/extract.rs) against serde_json.
//!
//! Input: any bytes, read as a JSON document. The scanner must accept exactly
//! the documents serde_json accepts, and every value it extracts must be the
//! value serde_json finds at the same JSON Pointer. The pointers asked for are
//! the providers' default field locations, a few that exist nowhere, and up to
//! 19 paths that exist in the document itself (so values are compared even
//! where the fuzzer invents the keys).
//!
//! Where the two differ by design, the rule is spelled out below:
//!
//! - Bytes that are not UTF-8 never reach the scanner (the providers answer
//!   "not UTF-8" first; it takes `&str`). They are read lossily here so that
//!   every input still exercises it.
//! - Nesting deeper than 128 levels: serde_json skips any depth when asked to
//!   ignore a value, while the scanner (recursive) refuses it like serde_json
//!   does when it builds a value. Expected: rejected.
//! - Numbers are checked for grammar only: `1e400` is valid JSON. serde_json
//!   fails to build a `Value` from it (out of range), so values are compared
//!   only for documents it can build; the scanner's own number readers then
//!   say "not a number I can use".
//! - A repeated key: its last value wins, with everything below it (as in
//!   serde_json's `Value`); the paths of earlier values are asked for too.
//! - `\uD800` (a lone surrogate) is valid grammar, which is all the scanner
//!   checks while skipping; serde_json cannot decode it into a string. A key
//!   containing one can match no pointer (pointers are Rust strings) and is
//!   skipped; a string value containing one is "not a string" to `as_str`.

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use presence_gateway::providers::extract::{
    self, JsonPointer, MAX_POINTERS, PointerSet, as_i64, as_str, as_text,
};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Pointers asked of every document: the providers' default locations
/// (Mitel, NetSapiens) and pointers that exist in no seed.
const FIXED: &[&str] = &[
    "",
    "/subject",
    "/topic",
    "/content/presence",
    "/content/timestamp",
    "/0",
    "/0/user",
    "/1/time",
    "/a",
    "/a/0/b",
    "/~0~1",
    "/-",
    "/00",
];

/// Deepest nesting the scanner accepts (serde_json's recursion limit).
const MAX_DEPTH: usize = 128;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text: &str = &text;

    let mut pointers: Vec<String> = FIXED.iter().map(|p| (*p).to_owned()).collect();
    let value = serde_json::from_str::<Value>(text).ok();
    if value.is_some() {
        let paths = Paths {
            prefix: String::new(),
            out: &mut pointers,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        paths
            .deserialize(&mut de)
            .expect("a document serde_json reads");
    }
    let mut set = PointerSet::default();
    let indices: Vec<usize> = pointers
        .iter()
        .map(|p| {
            let pointer = JsonPointer::parse(p).expect("paths are valid pointers");
            set.add(pointer).expect("at most MAX_POINTERS")
        })
        .collect();

    let ours = extract::extract(&set, text);
    let grammar_ok = serde_json::from_str::<IgnoredAny>(text).is_ok();
    let expected_ok = grammar_ok && depth(text) <= MAX_DEPTH;
    assert_eq!(
        ours.is_ok(),
        expected_ok,
        "accept/reject differs (serde_json grammar: {grammar_ok}): {text:?}"
    );
    let Ok(found) = ours else { return };
    let Some(value) = value else {
        // Valid grammar serde_json cannot build (out-of-range numbers, lone
        // surrogates): nothing to compare the values with.
        return;
    };
    for (pointer, &i) in pointers.iter().zip(&indices) {
        let expected = value.pointer(pointer).filter(|v| !v.is_null());
        let got = found.get(i);
        let got_value = got.map(|raw| {
            let text = raw.get();
            assert_eq!(text, text.trim(), "raw value with whitespace at {pointer}");
            serde_json::from_str::<Value>(text).expect("an extracted value is valid JSON")
        });
        assert_eq!(
            got_value.as_ref(),
            expected,
            "value at {pointer:?} of {text:?}"
        );
        let (Some(raw), Some(expected)) = (got, expected) else {
            continue;
        };
        // The readers the providers use on extracted values.
        match expected {
            Value::String(s) => {
                assert_eq!(as_str(raw).as_deref(), Some(s.as_str()));
                assert_eq!(as_text(raw).as_deref(), Some(s.as_str()));
                assert_eq!(as_i64(raw), None);
            }
            Value::Number(n) => {
                assert_eq!(as_str(raw), None);
                assert_eq!(as_text(raw), Some(Cow::Borrowed(raw.get())));
                if let Some(n) = n.as_i64() {
                    assert_eq!(as_i64(raw), Some(n), "{pointer}");
                } else if let (Some(f), Some(ours)) = (n.as_f64(), as_i64(raw)) {
                    // serde_json's float parsing may differ from Rust's by
                    // one unit in the last place; truncation then by one.
                    assert!((f.trunc() - ours as f64).abs() <= 1.0 + f.abs() * 1e-15);
                }
            }
            Value::Bool(_) => {
                assert_eq!(as_str(raw), None);
                assert_eq!(as_text(raw).as_deref(), Some(raw.get()));
                assert_eq!(as_i64(raw), None);
            }
            Value::Array(_) | Value::Object(_) => {
                assert_eq!(as_str(raw), None);
                assert_eq!(as_text(raw), None);
                assert_eq!(as_i64(raw), None);
            }
            Value::Null => unreachable!("null counts as absent"),
        }
    }
});

/// The JSON Pointer of every member and element of a document, including
/// those of a repeated key's earlier values (which serde_json's `Value`
/// drops, and which the scanner must drop too), until the set is full.
struct Paths<'a> {
    prefix: String,
    out: &'a mut Vec<String>,
}

impl Paths<'_> {
    fn child(&mut self, key: &str) -> Paths<'_> {
        let prefix = format!(
            "{}/{}",
            self.prefix,
            key.replace('~', "~0").replace('/', "~1")
        );
        if self.out.len() < MAX_POINTERS && !self.out.contains(&prefix) {
            self.out.push(prefix.clone());
        }
        Paths {
            prefix,
            out: self.out,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Paths<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Paths<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            map.next_value_seed(self.child(&key))?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        while seq
            .next_element_seed(self.child(&index.to_string()))?
            .is_some()
        {
            index += 1;
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The deepest nesting of arrays and objects in `text`, which serde_json
/// found to be valid JSON.
fn depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}
