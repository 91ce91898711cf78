//! The dashboard in a real browser: headless Chromium driven through
//! ChromeDriver's WebDriver API (Debian's `chromium` and `chromium-driver`;
//! `.ci/run` installs them). Loads `/`, watches rows appear and change
//! colour as signed webhooks arrive, filters, reads the source counters
//! and the overview's charts (the sparkline of accepted events, the stacked
//! bar of availabilities), sees the connection indicator follow a gateway restart, and saves a
//! screenshot under the test's output directory.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Gateway, MITEL_KEY, TOKEN};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A ChromeDriver process and one browser session in it.
struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Child,
}

impl Browser {
    async fn start() -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: install Debian's chromium and chromium-driver \
                 (bash .ci/run does)"
            );
        }
        // Port 0: ChromeDriver binds a free port itself and says which.
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let port = tokio::time::timeout(
            Duration::from_secs(30),
            driver_port(driver.stdout.take().expect("chromedriver's stdout")),
        )
        .await
        .expect("chromedriver did not say its port within 30 s");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let mut ready = false;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{base}/status")).send().await {
                let status: Value = r.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not become ready");
        let profile = std::env::temp_dir().join(format!("pg-dashboard-{port}"));
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking", "--disable-dev-shm-usage",
                             "--window-size=1280,900",
                             format!("--user-data-dir={}", profile.display())]
                }
            }}}))
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            _driver: driver,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if !body.is_null() {
            request = request.json(&body);
        }
        let response: Value = request
            .send()
            .await
            .expect("webdriver command")
            .json()
            .await
            .expect("webdriver JSON");
        assert!(
            response["value"]["error"].is_null(),
            "webdriver {path}: {response}"
        );
        response["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Polls `script` until it returns `expected` (10 s at most).
    async fn wait_for(&self, script: &str, expected: Value) {
        self.wait_for_within(script, expected, 10).await;
    }

    /// Polls `script` until it returns `expected` (`secs` at most).
    async fn wait_for_within(&self, script: &str, expected: Value, secs: u64) {
        let mut last = Value::Null;
        for _ in 0..secs * 10 {
            last = self.eval(script).await;
            if last == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{script}\nexpected {expected}, last {last}");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        let id = found[ELEMENT].as_str().expect("element id").to_owned();
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let png = self
            .command(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("PNG")
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// Reads ChromeDriver's stdout up to "ChromeDriver was started
/// successfully on port N." and returns N; goes on reading (and dropping)
/// the rest, so that the driver never blocks on a full pipe.
async fn driver_port(stdout: tokio::process::ChildStdout) -> u16 {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.expect("chromedriver's stdout") {
        let port = line
            .strip_prefix("ChromeDriver was started successfully on port ")
            .and_then(|rest| rest.trim_end_matches('.').parse().ok());
        if let Some(port) = port {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return port;
        }
        seen.push(line);
    }
    panic!(
        "chromedriver exited without saying its port:\n{}",
        seen.join("\n")
    )
}

/// Posts a presence change observed `step` ms after the test's start.
async fn post(gw: &Gateway, principal: &str, status: &str, note: &str, step: i64) {
    post_to(gw, ("mitel", MITEL_KEY), principal, status, note, step).await;
}

/// [`post`] to another Mitel source, signed with its key.
async fn post_to(
    gw: &Gateway,
    (source, key): (&str, &str),
    principal: &str,
    status: &str,
    note: &str,
    step: i64,
) {
    static START: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        i64::try_from(now.expect("clock").as_millis()).expect("ms")
    });
    let body = json!({"topic": "platform-api-presence",
        "subject": format!("/presentities/{principal}"),
        "content": {"presence": status, "statusMessage": note, "timestamp": start + step}})
    .to_string();
    gw.post_signed(source, key, &body).await;
}

/// Starts the gateway on a copy of `listener` and waits until it is
/// ready, as a proxy would before sending it webhooks (the store may still
/// be loading: on the Redis backend, webhooks get 503 until then). The
/// test keeps the listener, so a restarted gateway serves the same origin
/// the page was loaded from, with nothing able to take the port between
/// the two; the page's reconnection waits in the socket's backlog.
async fn start_ready(config: &str, listener: &std::net::TcpListener) -> Gateway {
    let copy = listener.try_clone().expect("duplicate the listener");
    copy.set_nonblocking(true).expect("non-blocking listener");
    let copy = tokio::net::TcpListener::from_std(copy).expect("listener");
    let gw = Gateway::start_on_listener(config, copy).await;
    common::wait_until("readiness", std::time::Duration::from_secs(10), || async {
        gw.readyz().await == 200
    })
    .await;
    gw
}

/// The row of `principal`: its availability and badge colour, or null.
fn row(principal: &str) -> String {
    format!(
        "const r = document.querySelector('tr[data-principal=\"{principal}\"]');
         if (!r) return null;
         const b = r.querySelector('.badge');
         return [r.dataset.availability, getComputedStyle(b).backgroundColor];"
    )
}

/// A source's sparkline: how many points it draws and the total it
/// says it shows (`data-total`), or null.
fn sparkline(source: &str) -> String {
    format!(
        "const s = document.querySelector('[data-source=\"{source}\"] svg.spark');
         if (!s) return null;
         const line = s.querySelector('polyline');
         return [line ? line.getAttribute('points').split(' ').length : 0,
                 Number(s.dataset.total)];"
    )
}

/// A source's stacked bar: per segment its availability, count, width in
/// percent (rounded) and fill colour.
fn segments(source: &str) -> String {
    format!(
        "const bar = document.querySelector('[data-source=\"{source}\"] svg.dist');
         if (!bar) return null;
         return [...bar.querySelectorAll('rect')].map(r => [r.dataset.availability,
           r.dataset.count, Math.round(Number(r.getAttribute('width'))),
           getComputedStyle(r).fill]);"
    )
}

const CONNECTION: &str = "return document.getElementById('connection').textContent;";
const VISIBLE_ROWS: &str =
    "return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.principal);";

/// The badge (and chart) colour the page gives `availability`.
fn colour(availability: &str) -> &'static str {
    match availability {
        "available" => "rgb(31, 157, 85)",
        "away" => "rgb(214, 158, 46)",
        "busy" => "rgb(197, 48, 48)",
        "do_not_disturb" => "rgb(130, 39, 39)",
        "unknown" => "rgb(160, 174, 192)",
        other => panic!("no colour known for {other}"),
    }
}

/// One segment of a stacked bar as [`segments`] reads it: `count` records
/// `availability`, `width` percent wide, in its colour.
fn segment(availability: &str, count: u32, width: u32) -> Value {
    json!([availability, count.to_string(), width, colour(availability)])
}

/// What the dashboard's page shows, read through [`row`] and [`person`].
impl Browser {
    /// Waits until the row of `principal` shows `availability` in its colour.
    async fn wait_for_row(&self, principal: &str, availability: &str) {
        self.wait_for(&row(principal), json!([availability, colour(availability)]))
            .await;
    }

    /// Waits until the People tab's row of `id` shows `availability` (in
    /// its colour), decided by `decided_by`, with `identities`.
    async fn wait_for_person(
        &self,
        id: &str,
        availability: &str,
        decided_by: &str,
        identities: &[String],
    ) {
        let expected = json!([availability, colour(availability), decided_by, identities]);
        self.wait_for(&person(id), expected).await;
    }

    /// Clicks the element with the id `id`.
    async fn click(&self, id: &str) {
        self.eval(&format!(
            "document.getElementById('{id}').click(); return null;"
        ))
        .await;
    }

    /// Empties the filter box with the id `id`, as a user deleting its text.
    async fn clear_filter(&self, id: &str) {
        self.eval(&format!(
            "const f = document.getElementById('{id}'); f.value = '';
             f.dispatchEvent(new Event('input')); return null;"
        ))
        .await;
    }

    /// Asserts that `script` returns a text that holds each of `parts`.
    async fn assert_text(&self, script: &str, parts: &[&str]) {
        let text = self.eval(script).await;
        assert!(
            text.as_str()
                .is_some_and(|t| parts.iter().all(|part| t.contains(part))),
            "{script}\nreturned {text}, which lacks one of {parts:?}"
        );
    }

    /// Saves a screenshot as `name` under the test's output directory.
    async fn save_screenshot(&self, name: &str) {
        let png = self.screenshot().await;
        assert_eq!(&png[1..4], b"PNG");
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&out, &png).expect("save the screenshot");
        eprintln!("screenshot: {}", out.display());
    }
}

#[tokio::test]
async fn the_dashboard_follows_webhooks_live_in_a_real_browser() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    // A second source whose managed subscription cannot be created (its
    // API is a closed port): the page shows its state.
    let config = common::mitel_config(&format!(
        r#"
[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "http://127.0.0.1:9"

[sources.auth]
type = "bearer"
token = "t"

[sources.subscription]
callback_url = "http://127.0.0.1:{port}/webhooks/ns"
domain = "acme.example"
"#
    ));
    let gw = start_ready(&config, &listener).await;
    post(&gw, "alice", "Busy", "in a meeting", 1).await;
    let browser = Browser::start().await;
    // The token in the fragment: the page keeps it and drops it from the URL.
    browser
        .go(&format!("http://127.0.0.1:{port}/#token={TOKEN}"))
        .await;
    browser.wait_for(CONNECTION, json!("live")).await;
    browser.wait_for_row("alice", "busy").await;
    assert_eq!(browser.eval("return location.hash;").await, json!(""));
    // Changes arrive without a reload: a marker set now survives them.
    browser.eval("window.marker = 42; return null;").await;
    post(&gw, "alice", "Available", "", 2).await;
    browser.wait_for_row("alice", "available").await;
    post(&gw, "bob", "Away", "lunch", 3).await;
    browser.wait_for_row("bob", "away").await;
    assert_eq!(browser.eval("return window.marker;").await, json!(42));
    browser
        .assert_text(
            "return document.querySelector('tr[data-principal=\"bob\"]').innerText;",
            &["lunch", "mitel"],
        )
        .await;
    // The filter box narrows the table.
    browser.type_into("#filter", "bob").await;
    browser.wait_for(VISIBLE_ROWS, json!(["bob"])).await;
    // Per-source counters (refreshed every 5 s).
    browser
        .wait_for(
            "const d = document.querySelector('[data-source=\"mitel\"] [data-counter=\"accepted\"]');
             return d && d.textContent;",
            json!("3"),
        )
        .await;
    browser
        .wait_for(
            "const s = document.querySelector('[data-source=\"ns\"] .subscription');
             return s && s.className + ' ' + s.textContent.startsWith('presence: failed');",
            json!("subscription state-failed true"),
        )
        .await;
    // The overview's charts: the sparkline holds the hour's accepted
    // events (all in the last minute or two), the stacked bar one segment
    // per availability of the source's records, coloured like the rows.
    browser.wait_for(&sparkline("mitel"), json!([60, 3])).await;
    let bar = json!([segment("available", 1, 50), segment("away", 1, 50)]);
    browser.wait_for(&segments("mitel"), bar).await;
    browser
        .assert_text(
            "return document.querySelector('[data-source=\"mitel\"] .legend').innerText;",
            &["available 1", "away 1"],
        )
        .await;
    post(&gw, "bob", "Busy", "on the phone", 4).await;
    post(&gw, "dave", "Busy", "", 5).await;
    browser.wait_for(&sparkline("mitel"), json!([60, 5])).await;
    let bar = json!([segment("available", 1, 33), segment("busy", 2, 67)]);
    browser.wait_for(&segments("mitel"), bar).await;
    // A source without records draws an empty bar and a flat line.
    browser.wait_for(&sparkline("ns"), json!([60, 0])).await;
    browser.wait_for(&segments("ns"), json!([])).await;
    browser.save_screenshot("dashboard.png").await;

    // The gateway goes away: the indicator says so; it comes back (empty,
    // a new process) and the page reconnects and shows the new state.
    gw.stop().await;
    browser
        .wait_for(
            "const t = document.getElementById('connection').textContent;
             return t === 'reconnecting' || t === 'disconnected';",
            json!(true),
        )
        .await;
    let gw = start_ready(&config, &listener).await;
    post(&gw, "carol", "DoNotDisturb", "", 4).await;
    browser.clear_filter("filter").await;
    browser.wait_for(CONNECTION, json!("live")).await;
    browser.wait_for(VISIBLE_ROWS, json!(["carol"])).await;
    browser.close().await;
}

/// A second Mitel source's key (the desk phones).
const DESK_KEY: &str = "3f0d6a52-5a0b-4a4e-9e51-0f4f3c0b6d21";

/// The row of `person` in the People tab: its availability, badge colour,
/// the source that decided it, and its identities as
/// `source/principal/availability`; or null.
fn person(id: &str) -> String {
    format!(
        "const r = document.querySelector('#people-rows tr[data-person=\"{id}\"]');
         if (!r) return null;
         const b = r.querySelector('.badge');
         return [r.dataset.availability, getComputedStyle(b).backgroundColor,
                 r.dataset.decidedBy,
                 [...r.querySelectorAll('.identities li[data-source]')].map(li =>
                   li.dataset.source + '/' + li.dataset.principal + '/' + li.dataset.availability)];"
    )
}

/// Waits until the People tab shows Ana `availability`, decided by
/// `decided_by`, her Mitel identity available (as it stays throughout) and
/// her desk phone `desk`.
async fn wait_for_ana(browser: &Browser, availability: &str, decided_by: &str, desk: &str) {
    let identities = [
        "mitel/ana-m/available".to_owned(),
        format!("desk/ana-d/{desk}"),
    ];
    browser
        .wait_for_person("ana", availability, decided_by, &identities)
        .await;
}

const PEOPLE_ROWS: &str =
    "return [...document.querySelectorAll('#people-rows tr')].map(r => r.dataset.person);";

#[tokio::test]
async fn the_people_tab_shows_derived_presence_live_and_follows_reloads() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dashboard-people-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("people dir");
    let people = dir.join("people.toml");
    let ana = r#"
[[person]]
id = "ana"
name = "Ana Lima"
identities = [
  { source = "mitel", principal = "ana-m" },
  { source = "desk", principal = "ana-d" },
]
"#;
    let bo =
        "\n[[person]]\nid = \"bo\"\nidentities = [{ source = \"mitel\", principal = \"bo-m\" }]\n";
    std::fs::write(&people, format!("{ana}{bo}")).expect("write people.toml");
    let config = common::mitel_config(&format!(
        r#"
[[sources]]
id = "desk"
kind = "mitel"
signing_keys = ["{DESK_KEY}"]

[people]
file = "{}"
"#,
        people.display()
    ));
    let gw = Gateway::start(&config).await;
    let desk = ("desk", DESK_KEY);
    post(&gw, "ana-m", "Available", "", 1).await;
    post_to(&gw, desk, "ana-d", "Busy", "on a call", 2).await;

    let browser = Browser::start().await;
    browser.go(&format!("{}/#token={TOKEN}", gw.url(""))).await;
    browser.wait_for(CONNECTION, json!("live")).await;
    // The tab shows once the gateway says it has people.
    browser
        .wait_for(
            "const t = document.getElementById('tab-people'); return !t.hidden;",
            json!(true),
        )
        .await;
    browser.click("tab-people").await;
    wait_for_ana(&browser, "busy", "desk", "busy").await;
    // A person none of whose identities has a record: unknown, listed.
    browser.wait_for_person("bo", "unknown", "", &[]).await;
    browser
        .assert_text(
            "return document.querySelector('tr[data-person=\"ana\"]').innerText;",
            &["Ana Lima", "ana-d"],
        )
        .await;
    browser
        .assert_text(
            "return document.getElementById('mapping').textContent;",
            &["mapping version 1", "2 people"],
        )
        .await;

    // Live: the desk phone goes to do-not-disturb, which wins; then offline,
    // and the Mitel identity decides again.
    post_to(&gw, desk, "ana-d", "DoNotDisturb", "", 3).await;
    wait_for_ana(&browser, "do_not_disturb", "desk", "do_not_disturb").await;
    post_to(&gw, desk, "ana-d", "Offline", "", 4).await;
    wait_for_ana(&browser, "available", "mitel", "offline").await;
    // An identity change that does not change the winner: no person event
    // needs to come, the identity still shows its new availability.
    post_to(&gw, desk, "ana-d", "Away", "", 5).await;
    wait_for_ana(&browser, "available", "mitel", "away").await;
    post(&gw, "bo-m", "Away", "lunch", 6).await;
    let bo_m = "mitel/bo-m/away".to_owned();
    browser
        .wait_for_person("bo", "away", "mitel", &[bo_m])
        .await;
    // The filter box narrows the people.
    browser.type_into("#people-filter", "lima").await;
    browser.wait_for(PEOPLE_ROWS, json!(["ana"])).await;
    browser.clear_filter("people-filter").await;
    browser.wait_for(PEOPLE_ROWS, json!(["ana", "bo"])).await;

    // A reload that fails keeps the mapping and says why.
    std::fs::write(
        &people,
        "[[person]]\nid = \"ana\"\nidentities = [{ source = \"nowhere\", principal = \"x\" }]\n",
    )
    .expect("write a bad people.toml");
    browser
        .wait_for_within(
            "const e = document.querySelector('#mapping .error');
             return !!e && e.textContent.includes('last reload failed');",
            json!(true),
            30,
        )
        .await;
    browser.wait_for(PEOPLE_ROWS, json!(["ana", "bo"])).await;
    // A reload without bo: bo leaves the tab, ana stays as she was.
    std::fs::write(&people, ana).expect("write people.toml without bo");
    browser
        .wait_for_within(PEOPLE_ROWS, json!(["ana"]), 30)
        .await;
    wait_for_ana(&browser, "available", "mitel", "away").await;

    browser.save_screenshot("dashboard-people.png").await;

    // The presence tab is still fed by the same stream.
    browser.click("tab-presence").await;
    browser.wait_for_row("bo-m", "away").await;
    browser.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_page_and_its_assets_are_embedded_and_locked_down() {
    let gw = Gateway::start(&common::mitel_config("")).await;
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/assets/dashboard.js", "text/javascript; charset=utf-8"),
        ("/assets/dashboard.css", "text/css; charset=utf-8"),
    ] {
        // No token needed for the page itself: its data needs one.
        let response = gw.client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], kind);
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        let text = response.text().await.unwrap();
        // Nothing from elsewhere: no CDN, no external fonts or scripts. (The
        // SVG namespace the script builds its charts in is a name, not a
        // resource.)
        let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{path}"
        );
    }
    assert_eq!(
        gw.client.post(gw.url("/")).send().await.unwrap().status(),
        405
    );
}
