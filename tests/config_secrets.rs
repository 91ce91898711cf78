//! A configuration error names the key and the line, and never prints a
//! secret: each secret field written in the wrong shape, run through the
//! real binary's `check-config` and its start-up (text and JSON logs).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_presence-gateway");

/// The value that must never be printed.
const SECRET: &str = "s3cret-Value-7f2a";

/// A file with a bad secret field: its text, the key path and line the
/// error must name.
struct Case {
    what: &'static str,
    text: String,
    key: &'static str,
    line: usize,
}

fn mitel_auth(field: &str, kind: &str, value: &str) -> String {
    format!(
        r#"[[sources]]
id = "m"
kind = "mitel"
signing_keys = ["k"]

[sources.subscription]
callback_url = "https://gw.example.com/webhooks/m"

[sources.auth]
type = "{kind}"
{field} = {value}
"#
    )
}

fn netsapiens_auth(field: &str, value: &str) -> String {
    format!(
        r#"[[sources]]
id = "ns"
kind = "netsapiens"
correlation_ids = ["c"]
api_base = "https://ns.example.com"

[sources.subscription]
callback_url = "https://gw.example.com/webhooks/ns"

[sources.auth]
type = "password"
{field} = {value}
"#
    )
}

fn cases() -> Vec<Case> {
    let mitel = |line: &str| format!("[[sources]]\nid = \"m\"\nkind = \"mitel\"\n{line}\n");
    let ns = |line: &str| format!("[[sources]]\nid = \"ns\"\nkind = \"netsapiens\"\n{line}\n");
    vec![
        Case {
            what: "signing key as a string",
            text: mitel(&format!("signing_keys = \"{SECRET}\"")),
            key: "sources[0].signing_keys",
            line: 4,
        },
        Case {
            what: "signing key list with a wrong item",
            text: mitel(&format!("signing_keys = [\"{SECRET}\", 5]")),
            key: "sources[0].signing_keys[1]",
            line: 4,
        },
        Case {
            what: "signing key list with a syntax error",
            text: mitel(&format!("signing_keys = [\"{SECRET}\" \"{SECRET}\"]")),
            key: "",
            line: 4,
        },
        Case {
            what: "unterminated signing key",
            text: mitel(&format!("signing_keys = [\"{SECRET}")),
            key: "",
            line: 4,
        },
        Case {
            what: "signing key as a table",
            text: mitel(&format!("signing_keys = [{{ key = \"{SECRET}\" }}]")),
            key: "sources[0].signing_keys[0]",
            line: 4,
        },
        Case {
            what: "correlation id as a string",
            text: ns(&format!("correlation_ids = \"{SECRET}\"")),
            key: "sources[0].correlation_ids",
            line: 4,
        },
        Case {
            what: "correlation id with a bad model",
            text: ns(&format!(
                "correlation_ids = [{{ id = \"{SECRET}\", model = 5 }}]"
            )),
            key: "sources[0].correlation_ids[0]",
            line: 4,
        },
        Case {
            what: "consumer token as a string",
            text: format!("[consumers]\ntokens = \"{SECRET}\"\n"),
            key: "consumers.tokens",
            line: 2,
        },
        Case {
            what: "consumer token list with a wrong item",
            text: format!("[consumers]\ntokens = [\"{SECRET}\", [\"{SECRET}\"]]\n"),
            key: "consumers.tokens[1]",
            line: 2,
        },
        Case {
            what: "bearer token as a list",
            text: mitel_auth("token", "bearer", &format!("[\"{SECRET}\"]")),
            key: "sources[0].auth.token",
            line: 11,
        },
        Case {
            what: "client secret as a table",
            text: mitel_auth(
                "client_secret",
                "client_credentials",
                &format!("{{ value = \"{SECRET}\" }}"),
            ),
            key: "sources[0].auth.client_secret",
            line: 11,
        },
        Case {
            what: "refresh token as a list",
            text: mitel_auth("refresh_token", "refresh_token", &format!("[\"{SECRET}\"]")),
            key: "sources[0].auth.refresh_token",
            line: 11,
        },
        Case {
            what: "password as a list",
            text: netsapiens_auth("password", &format!("[\"{SECRET}\"]")),
            key: "sources[0].auth.password",
            line: 12,
        },
        Case {
            what: "Redis URL as a list",
            text: format!("[store.redis]\nurl = [\"redis://:{SECRET}@10.0.0.5:6379\"]\n"),
            key: "store.redis.url",
            line: 2,
        },
        Case {
            what: "Redis URL with a bad scheme",
            text: format!(
                "[store]\nbackend = \"redis\"\n\n[store.redis]\nurl = \"http://:{SECRET}@10.0.0.5\"\n"
            ),
            key: "store.redis.url",
            line: 0,
        },
    ]
}

/// A scratch directory for one test, removed at its end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("pg-config-secrets-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary with `args` on `config`; exit code and everything it
/// printed (stdout and stderr).
fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("PRESENCE_GATEWAY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run the gateway binary");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), printed)
}

/// `check-config` and start-up (both log formats) fail with exit code 2,
/// name what `expect` lists, and never print the secret.
fn assert_reported(config: &Path, env: &[(&str, &str)], what: &str, expect: &[String]) {
    for args in [
        &["check-config"][..],
        &["serve"],
        &["--log-format", "json", "serve"],
    ] {
        let (code, printed) = run(config, args, env);
        assert_eq!(code, Some(2), "{what}, {args:?}: {printed}");
        assert!(
            !printed.contains(SECRET),
            "{what}, {args:?}: the secret was printed:\n{printed}"
        );
        for part in expect {
            assert!(
                printed.contains(part.as_str()),
                "{what}, {args:?}: {part:?} missing from:\n{printed}"
            );
        }
    }
}

#[test]
fn secret_fields_in_the_wrong_shape_are_named_by_key_and_line_never_printed() {
    let dir = Dir::new("file");
    let config = dir.0.join("bad.toml");
    for case in cases() {
        std::fs::write(&config, &case.text).expect("write config");
        let mut expect = Vec::new();
        if !case.key.is_empty() {
            expect.push(case.key.to_owned());
        }
        if case.line > 0 {
            expect.push(format!("line {}", case.line));
        }
        assert_reported(&config, &[], case.what, &expect);
    }
}

#[test]
fn environment_overrides_are_reported_without_their_value() {
    let dir = Dir::new("env");
    let config = dir.0.join("override.toml");
    std::fs::write(&config, "").expect("write config");
    for (name, key) in [
        (
            "PRESENCE_GATEWAY__STORE__REDIS__LEASE_TTL_SECS",
            "store.redis.lease_ttl_secs",
        ),
        (
            "PRESENCE_GATEWAY__SERVER__MAX_IN_FLIGHT",
            "server.max_in_flight",
        ),
    ] {
        assert_reported(&config, &[(name, SECRET)], name, &[key.to_owned()]);
    }
}

#[test]
fn urls_that_fail_validation_are_not_quoted() {
    // A URL may carry credentials in its user info.
    let dir = Dir::new("urls");
    let config = dir.0.join("urls.toml");
    let text = format!(
        r#"[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "ftp://admin:{SECRET}@ns.example.com"

[sources.subscription]
callback_url = "gw.example.com/hook?token={SECRET}"

[sources.auth]
type = "bearer"
token = "t"
"#
    );
    std::fs::write(&config, text).expect("write config");
    let expect = [
        "sources[0].api_base".to_owned(),
        "sources[0].subscription.callback_url".to_owned(),
    ];
    assert_reported(&config, &[], "bad URLs", &expect);
}
