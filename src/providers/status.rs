//! Raw provider status words to [`Availability`].
//!
//! Lookup order: the source's `[sources.status_map]`, then the provider's
//! built-in table, then the model's own names in any spelling
//! (`DoNotDisturb`, `do-not-disturb`); anything else is `unknown`, and the
//! record keeps the raw word. Matching is ASCII case-insensitive.

use crate::presence::Availability;
use crate::presence::model::snake_case;

/// A provider's built-in words.
pub type BuiltinTable = &'static [(&'static str, Availability)];

/// Status words of one source.
#[derive(Clone, Debug)]
pub struct StatusMap {
    custom: Vec<(Box<str>, Availability)>,
    builtin: BuiltinTable,
}

impl StatusMap {
    /// The built-in table extended (and overridden) by `custom`.
    pub fn new<'a>(
        builtin: BuiltinTable,
        custom: impl IntoIterator<Item = (&'a str, Availability)>,
    ) -> Self {
        StatusMap {
            custom: custom.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            builtin,
        }
    }

    /// The availability a raw word stands for.
    pub fn map(&self, raw: &str) -> Availability {
        let raw = raw.trim();
        if let Some((_, a)) = self
            .custom
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(raw))
        {
            return *a;
        }
        if let Some((_, a)) = self
            .builtin
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(raw))
        {
            return *a;
        }
        Availability::from_name(&snake_case(raw)).unwrap_or(Availability::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: BuiltinTable = &[("dnd", Availability::DoNotDisturb)];

    #[test]
    fn custom_then_builtin_then_model_names() {
        let m = StatusMap::new(
            TABLE,
            [
                ("OnThePhone", Availability::Busy),
                ("dnd", Availability::Away),
            ],
        );
        assert_eq!(m.map("onthephone"), Availability::Busy);
        assert_eq!(
            m.map("DND"),
            Availability::Away,
            "custom overrides built-in"
        );
        assert_eq!(m.map("DoNotDisturb"), Availability::DoNotDisturb);
        assert_eq!(m.map("be-right-back"), Availability::BeRightBack);
        assert_eq!(m.map(" Busy "), Availability::Busy);
        assert_eq!(m.map("Lunch"), Availability::Unknown);
    }
}
