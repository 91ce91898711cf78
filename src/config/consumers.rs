//! `[consumers]`: who may read the consumer API (bearer tokens, resolved as
//! secrets) and how far a stream consumer may fall behind. Raw form,
//! defaults, validation and the typed [`ConsumersConfig`].

use serde::Deserialize;

use super::secrets::{Secret, resolve_secret};

/// `[consumers]`.
#[derive(Clone, Debug, Default)]
pub struct ConsumersConfig {
    /// Bearer tokens accepted on `/v1`; empty means open.
    pub tokens: Vec<Secret>,
    /// Changes a stream consumer may fall behind the live fan-out.
    pub stream_buffer: usize,
    /// Stream opens with a snapshot or replay one consumer may make at
    /// once (0: no limit), and how many it regains per minute.
    pub stream_open_burst: u32,
    pub stream_opens_per_minute: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConsumers {
    tokens: Vec<String>,
    stream_buffer: u64,
    stream_open_burst: u64,
    stream_opens_per_minute: u64,
}

impl Default for RawConsumers {
    fn default() -> Self {
        RawConsumers {
            tokens: Vec::new(),
            stream_buffer: 4096,
            stream_open_burst: 60,
            stream_opens_per_minute: 60,
        }
    }
}

/// Checks `[consumers]` and resolves its tokens, reporting each bad key
/// through `problem`.
pub(super) fn resolve(
    raw: RawConsumers,
    lookup: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(String, String),
) -> ConsumersConfig {
    if !(16..=1 << 20).contains(&raw.stream_buffer) {
        problem(
            "consumers.stream_buffer".into(),
            "must be between 16 and 1048576".into(),
        );
    }
    if raw.stream_open_burst > 1_000_000 {
        problem(
            "consumers.stream_open_burst".into(),
            "must be at most 1000000 (0 turns the limit off)".into(),
        );
    }
    if !(1..=1_000_000).contains(&raw.stream_opens_per_minute) {
        problem(
            "consumers.stream_opens_per_minute".into(),
            "must be between 1 and 1000000".into(),
        );
    }
    let tokens = raw
        .tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            resolve_secret(t, lookup)
                .map_err(|m| problem(format!("consumers.tokens[{i}]"), m))
                .ok()
        })
        .collect();
    ConsumersConfig {
        tokens,
        stream_buffer: usize::try_from(raw.stream_buffer).unwrap_or(usize::MAX),
        stream_open_burst: u32::try_from(raw.stream_open_burst).unwrap_or(u32::MAX),
        stream_opens_per_minute: u32::try_from(raw.stream_opens_per_minute).unwrap_or(u32::MAX),
    }
}
