//! People at scale: 100 000 people with three identities each.
//!
//! - `load_100k_people_x3`: loading the people file (about 25 MiB): read,
//!   parse and validate, as at start-up and on every reload that changed
//!   the file. The target is well under a second.
//! - `apply/*`: the cost of one presence change in the store, side by side
//!   in one run: without people; with the 100 000 people mapped, for a
//!   principal nobody maps (the lookup only); and for a mapped identity
//!   (the lookup, the person's derivation and, every other change, a
//!   person event). Target: at most 10 % more per webhook than without
//!   people (a webhook costs far more than the store's part; see the
//!   README's Performance section for the end-to-end figure).
//! - `reconcile_100k_people`: bringing every person in line with a
//!   mapping, as a reload does.
//! - Memory per person: counted by an allocator that tallies live bytes,
//!   printed before the benchmarks run.
//!
//! Run: `cargo bench --bench people`

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use presence_gateway::config::people::{Mapping, load_mapping};
use presence_gateway::people::{self, People};
use presence_gateway::presence::records::StoreLimits;
use presence_gateway::presence::{Availability, Millis, PresenceUpdate, Records};

/// Counts the bytes held (for the memory per person).
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a
// counter is kept besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PEOPLE: usize = 100_000;

/// Writes the file: UUID-shaped Mitel and Teams principals and a
/// `user@domain` NetSapiens one per person, as in DESIGN §9.
fn write_file() -> PathBuf {
    let mut text = String::with_capacity(PEOPLE * 300);
    for n in 0..PEOPLE {
        writeln!(
            text,
            "[[person]]\nid = \"person-{n}\"\nname = \"Person Number {n}\"\nidentities = [\n  \
             {{ source = \"mitel-prod\", principal = \"2f1c9a1e-5a9e-4a57-9d1e-{n:012x}\" }},\n  \
             {{ source = \"teams\",      principal = \"66825e03-7ef5-42da-9069-{n:012x}\" }},\n  \
             {{ source = \"ns-cluster\", principal = \"{n}@acme\" }},\n]\n"
        )
        .unwrap();
    }
    let path = std::env::temp_dir().join(format!("pg-bench-people-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn load(c: &mut Criterion) {
    let path = write_file();
    let sources: Vec<Arc<str>> = ["mitel-prod", "teams", "ns-cluster"]
        .into_iter()
        .map(Arc::from)
        .collect();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let mut group = c.benchmark_group("people");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("load_100k_people_x3", |b| {
        b.iter(|| {
            let mapping = load_mapping(&path, &sources, false, 1).unwrap();
            assert_eq!(mapping.people.len(), PEOPLE);
            black_box(mapping)
        })
    });
    group.finish();
    let _ = std::fs::remove_file(&path);
}

const SOURCES: [&str; 3] = ["mitel-prod", "teams", "ns-cluster"];

fn limits() -> StoreLimits {
    StoreLimits {
        history: 10_000,
        dedup_window_ms: 0,
        dedup_capacity: 1,
        stream_buffer: 1024,
        max_future_skew_ms: 300_000,
    }
}

fn update(principal: &str, availability: Availability, at: i64) -> PresenceUpdate<'_> {
    PresenceUpdate {
        principal: Cow::Borrowed(principal),
        availability,
        activity: None,
        status_text: None,
        raw_status: None,
        observed_at: Some(Millis(at)),
        event_id: None,
    }
}

/// The principal of person `n` on source `s`.
fn principal(s: usize, n: usize) -> String {
    format!("{s}-{n:08}")
}

/// Records for every identity of every person.
fn records() -> Records {
    let ids: Vec<Arc<str>> = SOURCES.into_iter().map(Arc::from).collect();
    let records = Records::new(&ids, limits());
    for n in 0..PEOPLE {
        for s in 0..SOURCES.len() {
            let a = Availability::ALL[(n + s) % Availability::ALL.len()];
            records.apply(s, &update(&principal(s, n), a, 1), Millis(1));
        }
    }
    records
}

fn mapping() -> Mapping {
    use presence_gateway::config::people::{Identity, PersonDef};
    Mapping {
        version: 1,
        match_equal_principals: false,
        people: (0..PEOPLE)
            .map(|n| PersonDef {
                id: Arc::from(format!("person-{n}")),
                name: Some(Arc::from(format!("Person Number {n}"))),
                identities: (0..SOURCES.len())
                    .map(|s| Identity {
                        source: Arc::from(SOURCES[s]),
                        principal: Arc::from(principal(s, n)),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn reconcile(people: &People, mapping: &Mapping, records: &Records) -> people::Reconciled {
    people.reconcile(mapping, records, &|change| {
        people::commit_local(records, None, change)
    })
}

/// Prints what the people take in memory, per person, and the mapping
/// itself.
fn memory() {
    let records = records();
    let before = HELD.load(Ordering::Relaxed);
    let mapping = mapping();
    let with_mapping = HELD.load(Ordering::Relaxed);
    let people = People::default();
    let done = reconcile(&people, &mapping, &records);
    let after = HELD.load(Ordering::Relaxed);
    let per = |bytes: isize| bytes as f64 / PEOPLE as f64;
    println!(
        "memory: the mapping {:.0} B per person; the index and person records {:.0} B per \
         person ({} people, {} records; the change history holds the events besides)",
        per(with_mapping - before),
        per(after - with_mapping),
        done.people,
        done.changed
    );
    drop((people, mapping, records));
}

fn apply(c: &mut Criterion) {
    memory();
    let plain = records();
    let mapped = records();
    let people = People::default();
    let mapping = mapping();
    reconcile(&people, &mapping, &mapped);
    let names: Vec<String> = (0..PEOPLE).map(|n| principal(0, n)).collect();
    let strangers: Vec<String> = (0..PEOPLE).map(|n| format!("x-{n:08}")).collect();
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(1));
    // Every update is a change (the availability alternates, time moves
    // on), for a different principal each time.
    let mut run = |name: &str, records: &Records, people: Option<&People>, who: &[String]| {
        let mut n = 0usize;
        let mut at = 10i64;
        group.bench_function(name, |b| {
            b.iter(|| {
                n = (n + 7919) % PEOPLE;
                at += 1;
                let a = if at % 2 == 0 {
                    Availability::DoNotDisturb
                } else {
                    Availability::Offline
                };
                let principal = &who[n];
                let outcome = records.apply(0, &update(principal, a, at), Millis(at));
                if let Some(people) = people {
                    people.touched(0, principal, records, &|change| {
                        people::commit_local(records, None, change)
                    });
                }
                black_box(outcome)
            })
        });
    };
    run("without_people", &plain, None, &names);
    run(
        "people_unmapped_principal",
        &mapped,
        Some(&people),
        &strangers,
    );
    run("people_mapped_identity", &mapped, Some(&people), &names);
    group.finish();

    let mut group = c.benchmark_group("people");
    group.sample_size(10);
    group.bench_function("reconcile_100k_people", |b| {
        b.iter(|| black_box(reconcile(&people, &mapping, &mapped)))
    });
    group.finish();
}

criterion_group!(benches, load, apply);
criterion_main!(benches);
