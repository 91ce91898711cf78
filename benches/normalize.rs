//! After verification: Mitel, NetSapiens, UCWA and Graph parse-and-normalize, then
//! `Records::apply` (the in-memory engine behind `Store`).
//!
//! Parsing runs on the recorded fixtures, with the default field pointers and
//! with `[sources.fields]` overrides that point deeper into the payload, and on
//! a non-presence topic (acknowledged and ignored: the cheapest way out).
//!
//! The store benches run against a store pre-filled with 1 000 000 principals
//! (36-character ids), the size the performance targets name, so the shard
//! maps are far larger than the cache. Every update carries a provider event id, as Mitel's do, so the
//! dedup check is part of every measured apply. Each iteration applies a
//! different, precomputed update chosen so that it really takes the named
//! path; the outcomes are collected and asserted after each timed chunk.
//!
//! Run: `cargo bench --bench normalize`

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Bencher, Criterion, Throughput, criterion_group, criterion_main};
use presence_gateway::presence::store::StoreLimits;
use presence_gateway::presence::{ApplyOutcome, Availability, Millis, PresenceUpdate, Records};
use presence_gateway::providers::fields::OneOrMany;
use presence_gateway::providers::mitel::{self, MitelParser};
use presence_gateway::providers::netsapiens::{self, CallFieldOverrides, Model, NetSapiensParser};
use presence_gateway::providers::{FieldOverrides, StatusMap};
use presence_gateway::providers::{graph, ucwa};
use presence_gateway::verify::Verified;

const PRESENCE: &str = include_str!("../tests/fixtures/mitel-presence.json");
const MEDIA: &str = include_str!("../tests/fixtures/mitel-media-call.json");
const UCWA_EVENTS: &str = include_str!("../tests/fixtures/ucwa-events.json");
const UCWA_PRESENCE: &str = include_str!("../tests/fixtures/ucwa-contact-presence.json");
/// A topic the gateway does not handle.
const OTHER_TOPIC: &str = r#"{"publicationId":"9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a","topic":"platform-api-conversations","method":"PUT","subject":"/2017-09-01/conversations/f4e3d2c1","content":{"eventId":"77aa88bb-99cc-4dde-8eff-001122334455","timestamp":1764000931000},"publisher":{"accountId":"acc-10042"}}"#;

/// The presence fixture with the status and note moved one level deeper, the
/// shape `[sources.fields]` overrides exist for.
const NESTED: &str = r#"{"publicationId":"6a1b4c9e-2f7d-4d0a-9b43-5f2e8c1d7a10","topic":"platform-api-presence","method":"PUT","subject":"/presentities/2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11","content":{"eventId":"0b7c2d44-8f1a-4e3b-a6d2-93c1e5f7b208","timestamp":1764000930123,"principalId":"2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11","state":{"presence":{"code":"OnThePhone","activity":"InACall"},"message":{"text":"On a call"}}},"publisher":{"accountId":"acc-10042","principalId":"2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11"},"subscription":{"subscriptionId":"5c2e7a90-1d3f-4b8e-8c6a-7e9f0a1b2c3d"},"notification":{"createdOn":"2026-11-24T10:15:30.140Z","correlationId":"c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f"}}"#;

fn parse(c: &mut Criterion) {
    let default_parser = MitelParser::new(
        &FieldOverrides::default(),
        &CallFieldOverrides::default(),
        StatusMap::new(mitel::STATUS_WORDS, []),
    )
    .expect("default Mitel fields compile");
    let overrides = FieldOverrides {
        status: Some(OneOrMany::One("/content/state/presence/code".into())),
        activity: Some(OneOrMany::One("/content/state/presence/activity".into())),
        note: Some(OneOrMany::Many(vec![
            "/content/state/message/text".into(),
            "/content/note".into(),
        ])),
        ..FieldOverrides::default()
    };
    let custom_parser = MitelParser::new(
        &overrides,
        &CallFieldOverrides::default(),
        StatusMap::new(mitel::STATUS_WORDS, [("OnThePhone", Availability::Busy)]),
    )
    .expect("custom Mitel fields compile");

    // Each case must take the path its name promises.
    let parsed = default_parser
        .parse(Verified::assume_verified_for_tests(PRESENCE.as_bytes()))
        .unwrap();
    assert_eq!((parsed.updates.len(), parsed.ignored), (1, 0));
    let parsed = custom_parser
        .parse(Verified::assume_verified_for_tests(NESTED.as_bytes()))
        .unwrap();
    assert_eq!((parsed.updates.len(), parsed.ignored), (1, 0));
    assert_eq!(parsed.updates[0].availability, Availability::Busy);
    assert_eq!(parsed.updates[0].status_text.as_deref(), Some("On a call"));
    let parsed = default_parser
        .parse(Verified::assume_verified_for_tests(MEDIA.as_bytes()))
        .unwrap();
    assert_eq!((parsed.calls.len(), parsed.ignored), (1, 0));
    let parsed = default_parser
        .parse(Verified::assume_verified_for_tests(OTHER_TOPIC.as_bytes()))
        .unwrap();
    assert_eq!((parsed.updates.len(), parsed.ignored), (0, 1));

    let mut group = c.benchmark_group("mitel_parse");
    let cases = [
        ("presence_default_fields", &default_parser, PRESENCE),
        ("presence_custom_fields", &custom_parser, NESTED),
        ("media_call_event", &default_parser, MEDIA),
        ("ignored_topic", &default_parser, OTHER_TOPIC),
    ];
    for (name, parser, body) in cases {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                parser.parse(Verified::assume_verified_for_tests(black_box(
                    body.as_bytes(),
                )))
            });
        });
    }
    group.finish();
}

/// A NetSapiens post of `n` presence objects (about 150 bytes each).
fn netsapiens_post(n: usize) -> String {
    let words = ["open", "inuse", "away", "dnd", "closed"];
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"user":"{}","domain":"acme.example","name-first-name":"Ada","presence":"{}","message":"","time":"2026-11-24 10:15:{:02}"}}"#,
                1000 + i,
                words[i % words.len()],
                i % 60
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn netsapiens_parse(c: &mut Criterion) {
    let parser = NetSapiensParser::new(
        &FieldOverrides::default(),
        &CallFieldOverrides::default(),
        StatusMap::new(netsapiens::STATUS_WORDS, []),
        jiff::tz::TimeZone::UTC,
    )
    .expect("default NetSapiens fields compile");
    let body = netsapiens_post(100);
    let parsed = parser
        .parse(
            Verified::assume_verified_for_tests(body.as_bytes()),
            Model::Presence,
        )
        .unwrap();
    assert_eq!((parsed.updates.len(), parsed.ignored), (100, 0));

    let mut group = c.benchmark_group("netsapiens_parse");
    group.throughput(Throughput::Elements(100));
    group.bench_function("presence_100_objects", |b| {
        b.iter(|| {
            parser.parse(
                Verified::assume_verified_for_tests(black_box(body.as_bytes())),
                Model::Presence,
            )
        });
    });
    group.finish();
}

/// UCWA: the event-channel answer (which presence resources to read), then one
/// contact presence resource read into an update.
fn ucwa_parse(c: &mut Criterion) {
    let statuses = StatusMap::new(ucwa::STATUS_WORDS, []);
    let events = ucwa::events(UCWA_EVENTS).expect("the events fixture parses");
    assert!(!events.presence.is_empty());
    let update = ucwa::presence_update("sarad@contoso.com", UCWA_PRESENCE, &statuses, None)
        .expect("the presence fixture parses");
    assert_eq!(update.availability, Availability::Offline);

    let mut group = c.benchmark_group("ucwa_parse");
    group.bench_function("event_channel_answer", |b| {
        b.iter(|| ucwa::events(black_box(UCWA_EVENTS)));
    });
    group.bench_function("contact_presence", |b| {
        b.iter(|| {
            ucwa::presence_update(
                black_box("sarad@contoso.com"),
                black_box(UCWA_PRESENCE),
                &statuses,
                None,
            )
        });
    });
    group.finish();
}

/// Graph: a notification batch of 100 items, each carrying its presence in
/// `resourceData` (the fixture's shape): parsed, each item's kind decided and
/// its update built, as the webhook does before applying them; and 100 items
/// that only name their user (each becomes a queued read).
fn graph_batch(carried: bool) -> String {
    let items: Vec<String> = (0..100)
        .map(|i| {
            let id = format!("{i:08x}-7ef5-42da-9069-724602c31f6b");
            let data = if carried {
                format!(r##"{{"@odata.type":"#Microsoft.Graph.presence","@odata.id":"communications/presences('{id}')","id":"{id}","availability":"Busy","activity":"InAMeeting"}}"##)
            } else {
                format!(r##"{{"@odata.type":"#Microsoft.Graph.presence","@odata.id":"communications/presences('{id}')","id":"{id}"}}"##)
            };
            format!(
                r#"{{"subscriptionId":"7f105c7d-2dc5-4530-97cd-4e7ae6534c07","clientState":"gw-client-state-6f3b2c","changeType":"updated","tenantId":"84bd8158-6d4d-4958-8b9f-9d6445542f95","resource":"communications/presences('{id}')","subscriptionExpirationDateTime":"2026-11-24T11:00:00.0000000Z","resourceData":{data}}}"#
            )
        })
        .collect();
    format!(r#"{{"value":[{}]}}"#, items.join(","))
}

/// Parses a batch and builds what the webhook builds: the number of updates
/// and of reads.
fn graph_parse_batch(body: &str, statuses: &StatusMap) -> (usize, usize) {
    let batch = graph::parse_batch(body.as_bytes()).expect("the batch parses");
    let (mut updates, mut reads) = (0, 0);
    for item in &batch.value {
        match item.kind() {
            graph::Kind::Carried(presence) => {
                let id = presence.id.clone().expect("an id");
                let update =
                    graph::presence_update(id, presence, statuses, Millis(T0)).expect("a presence");
                black_box(update);
                updates += 1;
            }
            graph::Kind::Read(id) => {
                black_box(id);
                reads += 1;
            }
            _ => {}
        }
    }
    (updates, reads)
}

fn graph_parse(c: &mut Criterion) {
    let statuses = StatusMap::new(graph::STATUS_WORDS, []);
    let carried = graph_batch(true);
    let named = graph_batch(false);
    assert_eq!(graph_parse_batch(&carried, &statuses), (100, 0));
    assert_eq!(graph_parse_batch(&named, &statuses), (0, 100));
    let mut group = c.benchmark_group("graph_parse");
    group.throughput(Throughput::Elements(100));
    group.bench_function("batch_100_with_resource_data", |b| {
        b.iter(|| graph_parse_batch(black_box(&carried), &statuses));
    });
    group.bench_function("batch_100_naming_users", |b| {
        b.iter(|| graph_parse_batch(black_box(&named), &statuses));
    });
    group.finish();
}

// ---- store -------------------------------------------------------------------

const PREFILL: u64 = 1_000_000;
/// The "new principal" store is rebuilt once it has grown by this much, so it
/// stays between 1 000 000 and about 1 100 000 principals.
const MAX_GROWTH: usize = 100_000;
/// Updates built (untimed) and then applied (timed) per round.
const CHUNK: u64 = 4096;
/// Observation time of the pre-filled records.
const T0: i64 = 1_764_000_000_000;

/// A 36-character UUID-shaped id, distinct for distinct `n`.
fn uuid_like(n: u64) -> String {
    // splitmix64: spreads consecutive numbers over the whole id.
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // The low 32 bits of `n` keep ids distinct whatever the mix does.
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:04x}{:08x}",
        n as u32,
        (z >> 48) as u16,
        (z >> 36) & 0xfff,
        (z >> 24) & 0xfff,
        (n >> 32) as u16,
        z as u32,
    )
}

fn principal(n: u64) -> String {
    uuid_like(n)
}

/// Event ids live in their own number space, away from principals.
fn event_id(n: u64) -> String {
    uuid_like(n | 1 << 63)
}

fn update(
    principal: String,
    availability: Availability,
    observed_at: i64,
    event_id: String,
) -> PresenceUpdate<'static> {
    let (raw, note) = match availability {
        Availability::Busy => ("Busy", "On a call"),
        _ => ("Available", "At my desk"),
    };
    PresenceUpdate {
        principal: Cow::Owned(principal),
        availability,
        activity: None,
        status_text: Some(Cow::Borrowed(note)),
        raw_status: Some(Cow::Borrowed(raw)),
        observed_at: Some(Millis(observed_at)),
        event_id: Some(Cow::Owned(event_id)),
    }
}

/// A store holding `PREFILL` principals `principal(0..PREFILL)`, each
/// available at `T0` with event id `event_id(i)` received at `T0`.
fn prefilled() -> Records {
    // The defaults of `[store]` in config/example.toml, except a dedup
    // capacity large enough that every pre-filled event id stays remembered
    // (the duplicate case relies on it): at 8 M, a bucket of eight receives
    // 0.5 of the million ids on average, and the chance that any bucket
    // overflows at all is below one percent.
    let store = Records::new(
        &[Arc::from("mitel-bench")],
        StoreLimits {
            history: 65_536,
            dedup_window_ms: 600_000,
            dedup_capacity: 8_000_000,
            stream_buffer: 4096,
            max_future_skew_ms: 300_000,
        },
    );
    for i in 0..PREFILL {
        let u = update(principal(i), Availability::Available, T0, event_id(i));
        assert!(matches!(
            store.apply(0, &u, Millis(T0)),
            ApplyOutcome::Changed(_)
        ));
    }
    store
}

/// One store case: its store (built before timing starts, see
/// [`StoreCase::prefilled`]), its progress and the buffers reused between
/// samples.
///
/// Criterion calls a benchmark's closure once per warm-up step and once per
/// sample, so everything expensive lives here, outside the closure.
#[derive(Default)]
struct StoreCase {
    store: Option<Records>,
    /// Number of updates made so far; keeps counting across samples, so a
    /// case keeps making progress (newer timestamps, fresh ids) for as long
    /// as Criterion keeps sampling.
    tick: u64,
    updates: Vec<(PresenceUpdate<'static>, Millis)>,
    outcomes: Vec<ApplyOutcome>,
}

impl StoreCase {
    /// A case whose store is built now, before Criterion starts timing, so
    /// the one-off build does not enter Criterion's estimate of an iteration
    /// (which would then shrink every sample to a single cold apply).
    fn prefilled() -> Self {
        StoreCase {
            store: Some(prefilled()),
            ..StoreCase::default()
        }
    }

    /// Applies `iters` updates made by `make(tick)` for consecutive ticks,
    /// timing only the applies, and checks each outcome with `expect`. With
    /// `max_growth`, the store is rebuilt before a sample once it has grown
    /// by more than that many principals.
    fn run(
        &mut self,
        b: &mut Bencher<'_>,
        max_growth: Option<usize>,
        make: impl Fn(u64) -> (PresenceUpdate<'static>, Millis),
        expect: impl Fn(ApplyOutcome) -> bool,
    ) {
        b.iter_custom(|iters| {
            let grown = |s: &Records| max_growth.is_some_and(|g| s.len(0) > PREFILL as usize + g);
            if self.store.as_ref().is_none_or(grown) {
                // Drop the old store before building the next one.
                self.store = None;
                self.store = Some(prefilled());
            }
            let store = self.store.as_ref().expect("built above");
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                left -= n;
                self.updates.clear();
                self.updates.extend((0..n).map(|i| make(self.tick + i)));
                self.tick += n;
                self.outcomes.clear();
                let start = Instant::now();
                for (u, received_at) in &self.updates {
                    self.outcomes
                        .push(store.apply(0, black_box(u), *received_at));
                }
                elapsed += start.elapsed();
                if let Some(bad) = self.outcomes.iter().find(|o| !expect(**o)) {
                    panic!("an update took the wrong path: {bad:?}");
                }
            }
            elapsed
        });
    }
}

fn store_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_apply");

    // A principal the store has never seen: insert, record, publish.
    let mut case = StoreCase::prefilled();
    group.bench_function("new_principal", |b| {
        case.run(
            b,
            Some(MAX_GROWTH),
            |t| {
                // Fresh ids past the pre-filled range; never reused, even
                // after a rebuild, because `tick` keeps counting.
                let at = T0 + 1 + t as i64;
                let fresh = PREFILL + t;
                (
                    update(principal(fresh), Availability::Busy, at, event_id(fresh)),
                    Millis(at),
                )
            },
            |o| matches!(o, ApplyOutcome::Changed(_)),
        );
    });
    // Free this case's store before the next one is built.
    drop(case);

    // An existing principal whose availability flips: visit `v` of principal
    // `k` (round robin) sets busy on even visits, available on odd ones, while
    // the pre-filled state is available, so every apply is a change.
    let mut case = StoreCase::prefilled();
    group.bench_function("update_changed", |b| {
        case.run(
            b,
            None,
            |t| {
                let (k, visit) = (t % PREFILL, t / PREFILL);
                let availability = if visit % 2 == 0 {
                    Availability::Busy
                } else {
                    Availability::Available
                };
                let at = T0 + 1 + t as i64;
                (
                    update(principal(k), availability, at, event_id(PREFILL + t)),
                    Millis(at),
                )
            },
            |o| matches!(o, ApplyOutcome::Changed(_)),
        );
    });
    drop(case);

    // A provider retry: the event id of a pre-filled record, within the
    // dedup window. Nothing is recorded, so this can repeat forever.
    let mut case = StoreCase::prefilled();
    group.bench_function("duplicate_event_id", |b| {
        case.run(
            b,
            None,
            |t| {
                let k = t % PREFILL;
                (
                    update(principal(k), Availability::Available, T0, event_id(k)),
                    Millis(T0 + 1_000),
                )
            },
            |o| o == ApplyOutcome::Duplicate,
        );
    });
    drop(case);

    // An event older than the stored one (fresh event id, so it is not a
    // duplicate): rejected after the lookup.
    let mut case = StoreCase::prefilled();
    group.bench_function("stale_event", |b| {
        case.run(
            b,
            None,
            |t| {
                let k = t % PREFILL;
                let received_at = Millis(T0 + 1 + t as i64);
                (
                    update(
                        principal(k),
                        Availability::Busy,
                        T0 - 1,
                        event_id(PREFILL + t),
                    ),
                    received_at,
                )
            },
            |o| o == ApplyOutcome::Stale,
        );
    });
    drop(case);

    group.finish();
}

criterion_group!(
    benches,
    parse,
    netsapiens_parse,
    ucwa_parse,
    graph_parse,
    store_apply
);
criterion_main!(benches);
