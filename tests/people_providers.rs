//! One person whose identities span every provider kind (DESIGN §9),
//! each fed the way its provider feeds the gateway: a Mitel webhook signed
//! with `x-notify-signature`, NetSapiens posts authenticated by
//! `X-Correlation-ID` (presence and call models), Standard Webhooks signed
//! by the reference `standardwebhooks` library, Graph (Teams) change
//! notifications carrying the `clientState`, read back from the mock Graph
//! (tests/common/graph.rs), and the event channel of the mock UCWA server
//! (tests/common/ucwa.rs), and Mitel's MQTT-over-WebSocket transport
//! (a real broker behind a relay, tests/common/mitel_ws.rs).
//!
//! The identities are driven one at a time so that the person's derived
//! availability and `decided_by` walk through the precedence rule: a
//! higher availability takes the person over, a call overrides everything,
//! going back down hands the person to the next identity, ties go to the
//! most recently observed record, and a change of an identity that does
//! not decide emits no person event (the next change that does is the
//! fence that proves it).
//!
//! Real time: the mocks serve on loopback and the gateway reads from them
//! as it would from the providers; every wait is for a condition. Needs
//! Mosquitto on 127.0.0.1:1883, as tests/mitel_ws.rs does (`scripts/test`
//! starts it).
//! Runs against every store backend (`PG_TEST_STORE`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::graph::{self, CLIENT_SECRET, CLIENT_STATE, Graph, batch, item};
use common::sse::{Client, Sse};
use common::ucwa::{APPS, Ucwa, start_mock};
use common::{Gateway, MITEL_KEY, T0, TOKEN, mitel_ws, wait_until};
use serde_json::{Value, json};

/// Real-time waits for something that takes milliseconds when it works
/// (a Graph read is coalesced for up to a second).
const WITHIN: Duration = Duration::from_secs(20);

/// The Standard Webhooks secret of the fixtures (tests/fixtures/keys.toml).
const STANDARD_KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The NetSapiens subscription ids (tests/fixtures/keys.toml; the call
/// subscription's is the NetSapiens suite's).
const NS_PRESENCE: &str = "sub-7d1f0c52-4b1e-4f0e-9a55-0e5b2f0a8c31";
const NS_CALLS: &str = "sub-calls-0b3e";

/// Ana's identities, one per provider kind, in the people file's order.
const MITEL: (&str, &str) = ("mitel", "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11");
const NS: (&str, &str) = ("ns", "1001@acme.example");
const VENDOR: (&str, &str) = ("vendor", "u-4411");
const SFB: (&str, &str) = ("sfb", "ana@contoso.com");
/// Ana's desk phone, whose events come over MQTT.
const DESK: (&str, &str) = ("mitel-ws", "7d3e1f20-6b2a-4c55-9e0d-1a2b3c4d5e6f");
/// Ana's Teams object id ([`graph::user`]`(1)`).
fn teams() -> (&'static str, String) {
    ("teams", graph::user(1))
}

/// A directory for the people file, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "pg-people-providers-{}-{}",
            std::process::id(),
            SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("test dir");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The people file: Ana with one identity on each source, and Bo (a
/// NetSapiens extension only) so that Ana's stream has someone to ignore.
fn people_file() -> String {
    let (teams, teams_id) = teams();
    let identities: Vec<String> = [MITEL, NS, VENDOR, (teams, &teams_id), SFB, DESK]
        .iter()
        .map(|(s, p)| format!("{{ source = \"{s}\", principal = \"{p}\" }}"))
        .collect();
    format!(
        "[[person]]\nid = \"ana\"\nname = \"Ana Lima\"\nidentities = [\n  {}\n]\n\n\
         [[person]]\nid = \"bo\"\nname = \"Bo Berg\"\n\
         identities = [{{ source = \"ns\", principal = \"1002@acme.example\" }}]\n",
        identities.join(",\n  ")
    )
}

/// Six sources, one of each kind, against the mocks at `graph_base`,
/// `ucwa_base` and `mitel_base`; the MQTT client id is `client_id`.
fn config(
    people: &std::path::Path,
    graph_base: &str,
    ucwa_base: &str,
    mitel_base: &str,
    client_id: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 5

[consumers]
tokens = ["{TOKEN}"]

[people]
file = "{people}"

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["{MITEL_KEY}"]

[[sources]]
id = "ns"
kind = "netsapiens"
correlation_ids = ["{NS_PRESENCE}", {{ id = "{NS_CALLS}", model = "call" }}]

[[sources]]
id = "vendor"
kind = "standard"
signing_keys = ["{STANDARD_KEY}"]

[[sources]]
id = "teams"
kind = "graph"
api_base = "{graph_base}"

[sources.auth]
type = "refresh_token"
token_url = "{graph_base}/token"
client_id = "{graph_client_id}"
client_secret = "{CLIENT_SECRET}"
refresh_tokens = ["{refresh_token}"]

[sources.subscription]
users = ["{teams_user}"]
callback_url = "{callback}"
client_state = "{CLIENT_STATE}"
lifetime_mins = 60
renew_before_secs = 600
resync_interval_secs = 900

[[sources]]
id = "sfb"
kind = "ucwa"
api_base = "{ucwa_base}{APPS}"

[sources.auth]
type = "refresh_token"
refresh_token = "r1"
token_url = "{ucwa_base}/oauth/token"

[sources.subscription]
contacts = ["sip:Ana@contoso.com"]
duration_mins = 10
event_timeout_secs = 900
retry_initial_ms = 1000
retry_max_secs = 30

[[sources]]
id = "{desk}"
kind = "mitel_ws"
api_base = "{mitel_base}"
auth_base = "{mitel_base}"

[sources.auth]
type = "client_credentials"
client_id = "gw"
client_secret = "s3cret"

[sources.subscription]
client_id = "{client_id}"
retry_initial_ms = 100
retry_max_secs = 1
"#,
        desk = DESK.0,
        people = people.display(),
        graph_client_id = graph::CLIENT_ID,
        refresh_token = graph::refresh_token(0),
        teams_user = graph::user(1),
        callback = graph::CALLBACK_URL,
    )
}

/// Everything one test drives: the gateway and the two mocks behind it.
struct World {
    gw: Gateway,
    graph: Graph,
    ucwa: Ucwa,
    /// The Graph subscription the notifications name.
    subscription: String,
    /// The MQTT topic of the desk phone's presence, and the relay to the
    /// broker (open while it lives).
    topic: String,
    _relay: mitel_ws::Relay,
}

impl World {
    /// The current record of `(source, principal)` (Null when none).
    async fn record(&self, source: &str, principal: &str) -> Value {
        let (status, record) = self
            .gw
            .get(&format!("/v1/presence/{source}/{principal}"))
            .await;
        if status == 404 {
            return Value::Null;
        }
        assert_eq!(status, 200, "{source}/{principal}: {record}");
        record
    }

    /// Waits until `(source, principal)` has `availability` (and, when
    /// given, `activity`): the change has been applied.
    async fn applied(&self, source: &str, principal: &str, availability: &str) {
        wait_until(
            &format!("{source}/{principal} to be {availability}"),
            WITHIN,
            || async { self.record(source, principal).await["availability"] == availability },
        )
        .await;
    }

    /// A Mitel presence envelope, signed with the source's key.
    async fn mitel(&self, status: &str, note: &str, at: i64) {
        let body = json!({"topic": "platform-api-presence",
            "subject": format!("/presentities/{}", MITEL.1),
            "content": {"presence": status, "note": note, "timestamp": T0 + at,
                        "eventId": format!("mitel-{at}"),
                        "principalId": MITEL.1}})
        .to_string();
        self.gw.post_signed(MITEL.0, MITEL_KEY, &body).await;
    }

    /// The desk phone's presence, published over MQTT as Mitel does: the
    /// same envelope as a webhook's, without a signature.
    async fn desk(&self, status: &str, at: i64) {
        let body = json!({"topic": "platform-api-presence",
            "subject": format!("/presentities/{}", DESK.1),
            "content": {"presence": status, "timestamp": T0 + at,
                        "eventId": format!("desk-{at}"), "principalId": DESK.1}})
        .to_string();
        let publisher = mitel_ws::tag("people-publisher");
        mitel_ws::publish(&publisher, &self.topic, body).await;
    }

    /// A NetSapiens post of `objects` under the subscription `correlation`.
    async fn netsapiens(&self, correlation: &str, objects: Value) {
        let response = self
            .gw
            .client
            .post(self.gw.url(&format!("/webhooks/{}", NS.0)))
            .header("X-Correlation-ID", correlation)
            .body(objects.to_string())
            .send()
            .await
            .expect("netsapiens post");
        let status = response.status();
        assert_eq!(status, 204, "{}", response.text().await.unwrap_or_default());
    }

    /// Ana's extension's presence, at `second` past [`T0`].
    async fn ns_presence(&self, status: &str, second: u32) {
        let objects = json!([{"user": "1001", "domain": "acme.example", "presence": status,
                              "message": "", "time": format!("2025-01-01 00:00:{second:02}")}]);
        self.netsapiens(NS_PRESENCE, objects).await;
    }

    /// A call from Ana's extension to Bo's, started (or ended) at `second`
    /// past [`T0`].
    async fn ns_call(&self, ended: bool, second: u32) {
        let objects = json!([{"orig_callid": "20250101000007000001-abc",
            "term_callid": "20250101000007000002-def",
            "orig_user": "1001", "orig_domain": "acme.example",
            "term_user": "1002", "term_domain": "acme.example",
            "time_start": format!("2025-01-01 00:00:{second:02}"),
            "remove": if ended { "yes" } else { "no" }}]);
        self.netsapiens(NS_CALLS, objects).await;
    }

    /// A Standard Webhooks presence event, signed now by the reference
    /// library (the timestamp header is checked against the gateway's
    /// clock; the body's time is fixed).
    async fn standard(&self, status: &str, at: i64) {
        let body = json!({"type": "presence.updated",
            "data": {"user_id": VENDOR.1, "status": status, "message": format!("{status} (vendor)"),
                     "changed_at": T0 + at}})
        .to_string();
        let id = format!("msg_people_{at}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let signature = standardwebhooks::Webhook::new(STANDARD_KEY)
            .expect("reference key")
            .sign(&id, now, body.as_bytes())
            .expect("reference signature");
        let response = self
            .gw
            .client
            .post(self.gw.url(&format!("/webhooks/{}", VENDOR.0)))
            .header("webhook-id", &id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .expect("standard webhook");
        let status = response.status();
        assert_eq!(status, 204, "{}", response.text().await.unwrap_or_default());
    }

    /// Teams: Graph has the new presence; it notifies without resource
    /// data (with the subscription's `clientState`), and the gateway reads
    /// it back. Returns once the record shows it.
    async fn teams(&self, availability: &str, activity: &str, expected: &str) {
        let (source, user) = teams();
        self.graph.set(&user, availability, activity);
        let notification = batch(vec![item(&self.subscription, CLIENT_STATE, &user, None)]);
        let response = self
            .gw
            .client
            .post(self.gw.url(&format!("/webhooks/{source}")))
            .header("content-type", "application/json; charset=utf-8")
            .body(notification)
            .send()
            .await
            .expect("graph notification");
        let status = response.status();
        assert_eq!(status, 202, "{}", response.text().await.unwrap_or_default());
        self.applied(source, &user, expected).await;
    }

    /// UCWA: the contact's presence changes on the server, which tells the
    /// gateway on its event channel; the gateway reads the presence.
    /// Returns once the record shows it.
    async fn ucwa(&self, availability: &str, expected: &str) {
        self.ucwa.set(SFB.1, availability);
        self.ucwa.event(SFB.1);
        self.applied(SFB.0, SFB.1, expected).await;
    }
}

/// Starts the mocks and a gateway with Ana's people file, and waits until
/// the gateway is ready (Graph subscribed and read, UCWA read).
async fn world(dir: &Dir) -> World {
    let people = dir.0.join("people.toml");
    std::fs::write(&people, people_file()).expect("people file");
    let (graph, graph_base) = Graph::start(1).await;
    let (ucwa, ucwa_base) = start_mock().await;
    // Before the gateway starts: the start-up read finds Ana away on UCWA.
    ucwa.set(SFB.1, "Away");
    let relay = mitel_ws::Relay::start().await;
    let tag = mitel_ws::tag("people");
    let (mitel, mitel_base) = mitel_ws::MitelApi::start(relay.port, &tag).await;
    let client_id = format!("gw-{tag}");
    let config = config(&people, &graph_base, &ucwa_base, &mitel_base, &client_id);
    let gw = Gateway::start(&config).await;
    wait_until("the gateway is ready", WITHIN, || async {
        gw.readyz().await == 200
    })
    .await;
    // `connected` once the broker acknowledged the subscription.
    wait_until("MQTT subscribed", WITHIN, || async {
        let (_, sources) = gw.get("/v1/sources").await;
        sources["sources"]
            .as_array()
            .and_then(|list| list.iter().find(|s| s["id"] == DESK.0))
            .and_then(|s| s["subscriptions"].as_array())
            .is_some_and(|subs| {
                subs.iter()
                    .any(|s| s["kind"] == "mqtt" && s["state"] == "connected")
            })
    })
    .await;
    let topic = mitel
        .presence_topic()
        .unwrap_or_else(|| panic!("no presence subscription: {:?}", mitel.subscriptions));
    let subscription = graph
        .subscriptions()
        .first()
        .and_then(|s| s.value["id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no Graph subscription: {:?}", graph.log()));
    World {
        gw,
        graph,
        ucwa,
        subscription,
        topic,
        _relay: relay,
    }
}

/// What a person event says: availability, activity, and the deciding
/// identity's source (`""` for none).
fn summary(event: &Sse) -> (String, Option<String>, String) {
    assert_eq!(event.event, "person", "{event:?}");
    assert_eq!(event.data["person"], "ana", "{event:?}");
    (
        event.data["availability"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        event.data["activity"].as_str().map(str::to_owned),
        event.data["decided_by"]["source"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn ev(
    availability: &str,
    activity: Option<&str>,
    source: &str,
) -> (String, Option<String>, String) {
    (
        availability.to_owned(),
        activity.map(str::to_owned),
        source.to_owned(),
    )
}

/// Takes Ana's next person event and checks it against `expected`, and
/// that its `decided_by` names the deciding identity's principal.
async fn next_person(
    stream: &mut Client,
    expected: (String, Option<String>, String),
    principal: &str,
) -> Sse {
    let event = stream.next().await.expect("a person event");
    assert_eq!(summary(&event), expected, "{}", event.data);
    assert_eq!(
        event.data["decided_by"]["principal"], principal,
        "{}",
        event.data
    );
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_whose_identities_span_all_provider_kinds_fed_by_real_signed_webhooks() {
    let dir = Dir::new();
    let w = world(&dir).await;
    let (_, teams_user) = teams();
    let teams_user = teams_user.as_str();

    // At start-up Graph said Offline and UCWA Away: Ana is away, by UCWA
    // (the mock UCWA's contacts' activity is always `Available`).
    let mut ana = Client::open(&w.gw, "?person=ana", None).await;
    let snapshot = next_person(&mut ana, ev("away", Some("available"), "sfb"), SFB.1).await;
    // Every presence change of Ana's identities, with Ana's person events
    // in between: shows where a change made no person event.
    let principals: String = [MITEL.1, NS.1, VENDOR.1, teams_user, SFB.1, DESK.1]
        .iter()
        .map(|p| format!("&principal={p}"))
        .collect();
    let mut mixed = Client::open(
        &w.gw,
        &format!("?person=ana{principals}&snapshot=false"),
        None,
    )
    .await;
    let mut person_events = vec![snapshot];

    // Mitel available beats UCWA away.
    w.mitel("Available", "at my desk", 1).await;
    let e = next_person(&mut ana, ev("available", None, "mitel"), MITEL.1).await;
    assert_eq!(e.data["status_text"], "at my desk");
    assert_eq!(e.data["observed_at"], "2025-01-01T00:00:00.001Z");
    person_events.push(e);

    // NetSapiens away: below the winner, no person event...
    w.ns_presence("away", 2).await;
    w.applied(NS.0, NS.1, "away").await;
    // ... as the fence shows: Teams busy (in a meeting) beats Mitel
    // available, and is the next person event.
    w.teams("Busy", "InAMeeting", "busy").await;
    let e = next_person(
        &mut ana,
        ev("busy", Some("in_a_meeting"), "teams"),
        teams_user,
    )
    .await;
    person_events.push(e);

    // Standard Webhooks be-right-back: below the winner, nothing; the
    // fence is UCWA do-not-disturb, which beats Teams busy.
    w.standard("be_right_back", 4).await;
    w.applied(VENDOR.0, VENDOR.1, "be_right_back").await;
    w.ucwa("DoNotDisturb", "do_not_disturb").await;
    let e = next_person(
        &mut ana,
        ev("do_not_disturb", Some("available"), "sfb"),
        SFB.1,
    )
    .await;
    person_events.push(e);

    // Mitel away: nothing. The fence: a call on the NetSapiens extension
    // makes Ana busy / in a call whatever the others say.
    w.mitel("Away", "gone for lunch", 6).await;
    w.applied(MITEL.0, MITEL.1, "away").await;
    w.ns_call(false, 7).await;
    let e = next_person(&mut ana, ev("busy", Some("in_a_call"), "ns"), NS.1).await;
    person_events.push(e);

    // The call ends: do-not-disturb again, by UCWA.
    w.ns_call(true, 8).await;
    let e = next_person(
        &mut ana,
        ev("do_not_disturb", Some("available"), "sfb"),
        SFB.1,
    )
    .await;
    person_events.push(e);

    // Going back down hands Ana back: UCWA online leaves Teams busy on top.
    w.ucwa("Online", "available").await;
    let e = next_person(
        &mut ana,
        ev("busy", Some("in_a_meeting"), "teams"),
        teams_user,
    )
    .await;
    person_events.push(e);
    // Teams away: UCWA's available is the highest now.
    w.teams("Away", "Away", "away").await;
    let e = next_person(&mut ana, ev("available", Some("available"), "sfb"), SFB.1).await;
    person_events.push(e);
    // UCWA offline: the vendor's be-right-back decides.
    w.ucwa("Offline", "offline").await;
    let e = next_person(&mut ana, ev("be_right_back", None, "vendor"), VENDOR.1).await;
    assert_eq!(e.data["status_text"], "be_right_back (vendor)");
    person_events.push(e);
    // The vendor goes offline: three identities are away (Mitel, the
    // NetSapiens extension, Teams); the most recently observed decides,
    // which is Teams' (read from Graph after the others' provider times).
    w.standard("offline", 12).await;
    let e = next_person(&mut ana, ev("away", None, "teams"), teams_user).await;
    person_events.push(e);

    // Mitel offline: not the winner, nothing; the fence is the vendor's
    // do-not-disturb.
    w.mitel("Offline", "", 13).await;
    w.applied(MITEL.0, MITEL.1, "offline").await;
    w.standard("dnd", 14).await;
    let e = next_person(&mut ana, ev("do_not_disturb", None, "vendor"), VENDOR.1).await;
    person_events.push(e);

    // The desk phone (MQTT) busy: below do-not-disturb, nothing; the
    // fence is the vendor going available, which hands Ana to the desk.
    w.desk("Busy", 15).await;
    w.applied(DESK.0, DESK.1, "busy").await;
    w.standard("available", 16).await;
    let e = next_person(&mut ana, ev("busy", None, "mitel-ws"), DESK.1).await;
    person_events.push(e);

    // Each person event's id is its seq, increasing.
    let ids: Vec<u64> = person_events
        .iter()
        .map(|e| e.id.expect("person events carry ids"))
        .collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "{ids:?}");
    for e in &person_events {
        assert_eq!(e.data["seq"], json!(e.id), "{}", e.data);
    }

    // The interleaving: each presence change of Ana's identities, and a
    // person event right after exactly those that changed Ana.
    let expected_mixed: Vec<(&str, &str, &str)> = vec![
        ("presence", "mitel", "available"),
        ("person", "mitel", "available"),
        ("presence", "ns", "away"),
        ("presence", "teams", "busy"),
        ("person", "teams", "busy"),
        ("presence", "vendor", "be_right_back"),
        ("presence", "sfb", "do_not_disturb"),
        ("person", "sfb", "do_not_disturb"),
        ("presence", "mitel", "away"),
        ("presence", "ns", "away"), // in a call: the activity changed
        ("person", "ns", "busy"),
        ("presence", "ns", "away"), // the call ended
        ("person", "sfb", "do_not_disturb"),
        ("presence", "sfb", "available"),
        ("person", "teams", "busy"),
        ("presence", "teams", "away"),
        ("person", "sfb", "available"),
        ("presence", "sfb", "offline"),
        ("person", "vendor", "be_right_back"),
        ("presence", "vendor", "offline"),
        ("person", "teams", "away"),
        ("presence", "mitel", "offline"),
        ("presence", "vendor", "do_not_disturb"),
        ("person", "vendor", "do_not_disturb"),
        ("presence", "mitel-ws", "busy"),
        ("presence", "vendor", "available"),
        ("person", "mitel-ws", "busy"),
    ];
    let got = mixed.take(expected_mixed.len()).await;
    let shown: Vec<(String, String, String)> = got
        .iter()
        .map(|e| {
            let source = match e.event.as_str() {
                "person" => e.data["decided_by"]["source"].as_str(),
                _ => e.data["source"].as_str(),
            };
            (
                e.event.clone(),
                source.unwrap_or_default().to_owned(),
                e.data["availability"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let expected_mixed: Vec<(String, String, String)> = expected_mixed
        .iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect();
    assert_eq!(shown, expected_mixed);
    let mixed_ids: Vec<u64> = got.iter().map(|e| e.id.expect("an id")).collect();
    assert!(mixed_ids.windows(2).all(|p| p[0] < p[1]), "{mixed_ids:?}");
    // The same person events on both streams.
    let mixed_people: Vec<&Sse> = got.iter().filter(|e| e.event == "person").collect();
    assert_eq!(mixed_people.len(), person_events.len() - 1);
    for (a, b) in mixed_people.iter().zip(&person_events[1..]) {
        assert_eq!((a.id, &a.data), (b.id, &b.data));
    }

    // The read API: Ana's record is the last event's, with every identity
    // record in the file's order.
    let (status, record) = w.gw.get("/v1/people/ana").await;
    assert_eq!(status, 200, "{record}");
    let last = person_events.last().expect("events");
    assert_eq!(record, last.data);
    assert_eq!(record["name"], "Ana Lima");
    let sources: Vec<(String, String, String)> = record["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap_or_default().to_owned(),
                r["principal"].as_str().unwrap_or_default().to_owned(),
                r["availability"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let own = |s: &str, p: &str, a: &str| (s.to_owned(), p.to_owned(), a.to_owned());
    assert_eq!(
        sources,
        [
            own(MITEL.0, MITEL.1, "offline"),
            own(NS.0, NS.1, "away"),
            own(VENDOR.0, VENDOR.1, "available"),
            own("teams", teams_user, "away"),
            own(SFB.0, SFB.1, "offline"),
            own(DESK.0, DESK.1, "busy"),
        ]
    );
    // Each identity record is the one the presence API serves.
    for entry in record["sources"].as_array().expect("sources") {
        let source = entry["source"].as_str().unwrap_or_default();
        let principal = entry["principal"].as_str().unwrap_or_default();
        assert_eq!(&w.record(source, principal).await, entry);
    }
    let problems = w.graph.problems();
    assert!(problems.is_empty(), "Graph rules broken: {problems:#?}");
}
