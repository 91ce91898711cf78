//! Loading a people file of 100 000 people with three identities each
//! (about 25 MiB): read, parse and validate, as at start-up and on every
//! reload that changed the file. The target is well under a second.
//!
//! Run: `cargo bench --bench people`

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use presence_gateway::config::people::load_mapping;

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

criterion_group!(benches, load);
criterion_main!(benches);
