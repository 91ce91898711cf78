//! Failover between replicas of the real binary (DESIGN §8): two
//! `presence-gateway` processes share the Redis at 127.0.0.1:6379 (a key
//! prefix of the test's own, removed at the end) with `lease_ttl_secs = 2`;
//! the one holding a managed source's lease is killed with SIGKILL, so it
//! releases nothing, and the other must take the lease over within the TTL
//! and one check, adopt what the dead one managed instead of creating it
//! again, and carry on: NetSapiens renewals of the same subscription, whose
//! correlation id authenticates on the survivor throughout; the UCWA event
//! channel, which only the holder ever reads.
//!
//! Children run through `tests/common/process.rs` and are killed when a
//! test fails; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netsapiens::NsApi;
use common::process::{Gateway, TestDir, with_listen};
use common::redis::{cleanup, shared_url, unique_prefix};
use common::ucwa::{APPS, start_mock};
use common::{TOKEN, wait_until};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// `lease_ttl_secs` of every replica: the shortest allowed.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// How often a replica claims (or checks) a lease: a third of the TTL.
const LEASE_CHECK: Duration = Duration::from_millis(2000 / 3);
/// The bound on a takeover after the holder's SIGKILL: the abandoned lease
/// expires at most `LEASE_TTL` after its last renewal, the survivor claims
/// it at its next check, and the rest is slack for a loaded 2-core machine
/// (the measured time is printed).
const TAKEOVER_WITHIN: Duration = Duration::from_secs(10);
/// The bound on anything else the tests wait for.
const WITHIN: Duration = Duration::from_secs(20);

/// The config of replica `replica` on the shared Redis under `prefix`,
/// with `sources` (TOML) after it.
fn replica_config(replica: &str, prefix: &str, sources: &str) -> String {
    format!(
        r#"
[server]
replica_id = "{replica}"
shutdown_grace_secs = 5

[consumers]
tokens = ["{TOKEN}"]

[store]
backend = "redis"

[store.redis]
url = "{url}"
key_prefix = "{prefix}"
lease_ttl_secs = {ttl}

{sources}
"#,
        url = shared_url(),
        ttl = LEASE_TTL.as_secs(),
    )
}

/// A replica: its id and the child running it.
struct Replica {
    id: &'static str,
    gw: Gateway,
}

/// Starts replicas `ids` at the same time (so either may win the lease),
/// each with `config(id)`, and waits until every one is ready.
async fn start_replicas(
    dir: &TestDir,
    ids: [&'static str; 2],
    config: impl Fn(&str) -> String,
) -> [Replica; 2] {
    let [a, b] = ids.map(|id| {
        let text = config(id);
        move |addr: SocketAddr| with_listen(&text, addr)
    });
    let (ga, gb) = tokio::join!(Gateway::spawn(dir, &a), Gateway::spawn(dir, &b));
    tokio::join!(ga.wait_ready(), gb.wait_ready());
    [
        Replica { id: ids[0], gw: ga },
        Replica { id: ids[1], gw: gb },
    ]
}

/// `"lease"` of `source` in the replica's `/v1/sources`.
async fn lease(gw: &Gateway, source: &str) -> Value {
    gw.source(source).await["lease"].clone()
}

/// Which of the replicas holds the lease of `source`, once exactly one
/// says it does and the other names it as the holder.
async fn sole_holder(replicas: &[Replica; 2], source: &str) -> Option<usize> {
    let leases = [
        lease(&replicas[0].gw, source).await,
        lease(&replicas[1].gw, source).await,
    ];
    let held: Vec<usize> = (0..2).filter(|&i| leases[i]["held_here"] == true).collect();
    let &[holder] = held.as_slice() else {
        return None;
    };
    let other = 1 - holder;
    let agreed = leases[holder]["holder"] == replicas[holder].id
        && leases[other] == json!({"holder": replicas[holder].id, "held_here": false});
    agreed.then_some(holder)
}

/// SIGKILLs the holder; then waits (bounded by [`TAKEOVER_WITHIN`]) until
/// the survivor says it holds the lease of `source`, and returns how long
/// that took from the signal.
async fn kill_holder_and_time_takeover(
    holder: Replica,
    survivor: &Replica,
    source: &str,
) -> Duration {
    let killed = Instant::now();
    holder.gw.kill9().await;
    wait_until(
        &format!("{} takes over the lease of {source}", survivor.id),
        TAKEOVER_WITHIN,
        || async { lease(&survivor.gw, source).await["held_here"] == true },
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "{source}: {} took over {} ms after the SIGKILL of {} (lease_ttl {} s, check every {} ms)",
        survivor.id,
        took.as_millis(),
        holder.id,
        LEASE_TTL.as_secs(),
        LEASE_CHECK.as_millis()
    );
    // The dead holder renewed at most a check before it died: its lease
    // cannot have been free much sooner than that before the TTL ran out.
    assert!(
        took >= LEASE_TTL - LEASE_CHECK - Duration::from_millis(300),
        "taken over after {took:?}: before the abandoned lease could expire"
    );
    assert_eq!(
        lease(&survivor.gw, source).await,
        json!({"holder": survivor.id, "held_here": true})
    );
    took
}

// ---------------------------------------------------------------------
// NetSapiens: the subscription is adopted, renewed, and its correlation
// id authenticates on the survivor throughout
// ---------------------------------------------------------------------

const NS_CALLBACK: &str = "https://gw.example.test/webhooks/ns";

/// The API key of each replica: the mock tells whose call it got.
fn ns_key(replica: &str) -> String {
    format!("ns-key-{replica}")
}

/// A managed NetSapiens source `ns` with a subscription of 6 s, renewed
/// 3 s before it expires: renewals happen during the test.
fn ns_source(api_base: &str, replica: &str) -> String {
    format!(
        r#"
[[sources]]
id = "ns"
kind = "netsapiens"
api_base = "{api_base}"

[sources.auth]
type = "bearer"
token = "{key}"

[sources.subscription]
callback_url = "{NS_CALLBACK}"
model = "presence"
domain = "acme.example"
lifetime_secs = 6
renew_before_secs = 3
"#,
        key = ns_key(replica)
    )
}

/// Posts a NetSapiens presence object with `correlation_id` to `url`.
async fn ns_post(client: &reqwest::Client, url: &str, correlation_id: &str) -> u16 {
    let body = json!([{"user": "1001", "domain": "acme.example", "presence": "open",
                       "message": "", "time": "2026-11-24 10:00:00"}]);
    client
        .post(url)
        .header("X-Correlation-ID", correlation_id)
        .json(&body)
        .send()
        .await
        .expect("webhook request")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_netsapiens_holder_is_replaced_without_a_second_subscription() {
    let prefix = unique_prefix("failover-ns");
    let dir = TestDir::new("failover-ns");
    let api = NsApi::with_keys(&[&ns_key("gw-a"), &ns_key("gw-b")]);
    let base = api.serve().await;
    let replicas = start_replicas(&dir, ["gw-a", "gw-b"], |id| {
        replica_config(id, &prefix, &ns_source(&base, id))
    })
    .await;

    // One replica manages the source: one subscription, renewed by it.
    wait_until("one holder and one subscription", WITHIN, || async {
        sole_holder(&replicas, "ns").await.is_some() && api.ids().len() == 1
    })
    .await;
    let h = sole_holder(&replicas, "ns")
        .await
        .expect("still one holder");
    let [a, b] = replicas;
    let (holder, survivor) = if h == 0 { (a, b) } else { (b, a) };
    let id = api.ids()[0].clone();
    let renew = format!("PUT /ns-api/v2/subscriptions/{id}");
    wait_until("the holder renews", WITHIN, || async {
        api.calls(&renew) >= 1
    })
    .await;
    let calls = api.all_calls();
    assert!(
        calls.iter().all(|c| c.key == ns_key(holder.id)),
        "only the holder calls the provider: {calls:?}"
    );

    // The survivor-to-be authenticates the id it follows in Redis.
    let webhook = survivor.gw.url("/webhooks/ns");
    let client = survivor.gw.client.clone();
    wait_until("the other replica accepts the id", WITHIN, || async {
        ns_post(&client, &webhook, &id).await == 204
    })
    .await;
    assert_eq!(ns_post(&client, &webhook, "not-a-subscription").await, 401);

    // A provider keeps posting to the survivor across the failover.
    let stop = CancellationToken::new();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let poster = tokio::spawn({
        let (stop, answers, client, webhook, id) = (
            stop.clone(),
            Arc::clone(&answers),
            client.clone(),
            webhook.clone(),
            id.clone(),
        );
        async move {
            while !stop.is_cancelled() {
                let status = ns_post(&client, &webhook, &id).await;
                answers.lock().push(status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    let killed = Instant::now();
    let holder_key = ns_key(holder.id);
    kill_holder_and_time_takeover(holder, &survivor, "ns").await;
    let took_over = Instant::now();

    // The survivor adopts the subscription and renews it.
    let renewals = || {
        api.all_calls()
            .into_iter()
            .filter(|c| c.at >= took_over && c.request == renew)
            .filter(|c| c.key == ns_key(survivor.id))
            .count()
    };
    wait_until(
        "the survivor renews the same subscription",
        WITHIN,
        || async { renewals() >= 2 },
    )
    .await;
    stop.cancel();
    poster.await.expect("poster");

    let calls = api.all_calls();
    assert_eq!(
        api.calls("POST"),
        1,
        "exactly one create in all: {:?}",
        api.log()
    );
    assert_eq!(api.calls("DELETE"), 0, "{:?}", api.log());
    assert_eq!(api.ids(), vec![id.clone()]);
    // Anything after the kill was the survivor's (a request the dead
    // process had in flight may land just after the signal).
    let late: Vec<_> = calls
        .iter()
        .filter(|c| c.at >= killed + Duration::from_millis(200) && c.key == holder_key)
        .collect();
    assert!(late.is_empty(), "calls of the dead replica: {late:?}");
    let answers = answers.lock().clone();
    assert!(answers.len() > 10, "{answers:?}");
    assert!(
        answers.iter().all(|&s| s == 204),
        "the id authenticates throughout the failover: {answers:?}"
    );
    assert_eq!(ns_post(&client, &webhook, &id).await, 204);
    assert_eq!(ns_post(&client, &webhook, "not-a-subscription").await, 401);
    let subscriptions = survivor.gw.source("ns").await["subscriptions"].clone();
    assert_eq!(subscriptions[0]["state"], "active", "{subscriptions}");

    survivor.gw.stop().await;
    cleanup(&shared_url(), &prefix).await;
}

// ---------------------------------------------------------------------
// UCWA: only the holder reads the event channel
// ---------------------------------------------------------------------

/// A UCWA source `sfb` with three contacts.
fn ucwa_source(base: &str) -> String {
    format!(
        r#"
[[sources]]
id = "sfb"
kind = "ucwa"
api_base = "{base}{APPS}"

[sources.auth]
type = "refresh_token"
refresh_token = "r1"
token_url = "{base}/oauth/token"

[sources.subscription]
contacts = ["sip:SaraD@contoso.com", "sip:alex@contoso.com", "sip:kim@contoso.com"]
duration_mins = 10
event_timeout_secs = 180
retry_initial_ms = 200
retry_max_secs = 2
"#
    )
}

/// `availability` of a UCWA contact's record on a replica (Null if none).
async fn availability(gw: &Gateway, address: &str) -> Value {
    gw.get(&format!("/v1/presence/sfb/{address}")).await.1["availability"].clone()
}

/// The state of the `ucwa` entry of the replica's `/v1/sources`.
async fn channel_state(gw: &Gateway) -> Value {
    gw.source("sfb").await["subscriptions"][0]["state"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reads_the_ucwa_event_channel_and_the_survivor_takes_it_over() {
    let prefix = unique_prefix("failover-ucwa");
    let dir = TestDir::new("failover-ucwa");
    let (ucwa, base) = start_mock().await;
    let replicas = start_replicas(&dir, ["gw-a", "gw-b"], |id| {
        replica_config(id, &prefix, &ucwa_source(&base))
    })
    .await;

    wait_until(
        "one holder with a running event channel",
        WITHIN,
        || async {
            let Some(h) = sole_holder(&replicas, "sfb").await else {
                return false;
            };
            channel_state(&replicas[h].gw).await == "active"
                && ucwa.state.lock().pending.get(&1) == Some(&1)
        },
    )
    .await;
    let h = sole_holder(&replicas, "sfb")
        .await
        .expect("still one holder");
    let [a, b] = replicas;
    let (holder, survivor) = if h == 0 { (a, b) } else { (b, a) };
    assert_eq!(channel_state(&survivor.gw).await, "standby");

    // The holder's start-up read is in Redis: both replicas serve it.
    for gw in [&holder.gw, &survivor.gw] {
        wait_until("the start-up read on every replica", WITHIN, || async {
            availability(gw, "sarad@contoso.com").await == "available"
        })
        .await;
    }
    // An event goes through the holder's channel.
    ucwa.set("sarad@contoso.com", "Busy");
    ucwa.event("sarad@contoso.com");
    wait_until("the event reaches the survivor-to-be", WITHIN, || async {
        availability(&survivor.gw, "sarad@contoso.com").await == "busy"
    })
    .await;
    {
        let m = ucwa.state.lock();
        assert_eq!(m.tokens_issued, 1, "the standby replica makes no call");
        assert_eq!(m.app, 1, "one application");
        assert_eq!(m.subscriptions.len(), 1, "one presence subscription");
        assert_eq!(m.max_pending.get(&1), Some(&1), "one reader at a time");
        assert!(m.polled.iter().all(|&app| app == 1), "{:?}", m.polled);
    }
    assert_eq!(channel_state(&survivor.gw).await, "standby");

    // Presence changes while nobody is told: only a new reader's start-up
    // read can bring it.
    ucwa.set("alex@contoso.com", "Away");
    ucwa.set("kim@contoso.com", "Busy");
    assert_eq!(
        availability(&survivor.gw, "alex@contoso.com").await,
        "busy_idle"
    );

    kill_holder_and_time_takeover(holder, &survivor, "sfb").await;

    wait_until("the survivor's application and channel", WITHIN, || async {
        channel_state(&survivor.gw).await == "active"
            && ucwa.state.lock().pending.get(&2) == Some(&1)
    })
    .await;
    assert_eq!(availability(&survivor.gw, "alex@contoso.com").await, "away");
    assert_eq!(availability(&survivor.gw, "kim@contoso.com").await, "busy");
    ucwa.set("sarad@contoso.com", "DoNotDisturb");
    ucwa.event("sarad@contoso.com");
    wait_until(
        "an event through the survivor's channel",
        WITHIN,
        || async { availability(&survivor.gw, "sarad@contoso.com").await == "do_not_disturb" },
    )
    .await;
    {
        let m = ucwa.state.lock();
        assert_eq!(
            m.tokens_issued, 2,
            "the survivor's first call was after the takeover"
        );
        assert_eq!(m.app, 2, "the survivor's application, and no other");
        assert_eq!(m.subscriptions.len(), 2, "{:?}", m.subscriptions);
        assert_eq!(m.max_pending.get(&2), Some(&1), "one reader at a time");
        assert_eq!(m.max_pending.get(&1), Some(&1));
    }

    survivor.gw.stop().await;
    cleanup(&shared_url(), &prefix).await;
}
