//! How errors of the file and of environment overrides are worded: the key
//! path and the position (line, column), and never a value from the file or
//! the environment.
//!
//! The `toml` and `config` crates quote the offending line and the value in
//! their messages (`invalid type: string "super-secret", expected a
//! sequence`), which would print a signing key or a refresh token that was
//! written in the wrong shape to the terminal and the logs. Their messages
//! are rebuilt here from parts that cannot hold a value: serde's kind of the
//! value found (`string`), what was expected, key names, and enum variant
//! names (secrets are never enums).

/// Checks `text` against `T` strictly (syntax, unknown keys, types) and
/// words the first error as `line L, column C: key: message`.
pub(super) fn strict<T: serde::de::DeserializeOwned>(text: &str) -> Result<(), String> {
    let at = |error: &toml::de::Error| match error.span() {
        Some(span) => {
            let (line, column) = position(text, span.start);
            format!("line {line}, column {column}: ")
        }
        None => String::new(),
    };
    let deserializer = toml::Deserializer::parse(text)
        // A syntax error: the parser's own descriptions and the tokens it
        // expected, never the text it found.
        .map_err(|e| format!("{}{}", at(&e), e.message()))?;
    serde_path_to_error::deserialize::<_, T>(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let message = without_values(e.inner().message());
        if key == "." {
            format!("{}{message}", at(e.inner()))
        } else {
            format!("{}{key}: {message}", at(e.inner()))
        }
    })?;
    Ok(())
}

/// An error of the `config` crate (environment overrides over the file),
/// without the value.
pub(super) fn override_error(error: &config::ConfigError) -> String {
    use config::ConfigError as E;
    match error {
        E::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            let found = kind_of(&unexpected.to_string());
            match key {
                Some(key) => format!("{key}: invalid type: {found}, expected {expected}"),
                None => format!("invalid type: {found}, expected {expected}"),
            }
        }
        E::At {
            error,
            key: Some(key),
            ..
        } => format!("{key}: {}", override_error(error)),
        E::At { error, .. } => override_error(error),
        E::Message(message) => without_values(message),
        E::NotFound(key) => format!("{key}: missing"),
        _ => "cannot be read".to_owned(),
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Messages that name only keys, variants, lengths or types, kept as they are.
const KEPT: [&str; 9] = [
    "unknown field `",
    "missing field `",
    "duplicate field `",
    "duplicate key",
    "unknown variant `",
    "invalid length ",
    "data did not match any variant",
    "integer number overflowed",
    "floating-point number overflowed",
];

/// serde's message without the value it may quote.
pub(super) fn without_values(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // "string \"x\", expected a sequence": the expected part comes
            // last, whatever the value holds.
            return match rest.rfind(", expected ") {
                Some(i) => format!("{prefix}{}{}", kind_of(&rest[..i]), &rest[i..]),
                None => format!("{prefix}{}", kind_of(rest)),
            };
        }
    }
    if KEPT.iter().any(|kept| message.starts_with(kept)) {
        return message.to_owned();
    }
    "invalid value".to_owned()
}

/// The kind of value serde (or the `config` crate) describes (`string
/// "x"` → `string`), from a fixed list: anything else is just "a value".
fn kind_of(found: &str) -> &'static str {
    const KINDS: [&str; 19] = [
        "boolean",
        "integer",
        "64-bit integer",
        "128-bit integer",
        "64-bit unsigned integer",
        "128-bit unsigned integer",
        "floating point",
        "character",
        "string",
        "byte array",
        "unit value",
        "Option value",
        "newtype struct",
        "sequence",
        "map",
        "enum",
        "unit variant",
        "newtype variant",
        "struct variant",
    ];
    let head = found.split(['"', '`']).next().unwrap_or("").trim();
    KINDS
        .into_iter()
        .find(|kind| head == *kind)
        .unwrap_or("a value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_keep_the_kind_and_drop_the_value() {
        assert_eq!(
            without_values("invalid type: string \"s3cret, expected x\", expected a sequence"),
            "invalid type: string, expected a sequence"
        );
        assert_eq!(
            without_values("invalid value: integer `-5`, expected u64"),
            "invalid value: integer, expected u64"
        );
        assert_eq!(
            without_values("invalid type: s3cret, expected a string"),
            "invalid type: a value, expected a string"
        );
        assert_eq!(without_values("custom: s3cret"), "invalid value");
        let kept = "unknown field `listn`, expected one of `listen`";
        assert_eq!(without_values(kept), kept);
    }

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(position(text, 0), (1, 1));
        assert_eq!(position(text, 6), (2, 1));
        assert_eq!(position(text, text.find('"').unwrap()), (2, 6));
        assert_eq!(position(text, 10_000), (3, 1));
    }
}
