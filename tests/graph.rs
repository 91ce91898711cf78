//! `kind = "graph"` (Microsoft Graph presence for Teams) against a mock
//! Graph (tests/common/graph.rs: token endpoint with rotating refresh
//! tokens, subscriptions API, `getPresencesByUserId`), written against the
//! contract of DESIGN §1, §2, §4 (Graph) and §5.
//!
//! Scenarios about schedules (renewal, resync, Retry-After, lifecycle
//! events) run under tokio's paused clock, like the other subscription
//! suites: the gateway, the mock and the test share one runtime and an hour
//! passes at once when nothing else is due. Scenarios about how fast the
//! webhook answers, or what a burst of notifications costs, run in real
//! time, as does the one with the real binary.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::graph::{
    self, CALLBACK_URL, CLIENT_SECRET, CLIENT_STATE, Call, DEFAULT_SCOPE, Graph, LIFECYCLE_URL,
    MAX_IDS, batch, item, lifecycle, parse_ms, resource_for, route, user, users,
};
use common::{Gateway, TOKEN, assert_problem, settle, wait_until};
use serde_json::{Value, json};

/// The source id of every config here.
const SOURCE: &str = "teams";
/// Real-time waits for something that takes milliseconds when it works.
const WITHIN: Duration = Duration::from_secs(20);

/// What a test's config varies.
struct Setup {
    users: Vec<String>,
    /// Service accounts (refresh tokens `rt-account-1`, ...).
    accounts: usize,
    /// Whether `client_secret` is configured.
    secret: bool,
    /// More lines in `[sources.auth]`.
    auth: String,
    /// `[sources.subscription]`: key and TOML value, in order.
    subscription: Vec<(String, String)>,
    /// More lines in `[server]`.
    server: String,
    /// Whether the mock runs Graph's validation handshake against the
    /// gateway before it answers a create.
    validate: bool,
}

impl Setup {
    fn new(users: Vec<String>, accounts: usize) -> Setup {
        Setup {
            users,
            accounts,
            secret: true,
            auth: String::new(),
            subscription: [
                ("callback_url", format!("\"{CALLBACK_URL}\"")),
                ("client_state", format!("\"{CLIENT_STATE}\"")),
                ("lifetime_mins", "60".to_owned()),
                ("renew_before_secs", "600".to_owned()),
                ("resync_interval_secs", "900".to_owned()),
                ("retry_initial_ms", "1000".to_owned()),
                ("retry_max_secs", "300".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            server: String::new(),
            validate: false,
        }
    }

    /// Sets `key` of `[sources.subscription]` to `value` (TOML).
    fn set(mut self, key: &str, value: &str) -> Setup {
        match self.subscription.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.subscription.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    fn config(&self, base: &str) -> String {
        let quoted = |list: Vec<String>| {
            let items: Vec<String> = list.iter().map(|s| format!("\"{s}\"")).collect();
            format!("[{}]", items.join(", "))
        };
        let refresh_tokens = quoted((0..self.accounts).map(graph::refresh_token).collect());
        let users = quoted(self.users.clone());
        let subscription: String = self
            .subscription
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        let secret = if self.secret {
            format!("client_secret = \"{CLIENT_SECRET}\"")
        } else {
            String::new()
        };
        format!(
            r#"
[server]
shutdown_grace_secs = 5
{server}

[consumers]
tokens = ["{TOKEN}"]

[[sources]]
id = "{SOURCE}"
kind = "graph"
api_base = "{base}"

[sources.auth]
type = "refresh_token"
token_url = "{base}/token"
client_id = "{client_id}"
{secret}
refresh_tokens = {refresh_tokens}
{auth}

[sources.subscription]
users = {users}
{subscription}"#,
            server = self.server,
            client_id = graph::CLIENT_ID,
            auth = self.auth,
        )
    }
}

/// Starts a gateway with `setup` against the mock at `base`. With
/// `setup.validate`, the mock is told the gateway's address first.
async fn gateway(setup: &Setup, api: &Graph, base: &str) -> Gateway {
    let (listener, webhook) = common::webhook_listener(SOURCE).await;
    if setup.validate {
        let own = webhook.trim_end_matches(&format!("/webhooks/{SOURCE}"));
        api.0.lock().validate_via = Some(own.to_owned());
    }
    Gateway::start_on_listener(&setup.config(base), listener).await
}

/// Waits (real time) until `/readyz` is 200.
async fn ready(gw: &Gateway) {
    wait_until("the gateway is ready", WITHIN, || async {
        gw.readyz().await == 200
    })
    .await;
}

/// The record of `principal` (Null when there is none).
async fn record(gw: &Gateway, principal: &str) -> Value {
    let (status, record) = gw.get(&format!("/v1/presence/{SOURCE}/{principal}")).await;
    if status == 404 {
        return Value::Null;
    }
    assert_eq!(status, 200, "{record}");
    record
}

/// The source as `/v1/sources` shows it.
async fn source(gw: &Gateway) -> Value {
    let (_, sources) = gw.get("/v1/sources").await;
    sources["sources"]
        .as_array()
        .and_then(|list| list.iter().find(|s| s["id"] == SOURCE))
        .cloned()
        .unwrap_or_else(|| panic!("no source {SOURCE} in {sources}"))
}

/// The source's subscriptions in `/v1/sources`.
async fn subscriptions(gw: &Gateway) -> Vec<Value> {
    source(gw).await["subscriptions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Posts `body` to the source's webhook, `query` appended to the path
/// (`""`, `"?lifecycle"`, ...), as Graph posts.
async fn notify(gw: &Gateway, query: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    gw.client
        .post(gw.url(&format!("/webhooks/{SOURCE}{query}")))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .expect("notification request")
}

/// Posts `items` and asserts 202.
async fn notify_ok(gw: &Gateway, items: Vec<Value>) {
    let response = notify(gw, "", batch(items)).await;
    let status = response.status();
    assert_eq!(status, 202, "{}", response.text().await.unwrap_or_default());
}

/// The id of the subscription the mock holds for `account`.
fn subscription_of(api: &Graph, account: usize) -> String {
    api.subscriptions()
        .iter()
        .find(|s| s.owner == account)
        .and_then(|s| s.value["id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no subscription of account {account}: {:?}", api.log()))
}

/// Every id the given reads asked for.
fn read_ids(reads: &[Call]) -> BTreeSet<String> {
    reads.iter().flat_map(Call::ids).collect()
}

/// Posts a notification that names `marker` without resource data and
/// waits (real time) until the gateway has read it. Reads are made in the
/// order users are named, so any read an earlier request caused has been
/// made by then too.
async fn flush_reads(gw: &Gateway, api: &Graph, subscription: &str, marker: &str) {
    let before = api.reads().len();
    notify_ok(gw, vec![item(subscription, CLIENT_STATE, marker, None)]).await;
    wait_until("the marker user is read", WITHIN, || async {
        api.reads()[before..]
            .iter()
            .any(|c| c.ids().iter().any(|id| id == marker))
    })
    .await;
}

fn problems_are_none(api: &Graph) {
    let problems = api.problems();
    assert!(problems.is_empty(), "Graph rules broken: {problems:#?}");
}

// --- start-up, subscriptions, tokens -------------------------------------

#[tokio::test(start_paused = true)]
async fn start_up_subscribes_each_group_with_its_own_account_and_reads_everyone() {
    let (api, base) = Graph::start(2).await;
    let everyone = users(700);
    let mut setup = Setup::new(everyone.clone(), 2);
    setup.validate = true;
    // The gateway's clock is wall time at its start plus tokio's elapsed
    // time (which stands still here while real time passes): bounded by
    // the wall time before it started and the wall time after the settle
    // plus tokio's elapsed time.
    let started = tokio::time::Instant::now();
    let asked_after = jiff::Timestamp::now().as_millisecond();
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    assert_eq!(gw.readyz().await, 200, "{:?}", api.log());
    let asked_before =
        jiff::Timestamp::now().as_millisecond() + started.elapsed().as_millis() as i64;

    // Two subscriptions: the first 650 users with account 1's token, the
    // other 50 with account 2's, after Graph validated both URLs.
    let mut creates = api.creates();
    assert_eq!(creates.len(), 2, "{:?}", api.log());
    creates.sort_by_key(|c| c.account);
    let groups = [&everyone[..650], &everyone[650..]];
    for (account, (create, group)) in creates.iter().zip(groups).enumerate() {
        assert_eq!(create.account, Some(account), "group {account}'s token");
        let body = &create.body;
        assert_eq!(body["changeType"], "updated");
        assert_eq!(body["notificationUrl"], CALLBACK_URL);
        assert_eq!(
            body["lifecycleNotificationUrl"], CALLBACK_URL,
            "lifecycle_url defaults to callback_url"
        );
        assert_eq!(body["resource"], resource_for(group).as_str());
        assert_eq!(body["clientState"], CLIENT_STATE);
        assert!(
            body["includeResourceData"].is_null() || body["includeResourceData"] == false,
            "no rich notifications without a certificate: {}",
            body["includeResourceData"]
        );
        assert!(body["encryptionCertificate"].is_null());
        let asked = body["expirationDateTime"].as_str().expect("an expiry");
        assert!(asked.ends_with('Z'), "UTC: {asked}");
        let asked = parse_ms(asked).expect("RFC 3339");
        assert!(
            asked >= asked_after + 60 * 60_000 && asked <= asked_before + 60 * 60_000,
            "now + lifetime_mins: {}",
            body["expirationDateTime"]
        );
    }

    // Everyone was read before ready, at most 650 ids a call.
    let reads = api.reads();
    assert!(reads.iter().all(|r| r.ids().len() <= MAX_IDS));
    assert_eq!(read_ids(&reads), everyone.iter().cloned().collect());
    assert!(reads.len() <= 4, "batched: {} reads", reads.len());
    // Every API call carried a token the mock issued.
    for call in api.calls() {
        assert!(
            call.account.is_some(),
            "{} without a valid token",
            call.request()
        );
    }

    // One token per account, with the configured grant.
    let requests = api.token_requests();
    let presented: BTreeSet<String> = requests
        .iter()
        .map(|form| form["refresh_token"].clone())
        .collect();
    assert_eq!(
        presented,
        [graph::refresh_token(0), graph::refresh_token(1)].into()
    );
    assert_eq!(requests.len(), 2, "one token per account");
    for form in &requests {
        assert_eq!(form["grant_type"], "refresh_token");
        assert_eq!(form["client_id"], graph::CLIENT_ID);
        assert_eq!(form["client_secret"], CLIENT_SECRET);
        assert_eq!(form["scope"], DEFAULT_SCOPE);
    }

    // /v1/sources: one entry per group, in group order.
    let source = source(&gw).await;
    assert_eq!(source["kind"], "graph");
    let shown = source["subscriptions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(shown.len(), 2, "{source}");
    for (account, entry) in shown.iter().enumerate() {
        let id = subscription_of(&api, account);
        assert_eq!(entry["id"], id.as_str(), "{entry}");
        assert_eq!(entry["state"], "active", "{entry}");
        let held = api
            .subscriptions()
            .into_iter()
            .find(|s| s.value["id"] == id.as_str())
            .expect("held");
        assert_eq!(
            entry["expires_at"].as_str().and_then(parse_ms),
            held.value["expirationDateTime"].as_str().and_then(parse_ms),
            "{entry}"
        );
        assert!(entry["next_action_at"].is_string(), "{entry}");
    }
    assert!(!source.to_string().contains(CLIENT_STATE));
    assert!(!gw.metrics().await.contains(CLIENT_STATE));

    // The start-up resync made records of everyone (the mock says Offline).
    for principal in [&everyone[0], &everyone[649], &everyone[650], &everyone[699]] {
        let record = record(&gw, principal).await;
        assert_eq!(record["source"], SOURCE);
        assert_eq!(record["principal"], principal.as_str());
        assert_eq!(record["availability"], "offline", "{record}");
    }
    problems_are_none(&api);
}

#[tokio::test(start_paused = true)]
async fn one_user_gets_the_filter_form_with_the_configured_scope_and_lifecycle_url() {
    let (api, base) = Graph::start(1).await;
    let only = user(7);
    let scope = "https://graph.microsoft.com/.default offline_access";
    let mut setup =
        Setup::new(vec![only.clone()], 1).set("lifecycle_url", &format!("\"{LIFECYCLE_URL}\""));
    setup.secret = false;
    setup.auth = format!("scope = \"{scope}\"");
    setup.validate = true;
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    assert_eq!(gw.readyz().await, 200, "{:?}", api.log());

    let creates = api.creates();
    assert_eq!(creates.len(), 1, "{:?}", api.log());
    assert_eq!(
        creates[0].body["resource"],
        format!("/communications/presences?$filter=id in ('{only}')").as_str()
    );
    assert_eq!(creates[0].body["notificationUrl"], CALLBACK_URL);
    assert_eq!(creates[0].body["lifecycleNotificationUrl"], LIFECYCLE_URL);
    let form = &api.token_requests()[0];
    assert_eq!(form["scope"], scope);
    assert!(
        !form.contains_key("client_secret"),
        "no secret configured, none sent: {:?}",
        form.keys()
    );
    problems_are_none(&api);
}

/// Real time: held calls must not time out while the test looks.
#[tokio::test]
async fn not_ready_until_every_subscription_exists_and_everyone_was_read() {
    let (api, base) = Graph::start(1).await;
    let open_create = api.hold(route::CREATE);
    let open_read = api.hold(route::READ);
    let gw = gateway(&Setup::new(users(3), 1), &api, &base).await;

    wait_until("the create call", WITHIN, || async {
        api.creates().len() == 1
    })
    .await;
    assert_eq!(gw.readyz().await, 503, "not ready while the create is held");
    let shown = subscriptions(&gw).await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["state"], "pending", "{shown:?}");
    open_create.send_replace(true);
    wait_until("the subscription is active", WITHIN, || async {
        subscriptions(&gw)
            .await
            .first()
            .is_some_and(|s| s["state"] == "active")
    })
    .await;
    wait_until("a read call", WITHIN, || async { !api.reads().is_empty() }).await;
    assert_eq!(
        gw.readyz().await,
        503,
        "not ready while the start-up resync is held"
    );
    open_read.send_replace(true);
    ready(&gw).await;
    assert_eq!(record(&gw, &user(2)).await["availability"], "offline");
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_is_shown_and_retried() {
    let (api, base) = Graph::start(1).await;
    api.fail(route::CREATE, 503, None);
    let gw = gateway(&Setup::new(users(2), 1), &api, &base).await;
    settle().await;
    let shown = &subscriptions(&gw).await[0];
    assert!(
        shown["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed: ")),
        "{shown}"
    );
    assert!(shown["next_action_at"].is_string(), "{shown}");
    assert!(api.subscription_ids().is_empty());
    // retry_initial_ms = 1000: retried within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    assert_eq!(api.creates().len(), 2, "{:?}", api.log());
    let shown = &subscriptions(&gw).await[0];
    assert_eq!(shown["state"], "active", "{shown}");
    assert_eq!(shown["id"], subscription_of(&api, 0).as_str());
    problems_are_none(&api);
}

#[tokio::test(start_paused = true)]
async fn the_expiry_graph_answers_is_the_truth_and_plans_the_renewal() {
    let (api, base) = Graph::start(1).await;
    // Asked for an hour, Graph grants 20 minutes.
    api.0.lock().answer_lifetime = Some(Duration::from_secs(20 * 60));
    let gw = gateway(&Setup::new(users(2), 1), &api, &base).await;
    settle().await;
    let id = subscription_of(&api, 0);
    let granted = |api: &Graph| {
        api.subscriptions()[0].value["expirationDateTime"]
            .as_str()
            .and_then(parse_ms)
            .expect("an expiry")
    };
    let first = granted(&api);
    let asked = parse_ms(
        api.creates()[0].body["expirationDateTime"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(asked > first + 30 * 60_000, "the gateway asked for more");

    let shown = &subscriptions(&gw).await[0];
    assert_eq!(
        shown["expires_at"].as_str().and_then(parse_ms),
        Some(first),
        "{shown}"
    );
    assert_eq!(
        shown["next_action_at"].as_str().and_then(parse_ms),
        Some(first - 600_000),
        "renew_before_secs ahead of the granted expiry: {shown}"
    );

    // Due at 10 minutes, not at 50.
    tokio::time::sleep(Duration::from_secs(9 * 60 + 45)).await;
    settle().await;
    assert!(api.renewals().is_empty(), "{:?}", api.log());
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    let renewals = api.renewals();
    assert_eq!(renewals.len(), 1, "{:?}", api.log());
    assert_eq!(renewals[0].path, format!("/v1.0/subscriptions/{id}"));
    assert_eq!(renewals[0].account, Some(0));
    let asked = renewals[0].body["expirationDateTime"]
        .as_str()
        .expect("expiry");
    assert!(asked.ends_with('Z'), "{asked}");
    let second = granted(&api);
    assert!(second > first);
    let shown = &subscriptions(&gw).await[0];
    assert_eq!(shown["state"], "active", "{shown}");
    assert_eq!(
        shown["expires_at"].as_str().and_then(parse_ms),
        Some(second)
    );
    assert_eq!(
        shown["next_action_at"].as_str().and_then(parse_ms),
        Some(second - 600_000)
    );
    assert_eq!(api.creates().len(), 1);
    problems_are_none(&api);
}

#[tokio::test(start_paused = true)]
async fn a_subscription_graph_no_longer_has_is_created_again_at_renewal() {
    let (api, base) = Graph::start(1).await;
    let gw = gateway(&Setup::new(users(2), 1), &api, &base).await;
    settle().await;
    let old = subscription_of(&api, 0);
    api.remove_subscription(&old);
    tokio::time::sleep(Duration::from_secs(50 * 60 + 10)).await;
    settle().await;
    let renewals = api.renewals();
    assert_eq!(renewals.len(), 1, "{:?}", api.log());
    assert_eq!(renewals[0].path, format!("/v1.0/subscriptions/{old}"));
    assert_eq!(api.creates().len(), 2, "created again: {:?}", api.log());
    let new = subscription_of(&api, 0);
    assert_ne!(new, old);
    let shown = &subscriptions(&gw).await[0];
    assert_eq!(shown["id"], new.as_str(), "{shown}");
    assert_eq!(shown["state"], "active", "{shown}");
    problems_are_none(&api);
}

#[tokio::test(start_paused = true)]
async fn adopts_a_listed_subscription_with_the_same_resource_and_url() {
    let (api, base) = Graph::start(2).await;
    let everyone = users(651);
    {
        let mut m = api.0.lock();
        m.page_size = Some(1);
        m.one_per_account = false;
    }
    // Account 1: one for another URL first, then the gateway's own (on the
    // second page).
    let stale = api.add_subscription(
        0,
        &resource_for(&everyone[..650]),
        "https://old.example.com/webhooks/teams",
    );
    let own = api.add_subscription(0, &resource_for(&everyone[..650]), CALLBACK_URL);
    // Account 2: the right URL but other users.
    let other_users = api.add_subscription(
        1,
        &resource_for(&[everyone[650].clone(), user(9999)]),
        CALLBACK_URL,
    );
    let gw = gateway(&Setup::new(everyone.clone(), 2), &api, &base).await;
    settle().await;

    assert!(
        api.log()
            .iter()
            .any(|c| c.starts_with("GET /v1.0/subscriptions?$skiptoken=")),
        "the next page was followed: {:?}",
        api.log()
    );
    let creates = api.creates();
    assert_eq!(creates.len(), 1, "only group 2 is created: {:?}", api.log());
    assert_eq!(creates[0].account, Some(1));
    assert_eq!(
        creates[0].body["resource"],
        resource_for(&everyone[650..]).as_str()
    );
    let created = api
        .subscription_ids()
        .into_iter()
        .find(|id| ![&stale, &own, &other_users].contains(&id))
        .expect("the created one");
    let shown = subscriptions(&gw).await;
    assert_eq!(shown[0]["id"], own.as_str(), "{shown:?}");
    assert_eq!(shown[1]["id"], created.as_str(), "{shown:?}");
    assert!(shown.iter().all(|s| s["state"] == "active"), "{shown:?}");
    assert_eq!(gw.readyz().await, 200);
    problems_are_none(&api);
}

/// A subscription of the gateway's own account and URL whose settings no
/// longer match the config (another client state, users no group has any
/// more) is deleted, and the group's subscription created with the config's
/// settings: Graph allows one presence subscription per user and app, and an
/// adopted one with an old client state would make every notification 401.
#[tokio::test(start_paused = true)]
async fn subscriptions_left_from_an_earlier_configuration_are_replaced() {
    let (api, base) = Graph::start(1).await;
    api.0.lock().one_per_account = false;
    let everyone = users(2);
    let old_state = api.add_subscription(0, &resource_for(&everyone), CALLBACK_URL);
    let old_users = api.add_subscription(0, &resource_for(&[user(7777)]), CALLBACK_URL);
    let elsewhere = api.add_subscription(
        0,
        &resource_for(&everyone),
        "https://other-deployment.example.com/webhooks/teams",
    );
    {
        let mut m = api.0.lock();
        let listed = m
            .subscriptions
            .iter_mut()
            .find(|s| s.value["id"] == old_state.as_str())
            .expect("listed");
        listed.value["clientState"] = json!("the-client-state-before-rotation");
    }
    let gw = gateway(&Setup::new(everyone.clone(), 1), &api, &base).await;
    settle().await;
    let deleted: Vec<String> = api
        .calls_to("DELETE", "/v1.0/subscriptions/")
        .iter()
        .map(|c| c.path.trim_start_matches("/v1.0/subscriptions/").to_owned())
        .collect();
    assert!(deleted.contains(&old_state), "{:?}", api.log());
    assert!(deleted.contains(&old_users), "{:?}", api.log());
    assert!(
        !deleted.contains(&elsewhere),
        "another URL is not ours: {:?}",
        api.log()
    );
    let creates = api.creates();
    assert_eq!(creates.len(), 1, "{:?}", api.log());
    assert_eq!(creates[0].body["clientState"], CLIENT_STATE);
    let left = api.subscription_ids();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&elsewhere), "{left:?}");
    assert!(
        !left.contains(&old_state) && !left.contains(&old_users),
        "{left:?}"
    );
    assert_eq!(gw.readyz().await, 200);
}

#[tokio::test(start_paused = true)]
async fn subscriptions_are_kept_at_shutdown_unless_delete_on_shutdown() {
    let (api, base) = Graph::start(2).await;
    // Two gateways without persistence, one after the other, with the
    // same configured refresh tokens: they must stay valid.
    api.0.lock().rotate = false;
    let setup = Setup::new(users(700), 2);
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    let ids = api.subscription_ids();
    assert_eq!(ids.len(), 2);
    let owners: Vec<(String, usize)> = api
        .subscriptions()
        .iter()
        .map(|s| (s.value["id"].as_str().unwrap().to_owned(), s.owner))
        .collect();
    gw.stop().await;
    assert!(api.calls_to("DELETE", "/").is_empty(), "{:?}", api.log());
    assert_eq!(api.subscription_ids(), ids);

    // The next gateway adopts both, and deletes them when it stops.
    let setup = setup.set("delete_on_shutdown", "true");
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    assert_eq!(
        api.creates().len(),
        2,
        "adopted, not created: {:?}",
        api.log()
    );
    gw.stop().await;
    let deletes = api.calls_to("DELETE", "/v1.0/subscriptions/");
    assert_eq!(deletes.len(), 2, "{:?}", api.log());
    for (id, account) in &owners {
        let delete = deletes
            .iter()
            .find(|d| d.path == format!("/v1.0/subscriptions/{id}"))
            .unwrap_or_else(|| panic!("{id} deleted: {:?}", api.log()));
        assert_eq!(delete.account, Some(*account), "with its owner's token");
    }
    assert!(api.subscription_ids().is_empty());
    problems_are_none(&api);
}

/// DESIGN §8: with a data_dir, the rotated refresh tokens (one per
/// account) and the subscriptions survive a restart.
#[tokio::test(start_paused = true)]
async fn a_restart_with_a_data_dir_uses_the_rotated_refresh_tokens_and_adopts() {
    let (api, base) = Graph::start(2).await;
    let dir = common::process::TestDir::new("graph-restart");
    let mut setup = Setup::new(users(700), 2);
    setup.server = format!("\n[store]\ndata_dir = \"{}\"", dir.data().display());
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    assert_eq!(api.subscription_ids().len(), 2, "{:?}", api.log());
    let rotated = [api.current_refresh_token(0), api.current_refresh_token(1)];
    gw.stop().await;

    let before = api.token_requests().len();
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    assert_eq!(gw.readyz().await, 200, "{:?}", api.log());
    let presented: BTreeSet<String> = api.token_requests()[before..]
        .iter()
        .map(|form| form["refresh_token"].clone())
        .collect();
    assert_eq!(presented, rotated.into_iter().collect());
    assert_eq!(
        api.creates().len(),
        2,
        "adopted, not created: {:?}",
        api.log()
    );
    problems_are_none(&api);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_refreshed_with_the_rotated_refresh_token_and_the_call_retried() {
    let (api, base) = Graph::start(1).await;
    // Tokens outlive the test: only the 401 makes the gateway refresh.
    api.0.lock().token_lifetime_secs = 4 * 3600;
    let gw = gateway(&Setup::new(users(2), 1), &api, &base).await;
    settle().await;
    assert_eq!(api.token_requests().len(), 1);
    let rotated = api.current_refresh_token(0);
    assert_ne!(rotated, graph::refresh_token(0), "the mock rotated it");

    // Revoked just before the renewal is due (the resyncs at 15, 30 and 45
    // minutes still had a good token).
    tokio::time::sleep(Duration::from_secs(49 * 60 + 50)).await;
    settle().await;
    assert!(api.renewals().is_empty());
    assert_eq!(api.token_requests().len(), 1);
    api.revoke_access(0);
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    let renewals = api.renewals();
    assert_eq!(renewals.len(), 2, "401, then retried: {:?}", api.log());
    assert_eq!(renewals[0].account, None, "the revoked token");
    assert_eq!(renewals[1].account, Some(0), "a fresh token");
    let requests = api.token_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[1]["refresh_token"], rotated,
        "the refresh token the last answer returned"
    );
    assert_eq!(subscriptions(&gw).await[0]["state"], "active");
    problems_are_none(&api);
}

// --- resync ----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_read_answered_429_is_retried_after_retry_after_and_only_then_ready() {
    let (api, base) = Graph::start(1).await;
    api.fail(route::READ, 429, Some(30));
    let everyone = users(3);
    let gw = gateway(&Setup::new(everyone.clone(), 1), &api, &base).await;
    settle().await;
    assert_eq!(api.reads().len(), 1, "{:?}", api.log());
    assert_eq!(gw.readyz().await, 503, "the start-up resync is not done");
    tokio::time::sleep(Duration::from_secs(28)).await;
    settle().await;
    assert_eq!(
        api.reads().len(),
        1,
        "not before Retry-After: {:?}",
        api.log()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    settle().await;
    let reads = api.reads();
    assert_eq!(reads.len(), 2, "{:?}", api.log());
    assert!(reads[1].at - reads[0].at >= Duration::from_secs(30));
    assert_eq!(read_ids(&reads[1..]), everyone.iter().cloned().collect());
    assert_eq!(gw.readyz().await, 200);
    assert_eq!(record(&gw, &everyone[0]).await["availability"], "offline");
    problems_are_none(&api);
}

#[tokio::test(start_paused = true)]
async fn everyone_is_read_again_every_resync_interval() {
    let (api, base) = Graph::start(1).await;
    let everyone = users(3);
    let gw = gateway(&Setup::new(everyone.clone(), 1), &api, &base).await;
    settle().await;
    let at_start = api.reads().len();
    api.set(&everyone[0], "Busy", "InACall");
    tokio::time::sleep(Duration::from_secs(880)).await;
    settle().await;
    assert_eq!(api.reads().len(), at_start, "{:?}", api.log());
    assert_eq!(record(&gw, &everyone[0]).await["availability"], "offline");
    tokio::time::sleep(Duration::from_secs(40)).await;
    settle().await;
    let reads = api.reads();
    assert!(reads.len() > at_start, "{:?}", api.log());
    assert_eq!(
        read_ids(&reads[at_start..]),
        everyone.iter().cloned().collect()
    );
    let record = record(&gw, &everyone[0]).await;
    assert_eq!(
        (record["availability"].as_str(), record["activity"].as_str()),
        (Some("busy"), Some("in_a_call"))
    );
    problems_are_none(&api);
}

// --- the webhook -------------------------------------------------------------

#[tokio::test]
async fn validation_requests_echo_the_decoded_token_whatever_the_body() {
    let (api, base) = Graph::start(1).await;
    let gw = gateway(&Setup::new(users(2), 1), &api, &base).await;
    ready(&gw).await;
    let wrong_state = batch(vec![item(
        "sub",
        "not-the-client-state",
        &user(0),
        Some(("Busy", "Busy")),
    )]);
    let tokens: [(&str, &str); 7] = [
        ("plain", "abc123"),
        (
            "Graph's words",
            "Validation: Testing client application reachability for subscription Request-Id: 3b3f9821-ce3f-23d9-879b-00a23f3",
        ),
        ("markup", "<script>alert('x')</script><b>&amp;</b>"),
        ("ampersand and equals", "a&b=c&validationToken=d"),
        ("spaces", "a b  c"),
        ("plus", "a+b"),
        ("unicode", "Grüße ✓ 中文 🙂"),
    ];
    let bodies: [(&str, String); 4] = [
        ("no body", String::new()),
        ("a wrong client state", wrong_state),
        ("not JSON", "<xml/>".into()),
        ("an empty object", "{}".into()),
    ];
    let before = gw.snapshot().await;
    for (name, token) in tokens {
        let encoded: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        // Spaces as %20 as well as `+`, a literal `+` as %2B.
        let percent = encoded.replace('+', "%20");
        for (body_name, body) in &bodies {
            for query in [
                format!("?validationToken={encoded}"),
                format!("?validationToken={percent}"),
                format!("?lifecycle&validationToken={encoded}"),
                format!("?validationToken={encoded}&lifecycle"),
            ] {
                let case = format!("{name} / {body_name} / {query}");
                let response = notify(&gw, &query, body.clone()).await;
                assert_eq!(response.status(), 200, "{case}");
                let header = |h: &str| {
                    response
                        .headers()
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                assert!(header("content-type").starts_with("text/plain"), "{case}");
                assert_eq!(header("x-content-type-options"), "nosniff", "{case}");
                assert_eq!(response.text().await.unwrap(), token, "{case}");
            }
        }
    }
    // `+` in the query is a space.
    let response = notify(&gw, "?validationToken=a+b%2Bc", "").await;
    assert_eq!(response.text().await.unwrap(), "a b+c");
    let after = gw.snapshot().await;
    assert_eq!(after.records, before.records, "nothing applied");
    assert_eq!(after.last_seq, before.last_seq);
}

#[tokio::test]
async fn a_notification_with_resource_data_is_applied_and_answered_202() {
    let (api, base) = Graph::start(1).await;
    let principal = "66825e03-7ef5-42da-9069-724602c31f6b";
    let gw = gateway(
        &Setup::new(vec![principal.to_owned(), user(1)], 1),
        &api,
        &base,
    )
    .await;
    ready(&gw).await;
    let reads_at_ready = api.reads().len();
    let received = gw.counter(SOURCE, "received").await;

    let response = notify(&gw, "", common::fixture("graph-notification.json")).await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().contains_key("x-request-id"));
    let record = record(&gw, principal).await;
    assert_eq!(record["source"], SOURCE);
    assert_eq!(record["principal"], principal);
    assert_eq!(record["availability"], "busy", "{record}");
    assert_eq!(record["activity"], "in_a_meeting");
    assert_eq!(record["raw_status"], "Busy");
    assert!(
        record["observed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(gw.counter(SOURCE, "received").await, received + 1);

    // Applied from the notification: no read of that user.
    flush_reads(&gw, &api, &subscription_of(&api, 0), &user(1)).await;
    assert!(
        !read_ids(&api.reads()[reads_at_ready..]).contains(principal),
        "{:?}",
        api.log()
    );
    problems_are_none(&api);
}

#[tokio::test]
async fn graph_availability_and_activity_map_onto_the_model() {
    let (api, base) = Graph::start(1).await;
    // (availability, activity) as Graph sends them → (availability,
    // activity) of the record; raw_status is the availability as sent.
    let cases: &[(&str, &str, &str, Option<&str>)] = &[
        ("Available", "Available", "available", None),
        (
            "AvailableIdle",
            "Inactive",
            "available_idle",
            Some("inactive"),
        ),
        ("Away", "Away", "away", None),
        ("BeRightBack", "BeRightBack", "be_right_back", None),
        ("Busy", "Busy", "busy", None),
        ("Busy", "InACall", "busy", Some("in_a_call")),
        (
            "Busy",
            "InAConferenceCall",
            "busy",
            Some("in_a_conference_call"),
        ),
        ("Busy", "InAMeeting", "busy", Some("in_a_meeting")),
        ("BusyIdle", "InAMeeting", "busy_idle", Some("in_a_meeting")),
        ("DoNotDisturb", "DoNotDisturb", "do_not_disturb", None),
        (
            "DoNotDisturb",
            "Presenting",
            "do_not_disturb",
            Some("presenting"),
        ),
        (
            "DoNotDisturb",
            "UrgentInterruptionsOnly",
            "do_not_disturb",
            Some("urgent_interruptions_only"),
        ),
        ("Offline", "Offline", "offline", None),
        ("Offline", "OffWork", "offline", Some("off_work")),
        ("Away", "OutOfOffice", "away", Some("out_of_office")),
        ("PresenceUnknown", "PresenceUnknown", "unknown", None),
        ("busy", "InACall", "busy", Some("in_a_call")),
        (
            "AVAILABLEIDLE",
            "Inactive",
            "available_idle",
            Some("inactive"),
        ),
        ("donotdisturb", "DoNotDisturb", "do_not_disturb", None),
        ("Sleeping", "Sleeping", "unknown", Some("sleeping")),
    ];
    let everyone = users(cases.len() + 1);
    let reader = everyone[cases.len()].clone();
    api.set_with_message(
        &reader,
        "Busy",
        "InACall",
        "On a call with Contoso <until 5>",
    );
    let gw = gateway(&Setup::new(everyone.clone(), 1), &api, &base).await;
    ready(&gw).await;

    // status_text from a read's statusMessage.
    let read = record(&gw, &reader).await;
    assert_eq!(
        read["status_text"], "On a call with Contoso <until 5>",
        "{read}"
    );
    assert_eq!(read["availability"], "busy");
    assert_eq!(read["activity"], "in_a_call");
    assert_eq!(read["raw_status"], "Busy");

    let subscription = subscription_of(&api, 0);
    let items = cases
        .iter()
        .zip(&everyone)
        .map(|((availability, activity, ..), principal)| {
            item(
                &subscription,
                CLIENT_STATE,
                principal,
                Some((availability, activity)),
            )
        })
        .collect();
    notify_ok(&gw, items).await;
    for ((availability, activity, expected, expected_activity), principal) in
        cases.iter().zip(&everyone)
    {
        let record = record(&gw, principal).await;
        let case = format!("{availability}/{activity}: {record}");
        assert_eq!(record["availability"], *expected, "{case}");
        assert_eq!(record["activity"].as_str(), *expected_activity, "{case}");
        assert_eq!(record["raw_status"], *availability, "{case}");
    }
    problems_are_none(&api);
}

/// Real time: the burst must arrive within the gateway's coalescing window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_named_without_resource_data_are_read_in_few_batched_calls() {
    use futures_util::StreamExt;
    let (api, base) = Graph::start(2).await;
    let everyone = users(700);
    let gw = gateway(&Setup::new(everyone.clone(), 2), &api, &base).await;
    ready(&gw).await;
    let reads_at_ready = api.reads().len();
    for principal in &everyone {
        api.set(principal, "Busy", "InACall");
    }
    let groups = [subscription_of(&api, 0), subscription_of(&api, 1)];
    let started = Instant::now();
    futures_util::stream::iter(everyone.iter().enumerate())
        .for_each_concurrent(16, |(i, principal)| {
            let subscription = &groups[i / 650];
            let gw = &gw;
            async move {
                let response = notify(
                    gw,
                    "",
                    batch(vec![item(subscription, CLIENT_STATE, principal, None)]),
                )
                .await;
                assert_eq!(response.status(), 202);
            }
        })
        .await;
    let posting = started.elapsed();

    let all: BTreeSet<String> = everyone.iter().cloned().collect();
    wait_until("every named user is read", WITHIN, || async {
        read_ids(&api.reads()[reads_at_ready..]) == all
    })
    .await;
    let reads = api.reads()[reads_at_ready..].to_vec();
    let sizes: Vec<usize> = reads.iter().map(|r| r.ids().len()).collect();
    assert!(sizes.iter().all(|n| *n <= MAX_IDS), "{sizes:?}");
    // Posting took `posting`; with 1 s windows that is a handful of calls
    // per group, nowhere near one per notification.
    assert!(
        reads.len() <= 20,
        "{} reads of sizes {sizes:?} for 700 notifications posted in {posting:?}",
        reads.len()
    );
    wait_until("every record says busy", WITHIN, || async {
        let (_, page) = gw
            .post_json(
                "/v1/presence/query",
                &json!({"source": SOURCE, "principals": everyone}),
            )
            .await;
        page["items"].as_array().is_some_and(|items| {
            items.iter().filter(|r| r["availability"] == "busy").count() == 700
        })
    })
    .await;
    problems_are_none(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_answered_at_once_while_graph_reads_slowly() {
    let (api, base) = Graph::start(1).await;
    let everyone = users(3);
    let gw = gateway(&Setup::new(everyone.clone(), 1), &api, &base).await;
    ready(&gw).await;
    let subscription = subscription_of(&api, 0);
    api.0.lock().read_delay = Duration::from_secs(5);
    api.set(&everyone[0], "Busy", "InAMeeting");

    // A user to read: answered before Graph answers the read.
    let started = Instant::now();
    let response = notify(
        &gw,
        "",
        batch(vec![item(&subscription, CLIENT_STATE, &everyone[0], None)]),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(response.status(), 202);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // A user with resource data meanwhile: applied without waiting for the
    // slow read.
    let started = Instant::now();
    let response = notify(
        &gw,
        "",
        batch(vec![item(
            &subscription,
            CLIENT_STATE,
            &everyone[1],
            Some(("Away", "Away")),
        )]),
    )
    .await;
    assert_eq!(response.status(), 202);
    wait_until(
        "the resource data is applied",
        Duration::from_secs(2),
        || async { record(&gw, &everyone[1]).await["availability"] == "away" },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));

    wait_until("the slow read lands", WITHIN, || async {
        record(&gw, &everyone[0]).await["availability"] == "busy"
    })
    .await;
    assert_eq!(record(&gw, &everyone[0]).await["activity"], "in_a_meeting");
    problems_are_none(&api);
}

/// A `/v1/sources` document without the volatile subscription views, which
/// no rejected request is about.
fn counters_only(mut sources: Value) -> Value {
    if let Some(list) = sources["sources"].as_array_mut() {
        for source in list {
            if let Some(object) = source.as_object_mut() {
                object.remove("subscriptions");
            }
        }
    }
    sources
}

/// Increments counter `name` of the graph source in a `/v1/sources` document.
fn bump(sources: &mut Value, name: &str) {
    common::bump(sources, SOURCE, name);
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    body: String,
    status: u16,
    /// The rejection counters of which exactly one grows by one (several
    /// where the contract leaves the reason open; none: no counter).
    counters: &'static [&'static str],
}

fn bad_input_cases(subscription: &str, victim: &str) -> Vec<Case> {
    let good = |p: &str| item(subscription, CLIENT_STATE, p, None);
    let with_state = |state: Value| {
        let mut it = good(victim);
        it["clientState"] = state;
        it
    };
    let case = |name, body: String, status, counters| Case {
        name,
        method: "POST",
        path: format!("/webhooks/{SOURCE}"),
        body,
        status,
        counters,
    };
    let missing_state = {
        let mut it = good(victim);
        it.as_object_mut().unwrap().remove("clientState");
        it
    };
    let almost = format!("{}d", &CLIENT_STATE[..CLIENT_STATE.len() - 1]);
    let big = batch(vec![
        json!({"clientState": CLIENT_STATE, "pad": "x".repeat(20_000)}),
    ]);
    let mismatch: &[&str] = &["rejected.signature_mismatch"];
    let missing: &[&str] = &["rejected.signature_missing", "rejected.signature_mismatch"];
    let payload: &[&str] = &["rejected.bad_payload"];
    vec![
        case(
            "wrong clientState",
            batch(vec![with_state(json!("wrong"))]),
            401,
            mismatch,
        ),
        case(
            "clientState one character off",
            batch(vec![with_state(json!(almost))]),
            401,
            mismatch,
        ),
        case(
            "clientState with a suffix",
            batch(vec![with_state(json!(format!("{CLIENT_STATE}x")))]),
            401,
            mismatch,
        ),
        case(
            "clientState missing",
            batch(vec![missing_state]),
            401,
            missing,
        ),
        case(
            "clientState null",
            batch(vec![with_state(Value::Null)]),
            401,
            missing,
        ),
        case(
            "clientState empty",
            batch(vec![with_state(json!(""))]),
            401,
            missing,
        ),
        case(
            "one item of two with a wrong clientState",
            batch(vec![
                item(
                    subscription,
                    CLIENT_STATE,
                    victim,
                    Some(("Busy", "InACall")),
                ),
                with_state(json!("wrong")),
            ]),
            401,
            mismatch,
        ),
        case(
            "lifecycle event with a wrong clientState",
            batch(vec![lifecycle("missed", subscription, "wrong")]),
            401,
            mismatch,
        ),
        case(
            "invalid JSON",
            r#"{"value": [ {"clientState": "#.into(),
            400,
            payload,
        ),
        case("a bare array", format!("[{}]", good(victim)), 400, payload),
        case(
            "no value member",
            json!({"items": [good(victim)]}).to_string(),
            400,
            payload,
        ),
        case(
            "value not an array",
            json!({"value": good(victim)}).to_string(),
            400,
            payload,
        ),
        case(
            "over the body limit",
            big,
            413,
            &["rejected.body_too_large"],
        ),
        Case {
            name: "GET on the webhook path",
            method: "GET",
            path: format!("/webhooks/{SOURCE}"),
            body: String::new(),
            status: 405,
            counters: &["rejected.method_not_allowed"],
        },
        Case {
            name: "unknown source",
            method: "POST",
            path: "/webhooks/no-such-source".into(),
            body: batch(vec![good(victim)]),
            status: 404,
            counters: &[],
        },
    ]
}

#[tokio::test]
async fn bad_inputs_get_their_status_and_change_nothing_else() {
    let (api, base) = Graph::start(1).await;
    let everyone = users(3);
    let (first, victim, marker) = (&everyone[0], &everyone[1], &everyone[2]);
    let mut setup = Setup::new(everyone.clone(), 1);
    setup.server = "body_limit_bytes = 16384".into();
    let gw = gateway(&setup, &api, &base).await;
    ready(&gw).await;
    let subscription = subscription_of(&api, 0);
    let reads_at_ready = api.reads().len();
    // Something in the store first, so "unchanged" is not trivially empty.
    notify_ok(
        &gw,
        vec![item(
            &subscription,
            CLIENT_STATE,
            first,
            Some(("Away", "Away")),
        )],
    )
    .await;
    let victim_before = record(&gw, victim).await;

    for case in bad_input_cases(&subscription, victim) {
        let before = gw.snapshot().await;
        let url = gw.url(&case.path);
        let request = match case.method {
            "GET" => gw.client.get(url),
            _ => gw.client.post(url).body(case.body.clone()),
        };
        let response = request.send().await.expect("request");
        let problem = assert_problem(response, case.status).await;
        assert!(
            !problem.to_string().contains(CLIENT_STATE),
            "{}: the problem shows the client state: {problem}",
            case.name
        );
        let after = gw.snapshot().await;
        assert_eq!(
            after.records, before.records,
            "{}: records changed",
            case.name
        );
        assert_eq!(
            after.last_seq, before.last_seq,
            "{}: seq changed",
            case.name
        );
        let (before, after) = (counters_only(before.sources), counters_only(after.sources));
        let matched = case.counters.iter().any(|counter| {
            let mut expected = before.clone();
            bump(&mut expected, counter);
            expected == after
        });
        assert!(
            matched || (case.counters.is_empty() && before == after),
            "{}: exactly one of {:?} grows, nothing else:\nbefore {before}\nafter  {after}",
            case.name,
            case.counters
        );
    }
    assert_eq!(record(&gw, victim).await, victim_before);
    // No rejected request made the gateway read its user.
    flush_reads(&gw, &api, &subscription, marker).await;
    assert!(
        !read_ids(&api.reads()[reads_at_ready..]).contains(victim),
        "{:?}",
        api.log()
    );
    assert!(
        api.calls_to("POST", "/v1.0/subscriptions/").is_empty(),
        "no reauthorize"
    );
    problems_are_none(&api);
}

// --- lifecycle notifications -------------------------------------------------

#[tokio::test(start_paused = true)]
async fn lifecycle_events_reauthorize_recreate_and_resync() {
    let (api, base) = Graph::start(1).await;
    let everyone = users(3);
    let all: BTreeSet<String> = everyone.iter().cloned().collect();
    let setup =
        Setup::new(everyone.clone(), 1).set("lifecycle_url", &format!("\"{LIFECYCLE_URL}\""));
    let gw = gateway(&setup, &api, &base).await;
    settle().await;
    let id = subscription_of(&api, 0);
    let post = |event: &'static str, id: String| {
        let gw = &gw;
        async move {
            let body = batch(vec![lifecycle(event, &id, CLIENT_STATE)]);
            let response = notify(gw, "?lifecycle", body).await;
            assert_eq!(response.status(), 202, "{event}");
        }
    };

    // reauthorizationRequired → POST .../reauthorize with the owner's token.
    post("reauthorizationRequired", id.clone()).await;
    settle().await;
    let reauthorized = api.calls_to("POST", &format!("/v1.0/subscriptions/{id}/reauthorize"));
    assert_eq!(reauthorized.len(), 1, "{:?}", api.log());
    assert_eq!(reauthorized[0].account, Some(0));
    assert_eq!(api.creates().len(), 1);

    // missed → everyone is read again.
    let reads = api.reads().len();
    api.set(&everyone[2], "DoNotDisturb", "Presenting");
    post("missed", id.clone()).await;
    settle().await;
    assert_eq!(read_ids(&api.reads()[reads..]), all, "{:?}", api.log());
    assert_eq!(record(&gw, &everyone[2]).await["activity"], "presenting");

    // subscriptionRemoved → created again, then everyone is read.
    api.remove_subscription(&id);
    let calls_before = api.calls().len();
    post("subscriptionRemoved", id.clone()).await;
    settle().await;
    assert_eq!(api.creates().len(), 2, "{:?}", api.log());
    let new = subscription_of(&api, 0);
    assert_ne!(new, id);
    let calls = api.calls()[calls_before..].to_vec();
    let created = calls
        .iter()
        .position(|c| c.method == "POST" && c.path == "/v1.0/subscriptions")
        .expect("created");
    assert_eq!(
        read_ids(&calls[created..]),
        all,
        "read after the create: {:?}",
        api.log()
    );
    let shown = &subscriptions(&gw).await[0];
    assert_eq!(shown["id"], new.as_str(), "{shown}");
    assert_eq!(shown["state"], "active", "{shown}");
    problems_are_none(&api);
}

// --- rich notifications ------------------------------------------------------

#[path = "common/graph_keys.rs"]
mod graph_keys;

/// The certificate and key the gateway is configured with, made once.
fn keys() -> &'static (String, String) {
    static KEYS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    KEYS.get_or_init(graph_keys::generate)
}

/// Another certificate, not the gateway's.
fn other_keys() -> &'static (String, String) {
    static KEYS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| graph_keys::generate_seeded(2))
}

/// `encryptedContent` for `resource` (the presence JSON), as Graph would
/// encrypt it for the certificate `cert_pem` with id `cert_id`.
fn encrypted(cert_pem: &str, cert_id: &str, resource: &Value) -> Value {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    presence_gateway::providers::graph_rich::encrypt_for_tests(
        cert_pem,
        resource.to_string().as_bytes(),
        &mut rng,
    )
    .expect("encrypt for the certificate")
    .to_json(cert_id)
}

/// An item that carries its presence only encrypted.
fn rich_item(subscription: &str, principal: &str, content: Value) -> Value {
    let mut it = item(subscription, CLIENT_STATE, principal, None);
    it["encryptedContent"] = content;
    it
}

/// A setup with rich notifications for the generated certificate and key.
fn rich_setup(users: Vec<String>, cert_pem: &str, key_pem: &str) -> Setup {
    Setup::new(users, 1)
        .set("encryption_certificate", &format!("'''\n{cert_pem}'''"))
        .set("encryption_certificate_id", "\"cert-1\"")
        .set("encryption_key", &format!("'''\n{key_pem}'''"))
}

#[tokio::test]
async fn rich_notifications_are_decrypted_and_applied_without_a_read() {
    let (cert_pem, key_pem) = keys();
    let (api, base) = Graph::start(1).await;
    let everyone = users(2);
    let gw = gateway(
        &rich_setup(everyone.clone(), cert_pem, key_pem),
        &api,
        &base,
    )
    .await;
    ready(&gw).await;

    let create = &api.creates()[0].body;
    assert_eq!(create["includeResourceData"], true, "{create}");
    assert_eq!(create["encryptionCertificateId"], "cert-1");
    let der_base64: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
        .split_whitespace()
        .collect();
    let sent: String = create["encryptionCertificate"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(sent, der_base64, "the certificate as base64 DER");

    let subscription = subscription_of(&api, 0);
    let reads_at_ready = api.reads().len();
    let presence = json!({"@odata.type": "#Microsoft.Graph.presence", "id": everyone[0],
                          "availability": "DoNotDisturb", "activity": "Presenting"});
    let content = encrypted(cert_pem, "cert-1", &presence);
    notify_ok(&gw, vec![rich_item(&subscription, &everyone[0], content)]).await;
    let record = record(&gw, &everyone[0]).await;
    assert_eq!(record["availability"], "do_not_disturb", "{record}");
    assert_eq!(record["activity"], "presenting");
    assert_eq!(record["raw_status"], "DoNotDisturb");

    flush_reads(&gw, &api, &subscription, &everyone[1]).await;
    assert!(
        !read_ids(&api.reads()[reads_at_ready..]).contains(&everyone[0]),
        "{:?}",
        api.log()
    );
    problems_are_none(&api);
}

#[tokio::test]
async fn tampered_rich_notifications_are_rejected_and_not_applied() {
    let (cert_pem, key_pem) = keys();
    let (other_cert, _) = other_keys();
    let (api, base) = Graph::start(1).await;
    let everyone = users(2);
    let (victim, marker) = (&everyone[0], &everyone[1]);
    let gw = gateway(
        &rich_setup(everyone.clone(), cert_pem, key_pem),
        &api,
        &base,
    )
    .await;
    ready(&gw).await;
    let subscription = subscription_of(&api, 0);
    let reads_at_ready = api.reads().len();
    let presence = json!({"id": victim, "availability": "Busy", "activity": "InACall"});
    let good = encrypted(cert_pem, "cert-1", &presence);

    /// Another base64 character in the same place: still valid base64.
    fn flip(text: &str, at: usize) -> String {
        let mut bytes = text.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    }
    let field = |name: &str| good[name].as_str().unwrap().to_owned();
    let mut data = good.clone();
    data["data"] = json!(flip(&field("data"), 4));
    let mut signature = good.clone();
    signature["dataSignature"] = json!(flip(&field("dataSignature"), 4));
    let mut key = good.clone();
    key["dataKey"] = json!(flip(&field("dataKey"), 4));
    let for_another_certificate = encrypted(other_cert, "cert-1", &presence);
    let cases = [
        ("data changed", data),
        ("signature changed", signature),
        ("data key changed", key),
        ("encrypted for another certificate", for_another_certificate),
    ];
    for (name, content) in cases {
        let before = gw.snapshot().await;
        let response = notify(
            &gw,
            "",
            batch(vec![rich_item(&subscription, victim, content)]),
        )
        .await;
        // The request is authentic (its clientState matches): 202, and the
        // item that fails is counted as a rejected signature and skipped.
        assert_eq!(response.status(), 202, "{name}");
        let after = gw.snapshot().await;
        assert_eq!(after.records, before.records, "{name}: applied");
        assert_eq!(after.last_seq, before.last_seq, "{name}");
        let mut expected = counters_only(before.sources);
        bump(&mut expected, "rejected.signature_mismatch");
        let after = counters_only(after.sources);
        assert_eq!(
            after["sources"][0]["counters"], expected["sources"][0]["counters"],
            "{name}: counted as a rejected signature, nothing else"
        );
    }
    // Not applied, and not read instead either.
    flush_reads(&gw, &api, &subscription, marker).await;
    assert!(
        !read_ids(&api.reads()[reads_at_ready..]).contains(victim),
        "{:?}",
        api.log()
    );
    assert_eq!(record(&gw, victim).await["availability"], "offline");
    problems_are_none(&api);
}

// --- configuration -----------------------------------------------------------

#[test]
fn check_config_refuses_what_graph_would_refuse() {
    let parse = |setup: &Setup| {
        presence_gateway::Config::parse_with_env(
            &setup.config("http://127.0.0.1:9"),
            std::path::Path::new("test.toml"),
            Vec::new(),
            |_| None,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let one = || Setup::new(users(1), 1);
    let accepted = [
        ("650 users per refresh token", Setup::new(users(1300), 2)),
        ("one user", one()),
        (
            "a 128-character client state",
            one().set("client_state", &format!("\"{}\"", "s".repeat(128))),
        ),
        (
            "a one-minute lifetime",
            one()
                .set("lifetime_mins", "1")
                .set("renew_before_secs", "30"),
        ),
    ];
    for (name, setup) in accepted {
        if let Err(error) = parse(&setup) {
            panic!("{name}: {error}");
        }
    }
    let long_state = "s".repeat(129);
    let refused = [
        (
            "more users than 650 per refresh token",
            Setup::new(users(1301), 2),
        ),
        (
            "renew_before_secs not below the lifetime",
            one().set("renew_before_secs", "3600"),
        ),
        (
            "a lifetime over 60 minutes",
            one().set("lifetime_mins", "61"),
        ),
        ("a lifetime of 0", one().set("lifetime_mins", "0")),
        (
            "a client state over 128 characters",
            one().set("client_state", &format!("\"{long_state}\"")),
        ),
        ("no refresh token", Setup::new(users(1), 0)),
    ];
    for (name, setup) in refused {
        let Err(error) = parse(&setup) else {
            panic!("{name}: accepted");
        };
        assert!(
            !error.contains(&long_state),
            "{name}: the error shows the secret"
        );
        assert!(!error.contains(CLIENT_SECRET), "{name}: {error}");
        assert!(!error.contains(&graph::refresh_token(0)), "{name}: {error}");
    }
}

// --- logs ----------------------------------------------------------------------

/// The real binary, its whole output: no access token, refresh token
/// (configured or rotated), client secret or client state, whatever
/// happened (rejections, a 401 and a refresh, lifecycle events, shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_holds_no_token_secret_or_client_state() {
    use common::process::{self, TestDir};
    let (api, base) = Graph::start(2).await;
    let everyone = users(700);
    let setup = Setup::new(everyone.clone(), 2).set("delete_on_shutdown", "true");
    let config = setup.config(&base);
    let dir = TestDir::new("graph-logs");
    let gw = process::Gateway::start(&dir, &|addr: SocketAddr| {
        process::with_listen(&config, addr)
    })
    .await;
    let subscription = subscription_of(&api, 0);
    let post = |query: &'static str, body: String| {
        let gw = &gw;
        async move {
            gw.client
                .post(gw.url(&format!("/webhooks/{SOURCE}{query}")))
                .body(body)
                .send()
                .await
                .expect("post")
                .status()
                .as_u16()
        }
    };
    let good = batch(vec![item(
        &subscription,
        CLIENT_STATE,
        &everyone[0],
        Some(("Busy", "InACall")),
    )]);
    assert_eq!(post("", good).await, 202);
    let wrong = batch(vec![item(&subscription, "wrong-state", &everyone[1], None)]);
    assert_eq!(post("", wrong).await, 401);
    let almost = batch(vec![item(
        &subscription,
        &format!("{CLIENT_STATE}x"),
        &everyone[1],
        None,
    )]);
    assert_eq!(post("", almost).await, 401);
    assert_eq!(post("?validationToken=hello", String::new()).await, 200);
    // A revoked token: the next read gets 401, the gateway refreshes.
    api.revoke_access(0);
    api.revoke_access(1);
    let reauthorize = batch(vec![lifecycle(
        "reauthorizationRequired",
        &subscription,
        CLIENT_STATE,
    )]);
    assert_eq!(post("", reauthorize).await, 202);
    let missed = batch(vec![lifecycle("missed", &subscription, CLIENT_STATE)]);
    assert_eq!(post("", missed).await, 202);
    wait_until("a refresh after the 401", WITHIN, || async {
        api.token_requests().len() >= 3
    })
    .await;
    wait_until("the reauthorization", WITHIN, || async {
        api.calls_to(
            "POST",
            &format!("/v1.0/subscriptions/{subscription}/reauthorize"),
        )
        .iter()
        .any(|c| c.account.is_some())
    })
    .await;
    let output = gw.stop().await;
    assert!(api.subscription_ids().is_empty(), "deleted at shutdown");

    assert!(output.contains("listening"), "the capture works:\n{output}");
    let mut secrets = api.all_tokens();
    secrets.push(CLIENT_SECRET.to_owned());
    secrets.push(CLIENT_STATE.to_owned());
    assert!(secrets.len() > 6, "{secrets:?}");
    for secret in secrets {
        assert!(
            !output.contains(&secret),
            "{secret} is in the output:\n{output}"
        );
    }
    let seen: HashSet<String> = api.calls().iter().map(|c| c.bearer.clone()).collect();
    assert!(seen.len() >= 3, "several access tokens were used: {seen:?}");
    problems_are_none(&api);
}
