//! `[people]` through the real binary's `check-config`: the people file is
//! validated with the rest of the configuration, and each of its problems
//! is printed with the file, the person and the line, with the exit code
//! of any invalid configuration (2). Also: the shipped examples agree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use presence_gateway::Config;
use presence_gateway::config::people::load_mapping;

const BIN: &str = env!("CARGO_BIN_EXE_presence-gateway");

/// Two sources, and people on them.
const CONFIG: &str = r#"
[[sources]]
id = "mitel-prod"
kind = "mitel"
signing_keys = ["k"]

[[sources]]
id = "teams"
kind = "standard"
signing_keys = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
"#;

const VALID: &str = r#"
[[person]]
id = "ana"
name = "Ana Lima"
identities = [
  { source = "mitel-prod", principal = "2f1c9a1e-5a9e-4a57-9d1e-2f6f8f7e9b11" },
  { source = "teams",      principal = "66825e03-7ef5-42da-9069-724602c31f6b" },
]

[[person]]
id = "bruno"
identities = [{ source = "teams", principal = "bruno@acme.example" }]
"#;

/// A scratch directory for one test, removed at its end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("pg-people-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Dir(dir)
    }

    /// A config naming `people` (relative to the working directory, which
    /// [`check_config`] makes this directory), and the people file.
    fn write(&self, people: Option<&str>) -> PathBuf {
        let config = self.0.join("gateway.toml");
        let text = format!("{CONFIG}\n[people]\nfile = \"people.toml\"\n");
        std::fs::write(&config, text).expect("write config");
        let file = self.0.join("people.toml");
        match people {
            Some(text) => std::fs::write(&file, text).expect("write people"),
            None => {
                let _ = std::fs::remove_file(&file);
            }
        }
        config
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `check-config` on `config`, run in `cwd`: exit code, stdout, stderr.
fn check_config(config: &Path, cwd: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .current_dir(cwd)
        .env_remove("PRESENCE_GATEWAY_CONFIG")
        .env_remove("PRESENCE_GATEWAY__PEOPLE__FILE")
        .env_remove("PRESENCE_GATEWAY__PEOPLE__MATCH_EQUAL_PRINCIPALS")
        .output()
        .expect("run the gateway binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_people_file_passes_and_is_counted() {
    let dir = Dir::new("valid");
    let config = dir.write(Some(VALID));
    let (code, stdout, stderr) = check_config(&config, &dir.0);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("people.toml: ok (2 people, 3 identities)"),
        "{stdout}"
    );
}

#[test]
fn each_problem_of_the_people_file_fails_the_check_with_its_line() {
    let dir = Dir::new("invalid");
    let cases: [(&str, &str, &[&str]); 6] = [
        (
            "unknown source",
            "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teamz\", principal = \"a\" }]\n",
            &[
                "people.toml: 1 problem",
                "line 3: person \"ana\", identities[0]: source \"teamz\" is not a configured source (configured: mitel-prod, teams)",
            ],
        ),
        (
            "one identity in two people",
            "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"a\" }]\n\
             [[person]]\nid = \"bob\"\nidentities = [{ source = \"teams\", principal = \"a\" }]\n",
            &[
                "line 6: person \"bob\", identities[0]: teams/a is also an identity of person \"ana\" (line 3)",
            ],
        ),
        (
            "duplicate ids",
            "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"a\" }]\n\
             [[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"b\" }]\n",
            &["line 4: person \"ana\": duplicate person id (also [[person]] 1 on line 1)"],
        ),
        (
            "bad id",
            "[[person]]\nid = \"ana lima\"\nidentities = [{ source = \"teams\", principal = \"a\" }]\n",
            &[
                "line 1: [[person]] 1: id \"ana lima\" may hold only ASCII letters, digits, \".\", \"_\", \"-\" and \"@\"",
            ],
        ),
        (
            "syntax error",
            "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\" principal = \"a\" }]\n",
            &["people.toml: line 3, column"],
        ),
        (
            "unknown key",
            "[[person]]\nid = \"ana\"\nemail = \"ana@acme.example\"\nidentities = []\n",
            &["people.toml: line 3, column 1: unknown field `email`"],
        ),
    ];
    for (what, people, expected) in cases {
        let config = dir.write(Some(people));
        let (code, stdout, stderr) = check_config(&config, &dir.0);
        assert_eq!(code, Some(2), "{what}: {stdout}{stderr}");
        assert!(
            stderr.contains("gateway.toml: invalid configuration\n"),
            "{what}: {stderr}"
        );
        for part in expected {
            assert!(
                stderr.contains(part),
                "{what}: {part:?} missing from:\n{stderr}"
            );
        }
    }
}

#[test]
fn every_problem_is_printed_not_just_the_first() {
    let dir = Dir::new("all");
    let people = "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teamz\", principal = \"a\" }]\n\
                  [[person]]\nid = \"ana\"\nidentities = []\n";
    let config = dir.write(Some(people));
    let (code, _, stderr) = check_config(&config, &dir.0);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("people.toml: 3 problems"), "{stderr}");
    for part in [
        "line 3: person \"ana\", identities[0]: source \"teamz\"",
        "line 4: person \"ana\": duplicate person id",
        "line 4: person \"ana\": has no identities",
    ] {
        assert!(stderr.contains(part), "{part:?} missing from:\n{stderr}");
    }
}

#[test]
fn a_missing_people_file_fails_the_check() {
    let dir = Dir::new("missing");
    let config = dir.write(None);
    let (code, stdout, stderr) = check_config(&config, &dir.0);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("cannot read people.toml: "), "{stderr}");
    // Relative to the working directory, as given: from elsewhere the same
    // config finds no file.
    let config = dir.write(Some(VALID));
    let (code, _, stderr) = check_config(&config, &std::env::temp_dir());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read people.toml: "), "{stderr}");
}

fn root(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_commented_people_example_matches_the_example_people_file() {
    // example.toml documents [people] commented out (no people is the
    // default); uncommented, it names config/people.example.toml, which
    // must be valid for the example's sources.
    let text = std::fs::read_to_string(root("config/example.toml")).unwrap();
    const START: &str = "# --- people ---";
    const END: &str = "# --- end of people ---";
    let start = text.find(START).expect("people block");
    let end = text[start..].find(END).expect("end marker") + start;
    let block: String = text[start..end]
        .lines()
        .skip(1)
        .map(|line| line.strip_prefix('#').unwrap_or(line))
        .map(|line| format!("{line}\n"))
        .collect();
    let text = format!("{}{block}{}", &text[..start], &text[end + END.len()..]);
    let vars = |name: &str| match name {
        "VENDOR_WEBHOOK_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
        _ => Some(format!("value-of-{name}")),
    };
    let config = Config::parse_with_env(&text, Path::new("example.toml"), Vec::new(), vars)
        .expect("uncommented example");
    let people = config.people.expect("[people]");
    assert_eq!(people.file, Path::new("config/people.example.toml"));
    assert!(!people.match_equal_principals);

    let ids: Vec<Arc<str>> = config
        .sources
        .iter()
        .map(|s| s.id.as_str().into())
        .collect();
    let mapping = load_mapping(&root("config/people.example.toml"), &ids, false, 1)
        .expect("people.example.toml");
    assert!(mapping.people.len() >= 2, "{mapping:?}");
    // Every source of the example has someone on it.
    for id in &ids {
        assert!(
            mapping
                .people
                .iter()
                .flat_map(|p| &p.identities)
                .any(|i| i.source == *id),
            "no identity on {id}"
        );
    }
}
