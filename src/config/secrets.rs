//! Secret values and secret references: [`Secret`], which never formats its
//! value, and [`resolve_secret`], which turns an `env:NAME`, `file:PATH` or
//! literal reference into one. Resolution happens once, while the config is
//! loaded; nothing here logs, and no error message contains a secret's value.

use std::fmt;
use std::sync::Arc;

/// A secret value: signing key, token, correlation id.
///
/// `Debug` and `Display` print `[redacted]`, so a secret cannot end up in a
/// log line or an error by formatting the struct that holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Wraps a value (tests and programmatic configuration).
    pub fn new(value: impl AsRef<[u8]>) -> Self {
        Secret(Arc::from(value.as_ref()))
    }

    /// The secret bytes. Callers compare them in constant time and never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Resolves `env:NAME`, `file:PATH` or a literal. Messages name the variable
/// or file, never the value.
pub(super) fn resolve_secret(
    reference: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    let value = if let Some(name) = reference.strip_prefix("env:") {
        lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?
    } else if let Some(path) = reference.strip_prefix("file:") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret file {path}: {e}"))?;
        text.strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text)
            .to_owned()
    } else {
        reference.to_owned()
    };
    if value.is_empty() {
        return Err("secret is empty".into());
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::parse;

    #[test]
    fn file_secret_reference_strips_one_newline() {
        let dir = std::env::temp_dir().join(format!("pg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[[sources]]\nid = \"m\"\nkind = \"mitel\"\nsigning_keys = [\"file:{}\"]\n",
            file.display()
        );
        let c = parse(&text, &[]).unwrap();
        assert_eq!(c.sources[0].signing_keys[0].expose(), b"from-file");
    }
}
