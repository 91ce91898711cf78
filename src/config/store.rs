//! `[store]`: how much the presence store keeps (replay history, the
//! duplicate-event window and its capacity). Raw form, defaults, validation
//! and the typed [`StoreConfig`].

use std::time::Duration;

use serde::Deserialize;

/// `[store]`.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub history: usize,
    pub dedup_window: Duration,
    pub dedup_capacity: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    history: u64,
    dedup_window_secs: u64,
    dedup_capacity: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            history: 65_536,
            dedup_window_secs: 600,
            dedup_capacity: 1_000_000,
        }
    }
}

/// Checks `[store]`, reporting each bad key through `problem`.
pub(super) fn resolve(raw: RawStore, problem: &mut impl FnMut(String, String)) -> StoreConfig {
    if raw.history > 10_000_000 {
        problem("store.history".into(), "must be at most 10000000".into());
    }
    if raw.dedup_capacity == 0 {
        problem("store.dedup_capacity".into(), "must be at least 1".into());
    }
    StoreConfig {
        history: usize::try_from(raw.history).unwrap_or(usize::MAX),
        dedup_window: Duration::from_secs(raw.dedup_window_secs),
        dedup_capacity: usize::try_from(raw.dedup_capacity).unwrap_or(usize::MAX),
    }
}
