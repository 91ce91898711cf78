//! Operations: health, readiness, metrics, request ids, the shipped config
//! files, and the command-line subcommands.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Gateway, MITEL_KEY, fixture, sign};
use presence_gateway::Config;

const BIN: &str = env!("CARGO_BIN_EXE_presence-gateway");

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
        _ => None,
    };
    let example = Config::load_with_env(&root("config/example.toml"), Vec::new(), vars)
        .expect("example.toml");
    assert_eq!(example.sources.len(), 2);
    assert_eq!(example.server.body_limit_bytes, 262_144);
    // The development default needs nothing at all.
    let dev = Config::load_with_env(&root("config/presence-gateway.toml"), Vec::new(), |_| None)
        .expect("dev config");
    assert_eq!(
        dev.sources[0].signing_keys[0].expose(),
        MITEL_KEY.as_bytes()
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
    assert_eq!(blocks, 4, "Mitel, NetSapiens, a mitel_ws and a ucwa source");
    let vars = |name: &str| Some(format!("value-of-{name}"));
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
