//! The config loader (src/config): any text as the TOML file, with the
//! environment stubbed. Input: the file's text, optionally followed by a
//! line `#env` and `NAME=value` lines, the process environment (for the
//! `PRESENCE_GATEWAY__...` overrides). `env:NAME` secrets resolve to a
//! marker value (or are unset when NAME starts with `UNSET`).
//!
//! It must answer a config or an error, never panic; neither the config's
//! `Debug` nor the error's message may show a secret that came from the
//! environment.
//!
//! `file:PATH` secrets read the real file system (a fuzzer naming
//! `/dev/zero` would exhaust memory, which is the operator's doing, not an
//! attacker's): inputs that mention `file:` are skipped.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use presence_gateway::Config;

const SECRET: &str = "Env-Secret-Value-7f3a";

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if input.contains("file:") {
        return;
    }
    let (text, env) = input.split_once("\n#env\n").unwrap_or((input, ""));
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let lookup = |name: &str| match name {
        "HOSTNAME" => Some("fuzz-host".to_owned()),
        _ if name.starts_with("UNSET") => None,
        _ => Some(SECRET.to_owned()),
    };
    match Config::parse_with_env(text, Path::new("fuzz.toml"), vars, lookup) {
        Ok(config) => {
            let shown = format!("{config:?}");
            assert!(!shown.contains(SECRET), "a secret in Debug: {shown}");
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.contains(SECRET), "a secret in an error: {shown}");
        }
    }
});
