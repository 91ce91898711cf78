//! Pulls a handful of values out of a JSON document by JSON Pointer (RFC 6901)
//! in one streaming pass.
//!
//! Provider field locations are partly undocumented, so every field is a list
//! of configurable pointers. Building a `serde_json::Value` tree for each
//! webhook would allocate for every key of the payload; instead this walks the
//! document once, descends only into keys some pointer needs, skips the rest
//! with `IgnoredAny`, and returns the wanted values as borrowed `&RawValue`s.
//! The whole document is still validated as JSON.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Most pointers one [`PointerSet`] can hold (the width of its bit masks).
pub const MAX_POINTERS: usize = 32;

/// A parsed JSON Pointer.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: Box<str>,
    segments: Box<[Segment]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    key: Box<str>,
    /// The segment as an array index, when it is one.
    index: Option<usize>,
}

/// A pointer that is not valid RFC 6901 syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointerError {
    #[error("a JSON pointer must be empty or start with '/': {0:?}")]
    NoLeadingSlash(String),
    #[error("invalid escape in JSON pointer {0:?} (only ~0 and ~1 are allowed)")]
    BadEscape(String),
}

impl JsonPointer {
    /// Parses `/a/b~1c/0` style pointers.
    pub fn parse(text: &str) -> Result<Self, PointerError> {
        if text.is_empty() {
            return Ok(JsonPointer {
                text: "".into(),
                segments: Box::new([]),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(PointerError::NoLeadingSlash(text.to_owned()));
        };
        let segments = rest
            .split('/')
            .map(|raw| {
                let mut key = String::with_capacity(raw.len());
                let mut chars = raw.chars();
                while let Some(c) = chars.next() {
                    if c == '~' {
                        match chars.next() {
                            Some('0') => key.push('~'),
                            Some('1') => key.push('/'),
                            _ => return Err(PointerError::BadEscape(text.to_owned())),
                        }
                    } else {
                        key.push(c);
                    }
                }
                let index = if key == "0" || (!key.starts_with('0') && !key.is_empty()) {
                    key.parse().ok()
                } else {
                    None
                };
                Ok(Segment {
                    key: key.into(),
                    index,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(JsonPointer {
            text: text.into(),
            segments,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The pointers one extraction looks for; each has an index into [`Found`].
#[derive(Clone, Debug, Default)]
pub struct PointerSet {
    pointers: Vec<JsonPointer>,
}

/// More than [`MAX_POINTERS`] distinct pointers were configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many distinct field pointers (at most {MAX_POINTERS})")]
pub struct TooManyPointers;

impl PointerSet {
    /// Adds a pointer (or finds the identical one) and returns its index.
    pub fn add(&mut self, pointer: JsonPointer) -> Result<usize, TooManyPointers> {
        if let Some(i) = self.pointers.iter().position(|p| *p == pointer) {
            return Ok(i);
        }
        if self.pointers.len() == MAX_POINTERS {
            return Err(TooManyPointers);
        }
        self.pointers.push(pointer);
        Ok(self.pointers.len() - 1)
    }

    /// The pointer with index `i`.
    pub fn get(&self, i: usize) -> Option<&JsonPointer> {
        self.pointers.get(i)
    }

    fn all(&self) -> u32 {
        if self.pointers.len() == MAX_POINTERS {
            u32::MAX
        } else {
            (1u32 << self.pointers.len()) - 1
        }
    }

    fn ending_at(&self, mask: u32, depth: usize) -> u32 {
        self.select(mask, |p| p.segments.len() == depth)
    }

    fn matching_key(&self, mask: u32, depth: usize, key: &str) -> u32 {
        self.select(mask, |p| {
            p.segments.get(depth).is_some_and(|s| &*s.key == key)
        })
    }

    fn matching_index(&self, mask: u32, depth: usize, index: usize) -> u32 {
        self.select(mask, |p| {
            p.segments
                .get(depth)
                .is_some_and(|s| s.index == Some(index))
        })
    }

    fn select(&self, mask: u32, keep: impl Fn(&JsonPointer) -> bool) -> u32 {
        let mut out = 0;
        let mut bits = mask;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if keep(&self.pointers[i]) {
                out |= 1 << i;
            }
        }
        out
    }
}

/// The values found for a [`PointerSet`], borrowed from the document.
#[derive(Clone, Copy, Debug)]
pub struct Found<'de> {
    values: [Option<&'de RawValue>; MAX_POINTERS],
}

impl<'de> Found<'de> {
    /// The value of pointer `i`; `None` when absent or JSON `null`.
    pub fn get(&self, i: usize) -> Option<&'de RawValue> {
        self.values
            .get(i)
            .copied()
            .flatten()
            .filter(|raw| raw.get() != "null")
    }
}

/// Walks `json` once and returns the values of every pointer in `set`.
///
/// Fails when `json` is not one complete, valid JSON document.
pub fn extract<'de>(set: &PointerSet, json: &'de str) -> Result<Found<'de>, serde_json::Error> {
    let mut found = Found {
        values: [None; MAX_POINTERS],
    };
    let mut de = serde_json::Deserializer::from_str(json);
    Level {
        set,
        depth: 0,
        mask: set.all(),
        out: &mut found.values,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// The JSON string in `raw`, unescaped (borrowed when it has no escapes);
/// `None` when `raw` is not a string.
pub fn as_str<'de>(raw: &'de RawValue) -> Option<Cow<'de, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    StrSeed.deserialize(&mut de).ok()
}

/// A string, or a number or boolean as written: for ids and labels that some
/// providers send as numbers.
pub fn as_text<'de>(raw: &'de RawValue) -> Option<Cow<'de, str>> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => as_str(raw),
        Some(b'{' | b'[') | None => None,
        Some(_) => Some(Cow::Borrowed(text)),
    }
}

/// A JSON number as `i64` (fractions truncated); `None` otherwise.
pub fn as_i64(raw: &RawValue) -> Option<i64> {
    let text = raw.get();
    text.parse::<i64>().ok().or_else(|| {
        text.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && f.abs() < 9.0e18)
            .map(|f| f as i64)
    })
}

struct Level<'s, 'de> {
    set: &'s PointerSet,
    depth: usize,
    mask: u32,
    out: &'s mut [Option<&'de RawValue>; MAX_POINTERS],
}

impl<'de> DeserializeSeed<'de> for Level<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let ends_here = self.set.ending_at(self.mask, self.depth);
        if ends_here == 0 {
            return deserializer.deserialize_any(self);
        }
        let raw = <&'de RawValue>::deserialize(deserializer)?;
        let mut bits = ends_here;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            self.out[i] = Some(raw);
        }
        let deeper = self.mask & !ends_here;
        if deeper != 0 {
            // One pointer is a prefix of another: walk the captured value again.
            let mut de = serde_json::Deserializer::from_str(raw.get());
            Level {
                set: self.set,
                depth: self.depth,
                mask: deeper,
                out: self.out,
            }
            .deserialize(&mut de)
            .map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for Level<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Level {
            set,
            depth,
            mask,
            out,
        } = self;
        while let Some(key) = map.next_key_seed(StrSeed)? {
            let sub = set.matching_key(mask, depth, &key);
            if sub == 0 {
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(Level {
                    set,
                    depth: depth + 1,
                    mask: sub,
                    out: &mut *out,
                })?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Level {
            set,
            depth,
            mask,
            out,
        } = self;
        let mut index = 0;
        loop {
            let sub = set.matching_index(mask, depth, index);
            let more = if sub == 0 {
                seq.next_element::<IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(Level {
                    set,
                    depth: depth + 1,
                    mask: sub,
                    out: &mut *out,
                })?
                .is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    // Scalars where a pointer wanted to descend further: the pointer simply
    // does not resolve.
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

/// Deserializes a string, borrowing it from the input when it has no escapes.
struct StrSeed;

impl<'de> DeserializeSeed<'de> for StrSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for StrSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(pointers: &[&str]) -> PointerSet {
        let mut s = PointerSet::default();
        for p in pointers {
            s.add(JsonPointer::parse(p).unwrap()).unwrap();
        }
        s
    }

    #[test]
    fn finds_nested_values_and_array_elements() {
        let s = set(&[
            "/a/b",
            "/list/1/x",
            "/missing",
            "/a/b/deeper",
            "/esc~1aped",
            "/n",
        ]);
        let json = r#"{"a":{"b":"v\"q"},"list":[{"x":1},{"x":"two"}],"esc/aped":true,"n":null}"#;
        let f = extract(&s, json).unwrap();
        assert_eq!(as_str(f.get(0).unwrap()).unwrap(), "v\"q");
        assert_eq!(as_str(f.get(1).unwrap()).unwrap(), "two");
        assert!(f.get(2).is_none());
        assert!(f.get(3).is_none());
        assert_eq!(f.get(4).unwrap().get(), "true");
        assert!(f.get(5).is_none(), "null counts as absent");
    }

    #[test]
    fn prefix_pointers_both_resolve() {
        let s = set(&["/a", "/a/b"]);
        let f = extract(&s, r#"{"a":{"b":7}}"#).unwrap();
        assert_eq!(f.get(0).unwrap().get(), r#"{"b":7}"#);
        assert_eq!(as_i64(f.get(1).unwrap()), Some(7));
    }

    #[test]
    fn whole_document_pointer_and_validation() {
        let s = set(&[""]);
        assert_eq!(extract(&s, " [1] ").unwrap().get(0).unwrap().get(), "[1]");
        assert!(extract(&s, "{} x").is_err());
        assert!(extract(&set(&["/a"]), "{\"a\":1").is_err());
        assert!(extract(&set(&["/a"]), "{\"b\":[1,}").is_err());
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let s = set(&["/a", "/b"]);
        let f = extract(&s, r#"{"a":"plain","b":"t\u00e9"}"#).unwrap();
        assert!(matches!(
            as_str(f.get(0).unwrap()),
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(as_str(f.get(1).unwrap()).unwrap(), "té");
        assert_eq!(as_text(f.get(0).unwrap()).unwrap(), "plain");
    }

    #[test]
    fn pointer_syntax() {
        assert!(JsonPointer::parse("a").is_err());
        assert!(JsonPointer::parse("/a~2").is_err());
        let p = JsonPointer::parse("/a~0b/01/1").unwrap();
        assert_eq!(p.segments[0].key.as_ref(), "a~b");
        assert_eq!(p.segments[1].index, None, "leading zeros are not indices");
        assert_eq!(p.segments[2].index, Some(1));
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json_pointer(value in arb_json(), path in proptest::collection::vec("[abc0-2]", 0..4)) {
            let text = serde_json::to_string(&value).unwrap();
            let pointer = if path.is_empty() { String::new() } else { format!("/{}", path.join("/")) };
            let s = set(&[&pointer]);
            let found = extract(&s, &text).unwrap();
            let expected = value.pointer(&pointer).filter(|v| !v.is_null());
            let got = found.get(0).map(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).unwrap());
            prop_assert_eq!(got.as_ref(), expected);
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i32>().prop_map(serde_json::Value::from),
            "[a-z\"\\\\]{0,4}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[abc0-2]", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
