//! Operations: health, readiness, metrics, request ids, the shipped config
//! files, and the command-line subcommands.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Gateway, MITEL_KEY, fixture, sign};
use presence_gateway::Config;
use presence_gateway::verify::VerifyError;
use presence_gateway::verify::standard::{Headers, StandardVerifier, decode_secret};

const BIN: &str = env!("CARGO_BIN_EXE_presence-gateway");

/// The secret of the Standard Webhooks libraries' published test vector
/// (also `standard_secret` in tests/fixtures/keys.toml and the dev config's).
const STANDARD_KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn root(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let response = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn request_ids_are_generated_or_propagated() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let response = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!generated.is_empty());
    let response = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_ne!(
        response.headers()["x-request-id"].to_str().unwrap(),
        generated
    );
    let response = gw
        .client
        .get(gw.url("/healthz"))
        .header("x-request-id", "from-proxy-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "from-proxy-42");
    // Error answers carry it too.
    let response = gw
        .client
        .post(gw.url("/webhooks/nope"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn metrics_expose_requests_rejections_store_and_latency() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let body = fixture("mitel-presence.json");
    gw.post_signed("mitel", MITEL_KEY, &body).await;
    gw.post_webhook("mitel", body.clone(), Some(&"0".repeat(64)))
        .await;
    gw.post_webhook("mitel", body.clone(), None).await;
    gw.post_webhook("unknown", body, None).await;

    let response = gw.client.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    for line in [
        "presence_gateway_webhook_requests_total{source=\"mitel\",outcome=\"accepted\"} 1",
        "presence_gateway_webhook_requests_total{source=\"mitel\",outcome=\"rejected\"} 2",
        "presence_gateway_webhook_rejections_total{source=\"mitel\",reason=\"signature_mismatch\"} 1",
        "presence_gateway_verification_failures_total{source=\"mitel\",reason=\"mismatch\"} 1",
        "presence_gateway_verification_failures_total{source=\"mitel\",reason=\"missing\"} 1",
        "presence_gateway_events_total{source=\"mitel\",result=\"changed\"} 1",
        "presence_gateway_store_records{source=\"mitel\",availability=\"busy\"} 1",
        "presence_gateway_store_last_seq 1",
        "presence_gateway_webhook_request_duration_seconds_count{source=\"mitel\"} 1",
        "presence_gateway_unknown_source_requests_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"));
    assert!(!text.contains(MITEL_KEY));
}

/// `/metrics` in one format, with its content type.
async fn scrape(gw: &Gateway, accept: Option<&str>) -> (String, String) {
    let mut request = gw.client.get(gw.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

/// Every family has HELP text and a TYPE; every sample belongs to a family
/// declared before it. `classic`: the classic format names a counter
/// family with its `_total`, OpenMetrics without.
fn assert_well_formed(text: &str, classic: bool) {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut helped = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name and text");
            assert!(!help.trim().is_empty(), "empty HELP: {line}");
            assert!(!help.contains(['\\', '"']), "HELP needing escapes: {line}");
            helped.insert(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name and type");
            assert!(helped.contains(name), "no HELP before {line}");
            if kind == "counter" {
                assert_eq!(name.ends_with("_total"), classic, "{line}");
            }
            families.push((name.to_owned(), kind.to_owned()));
        } else if line.starts_with('#') {
            assert!(!classic, "not a classic line: {line}");
        } else {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let (family, kind) = families.last().expect("a sample before any TYPE");
            let base = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .into_iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name),
                "counter" if !classic => name.strip_suffix("_total").unwrap_or(name),
                _ => name,
            };
            assert_eq!(base, family, "sample outside its family: {line}");
        }
    }
    assert!(families.len() > 20, "{text}");
}

#[tokio::test]
async fn metrics_in_both_text_formats_have_help_for_every_family() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    gw.post_signed("mitel", MITEL_KEY, &fixture("mitel-presence.json"))
        .await;
    let (content_type, openmetrics) = scrape(&gw, None).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(openmetrics.ends_with("# EOF\n"));
    assert_well_formed(&openmetrics, false);
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert_eq!(
        scrape(&gw, Some(prometheus_accept)).await.0,
        content_type,
        "Prometheus asks for OpenMetrics first"
    );

    let (content_type, classic) = scrape(&gw, Some("text/plain; version=0.0.4")).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_well_formed(&classic, true);
    assert!(classic.contains(
        "# TYPE presence_gateway_events_total counter\n\
         presence_gateway_events_total{source=\"mitel\",result=\"changed\"} 1\n"
    ));
    // The process collector (read from /proc on Linux).
    if cfg!(target_os = "linux") {
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
        ] {
            let value = common::metric_value(&classic, name);
            assert!(value.is_some_and(|v| v > 0.0), "{name} in\n{classic}");
        }
    }
}

/// `promtool check metrics` (Prometheus' own linter, from Debian's
/// `prometheus` package, which `scripts/test` provides as `$PROMTOOL`)
/// accepts the classic format the gateway serves. Skipped where there is
/// no promtool.
#[tokio::test]
async fn promtool_check_metrics_passes() {
    use std::io::Write as _;
    let candidates = [std::env::var("PROMTOOL").ok(), Some("promtool".to_owned())];
    let Some(promtool) = candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        eprintln!("promtool not found: skipped (bash scripts/test provides it as $PROMTOOL)");
        return;
    };
    let gw = Gateway::start(&common::mitel_config("")).await;
    gw.post_signed("mitel", MITEL_KEY, &fixture("mitel-presence.json"))
        .await;
    let (_, text) = scrape(&gw, Some("text/plain; version=0.0.4")).await;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics: {:?}\n{}{}\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

#[test]
fn shipped_config_files_parse() {
    // example.toml documents every key; it reads its secrets from the environment.
    let vars = |name: &str| match name {
        "PG_CONSUMER_TOKEN" => Some("t".to_owned()),
        "MITEL_APPLICATION_ID" => Some("k".to_owned()),
        "NS_SUBSCRIPTION_ID" => Some("sub".to_owned()),
        "VENDOR_WEBHOOK_SECRET" => Some(STANDARD_KEY.to_owned()),
        _ => None,
    };
    let example = Config::load_with_env(&root("config/example.toml"), Vec::new(), vars)
        .expect("example.toml");
    let kinds: Vec<&str> = example.sources.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["mitel", "netsapiens", "standard"]);
    assert_eq!(example.server.body_limit_bytes, 262_144);
    // The values example.toml writes out are the defaults.
    let standard = example.sources[2].standard.as_ref().expect("standard");
    assert_eq!(standard.tolerance_secs, 300);
    assert_eq!(standard.event_types, ["presence.updated"]);
    // The development default needs nothing at all.
    let dev = Config::load_with_env(&root("config/presence-gateway.toml"), Vec::new(), |_| None)
        .expect("dev config");
    assert_eq!(
        dev.sources[0].signing_keys[0].expose(),
        MITEL_KEY.as_bytes()
    );
    assert_eq!(dev.sources[1].id, "vendor-dev");
    assert_eq!(
        dev.sources[1].signing_keys[0].expose(),
        STANDARD_KEY.as_bytes()
    );
}

#[test]
fn the_commented_managed_subscription_examples_parse() {
    // example.toml documents the managed-subscription keys of each source
    // commented out; uncommented, they must be a valid configuration too.
    let mut text = std::fs::read_to_string(root("config/example.toml")).unwrap();
    const START: &str = "# --- managed subscription ---";
    const END: &str = "# --- end of managed subscription ---";
    let mut blocks = 0;
    while let Some(start) = text.find(START) {
        let end = text[start..].find(END).expect("end marker") + start;
        let block: String = text[start..end]
            .lines()
            .skip(1)
            .map(|line| line.strip_prefix('#').unwrap_or(line))
            .map(|line| format!("{line}\n"))
            .collect();
        text = format!("{}{block}{}", &text[..start], &text[end + END.len()..]);
        blocks += 1;
    }
    assert_eq!(
        blocks, 5,
        "Mitel, NetSapiens, a mitel_ws, a ucwa and a graph source"
    );
    let vars = |name: &str| match name {
        // A Standard Webhooks secret must be one to be accepted.
        "VENDOR_WEBHOOK_SECRET" => Some(STANDARD_KEY.to_owned()),
        _ => Some(format!("value-of-{name}")),
    };
    let config = Config::parse_with_env(&text, Path::new("example.toml"), Vec::new(), vars)
        .expect("uncommented example");
    let mitel = config.sources[0].managed.as_ref().expect("managed Mitel");
    let m = mitel.mitel.as_ref().expect("Mitel parts");
    assert!(m.media && m.principals.is_empty());
    assert_eq!(m.method_filter.as_deref(), Some("PUT"));
    assert_eq!(m.auth_base, "https://authentication.api.mitel.io");
    let ns = config.sources[1]
        .managed
        .as_ref()
        .expect("managed NetSapiens");
    assert_eq!(ns.model_names, ["presence", "call"]);
    assert_eq!(
        ns.callback_url,
        "https://gw.example.com/webhooks/ns-cluster"
    );
    let teams = config
        .sources
        .iter()
        .find(|s| s.id == "teams")
        .expect("the graph source");
    assert_eq!(teams.kind.as_str(), "graph");
    let managed = teams.managed.as_ref().expect("managed Graph");
    assert_eq!(managed.api_base, "https://graph.microsoft.com");
    assert_eq!(managed.lifetime.as_secs(), 3600);
    assert_eq!(managed.renew_before.as_secs(), 600);
    let g = managed.graph.as_ref().expect("Graph parts");
    // Two users: one group, so only the first of the two accounts is used.
    assert_eq!(g.groups.len(), 1);
    assert_eq!(g.groups[0].len(), 2);
    assert_eq!(g.accounts.len(), 1);
    assert_eq!(
        g.token_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    // lifecycle_url stays a comment: it defaults to callback_url.
    assert_eq!(g.lifecycle_url, "https://gw.example.com/webhooks/teams");
    assert_eq!(g.lifecycle_url, managed.callback_url);
    assert_eq!(g.client_state.expose(), b"value-of-GRAPH_CLIENT_STATE");
    assert_eq!(g.resync_interval.as_secs(), 900);
    // The encryption keys stay "##" comments: no rich notifications.
    assert!(g.rich.is_none());
}

#[test]
fn the_readme_graph_example_parses() {
    // The first TOML block of the README's Graph section is a whole source.
    let readme = std::fs::read_to_string(root("README.md")).unwrap();
    let section = readme
        .find("### Microsoft Teams (Graph)")
        .expect("the Graph section");
    const OPEN: &str = "```toml\n";
    let start = readme[section..].find(OPEN).expect("a TOML block") + section + OPEN.len();
    let end = readme[start..].find("```").expect("its end") + start;
    let text = readme[start..end].replace("<tenant id>", "contoso.onmicrosoft.com");
    let vars = |name: &str| Some(format!("value-of-{name}"));
    let config = Config::parse_with_env(&text, Path::new("README.md"), Vec::new(), vars)
        .expect("the README's Graph example");
    let managed = config.sources[0].managed.as_ref().expect("managed");
    let g = managed.graph.as_ref().expect("Graph parts");
    assert_eq!(
        g.groups,
        [[
            "66825e03-7ef5-42da-9069-724602c31f6b",
            "4b0fc2a1-93d8-4e25-9f56-0d1c8e7a3b42"
        ]]
    );
    assert_eq!(g.lifecycle_url, "https://gw.example.com/webhooks/teams");
    assert_eq!(managed.lifetime.as_secs(), 3600);
}

#[test]
fn check_config_accepts_good_files_and_names_bad_keys() {
    let ok = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(root("config/presence-gateway.toml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok"));

    let dir = std::env::temp_dir().join(format!("pg-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    // Writes `text` to the bad file and runs check-config on it.
    let check = |text: &str| {
        std::fs::write(&bad, text).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = check("[[sources]]\nid = \"x\"\nkind = \"mitel\"\nsigning_keys = []\n");
    assert!(stderr.contains("sources[0].signing_keys"), "{stderr}");

    let stderr = check("[server]\nlisten = \"0.0.0.0:1\"\nbody_limit = 5\n");
    assert!(
        stderr.contains("line 3") && stderr.contains("body_limit"),
        "{stderr}"
    );

    // A Standard Webhooks secret that is not base64 is named by its key,
    // and no part of it is printed.
    let stderr = check(
        "[[sources]]\nid = \"vendor\"\nkind = \"standard\"\n\
         signing_keys = [\"whsec_c2VjcmV0*not-base64\"]\n",
    );
    assert!(
        stderr.contains("sources[0].signing_keys[0]") && stderr.contains("base64"),
        "{stderr}"
    );
    assert!(!stderr.contains("c2VjcmV0"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn healthcheck_subcommand_probes_healthz() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    let addr = gw.addr.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["healthcheck", "--addr", &addr])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(ok.success());
    // A port this test holds (bound) without listening: connections to it
    // are refused, and no other process can start listening there.
    let closed = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    closed
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let closed_addr = closed
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap()
        .to_string();
    let failed = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["healthcheck", "--timeout", "1", "--addr", &closed_addr])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!failed.success());
    drop(closed);
}

#[test]
fn sign_subcommand_matches_the_verifier() {
    let file = root("tests/fixtures/mitel-presence.json");
    let out = Command::new(BIN)
        .args(["sign", "--key", MITEL_KEY])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = sign(MITEL_KEY, &std::fs::read(&file).unwrap());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
}

/// Runs `sign` with `args`, the body on stdin; (success, stdout, stderr).
fn run_sign(args: &[&str], body: &[u8]) -> (bool, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new(BIN)
        .arg("sign")
        .args(args)
        .env_remove("PRESENCE_GATEWAY_SIGN_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sign");
    let mut stdin = child.stdin.take().expect("stdin");
    // A refused key is only looked at after the body is read: write it all.
    stdin.write_all(body).expect("write the body");
    drop(stdin);
    let out = child.wait_with_output().expect("sign");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The values of the three `name: value` lines `sign --standard` prints.
fn standard_header_lines(stdout: &str) -> [String; 3] {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let value = |i: usize, name: &str| {
        lines[i]
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(": "))
            .unwrap_or_else(|| panic!("line {i} is not {name}: {stdout}"))
            .to_owned()
    };
    [
        value(0, "webhook-id"),
        value(1, "webhook-timestamp"),
        value(2, "webhook-signature"),
    ]
}

#[test]
fn sign_standard_prints_headers_the_verifier_accepts() {
    // The published Standard Webhooks test vector.
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    let verifier = StandardVerifier::new([decode_secret(STANDARD_KEY.as_bytes()).unwrap()], 300);

    let (ok, stdout, stderr) = run_sign(
        &[
            "--standard",
            "--key",
            STANDARD_KEY,
            "--id",
            ID,
            "--timestamp",
            &TIMESTAMP.to_string(),
        ],
        BODY,
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\n\
         webhook-timestamp: 1614265330\n\
         webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\n"
    );
    let [id, timestamp, signature] = standard_header_lines(&stdout);
    let headers = Headers {
        id: Some(id.as_bytes()),
        timestamp: Some(timestamp.as_bytes()),
        signature: Some(signature.as_bytes()),
    };
    let message = verifier.verify(headers, BODY, TIMESTAMP).expect("verified");
    assert_eq!(message.id, ID);
    assert_eq!(message.body.bytes(), BODY);
    // The headers are bound to the body.
    assert_eq!(
        verifier
            .verify(headers, br#"{"test": 2432232315}"#, TIMESTAMP)
            .map(|_| ()),
        Err(VerifyError::Mismatch)
    );

    // Without --id and --timestamp: a fresh msg_ id and the current time,
    // which a verifier on the same clock accepts.
    let body = std::fs::read(root("tests/fixtures/standard-presence.json")).unwrap();
    let (ok, stdout, stderr) = run_sign(&["--standard", "--key", STANDARD_KEY], &body);
    assert!(ok, "{stderr}");
    let [id, timestamp, signature] = standard_header_lines(&stdout);
    assert!(id.starts_with("msg_") && id.len() > 4, "{id}");
    let headers = Headers {
        id: Some(id.as_bytes()),
        timestamp: Some(timestamp.as_bytes()),
        signature: Some(signature.as_bytes()),
    };
    let now = presence_gateway::sources::unix_now();
    let message = verifier.verify(headers, &body, now).expect("verified");
    assert_eq!(message.id, id);
}

#[test]
fn sign_standard_refuses_bad_keys_without_printing_them() {
    for (key, secret_part) in [
        ("whsec_", ""),
        ("whsec_c2VjcmV0*not-base64", "c2VjcmV0"),
        (
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    ] {
        let (ok, stdout, stderr) = run_sign(&["--standard", "--key", key], b"{}");
        assert!(!ok, "{key:?} accepted: {stdout}");
        assert!(stdout.is_empty(), "{key:?}: {stdout}");
        assert!(stderr.contains("--key"), "{key:?}: {stderr}");
        if !secret_part.is_empty() {
            assert!(!stderr.contains(secret_part), "{key:?}: {stderr}");
        }
    }
}

/// The README's "Try it" for Standard Webhooks: the dev config's
/// `vendor-dev` source takes what `sign --standard` prints, once.
#[tokio::test]
async fn the_dev_config_takes_a_request_signed_by_sign_standard() {
    let text = std::fs::read_to_string(root("config/presence-gateway.toml")).unwrap();
    // State stays where PG_TEST_STORE puts it, not in var/state.
    let text = text.replace("data_dir = \"var/state\"", "");
    assert!(
        !text.contains("data_dir"),
        "the dev config's data_dir moved"
    );
    let gw = Gateway::start(&text).await;
    let body = r#"{"type":"presence.updated","data":{"user_id":"u-4411","status":"away","activity":"InAMeeting","message":"back at 3"}}"#;
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_sign(&["--standard", "--key", STANDARD_KEY], body.as_bytes())
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    let [id, timestamp, signature] = standard_header_lines(&stdout);
    let post = || {
        gw.client
            .post(gw.url("/webhooks/vendor-dev"))
            .header("webhook-id", &id)
            .header("webhook-timestamp", &timestamp)
            .header("webhook-signature", &signature)
            .body(body)
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 204);
    let response = gw
        .client
        .get(gw.url("/v1/presence/vendor-dev/u-4411"))
        .bearer_auth("dev-consumer-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let record: serde_json::Value = response.json().await.unwrap();
    assert_eq!(record["availability"], "away");
    assert_eq!(record["activity"], "in_a_meeting");
    assert_eq!(record["status_text"], "back at 3");
    // The same request again is a duplicate: acknowledged, not applied.
    assert_eq!(post().await.unwrap().status(), 204);
    let sources: serde_json::Value = gw
        .client
        .get(gw.url("/v1/sources"))
        .bearer_auth("dev-consumer-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        common::source_counter(&sources, "vendor-dev", "accepted"),
        1
    );
    assert_eq!(
        common::source_counter(&sources, "vendor-dev", "duplicate"),
        1
    );
}
