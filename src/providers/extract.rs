//! Pulls a handful of values out of a JSON document by JSON Pointer (RFC 6901)
//! in one streaming pass.
//!
//! Provider field locations are partly undocumented, so every field is a list
//! of configurable pointers. Building a `serde_json::Value` tree for each
//! webhook would allocate for every key of the payload; instead a small
//! validating scanner walks the bytes once, descends only into keys some
//! pointer needs, skips the rest, and returns the wanted values as borrowed
//! slices of JSON text ([`Raw`]). The whole document is still validated
//! (RFC 8259 grammar, nesting at most 128 deep, like serde_json); when it is
//! not valid, serde_json is asked for the error message. The scanner never
//! allocates. Property tests check it against serde_json.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, Visitor};

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
///
/// Besides the pointers, the set keeps per depth the bit mask of pointers
/// that end there and, for every key (or array index) some pointer has at
/// that depth, the mask of pointers with it: the scanner asks these for every
/// key it meets, so they are flat lists compared by length first.
#[derive(Clone, Debug, Default)]
pub struct PointerSet {
    pointers: Vec<JsonPointer>,
    levels: Vec<Level>,
}

#[derive(Clone, Debug, Default)]
struct Level {
    /// Pointers with exactly this many segments.
    ends: u32,
    /// Keys at this depth and the pointers that have each.
    keys: Vec<(Box<str>, u32)>,
    /// Array indices at this depth and the pointers that have each.
    indices: Vec<(usize, u32)>,
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
        let bit = 1u32 << self.pointers.len();
        let depth = pointer.segments.len();
        if self.levels.len() <= depth {
            self.levels.resize_with(depth + 1, Level::default);
        }
        self.levels[depth].ends |= bit;
        for (level, segment) in self.levels.iter_mut().zip(pointer.segments.iter()) {
            match level.keys.iter_mut().find(|(k, _)| *k == segment.key) {
                Some((_, mask)) => *mask |= bit,
                None => level.keys.push((segment.key.clone(), bit)),
            }
            if let Some(index) = segment.index {
                match level.indices.iter_mut().find(|(i, _)| *i == index) {
                    Some((_, mask)) => *mask |= bit,
                    None => level.indices.push((index, bit)),
                }
            }
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
        self.levels.get(depth).map_or(0, |l| l.ends & mask)
    }

    fn matching_key(&self, mask: u32, depth: usize, key: &str) -> u32 {
        self.levels.get(depth).map_or(0, |l| {
            l.keys
                .iter()
                .find(|(k, _)| k.len() == key.len() && **k == *key)
                .map_or(0, |(_, m)| m & mask)
        })
    }

    fn matching_index(&self, mask: u32, depth: usize, index: usize) -> u32 {
        self.levels.get(depth).map_or(0, |l| {
            l.indices
                .iter()
                .find(|(i, _)| *i == index)
                .map_or(0, |(_, m)| m & mask)
        })
    }
}

/// One value's JSON text, borrowed from the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raw<'de>(&'de str);

impl<'de> Raw<'de> {
    /// The JSON text of the value (no surrounding whitespace).
    pub fn get(self) -> &'de str {
        self.0
    }

    /// A value from JSON text, for tests of code that reads values.
    #[cfg(test)]
    pub(crate) fn for_tests(json: &'de str) -> Self {
        Raw(json)
    }
}

/// The values found for a [`PointerSet`], borrowed from the document.
#[derive(Clone, Copy, Debug)]
pub struct Found<'de> {
    values: [Option<Raw<'de>>; MAX_POINTERS],
}

impl<'de> Found<'de> {
    /// The value of pointer `i`; `None` when absent or JSON `null`.
    pub fn get(&self, i: usize) -> Option<Raw<'de>> {
        self.values
            .get(i)
            .copied()
            .flatten()
            .filter(|raw| raw.0 != "null")
    }
}

/// Walks `json` once and returns the values of every pointer in `set`.
///
/// Fails when `json` is not one complete, valid JSON document.
pub fn extract<'de>(set: &PointerSet, json: &'de str) -> Result<Found<'de>, serde_json::Error> {
    let mut scanner = Scanner {
        text: json,
        bytes: json.as_bytes(),
        at: 0,
        set,
        found: Found {
            values: [None; MAX_POINTERS],
        },
    };
    match scanner.document() {
        Ok(()) => Ok(scanner.found),
        Err(Invalid::TooDeep) => Err(de::Error::custom(format_args!(
            "JSON nested deeper than {MAX_DEPTH} levels"
        ))),
        // Let serde_json describe the problem (line and column).
        Err(Invalid::Syntax) => match serde_json::from_str::<IgnoredAny>(json) {
            Err(e) => Err(e),
            Ok(_) => Err(de::Error::custom("invalid JSON")),
        },
    }
}

/// The JSON string in `raw`, unescaped (borrowed when it has no escapes);
/// `None` when `raw` is not a string.
pub fn as_str(raw: Raw<'_>) -> Option<Cow<'_, str>> {
    let text = raw.0;
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    StrSeed.deserialize(&mut de).ok()
}

/// A string, or a number or boolean as written: for ids and labels that some
/// providers send as numbers.
pub fn as_text(raw: Raw<'_>) -> Option<Cow<'_, str>> {
    match raw.0.as_bytes().first() {
        Some(b'"') => as_str(raw),
        Some(b'{' | b'[') | None => None,
        Some(_) => Some(Cow::Borrowed(raw.0)),
    }
}

/// A JSON number as `i64` (fractions truncated); `None` otherwise.
pub fn as_i64(raw: Raw<'_>) -> Option<i64> {
    let text = raw.0;
    text.parse::<i64>().ok().or_else(|| {
        text.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && f.abs() < 9.0e18)
            .map(|f| f as i64)
    })
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The first position from `at` holding `"`, `\\` or a control character
/// (or the end). Eight bytes at a time: for each byte, `x - 1` borrows into
/// the high bit only when `x` is zero (or, for the control test, below 0x20),
/// and the lowest flagged byte of a word is always a true match.
fn skip_plain(bytes: &[u8], mut at: usize) -> usize {
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let found = ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w))
            & HIGHS;
        if found != 0 {
            return at + (found.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while let Some(&b) = bytes.get(at) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        at += 1;
    }
    at
}

/// Deepest nesting accepted, as serde_json's default recursion limit.
const MAX_DEPTH: usize = 128;

/// Not valid JSON; the position is recovered by asking serde_json.
#[derive(Debug, PartialEq, Eq)]
enum Invalid {
    Syntax,
    /// Deeper than [`MAX_DEPTH`]: valid JSON, but refused (the scanner is
    /// recursive, and no provider nests this deep).
    TooDeep,
}

struct Scanner<'s, 'de> {
    text: &'de str,
    bytes: &'de [u8],
    at: usize,
    set: &'s PointerSet,
    found: Found<'de>,
}

impl<'de> Scanner<'_, 'de> {
    fn document(&mut self) -> Result<(), Invalid> {
        self.value(0, self.set.all())?;
        self.whitespace();
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(Invalid::Syntax)
        }
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Result<u8, Invalid> {
        self.bytes.get(self.at).copied().ok_or(Invalid::Syntax)
    }

    /// One value at `depth`, for the pointers in `mask`.
    fn value(&mut self, depth: usize, mask: u32) -> Result<(), Invalid> {
        self.whitespace();
        let start = self.at;
        let ends = if mask == 0 {
            0
        } else {
            self.set.ending_at(mask, depth)
        };
        let deeper = mask & !ends;
        match self.peek()? {
            b'{' => self.object(depth, deeper)?,
            b'[' => self.array(depth, deeper)?,
            b'"' => {
                self.string()?;
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return Err(Invalid::Syntax),
        }
        let mut bits = ends;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            self.found.values[i] = Some(Raw(&self.text[start..self.at]));
        }
        Ok(())
    }

    fn object(&mut self, depth: usize, mask: u32) -> Result<(), Invalid> {
        if depth >= MAX_DEPTH {
            return Err(Invalid::TooDeep);
        }
        self.at += 1;
        self.whitespace();
        if self.peek()? == b'}' {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.whitespace();
            if self.peek()? != b'"' {
                return Err(Invalid::Syntax);
            }
            let key_start = self.at;
            let escaped = self.string()?;
            let sub = if mask == 0 {
                0
            } else if escaped {
                // A key that does not decode (a lone surrogate escape: valid
                // grammar) names no pointer, as pointers are Rust strings.
                as_str(Raw(&self.text[key_start..self.at]))
                    .map_or(0, |key| self.set.matching_key(mask, depth, &key))
            } else {
                self.set
                    .matching_key(mask, depth, &self.text[key_start + 1..self.at - 1])
            };
            // A repeated key's last value wins, as in serde_json: forget
            // what an earlier one gave the pointers below it.
            let mut bits = sub;
            while bits != 0 {
                self.found.values[bits.trailing_zeros() as usize] = None;
                bits &= bits - 1;
            }
            self.whitespace();
            if self.peek()? != b':' {
                return Err(Invalid::Syntax);
            }
            self.at += 1;
            self.value(depth + 1, sub)?;
            self.whitespace();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Invalid::Syntax),
            }
        }
    }

    fn array(&mut self, depth: usize, mask: u32) -> Result<(), Invalid> {
        if depth >= MAX_DEPTH {
            return Err(Invalid::TooDeep);
        }
        self.at += 1;
        self.whitespace();
        if self.peek()? == b']' {
            self.at += 1;
            return Ok(());
        }
        let mut index = 0;
        loop {
            let sub = if mask == 0 {
                0
            } else {
                self.set.matching_index(mask, depth, index)
            };
            self.value(depth + 1, sub)?;
            self.whitespace();
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Invalid::Syntax),
            }
            index += 1;
        }
    }

    /// A string starting at its opening quote; returns whether it had escapes.
    fn string(&mut self) -> Result<bool, Invalid> {
        self.at += 1;
        let mut escaped = false;
        loop {
            self.at = skip_plain(self.bytes, self.at);
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Ok(escaped);
                }
                b'\\' => {
                    escaped = true;
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            // Like serde_json when it skips a string: four hex
                            // digits; surrogate pairing is checked only when a
                            // string is actually decoded.
                            let hex = self
                                .bytes
                                .get(self.at + 1..self.at + 5)
                                .ok_or(Invalid::Syntax)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(Invalid::Syntax);
                            }
                            self.at += 5;
                        }
                        _ => return Err(Invalid::Syntax),
                    }
                }
                // A raw control character inside a string.
                _ => return Err(Invalid::Syntax),
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Invalid> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(Invalid::Syntax)
        }
    }

    fn number(&mut self) -> Result<(), Invalid> {
        if self.peek()? == b'-' {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return Err(Invalid::Syntax),
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if !self.peek()?.is_ascii_digit() {
                return Err(Invalid::Syntax);
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return Err(Invalid::Syntax);
            }
            self.digits();
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
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
    fn skip_plain_finds_the_first_stop_byte() {
        for text in [
            "",
            "abc",
            "abcdefgh\"",
            "abcdefghijklmnop\\x",
            "ab\u{1}cdefghij\"",
            "\u{7f}\u{80}\u{ff}ééééé\"x",
        ] {
            let bytes = text.as_bytes();
            let expected = bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(bytes.len());
            for start in 0..=expected {
                assert_eq!(skip_plain(bytes, start), expected, "{text:?} from {start}");
            }
        }
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
        fn agrees_with_serde_json_pointer(value in arb_json(),
                                          paths in proptest::collection::vec(proptest::collection::vec("[abc0-2]", 0..4), 1..5)) {
            let text = serde_json::to_string(&value).unwrap();
            let pointers: Vec<String> = paths
                .iter()
                .map(|path| if path.is_empty() { String::new() } else { format!("/{}", path.join("/")) })
                .collect();
            let refs: Vec<&str> = pointers.iter().map(String::as_str).collect();
            let s = set(&refs);
            let found = extract(&s, &text).unwrap();
            for pointer in &pointers {
                let i = s.pointers.iter().position(|p| p.as_str() == pointer).unwrap();
                let expected = value.pointer(pointer).filter(|v| !v.is_null());
                let got = found.get(i).map(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).unwrap());
                prop_assert_eq!(got.as_ref(), expected, "{}", pointer);
            }
        }
    }

    /// Valid documents with one byte replaced, inserted or removed: the
    /// scanner accepts exactly what serde_json accepts.
    #[test]
    fn validity_agrees_with_serde_json_on_edge_cases() {
        let cases = [
            "",
            " ",
            "{}",
            "[]",
            "{,}",
            "[1,]",
            "[,1]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{\"a\":}",
            "01",
            "-",
            "-0",
            "1.",
            "1.5e",
            "1e+",
            "1E-7",
            "tru",
            "nul",
            "\"\\x\"",
            "\"\\u12G4\"",
            "\"\\u0041\"",
            "\"a\tb\"",
            "\"\u{1}\"",
            "[[[]]]",
            "{\"a\":{\"b\":[true,false,null]}}",
            "1 2",
            "\"unterminated",
            "{\"a\":1}}",
            " [1] ",
        ];
        for text in cases {
            let ours = extract(&set(&["/a"]), text).is_ok();
            let theirs = serde_json::from_str::<IgnoredAny>(text).is_ok();
            assert_eq!(ours, theirs, "{text:?}");
        }
        // Nesting: 128 levels are fine; deeper is refused with its own message
        // (serde_json would skip any depth when ignoring a value).
        let deep_ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(extract(&set(&["/a"]), &deep_ok).is_ok());
        let too_deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        let err = extract(&set(&["/a"]), &too_deep).unwrap_err().to_string();
        assert!(err.contains("deeper than 128"), "{err}");
    }

    /// Found by fuzz/fuzz_targets/json_scanner.rs: a key with a lone
    /// surrogate escape is valid JSON, but was refused whenever a pointer
    /// needed the keys of its object.
    #[test]
    fn keys_with_lone_surrogates_are_valid_and_match_nothing() {
        let s = set(&["/a", "/\u{fffd}"]);
        for text in [r#"{"\ude00":1,"a":2}"#, r#"{"a\ud800":1,"a":2}"#] {
            let f = extract(&s, text).unwrap();
            assert_eq!(f.get(0).unwrap().get(), "2", "{text}");
            assert!(f.get(1).is_none(), "{text}");
            assert!(serde_json::from_str::<IgnoredAny>(text).is_ok());
        }
    }

    /// Found by comparing with serde_json (fuzz/fuzz_targets/json_scanner.rs):
    /// with a repeated key, pointers below it kept the earlier value's
    /// members, mixing two objects serde_json reads as the last one alone.
    #[test]
    fn a_repeated_key_is_its_last_value_alone() {
        let s = set(&["/content", "/content/presence", "/content/time", "/a/1"]);
        let text = r#"{"content":{"presence":"Busy"},"a":[1,2],"content":{"time":5},"a":[3]}"#;
        let f = extract(&s, text).unwrap();
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(f.get(0).unwrap().get(), r#"{"time":5}"#);
        assert!(f.get(1).is_none(), "not the first object's member");
        assert!(value.pointer("/content/presence").is_none());
        assert_eq!(f.get(2).unwrap().get(), "5");
        assert!(f.get(3).is_none(), "not the first array's element");
    }

    proptest! {
        #[test]
        fn validity_agrees_with_serde_json(value in arb_json(), at in any::<prop::sample::Index>(),
                                           byte in prop::sample::select(b"{}[],:\"\\ -+.0123456789eEtrufalsn\x01x".to_vec()),
                                           edit in 0u8..3) {
            let mut bytes = serde_json::to_string(&value).unwrap().into_bytes();
            let i = at.index(bytes.len() + 1);
            match edit {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
            let Ok(text) = String::from_utf8(bytes) else { return Ok(()); };
            let ours = extract(&set(&["/a", "/0/b"]), &text).is_ok();
            let theirs = serde_json::from_str::<IgnoredAny>(&text).is_ok();
            prop_assert_eq!(ours, theirs, "{:?}", text);
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
