//! People (DESIGN §9) against a running gateway fed by signed webhooks: the
//! read API, person events on the stream (only when the derived record
//! changes, with resume), reloads of the mapping (moved identities, removed
//! people, a bad file that keeps the old mapping), people formed by equal
//! principals, and person records that survive a restart.
//!
//! Runs against every store backend (`PG_TEST_STORE`), like the other
//! black-box suites.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sse::{Client, Sse};
use common::{Gateway, MITEL_KEY, TOKEN};
use serde_json::{Value, json};

/// How long a reload (file polled every second) may take to show.
const RELOAD: Duration = Duration::from_secs(15);

/// A directory for one test's people file, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "pg-people-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("test dir");
        Dir(dir)
    }

    fn people(&self) -> PathBuf {
        self.0.join("people.toml")
    }

    /// Replaces the people file the way an editor does (write aside, rename).
    fn write(&self, text: &str) {
        let aside = self.0.join("people.toml.new");
        std::fs::write(&aside, text).expect("write people file");
        std::fs::rename(&aside, self.people()).expect("rename people file");
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `[[person]]` entry: identities as `(source, principal)`.
fn person(id: &str, name: &str, identities: &[(&str, &str)]) -> String {
    let ids: Vec<String> = identities
        .iter()
        .map(|(s, p)| format!("{{ source = \"{s}\", principal = \"{p}\" }}"))
        .collect();
    format!(
        "[[person]]\nid = \"{id}\"\nname = \"{name}\"\nidentities = [{}]\n\n",
        ids.join(", ")
    )
}

/// Ana with a softphone (`mitel/a1`) and a desk phone (`desk/a2`), and
/// Bo with a softphone (`mitel/b1`).
fn ana_and_bo() -> String {
    format!(
        "{}{}",
        person("ana", "Ana", &[("mitel", "a1"), ("desk", "a2")]),
        person("bo", "Bo", &[("mitel", "b1")]),
    )
}

/// Two Mitel sources (`mitel`: say a softphone, `desk`: a desk phone),
/// both signed with [`MITEL_KEY`], and the people file.
fn config(people: &Path, extra: &str) -> String {
    common::mitel_config(&format!(
        r#"
[[sources]]
id = "desk"
kind = "mitel"
signing_keys = ["{MITEL_KEY}"]

[people]
file = "{}"
{extra}
"#,
        people.display()
    ))
}

/// A signed Mitel presence event observed `ts` ms after [`common::T0`].
async fn post(gw: &Gateway, source: &str, principal: &str, status: &str, ts: i64) {
    let body = json!({"topic": "platform-api-presence",
        "subject": format!("/presentities/{principal}"),
        "content": {"presence": status, "timestamp": common::T0 + ts,
                    "eventId": format!("{source}-{principal}-{ts}")}})
    .to_string();
    gw.post_signed(source, MITEL_KEY, &body).await;
}

async fn person_of(gw: &Gateway, id: &str) -> Value {
    let (status, record) = gw.get(&format!("/v1/people/{id}")).await;
    assert_eq!(status, 200, "{id}: {record}");
    record
}

/// `(event, person or principal, availability)` of stream events.
fn summary(events: &[Sse]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            let who = e.data["person"]
                .as_str()
                .or(e.data["principal"].as_str())
                .unwrap_or_default();
            let availability = e.data["availability"].as_str().unwrap_or_default();
            (e.event.clone(), who.to_owned(), availability.to_owned())
        })
        .collect()
}

fn ev(event: &str, who: &str, availability: &str) -> (String, String, String) {
    (event.to_owned(), who.to_owned(), availability.to_owned())
}

async fn mapping(gw: &Gateway) -> Value {
    let (status, page) = gw.get("/v1/people?limit=1").await;
    assert_eq!(status, 200, "{page}");
    page["mapping"].clone()
}

async fn wait_for_version(gw: &Gateway, version: u64) {
    common::wait_until("the new people mapping", RELOAD, || async {
        mapping(gw).await["version"] == version
    })
    .await;
}

#[tokio::test]
async fn people_are_derived_from_their_identities_and_read_back() {
    let dir = Dir::new("read");
    dir.write(&format!(
        "{}{}{}",
        person("ana", "Ana Lima", &[("mitel", "a1"), ("desk", "a2")]),
        person("bo", "Bo Berg", &[("mitel", "b1")]),
        person("cy", "Cy Park", &[("desk", "c1")]),
    ));
    let gw = Gateway::start(&config(&dir.people(), "")).await;
    post(&gw, "mitel", "a1", "Available", 1).await;
    post(&gw, "desk", "a2", "Busy", 2).await;
    post(&gw, "mitel", "b1", "Away", 3).await;
    post(&gw, "mitel", "nobody", "Busy", 4).await;

    let ana = person_of(&gw, "ana").await;
    assert_eq!(ana["name"], "Ana Lima");
    assert_eq!(ana["availability"], "busy");
    assert_eq!(
        ana["decided_by"],
        json!({"source": "desk", "principal": "a2"})
    );
    assert_eq!(ana["observed_at"], "2025-01-01T00:00:00.002Z");
    let sources: Vec<&str> = ana["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["principal"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        ["a1", "a2"],
        "identity records in the file's order"
    );
    assert!(ana["seq"].as_u64().unwrap() > 0);

    // Cy has no identity record yet: listed, unknown, seq 0.
    let cy = person_of(&gw, "cy").await;
    assert_eq!(
        (
            &cy["availability"],
            &cy["seq"],
            &cy["decided_by"],
            &cy["sources"]
        ),
        (&json!("unknown"), &json!(0), &Value::Null, &json!([]))
    );

    // Pages in id order, filters as for presence.
    let (status, page) = gw.get("/v1/people?limit=2").await;
    assert_eq!(status, 200);
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["person"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&page), ["ana", "bo"]);
    assert_eq!(page["mapping"]["version"], 1);
    assert_eq!(page["mapping"]["people"], 3);
    assert_eq!(page["mapping"]["last_error"], Value::Null);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, next) = gw.get(&format!("/v1/people?limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&next), ["cy"]);
    assert_eq!(next["next_cursor"], Value::Null);
    let (_, busy) = gw.get("/v1/people?availability=busy,away").await;
    assert_eq!(ids(&busy), ["ana", "bo"]);

    let (status, found) = gw
        .post_json(
            "/v1/people/query",
            &json!({"ids": ["bo", "zed", "ana", "bo"]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(ids(&found), ["bo", "ana"]);

    // The unmapped principal is no person.
    let (status, _) = gw.get("/v1/people/nobody").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bad_people_requests_are_refused_and_change_nothing() {
    let dir = Dir::new("bad");
    dir.write(&person("ana", "Ana", &[("mitel", "a1")]));
    let gw = Gateway::start(&config(&dir.people(), "")).await;
    post(&gw, "mitel", "a1", "Busy", 1).await;
    let before = gw.snapshot().await;
    let ana = person_of(&gw, "ana").await;
    for (path, status) in [
        ("/v1/people?limit=0", 400),
        ("/v1/people?limit=1001", 400),
        ("/v1/people?limit=x", 400),
        ("/v1/people?availability=", 400),
        ("/v1/people?availability=busy,,away", 400),
        ("/v1/people?availability=free", 400),
        ("/v1/people?cursor=%25%25", 400),
        ("/v1/people?sort=name", 400),
        ("/v1/people/zed", 404),
        ("/v1/stream?people=maybe", 400),
        ("/v1/stream?presence=2", 400),
    ] {
        let response = gw.get_raw(path).await;
        common::assert_problem(response, status).await;
    }
    let many: Vec<String> = (0..1001).map(|i| format!("p{i}")).collect();
    for (body, status) in [
        (json!({"ids": "ana"}), 400),
        (json!({"names": ["ana"]}), 400),
        (json!({"ids": ["ana"], "extra": 1}), 400),
        (json!({"ids": many}), 400),
    ] {
        let (got, problem) = gw.post_json("/v1/people/query", &body).await;
        assert_eq!(got, status, "{body}: {problem}");
    }
    let response = gw
        .client
        .post(gw.url("/v1/people/query"))
        .bearer_auth(TOKEN)
        .body(vec![b' '; 600 * 1024])
        .send()
        .await
        .expect("post");
    common::assert_problem(response, 413).await;
    // Without the token: 401, also for people.
    for path in ["/v1/people", "/v1/people/ana", "/v1/stream?people=true"] {
        let response = gw.client.get(gw.url(path)).send().await.expect("get");
        common::assert_problem(response, 401).await;
    }
    assert_eq!(gw.snapshot().await, before, "nothing changed");
    assert_eq!(person_of(&gw, "ana").await, ana);
}

#[tokio::test]
async fn person_events_stream_only_when_the_derived_record_changes_and_resume() {
    let dir = Dir::new("stream");
    dir.write(&ana_and_bo());
    let gw = Gateway::start(&config(&dir.people(), "")).await;
    post(&gw, "mitel", "a1", "Available", 1).await;

    // People only: the snapshot is Ana's record.
    let mut people = Client::open(&gw, "?people=true", None).await;
    let first = people.take(1).await;
    assert_eq!(summary(&first), [ev("person", "ana", "available")]);
    let ana_seq = first[0].id.unwrap();
    assert_eq!(first[0].data["seq"], ana_seq);
    let mut both = Client::open(&gw, "?people=true&presence=true&snapshot=false", None).await;
    let mut only_bo = Client::open(&gw, "?person=bo&snapshot=false", None).await;

    post(&gw, "desk", "a2", "Busy", 2).await;
    // The desk phone is away: Ana stays busy (decided by... the desk still?
    // no: away ranks below available, so the softphone decides, available).
    post(&gw, "desk", "a2", "Away", 3).await;
    // Now the softphone changes below the winner's rank: nothing for Ana.
    post(&gw, "mitel", "a1", "DoNotDisturb", 4).await;
    post(&gw, "desk", "a2", "Offline", 5).await;
    post(&gw, "mitel", "b1", "Busy", 6).await;

    let got = people.take(4).await;
    assert_eq!(
        summary(&got),
        [
            ev("person", "ana", "busy"),
            ev("person", "ana", "available"),
            ev("person", "ana", "do_not_disturb"),
            ev("person", "bo", "busy"),
        ],
        "the desk going offline under do-not-disturb is no person event"
    );
    assert_eq!(got[1].data["decided_by"]["source"], "mitel");
    // Each person event comes right after the presence change that made it.
    let mixed = both.take(9).await;
    assert_eq!(
        summary(&mixed),
        [
            ev("presence", "a2", "busy"),
            ev("person", "ana", "busy"),
            ev("presence", "a2", "away"),
            ev("person", "ana", "available"),
            ev("presence", "a1", "do_not_disturb"),
            ev("person", "ana", "do_not_disturb"),
            ev("presence", "a2", "offline"),
            ev("presence", "b1", "busy"),
            ev("person", "bo", "busy"),
        ]
    );
    let seqs: Vec<u64> = mixed.iter().map(|e| e.id.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(
        summary(&only_bo.take(1).await),
        [ev("person", "bo", "busy")]
    );

    // Resume after Ana's first event: exactly the person events since.
    let mut resumed = Client::open(&gw, "?people=true", Some(ana_seq)).await;
    assert_eq!(summary(&resumed.take(4).await), summary(&got));
    // Resume by person, after the second of them.
    let after = got[1].id.unwrap();
    let mut ana_only = Client::open(&gw, "?person=ana", Some(after)).await;
    assert_eq!(
        summary(&ana_only.take(1).await),
        [ev("person", "ana", "do_not_disturb")]
    );
    // Nothing else is pending for Ana: the next one is live.
    post(&gw, "mitel", "a1", "Available", 7).await;
    assert_eq!(
        summary(&ana_only.take(1).await),
        [ev("person", "ana", "available")]
    );
    // A position older than the history: reset, then the snapshot.
    let mut old = Client::open(&gw, "?people=true", Some(10_000)).await;
    let reset = old.take(3).await;
    assert_eq!(reset[0].event, "reset");
    assert_eq!(reset[0].data["reason"], "history");
    assert_eq!(
        summary(&reset[1..]),
        [ev("person", "bo", "busy"), ev("person", "ana", "available")]
    );
}

#[tokio::test]
async fn reloads_move_identities_remove_people_and_keep_the_old_mapping_when_bad() {
    let dir = Dir::new("reload");
    dir.write(&ana_and_bo());
    let gw = Gateway::start(&config(&dir.people(), "")).await;
    post(&gw, "mitel", "a1", "Available", 1).await;
    post(&gw, "desk", "a2", "DoNotDisturb", 2).await;
    post(&gw, "mitel", "b1", "Away", 3).await;
    assert_eq!(
        person_of(&gw, "ana").await["availability"],
        "do_not_disturb"
    );
    let mut stream = Client::open(&gw, "?people=true&snapshot=false", None).await;
    let last_seq = gw.snapshot().await.last_seq;

    // A bad file: the old mapping stays, and says why.
    dir.write(&format!(
        "{}{}",
        person("ana", "Ana", &[("mitel", "a1"), ("nowhere", "a2")]),
        person("ana", "Bo", &[("mitel", "b1")]),
    ));
    common::wait_until("the reload error", RELOAD, || async {
        mapping(&gw).await["last_error"].is_object()
    })
    .await;
    let status = mapping(&gw).await;
    assert_eq!(status["version"], 1);
    let message = status["last_error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("nowhere"), "{message}");
    assert!(message.contains("ana"), "{message}");
    assert_eq!(
        person_of(&gw, "ana").await["availability"],
        "do_not_disturb"
    );
    assert_eq!(gw.snapshot().await.last_seq, last_seq, "no event");

    // The desk phone moves from Ana to Bo.
    dir.write(&format!(
        "{}{}",
        person("ana", "Ana", &[("mitel", "a1")]),
        person("bo", "Bo", &[("mitel", "b1"), ("desk", "a2")]),
    ));
    wait_for_version(&gw, 2).await;
    let mut moved = summary(&stream.take(2).await);
    moved.sort();
    assert_eq!(
        moved,
        [
            ev("person", "ana", "available"),
            ev("person", "bo", "do_not_disturb")
        ]
    );
    assert_eq!(mapping(&gw).await["last_error"], Value::Null);
    assert_eq!(
        person_of(&gw, "bo").await["decided_by"],
        json!({"source": "desk", "principal": "a2"})
    );

    // Bo is removed: his subscribers get a final record.
    let mut bo_only = Client::open(&gw, "?person=bo", None).await;
    assert_eq!(
        summary(&bo_only.take(1).await),
        [ev("person", "bo", "do_not_disturb")]
    );
    dir.write(&person("ana", "Ana", &[("mitel", "a1")]));
    wait_for_version(&gw, 3).await;
    let last = bo_only.take(1).await.remove(0);
    assert_eq!(last.event, "person");
    assert_eq!(last.data["person"], "bo");
    assert_eq!(last.data["availability"], "unknown");
    assert_eq!(last.data["sources"], json!([]));
    assert_eq!(last.data["decided_by"], Value::Null);
    assert_eq!(
        summary(&stream.take(1).await),
        [ev("person", "bo", "unknown")]
    );
    let (status, _) = gw.get("/v1/people/bo").await;
    assert_eq!(status, 404);
    assert_eq!(mapping(&gw).await["people"], 1);

    // Rewriting the same mapping changes nothing.
    let seq = gw.snapshot().await.last_seq;
    dir.write(&person("ana", "Ana", &[("mitel", "a1")]));
    post(&gw, "mitel", "zz", "Busy", 9).await;
    let fence = gw.snapshot().await.last_seq;
    assert_eq!(fence.map(|s| s - 1.0), seq, "only the presence event");
    assert_eq!(mapping(&gw).await["version"], 3);
}

#[tokio::test]
async fn equal_principals_on_several_sources_are_one_person() {
    let dir = Dir::new("equal");
    dir.write(&person("ana", "Ana", &[("mitel", "a1")]));
    let gw = Gateway::start(&config(&dir.people(), "match_equal_principals = true")).await;
    post(&gw, "mitel", "kim@acme", "Available", 1).await;
    let (status, _) = gw.get("/v1/people/kim@acme").await;
    assert_eq!(status, 404, "one source only: no person yet");
    post(&gw, "desk", "kim@acme", "Busy", 2).await;
    let kim = person_of(&gw, "kim@acme").await;
    assert_eq!(kim["availability"], "busy");
    assert_eq!(kim["name"], Value::Null);
    assert_eq!(kim["sources"].as_array().unwrap().len(), 2);
    // An explicitly mapped identity is not taken for an equal principal.
    post(&gw, "mitel", "a1", "Away", 3).await;
    post(&gw, "desk", "a1", "Busy", 4).await;
    assert_eq!(
        person_of(&gw, "ana").await["sources"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (status, _) = gw.get("/v1/people/a1").await;
    assert_eq!(status, 404);
    let (_, page) = gw.get("/v1/people").await;
    assert_eq!(page["mapping"]["match_equal_principals"], true);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["person"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ana", "kim@acme"]);
}

#[tokio::test]
async fn person_records_and_their_events_survive_a_restart() {
    let dir = Dir::new("restart");
    dir.write(&ana_and_bo());
    let data = dir.0.join("data");
    let text = config(
        &dir.people(),
        &format!("\n[store]\ndata_dir = \"{}\"\n", data.display()),
    );
    let gw = Gateway::start(&text).await;
    post(&gw, "mitel", "a1", "Available", 1).await;
    let mark = gw.snapshot().await.last_seq.expect("seq") as u64;
    post(&gw, "desk", "a2", "Busy", 2).await;
    post(&gw, "mitel", "b1", "Away", 3).await;
    let ana = person_of(&gw, "ana").await;
    let bo = person_of(&gw, "bo").await;
    let last = gw.snapshot().await.last_seq;
    gw.stop().await;

    let gw = Gateway::start(&text).await;
    assert_eq!(person_of(&gw, "ana").await, ana);
    assert_eq!(person_of(&gw, "bo").await, bo);
    assert_eq!(gw.snapshot().await.last_seq, last, "no event at start-up");
    // A consumer from before the restart resumes exactly: no reset.
    let mut resumed = Client::open(&gw, "?people=true", Some(mark)).await;
    assert_eq!(
        summary(&resumed.take(2).await),
        [ev("person", "ana", "busy"), ev("person", "bo", "away")]
    );
    post(&gw, "mitel", "b1", "Busy", 4).await;
    let live = resumed.take(1).await.remove(0);
    assert_eq!(
        summary(std::slice::from_ref(&live)),
        [ev("person", "bo", "busy")]
    );
    assert!(live.id.unwrap() as f64 > last.unwrap());
    gw.stop().await;
}

/// SIGHUP reloads the file even when nothing about it looks changed (same
/// size, same modification time, same inode): the real binary.
#[tokio::test]
async fn sighup_reloads_the_people_file() {
    use common::process::{Gateway as Process, TestDir};
    let dir = TestDir::new("people-sighup");
    let people = dir.path().join("people.toml");
    std::fs::write(&people, person("ana", "Ana Lima", &[("mitel", "a1")])).expect("write");
    let text = config(&people, "");
    let gw = Process::start(&dir, &|addr| {
        common::process::with_listen(&text.replace("listen = \"127.0.0.1:0\"\n", ""), addr)
    })
    .await;
    let (status, ana) = gw.get("/v1/people/ana").await;
    assert_eq!((status, &ana["name"]), (200, &json!("Ana Lima")));

    // Rewritten in place, its modification time put back.
    let modified = std::fs::metadata(&people)
        .and_then(|m| m.modified())
        .expect("mtime");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&people)
        .expect("open");
    std::io::Write::write_all(
        &mut &file,
        person("ana", "Ana Lyra", &[("mitel", "a1")]).as_bytes(),
    )
    .expect("rewrite");
    file.set_modified(modified).expect("set mtime");
    drop(file);

    // The shell's own `kill`: no procps needed.
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -HUP {}", gw.pid())])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    common::wait_until("the reload after SIGHUP", RELOAD, || async {
        gw.get("/v1/people/ana").await.1["name"] == "Ana Lyra"
    })
    .await;
    let (_, page) = gw.get("/v1/people").await;
    assert_eq!(page["mapping"]["version"], 2);
    gw.stop().await;
}
