//! `[people]` and the people file it names (DESIGN §9): which identities
//! (`source`, `principal`) belong to one person. This module owns the
//! section's settings, reading and validating the people file into a
//! [`Mapping`], and [`PeopleWatch`], which reloads the file on SIGHUP and
//! when it changes and hands each new mapping out on a `watch` channel.
//!
//! It never touches presence: deriving a person's presence from the mapping
//! is the people engine's job. A load either yields a whole, valid mapping
//! or names every problem of the file; a failed reload never replaces the
//! mapping in use.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::presence::Millis;
use crate::sources::MAX_PRINCIPAL_BYTES;

/// The largest people file read, in bytes. 100 000 people with three
/// identities each take about 25 MiB; a file far larger is a mistake, and
/// must not be read into memory (and parsed) whole.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// The longest person id, in bytes. Ids appear in URL paths
/// (`/v1/people/{id}`) and stream filters.
pub const MAX_ID_BYTES: usize = 128;

/// The longest display name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// How often [`PeopleWatch`] looks at the file's metadata.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

// ---- the [people] section ----------------------------------------------------

/// `[people]`: where the people file is and how identities are matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeopleConfig {
    /// The people file. A relative path is relative to the working
    /// directory, as given (like `store.data_dir` and `file:` secrets).
    pub file: PathBuf,
    /// `true`: identical principals on different sources are one person.
    pub match_equal_principals: bool,
}

impl PeopleConfig {
    /// Loads and validates the people file ([`load_mapping`]).
    pub fn load(&self, source_ids: &[Arc<str>], version: u64) -> Result<Mapping, MappingError> {
        load_mapping(&self.file, source_ids, self.match_equal_principals, version)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeople {
    file: String,
    #[serde(default)]
    match_equal_principals: bool,
}

/// Checks `[people]`, reporting each bad key through `problem`. The file
/// itself is read by [`load_mapping`], not here: the config is valid
/// without it, and start-up and `check-config` load it with the source ids.
pub(super) fn resolve(raw: RawPeople, problem: &mut impl FnMut(String, String)) -> PeopleConfig {
    if raw.file.trim().is_empty() {
        problem(
            "people.file".into(),
            "must not be empty (leave [people] out to turn people off)".into(),
        );
    }
    PeopleConfig {
        file: PathBuf::from(raw.file),
        match_equal_principals: raw.match_equal_principals,
    }
}

// ---- the mapping -------------------------------------------------------------

/// A validated people file: every person and their identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// 1 for the mapping loaded at start-up, one more for each reload that
    /// changed it.
    pub version: u64,
    /// In file order.
    pub people: Vec<PersonDef>,
    /// `[people] match_equal_principals`.
    pub match_equal_principals: bool,
}

impl Mapping {
    /// Whether `other` says the same thing (everything but the version).
    pub fn same_content(&self, other: &Mapping) -> bool {
        self.match_equal_principals == other.match_equal_principals && self.people == other.people
    }

    /// The number of identities of all people.
    pub fn identity_count(&self) -> usize {
        self.people.iter().map(|p| p.identities.len()).sum()
    }
}

/// One `[[person]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonDef {
    pub id: Arc<str>,
    pub name: Option<Arc<str>>,
    /// At least one, each in no other person.
    pub identities: Vec<Identity>,
}

/// One identity of a person: a principal on a configured source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The configured source id (the same `Arc` as the one given to
    /// [`load_mapping`]).
    pub source: Arc<str>,
    pub principal: Arc<str>,
}

/// Why a people file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is {len} bytes or more; people files larger than {MAX_FILE_BYTES} bytes are refused",
        path.display()
    )]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {} problem{}\n{}", path.display(), problems.len(), if problems.len() == 1 { "" } else { "s" }, Lines(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<MappingProblem>,
    },
}

/// One problem of a people file: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingProblem {
    /// 1-based line of the person or identity.
    pub line: Option<usize>,
    /// `person "ana"` or `person "ana", identities[1]` (or `[[person]] 3`
    /// when the id itself is the problem).
    pub what: String,
    pub message: String,
}

impl fmt::Display for MappingProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", self.what, self.message)
    }
}

struct Lines<'a>(&'a [MappingProblem]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {p}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile<'a> {
    #[serde(default, borrow)]
    person: Vec<toml::Spanned<RawPerson<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerson<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    // Absent is reported like empty (with the person's line), among the
    // other problems, rather than as a syntax error that hides them.
    #[serde(default, borrow)]
    identities: Vec<toml::Spanned<RawIdentity<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity<'a> {
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(borrow)]
    principal: Cow<'a, str>,
}

/// Reads and validates the people file at `path`: `source_ids` are the
/// configured sources, `version` the version the mapping gets. Every
/// problem of the file is reported, not just the first.
pub fn load_mapping(
    path: &Path,
    source_ids: &[Arc<str>],
    match_equal_principals: bool,
    version: u64,
) -> Result<Mapping, MappingError> {
    let bytes = read_bounded(path)?;
    parse_mapping(path, &bytes, source_ids, match_equal_principals, version)
}

/// The file's bytes, refusing a file larger than [`MAX_FILE_BYTES`] without
/// reading it (and one that grows past it while being read).
fn read_bounded(path: &Path) -> Result<Vec<u8>, MappingError> {
    let read_error = |source| MappingError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    if len > MAX_FILE_BYTES {
        return Err(MappingError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(MappingError::TooLarge {
            path: path.to_owned(),
            len: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Files from this size on are followed by [`release_freed_memory`].
const TRIM_AFTER_BYTES: usize = 1 << 20;

/// Validates the people file's text (read from `path`).
fn parse_mapping(
    path: &Path,
    bytes: &[u8],
    source_ids: &[Arc<str>],
    match_equal_principals: bool,
    version: u64,
) -> Result<Mapping, MappingError> {
    let parsed = parse_text(path, bytes, source_ids, match_equal_principals, version);
    if bytes.len() >= TRIM_AFTER_BYTES {
        release_freed_memory();
    }
    parsed
}

/// Hands the memory a parse freed back to the system. The TOML parser's
/// tree of a large file is many times the file (a 25 MiB file of 100 000
/// people: hundreds of MiB), and glibc keeps what was freed in its arenas:
/// without this, a process that loaded such a file twice (start-up, a
/// reload) held over 1 GiB it no longer used.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages of the allocator's own
    // arenas to the system; it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn parse_text(
    path: &Path,
    bytes: &[u8],
    source_ids: &[Arc<str>],
    match_equal_principals: bool,
    version: u64,
) -> Result<Mapping, MappingError> {
    let syntax = |message: String| MappingError::Syntax {
        path: path.to_owned(),
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        // The prefix up to the first bad byte is valid UTF-8 by definition.
        let valid = std::str::from_utf8(valid).unwrap_or_default();
        let (line, column) = super::report::position(valid, valid.len());
        syntax(format!("line {line}, column {column}: not UTF-8"))
    })?;
    let raw: RawFile<'_> = toml::from_str(text).map_err(|e| {
        // The people file holds no secrets: the parser's message (which may
        // quote a key) is kept, but without its multi-line snippet.
        let at = match e.span() {
            Some(span) => {
                let (line, column) = super::report::position(text, span.start);
                format!("line {line}, column {column}: ")
            }
            None => String::new(),
        };
        syntax(format!("{at}{}", e.message().trim_end()))
    })?;
    let mut check = Checker::new(text, source_ids, match_equal_principals);
    let people = raw
        .person
        .into_iter()
        .enumerate()
        .map(|(index, person)| check.person(index, person))
        .collect();
    if !check.problems.is_empty() {
        return Err(MappingError::Invalid {
            path: path.to_owned(),
            problems: check.problems,
        });
    }
    Ok(Mapping {
        version,
        people,
        match_equal_principals,
    })
}

/// Whether `id` may name a person: 1 to [`MAX_ID_BYTES`] ASCII letters,
/// digits, `.`, `_`, `-` and `@` (it appears in URL paths unescaped).
pub fn id_is_valid(id: &str) -> bool {
    id_problem(id).is_none()
}

fn id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("id must not be empty".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Some(format!("id is {} bytes; at most {MAX_ID_BYTES}", id.len()));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if !id.chars().all(allowed) {
        return Some(format!(
            "id {id:?} may hold only ASCII letters, digits, \".\", \"_\", \"-\" and \"@\""
        ));
    }
    None
}

/// `text`, or its first 64 characters and "…" when longer: a message quotes
/// a value from the file, and the file may hold a very long one.
fn shortened(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(64) {
        Some((end, _)) => Cow::Owned(format!("{}…", &text[..end])),
        None => Cow::Borrowed(text),
    }
}

/// Byte offsets of line starts, for turning offsets into line numbers.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex(starts)
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Where an identity was first seen: the person's index and the identity's
/// byte offset.
#[derive(Clone, Copy)]
struct Seen {
    person: usize,
    at: usize,
}

/// The validation of one file, person by person; collects every problem.
struct Checker<'t, 's> {
    text: &'t str,
    /// Built at the first problem: a load without problems needs no line
    /// numbers.
    lines: Option<LineIndex>,
    source_ids: &'s [Arc<str>],
    match_equal_principals: bool,
    /// Person id → index of the first person with it.
    ids: FastMap<Arc<str>, usize>,
    /// (source, principal) → where first seen.
    identities: FastMap<(Arc<str>, Arc<str>), Seen>,
    /// principal → where first seen and on which source
    /// (`match_equal_principals` only).
    principals: FastMap<Arc<str>, (Seen, Arc<str>)>,
    /// Per person index: its id and byte offset, for messages about
    /// earlier people.
    people: Vec<(Arc<str>, usize)>,
    problems: Vec<MappingProblem>,
}

impl<'t, 's> Checker<'t, 's> {
    fn new(text: &'t str, source_ids: &'s [Arc<str>], match_equal_principals: bool) -> Self {
        Checker {
            text,
            lines: None,
            source_ids,
            match_equal_principals,
            ids: FastMap::default(),
            identities: FastMap::default(),
            principals: FastMap::default(),
            people: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn line(&mut self, at: usize) -> usize {
        let text = self.text;
        self.lines
            .get_or_insert_with(|| LineIndex::new(text))
            .line(at)
    }

    fn problem(&mut self, at: usize, what: &str, message: String) {
        let line = self.line(at);
        self.problems.push(MappingProblem {
            line: Some(line),
            what: what.to_owned(),
            message,
        });
    }

    fn person(&mut self, index: usize, spanned: toml::Spanned<RawPerson<'_>>) -> PersonDef {
        let at = spanned.span().start;
        let raw = spanned.into_inner();
        let id: Arc<str> = Arc::from(&*raw.id);
        let what = match id_problem(&id) {
            None => format!("person {id:?}"),
            Some(_) => format!("[[person]] {}", index + 1),
        };
        if let Some(message) = id_problem(&id) {
            self.problem(at, &what, message);
        } else if let Some(&first) = self.ids.get(&id) {
            let first_line = self.line(self.people[first].1);
            let message = format!(
                "duplicate person id (also [[person]] {} on line {first_line})",
                first + 1
            );
            self.problem(at, &what, message);
        } else {
            self.ids.insert(Arc::clone(&id), index);
        }
        let name = raw.name.map(|name| {
            if name.trim().is_empty() {
                self.problem(at, &what, "name must not be empty (leave it out)".into());
            } else if name.len() > MAX_NAME_BYTES {
                let message = format!("name is {} bytes; at most {MAX_NAME_BYTES}", name.len());
                self.problem(at, &what, message);
            }
            Arc::from(&*name)
        });
        if raw.identities.is_empty() {
            self.problem(
                at,
                &what,
                "has no identities (at least one is needed)".into(),
            );
        }
        self.people.push((Arc::clone(&id), at));
        let identities = raw
            .identities
            .into_iter()
            .enumerate()
            .filter_map(|(i, identity)| self.identity(index, &what, i, identity))
            .collect();
        PersonDef {
            id,
            name,
            identities,
        }
    }

    /// Checks one identity of person `person`; `None` when it cannot be one
    /// (its problem is recorded).
    fn identity(
        &mut self,
        person: usize,
        person_what: &str,
        i: usize,
        spanned: toml::Spanned<RawIdentity<'_>>,
    ) -> Option<Identity> {
        let at = spanned.span().start;
        let raw = spanned.into_inner();
        let what = format!("{person_what}, identities[{i}]");
        let source = self.source_ids.iter().find(|id| ***id == *raw.source);
        let Some(source) = source.map(Arc::clone) else {
            let configured = self
                .source_ids
                .iter()
                .map(|id| &**id)
                .collect::<Vec<_>>()
                .join(", ");
            let message = format!(
                "source {:?} is not a configured source (configured: {})",
                shortened(&raw.source),
                if configured.is_empty() {
                    "none"
                } else {
                    &configured
                }
            );
            self.problem(at, &what, message);
            return None;
        };
        if raw.principal.is_empty() {
            self.problem(at, &what, "principal must not be empty".into());
            return None;
        }
        if raw.principal.len() > MAX_PRINCIPAL_BYTES {
            let message = format!(
                "principal is {} bytes; the gateway keeps principals of at most {MAX_PRINCIPAL_BYTES}",
                raw.principal.len()
            );
            self.problem(at, &what, message);
            return None;
        }
        let principal: Arc<str> = Arc::from(&*raw.principal);
        let here = Seen { person, at };
        let key = (Arc::clone(&source), Arc::clone(&principal));
        if let Some(first) = self.identities.get(&key).copied() {
            let first_line = self.line(first.at);
            let message = if first.person == person {
                format!("{source}/{principal} is listed twice (also on line {first_line})")
            } else {
                format!(
                    "{source}/{principal} is also an identity of person {:?} (line {first_line}); \
                     an identity belongs to one person",
                    self.people[first.person].0
                )
            };
            self.problem(at, &what, message);
            return None;
        }
        self.identities.insert(key, here);
        if self.match_equal_principals {
            match self.principals.get(&principal).cloned() {
                Some((first, first_source)) if first.person != person => {
                    let first_line = self.line(first.at);
                    let message = format!(
                        "principal {principal:?} is also an identity of person {:?} \
                         (on source {first_source}, line {first_line}); with \
                         match_equal_principals = true identical principals are one person",
                        self.people[first.person].0
                    );
                    self.problem(at, &what, message);
                }
                Some(_) => {}
                None => {
                    self.principals
                        .insert(Arc::clone(&principal), (here, Arc::clone(&source)));
                }
            }
        }
        Some(Identity { source, principal })
    }
}

// ---- reloading ---------------------------------------------------------------

/// Where reloading stands: the mapping in use and the last failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadStatus {
    /// The version of the mapping in use.
    pub version: u64,
    /// Its number of people.
    pub people: usize,
    pub file: PathBuf,
    /// When the file was last loaded successfully (also when it changed
    /// nothing, so that an operator sees that a SIGHUP was taken).
    pub loaded_at: Millis,
    /// The last failure and when it happened; cleared by the next
    /// successful load.
    pub last_error: Option<(String, Millis)>,
    /// Loads tried since start-up, successful or not (a file found missing
    /// counts as one).
    pub attempts: u64,
}

/// Reloads the people file on SIGHUP, when it changes, and when asked
/// ([`PeopleWatch::reload_now`]), and publishes each changed mapping.
///
/// Cheap to clone: clones share the one watcher task, which stops when the
/// `shutdown` token given to [`PeopleWatch::spawn`] is cancelled.
#[derive(Clone)]
pub struct PeopleWatch {
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

struct Shared {
    mapping: watch::Sender<Arc<Mapping>>,
    status: watch::Sender<ReloadStatus>,
    /// Asks the watcher task for a reload (SIGHUP arrives the same way).
    asked: Notify,
}

impl PeopleWatch {
    /// Starts watching `cfg.file`; `initial` is the mapping loaded at
    /// start-up (with the same `source_ids`).
    pub fn spawn(
        cfg: PeopleConfig,
        source_ids: Vec<Arc<str>>,
        initial: Arc<Mapping>,
        shutdown: CancellationToken,
    ) -> PeopleWatch {
        Self::spawn_polling(cfg, source_ids, initial, shutdown, POLL_INTERVAL)
    }

    fn spawn_polling(
        cfg: PeopleConfig,
        source_ids: Vec<Arc<str>>,
        initial: Arc<Mapping>,
        shutdown: CancellationToken,
        every: Duration,
    ) -> PeopleWatch {
        let status = ReloadStatus {
            version: initial.version,
            people: initial.people.len(),
            file: cfg.file.clone(),
            loaded_at: Millis::now(),
            last_error: None,
            attempts: 0,
        };
        let shared = Arc::new(Shared {
            mapping: watch::Sender::new(initial),
            status: watch::Sender::new(status),
            asked: Notify::new(),
        });
        let watcher = Watcher {
            shared: Arc::clone(&shared),
            cfg,
            source_ids: source_ids.into(),
            poller: Poller::default(),
            // Unknown: the file may have changed since `initial` was read,
            // so the first look at it compares what it says.
            hash: None,
        };
        let tracker = TaskTracker::new();
        tracker.spawn(watcher.run(shutdown, every));
        tracker.close();
        PeopleWatch { shared, tracker }
    }

    /// The mapping in use now and every changed one after it.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Mapping>> {
        self.shared.mapping.subscribe()
    }

    /// The mapping in use.
    pub fn current(&self) -> Arc<Mapping> {
        Arc::clone(&self.shared.mapping.borrow())
    }

    /// Where reloading stands.
    pub fn status(&self) -> ReloadStatus {
        self.shared.status.borrow().clone()
    }

    /// Every change of [`status`](Self::status) (a load tried, a failure).
    pub fn subscribe_status(&self) -> watch::Receiver<ReloadStatus> {
        self.shared.status.subscribe()
    }

    /// Reloads the file soon, whether or not it looks changed: what SIGHUP
    /// does. Returns at once; the result shows in [`status`](Self::status).
    pub fn reload_now(&self) {
        self.shared.asked.notify_one();
    }

    /// Waits until the watcher task has stopped (after shutdown).
    pub async fn stopped(&self) {
        self.tracker.wait().await;
    }
}

impl fmt::Debug for PeopleWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeopleWatch")
            .field("status", &*self.shared.status.borrow())
            .finish_non_exhaustive()
    }
}

/// What the metadata of the file says about its content: a change of any
/// of these means it may have changed. The inode and device catch an
/// editor's rename-replace (and a Kubernetes ConfigMap's symlink swap),
/// even when the new file keeps the old one's times and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileMeta {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: (u64, u64),
}

impl FileMeta {
    fn of(meta: &std::fs::Metadata) -> FileMeta {
        #[cfg(unix)]
        let (changed, inode) = {
            use std::os::unix::fs::MetadataExt;
            ((meta.ctime(), meta.ctime_nsec()), (meta.dev(), meta.ino()))
        };
        #[cfg(not(unix))]
        let (changed, inode) = ((0, 0), (0, 0));
        FileMeta {
            len: meta.len(),
            modified: meta.modified().ok(),
            changed,
            inode,
        }
    }

    /// Whether the file was modified so shortly before `read_at` that a
    /// later write may keep the same times (file times are coarser than
    /// writes are quick): its content is then compared once more later.
    fn is_racy(&self, read_at: SystemTime) -> bool {
        self.modified
            .is_none_or(|m| read_at.duration_since(m).unwrap_or_default() < RACY)
    }
}

/// How soon after a write a file's times cannot be trusted to change with
/// the next write.
const RACY: Duration = Duration::from_secs(2);

/// What the poll should do next: the "what to do" half of the watcher,
/// kept apart from its timers and file system.
#[derive(Debug, Default)]
struct Poller {
    /// The metadata the mapping in use (or the last failure) was read with;
    /// `None`: not read yet, or the file went missing since.
    loaded: Option<FileMeta>,
    /// Metadata seen once and different from `loaded`: loaded when the
    /// next poll sees it unchanged, so that a file being written is not
    /// read half-way (an empty or truncated file is a valid mapping that
    /// would remove people).
    settling: Option<FileMeta>,
    /// The loaded file was modified right before it was read.
    recheck: bool,
    /// The file is missing and that was reported.
    missing: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    /// Read the file (its metadata is this).
    Load(FileMeta),
    /// The file cannot be looked at: report it (once).
    Missing,
}

impl Poller {
    fn observe(&mut self, now: Option<FileMeta>) -> Step {
        let Some(now) = now else {
            self.loaded = None;
            self.settling = None;
            if self.missing {
                return Step::Nothing;
            }
            self.missing = true;
            return Step::Missing;
        };
        self.missing = false;
        if self.loaded == Some(now) {
            self.settling = None;
            if std::mem::take(&mut self.recheck) {
                return Step::Load(now);
            }
            return Step::Nothing;
        }
        if self.settling == Some(now) {
            self.settling = None;
            return Step::Load(now);
        }
        self.settling = Some(now);
        Step::Nothing
    }

    /// A load of the file with metadata `meta` was tried at `read_at`.
    fn loaded(&mut self, meta: FileMeta, read_at: SystemTime) {
        self.loaded = Some(meta);
        self.settling = None;
        self.missing = false;
        self.recheck = meta.is_racy(read_at);
    }
}

/// The result of one load.
enum Outcome {
    /// Valid and saying what the mapping in use says.
    Unchanged,
    Changed(Mapping),
    Failed(MappingError),
}

/// The watcher task's state.
struct Watcher {
    shared: Arc<Shared>,
    cfg: PeopleConfig,
    source_ids: Arc<[Arc<str>]>,
    poller: Poller,
    /// SHA-256 of the content the mapping in use was loaded (or last found
    /// unchanged) from.
    hash: Option<[u8; 32]>,
}

/// Why the watcher looks at the file.
enum Why {
    Poll,
    Asked,
    Hangup,
}

impl Watcher {
    async fn run(mut self, shutdown: CancellationToken, every: Duration) {
        let mut hangup = Hangup::new(&self.cfg.file);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => Why::Poll,
                () = self.shared.asked.notified() => Why::Asked,
                () = hangup.recv() => Why::Hangup,
            };
            match why {
                Why::Poll => {
                    let meta = self.metadata().await;
                    match self.poller.observe(meta.as_ref().ok().copied()) {
                        Step::Nothing => {}
                        Step::Missing => {
                            if let Err(source) = meta {
                                self.failed(&self.read_error(source));
                            }
                        }
                        Step::Load(meta) => {
                            if !self.load_and_apply(meta, &shutdown).await {
                                return;
                            }
                        }
                    }
                }
                // SIGHUP and `reload_now` take the same path, so a test of
                // `reload_now` tests what SIGHUP does.
                Why::Asked | Why::Hangup => {
                    if matches!(why, Why::Hangup) {
                        tracing::info!(
                            file = %self.cfg.file.display(),
                            "SIGHUP: reloading the people file"
                        );
                    }
                    match self.metadata().await {
                        Ok(meta) => {
                            if !self.load_and_apply(meta, &shutdown).await {
                                return;
                            }
                        }
                        Err(source) => {
                            self.poller.observe(None);
                            self.failed(&self.read_error(source));
                        }
                    }
                }
            }
        }
    }

    /// Loads the file (whose metadata is `meta`) and publishes the result;
    /// `false` when shutdown came first.
    async fn load_and_apply(&mut self, meta: FileMeta, shutdown: &CancellationToken) -> bool {
        let read_at = SystemTime::now();
        let Some(outcome) = shutdown.run_until_cancelled(self.load()).await else {
            return false;
        };
        self.poller.loaded(meta, read_at);
        self.apply(outcome);
        true
    }

    fn read_error(&self, source: std::io::Error) -> MappingError {
        MappingError::Read {
            path: self.cfg.file.clone(),
            source,
        }
    }

    async fn metadata(&self) -> std::io::Result<FileMeta> {
        tokio::fs::metadata(&self.cfg.file)
            .await
            .map(|m| FileMeta::of(&m))
    }

    /// Reads and validates the file off the runtime's threads (a large
    /// file takes a noticeable fraction of a second).
    async fn load(&mut self) -> Outcome {
        let path = self.cfg.file.clone();
        let source_ids = Arc::clone(&self.source_ids);
        let match_equal_principals = self.cfg.match_equal_principals;
        let current = Arc::clone(&self.shared.mapping.borrow());
        let known = self.hash;
        let no_error = self.shared.status.borrow().last_error.is_none();
        let job = move || {
            use sha2::{Digest, Sha256};
            let bytes = match read_bounded(&path) {
                Ok(bytes) => bytes,
                Err(e) => return (Outcome::Failed(e), None),
            };
            let hash: [u8; 32] = Sha256::digest(&bytes).into();
            if known == Some(hash) && no_error {
                return (Outcome::Unchanged, Some(hash));
            }
            let version = current.version + 1;
            match parse_mapping(&path, &bytes, &source_ids, match_equal_principals, version) {
                Ok(m) if m.same_content(&current) => (Outcome::Unchanged, Some(hash)),
                Ok(m) => (Outcome::Changed(m), Some(hash)),
                Err(e) => (Outcome::Failed(e), None),
            }
        };
        match tokio::task::spawn_blocking(job).await {
            Ok((outcome, hash)) => {
                if hash.is_some() {
                    self.hash = hash;
                }
                outcome
            }
            Err(e) => Outcome::Failed(MappingError::Read {
                path: self.cfg.file.clone(),
                source: std::io::Error::other(format!("the load stopped: {e}")),
            }),
        }
    }

    fn apply(&self, outcome: Outcome) {
        let now = Millis::now();
        match outcome {
            Outcome::Unchanged => {
                self.shared.status.send_modify(|s| {
                    if s.last_error.is_some() {
                        tracing::info!(
                            file = %s.file.display(),
                            version = s.version,
                            "people file valid again; the mapping in use is unchanged"
                        );
                    }
                    s.attempts += 1;
                    s.loaded_at = now;
                    s.last_error = None;
                });
            }
            Outcome::Changed(mapping) => {
                tracing::info!(
                    file = %self.cfg.file.display(),
                    version = mapping.version,
                    people = mapping.people.len(),
                    identities = mapping.identity_count(),
                    "people file reloaded"
                );
                let (version, people) = (mapping.version, mapping.people.len());
                self.shared.mapping.send_replace(Arc::new(mapping));
                self.shared.status.send_modify(|s| {
                    s.attempts += 1;
                    s.version = version;
                    s.people = people;
                    s.loaded_at = now;
                    s.last_error = None;
                });
            }
            Outcome::Failed(e) => self.failed(&e),
        }
    }

    /// Records a failed load (or a file that cannot be looked at); the
    /// mapping in use stays.
    fn failed(&self, error: &MappingError) {
        let version = self.shared.mapping.borrow().version;
        tracing::warn!(
            file = %self.cfg.file.display(),
            version,
            "people file not reloaded; keeping mapping version {version}: {error}"
        );
        let message = error.to_string();
        self.shared.status.send_modify(|s| {
            s.attempts += 1;
            s.last_error = Some((message, Millis::now()));
        });
    }
}

/// SIGHUP, where there is one.
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn new(file: &Path) -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signal = signal(SignalKind::hangup())
                .inspect_err(|e| {
                    tracing::warn!(
                        file = %file.display(),
                        error = %e,
                        "cannot listen for SIGHUP; the people file is still reloaded when it changes"
                    );
                })
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        {
            let _ = file;
            Hangup {}
        }
    }

    /// The next SIGHUP; never, without one.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
            self.signal = None;
        }
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::super::ConfigError;
    use super::super::test_support::parse;
    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "pg-people-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sources() -> Vec<Arc<str>> {
        ["mitel-prod", "teams", "ns-cluster"]
            .into_iter()
            .map(Arc::from)
            .collect()
    }

    const ANA: &str = r#"
[[person]]
id = "ana"
name = "Ana Lima"
identities = [
  { source = "mitel-prod", principal = "2f1c9a1e" },
  { source = "teams",      principal = "66825e03" },
  { source = "ns-cluster", principal = "1001@acme" },
]

[[person]]
id = "bob.k@acme"
identities = [{ source = "teams", principal = "b0b" }]
"#;

    fn load_text(text: &str, match_equal_principals: bool) -> Result<Mapping, MappingError> {
        parse_mapping(
            Path::new("people.toml"),
            text.as_bytes(),
            &sources(),
            match_equal_principals,
            1,
        )
    }

    fn problems(text: &str, match_equal_principals: bool) -> Vec<MappingProblem> {
        match load_text(text, match_equal_principals) {
            Err(MappingError::Invalid { problems, .. }) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn the_section_is_optional_and_file_is_required() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.people, None);

        let c = parse(
            "[people]\nfile = \"people.toml\"\nmatch_equal_principals = true\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.people,
            Some(PeopleConfig {
                file: PathBuf::from("people.toml"),
                match_equal_principals: true,
            })
        );

        let err = parse("[people]\nmatch_equal_principals = true\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `file`"), "{err}");
        let err = parse("[people]\nfile = \"p.toml\"\nfiles = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("files") && err.contains("line 3"), "{err}");

        let Err(ConfigError::Invalid(problems)) = parse("[people]\nfile = \" \"\n", &[]) else {
            panic!("expected a problem");
        };
        assert_eq!(problems[0].key, "people.file");
    }

    #[test]
    fn the_section_takes_environment_overrides() {
        let c = parse(
            "[people]\nfile = \"from-file.toml\"\n",
            &[
                ("PRESENCE_GATEWAY__PEOPLE__FILE", "/etc/pg/people.toml"),
                ("PRESENCE_GATEWAY__PEOPLE__MATCH_EQUAL_PRINCIPALS", "true"),
            ],
        )
        .unwrap();
        let people = c.people.unwrap();
        assert_eq!(people.file, Path::new("/etc/pg/people.toml"));
        assert!(people.match_equal_principals);
        // The environment alone can turn people on.
        let c = parse("", &[("PRESENCE_GATEWAY__PEOPLE__FILE", "p.toml")]).unwrap();
        assert_eq!(c.people.unwrap().file, Path::new("p.toml"));
    }

    #[test]
    fn loads_people_with_interned_sources() {
        let ids = sources();
        let m = parse_mapping(Path::new("p.toml"), ANA.as_bytes(), &ids, false, 7).unwrap();
        assert_eq!(m.version, 7);
        assert_eq!(m.people.len(), 2);
        assert_eq!(m.identity_count(), 4);
        let ana = &m.people[0];
        assert_eq!(&*ana.id, "ana");
        assert_eq!(ana.name.as_deref(), Some("Ana Lima"));
        assert_eq!(&*ana.identities[2].principal, "1001@acme");
        assert!(Arc::ptr_eq(&ana.identities[1].source, &ids[1]));
        assert_eq!(&*m.people[1].id, "bob.k@acme");
        assert_eq!(m.people[1].name, None);
        // No people at all is a valid (empty) mapping.
        assert!(load_text("", false).unwrap().people.is_empty());
    }

    #[test]
    fn rejects_each_kind_of_bad_person() {
        let long_principal = "p".repeat(MAX_PRINCIPAL_BYTES + 1);
        let long_id = "a".repeat(MAX_ID_BYTES + 1);
        let long_source_message =
            format!("source \"{}…\" is not a configured source", "s".repeat(64));
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "unknown source",
                r#"[[person]]
id = "ana"
identities = [{ source = "teamz", principal = "p" }]"#
                    .into(),
                "source \"teamz\" is not a configured source (configured: mitel-prod, teams, ns-cluster)",
            ),
            (
                "one identity in two people",
                r#"[[person]]
id = "ana"
identities = [{ source = "teams", principal = "p" }]
[[person]]
id = "bob"
identities = [{ source = "teams", principal = "p" }]"#
                    .into(),
                "teams/p is also an identity of person \"ana\" (line 3)",
            ),
            (
                "one identity twice in one person",
                r#"[[person]]
id = "ana"
identities = [
  { source = "teams", principal = "p" },
  { source = "teams", principal = "p" },
]"#
                .into(),
                "teams/p is listed twice (also on line 4)",
            ),
            (
                "duplicate person id",
                r#"[[person]]
id = "ana"
identities = [{ source = "teams", principal = "p" }]
[[person]]
id = "ana"
identities = [{ source = "teams", principal = "q" }]"#
                    .into(),
                "duplicate person id (also [[person]] 1 on line 1)",
            ),
            (
                "empty id",
                "[[person]]\nid = \"\"\nidentities = [{ source = \"teams\", principal = \"p\" }]"
                    .into(),
                "id must not be empty",
            ),
            (
                "id with a slash",
                "[[person]]\nid = \"a/b\"\nidentities = [{ source = \"teams\", principal = \"p\" }]"
                    .into(),
                "may hold only ASCII letters",
            ),
            (
                "id with a non-ASCII letter",
                "[[person]]\nid = \"josé\"\nidentities = [{ source = \"teams\", principal = \"p\" }]"
                    .into(),
                "may hold only ASCII letters",
            ),
            (
                "id too long",
                format!(
                    "[[person]]\nid = \"{long_id}\"\nidentities = [{{ source = \"teams\", principal = \"p\" }}]"
                ),
                "id is 129 bytes; at most 128",
            ),
            (
                "empty principal",
                "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"\" }]"
                    .into(),
                "principal must not be empty",
            ),
            (
                "principal too long",
                format!(
                    "[[person]]\nid = \"ana\"\nidentities = [{{ source = \"teams\", principal = \"{long_principal}\" }}]"
                ),
                "principal is 257 bytes",
            ),
            (
                "very long unknown source",
                format!(
                    "[[person]]\nid = \"ana\"\nidentities = [{{ source = \"{}\", principal = \"p\" }}]",
                    "s".repeat(10_000)
                ),
                &long_source_message,
            ),
            (
                "no identities",
                "[[person]]\nid = \"ana\"\nidentities = []".into(),
                "has no identities",
            ),
            (
                "identities left out",
                "[[person]]\nid = \"ana\"".into(),
                "has no identities",
            ),
            (
                "empty name",
                "[[person]]\nid = \"ana\"\nname = \"\"\nidentities = [{ source = \"teams\", principal = \"p\" }]"
                    .into(),
                "name must not be empty",
            ),
        ];
        for (what, text, expected) in cases {
            let problems = problems(&text, false);
            assert_eq!(problems.len(), 1, "{what}: {problems:?}");
            let shown = problems[0].to_string();
            assert!(shown.contains(expected), "{what}: {shown}");
            assert!(shown.starts_with("line "), "{what}: {shown}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_the_file() {
        let text = r#"[[person]]
id = "ana"
identities = [
  { source = "teamz", principal = "p" },
  { source = "teams", principal = "q" },
]

[[person]]
id = "ana"
identities = [{ source = "teams", principal = "q" }]

[[person]]
id = "c d"
identities = []
"#;
        let err = load_text(text, false).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("people.toml: 5 problems\n"), "{shown}");
        let MappingError::Invalid { problems, .. } = err else {
            unreachable!()
        };
        let at: Vec<(Option<usize>, &str)> =
            problems.iter().map(|p| (p.line, p.what.as_str())).collect();
        assert_eq!(
            at,
            [
                (Some(4), "person \"ana\", identities[0]"),
                (Some(8), "person \"ana\""),
                (Some(10), "person \"ana\", identities[0]"),
                (Some(12), "[[person]] 3"),
                (Some(12), "[[person]] 3"),
            ]
        );
    }

    #[test]
    fn equal_principals_on_two_people_contradict_matching_by_principal() {
        let text = r#"[[person]]
id = "ana"
identities = [{ source = "mitel-prod", principal = "1001" }, { source = "teams", principal = "1001" }]
[[person]]
id = "bob"
identities = [{ source = "ns-cluster", principal = "1001" }]
"#;
        // Without matching, three identities and two people are fine.
        assert_eq!(load_text(text, false).unwrap().people.len(), 2);
        let problems = problems(text, true);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, Some(6));
        assert!(
            problems[0]
                .message
                .contains("also an identity of person \"ana\" (on source mitel-prod, line 3)"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_line() {
        for (text, expected) in [
            ("[[person]]\nid = \"ana\nidentities = []\n", "line 2"),
            (
                "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"p\", kind = 1 }]\n",
                "line 3",
            ),
            ("[[persons]]\nid = \"ana\"\n", "line 1"),
            ("[[person]]\nid = 5\n", "line 2"),
        ] {
            let err = load_text(text, false).unwrap_err();
            assert!(
                matches!(err, MappingError::Syntax { .. }),
                "{text}: {err:?}"
            );
            let shown = err.to_string();
            assert!(
                shown.starts_with("people.toml: ") && shown.contains(expected),
                "{text}: {shown}"
            );
            assert!(!shown.contains('\n'), "one line: {shown}");
        }
        let err = parse_mapping(Path::new("p.toml"), b"a = \"\xff\"", &sources(), false, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1, column 6: not UTF-8"), "{err}");
    }

    #[test]
    fn a_missing_or_oversized_file_is_refused_without_reading_it() {
        let dir = TempDir::new();
        let err = load_mapping(&dir.0.join("nope.toml"), &sources(), false, 1).unwrap_err();
        assert!(matches!(err, MappingError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.toml"), "{err}");

        // Sparse: takes no disk space, and is never read.
        let big = dir.0.join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let err = load_mapping(&big, &sources(), false, 1).unwrap_err();
        assert!(matches!(err, MappingError::TooLarge { .. }), "{err:?}");
    }

    // ---- the poll's decisions --------------------------------------------------

    fn meta(len: u64, secs: u64) -> FileMeta {
        FileMeta {
            len,
            modified: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
            changed: (secs as i64, 0),
            inode: (1, 1),
        }
    }

    const LONG_AFTER: Duration = Duration::from_secs(1_000_000);

    #[test]
    fn a_change_is_loaded_once_it_has_settled() {
        let mut p = Poller::default();
        let a = meta(10, 100);
        assert_eq!(p.observe(Some(a)), Step::Nothing);
        assert_eq!(p.observe(Some(a)), Step::Load(a));
        p.loaded(a, SystemTime::UNIX_EPOCH + LONG_AFTER);
        assert_eq!(p.observe(Some(a)), Step::Nothing);

        // Still being written: each poll sees something new.
        let (b, c) = (meta(0, 200), meta(20, 201));
        assert_eq!(p.observe(Some(b)), Step::Nothing);
        assert_eq!(p.observe(Some(c)), Step::Nothing);
        assert_eq!(p.observe(Some(c)), Step::Load(c));

        // A rename-replace with the old times and length: another inode.
        p.loaded(c, SystemTime::UNIX_EPOCH + LONG_AFTER);
        let renamed = FileMeta { inode: (1, 2), ..c };
        assert_eq!(p.observe(Some(renamed)), Step::Nothing);
        assert_eq!(p.observe(Some(renamed)), Step::Load(renamed));
    }

    #[test]
    fn a_missing_file_is_reported_once_and_loaded_when_back() {
        let mut p = Poller::default();
        let a = meta(10, 100);
        p.loaded(a, SystemTime::UNIX_EPOCH + LONG_AFTER);
        assert_eq!(p.observe(None), Step::Missing);
        assert_eq!(p.observe(None), Step::Nothing);
        // Back exactly as it was: still loaded, to clear the error.
        assert_eq!(p.observe(Some(a)), Step::Nothing);
        assert_eq!(p.observe(Some(a)), Step::Load(a));
    }

    #[test]
    fn a_file_read_right_after_a_write_is_compared_once_more() {
        let mut p = Poller::default();
        let a = meta(10, 100);
        p.loaded(a, SystemTime::UNIX_EPOCH + Duration::from_millis(100_500));
        assert_eq!(p.observe(Some(a)), Step::Load(a));
        p.loaded(a, SystemTime::UNIX_EPOCH + LONG_AFTER);
        assert_eq!(p.observe(Some(a)), Step::Nothing);
    }

    // ---- the watcher -------------------------------------------------------------

    /// Long enough for a slow machine; the tests wait on channels, so a
    /// passing test never waits this long.
    const PATIENCE: Duration = Duration::from_secs(20);

    const ONE: &str =
        "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"a\" }]\n";
    const TWO: &str = "[[person]]\nid = \"ana\"\nidentities = [{ source = \"teams\", principal = \"a\" }]\n\
        [[person]]\nid = \"bob\"\nidentities = [{ source = \"teams\", principal = \"b\" }]\n";
    const BAD: &str =
        "[[person]]\nid = \"ana\"\nidentities = [{ source = \"nowhere\", principal = \"a\" }]\n";

    struct Fixture {
        dir: TempDir,
        path: PathBuf,
        watch: PeopleWatch,
        shutdown: CancellationToken,
    }

    impl Fixture {
        fn start(text: &str) -> Fixture {
            let dir = TempDir::new();
            let path = dir.write("people.toml", text);
            let cfg = PeopleConfig {
                file: path.clone(),
                match_equal_principals: false,
            };
            let initial = Arc::new(cfg.load(&sources(), 1).unwrap());
            let shutdown = CancellationToken::new();
            let watch = PeopleWatch::spawn_polling(
                cfg,
                sources(),
                initial,
                shutdown.clone(),
                Duration::from_millis(20),
            );
            Fixture {
                dir,
                path,
                watch,
                shutdown,
            }
        }

        /// Waits until the status satisfies `ok`.
        async fn status_until(&self, ok: impl FnMut(&ReloadStatus) -> bool) -> ReloadStatus {
            let mut rx = self.watch.subscribe_status();
            tokio::time::timeout(PATIENCE, rx.wait_for(ok))
                .await
                .expect("status in time")
                .expect("watcher alive")
                .clone()
        }

        /// Asks for a reload and waits until the watcher has looked at
        /// the file since.
        async fn reload(&self) -> ReloadStatus {
            let before = self.watch.status().attempts;
            self.watch.reload_now();
            self.status_until(|s| s.attempts > before).await
        }

        /// Replaces the file the way editors and deploy tools do: a new
        /// file renamed over the old one.
        fn replace(&self, text: &str) {
            let tmp = self.dir.write("people.toml.tmp", text);
            std::fs::rename(tmp, &self.path).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn next_mapping(rx: &mut watch::Receiver<Arc<Mapping>>) -> Arc<Mapping> {
        tokio::time::timeout(PATIENCE, rx.changed())
            .await
            .expect("a new mapping in time")
            .expect("watcher alive");
        Arc::clone(&rx.borrow_and_update())
    }

    #[tokio::test]
    async fn a_valid_change_is_published_as_the_next_version() {
        let f = Fixture::start(ONE);
        let mut rx = f.watch.subscribe();
        assert_eq!(rx.borrow_and_update().version, 1);
        std::fs::write(&f.path, TWO).unwrap();
        let m = next_mapping(&mut rx).await;
        assert_eq!((m.version, m.people.len()), (2, 2));
        let status = f.watch.status();
        assert_eq!((status.version, status.people), (2, 2));
        assert_eq!(status.last_error, None);
        assert_eq!(status.file, f.path);
        assert_eq!(f.watch.current(), m);
    }

    #[tokio::test]
    async fn an_invalid_change_keeps_the_mapping_until_fixed() {
        let f = Fixture::start(ONE);
        let mut rx = f.watch.subscribe();
        rx.borrow_and_update();
        f.replace(BAD);
        let status = f.status_until(|s| s.last_error.is_some()).await;
        let (message, _) = status.last_error.clone().unwrap();
        assert!(
            message.contains("people.toml") && message.contains("\"nowhere\""),
            "{message}"
        );
        assert_eq!(status.version, 1);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(f.watch.current().people.len(), 1);

        f.replace(TWO);
        let m = next_mapping(&mut rx).await;
        assert_eq!((m.version, m.people.len()), (2, 2));
        assert_eq!(f.watch.status().last_error, None);
    }

    #[tokio::test]
    async fn a_renamed_over_file_is_reloaded() {
        let f = Fixture::start(ONE);
        let mut rx = f.watch.subscribe();
        rx.borrow_and_update();
        f.replace(TWO);
        assert_eq!(next_mapping(&mut rx).await.version, 2);
        f.replace(ONE);
        let m = next_mapping(&mut rx).await;
        assert_eq!((m.version, m.people.len()), (3, 1));
    }

    #[tokio::test]
    async fn a_missing_file_keeps_the_mapping_and_says_so() {
        let f = Fixture::start(ONE);
        let mut rx = f.watch.subscribe();
        rx.borrow_and_update();
        std::fs::remove_file(&f.path).unwrap();
        let status = f.status_until(|s| s.last_error.is_some()).await;
        let (message, _) = status.last_error.unwrap();
        assert!(message.starts_with("cannot read"), "{message}");
        assert_eq!(f.watch.current().version, 1);

        // Back as it was: the error clears, and nothing is published.
        f.dir.write("people.toml", ONE);
        let status = f.status_until(|s| s.last_error.is_none()).await;
        assert_eq!(status.version, 1);
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn an_identical_rewrite_changes_nothing() {
        let f = Fixture::start(ONE);
        let mut rx = f.watch.subscribe();
        rx.borrow_and_update();
        f.replace(ONE);
        // The same path SIGHUP takes (the real binary's SIGHUP is tested
        // with the people engine: a signal here would reach every test of
        // this process).
        let status = f.reload().await;
        assert_eq!((status.version, status.last_error), (1, None));
        assert!(!rx.has_changed().unwrap());
        // A comment or layout change is not a change of the mapping either.
        f.replace(&format!("# the team\n\n{ONE}"));
        f.reload().await;
        assert!(!rx.has_changed().unwrap());
        // The next real change is the very next version.
        f.replace(TWO);
        assert_eq!(next_mapping(&mut rx).await.version, 2);
    }

    #[tokio::test]
    async fn reload_now_reports_a_missing_file() {
        let f = Fixture::start(ONE);
        std::fs::remove_file(&f.path).unwrap();
        let status = f.reload().await;
        assert!(status.last_error.is_some());
        assert_eq!(status.version, 1);
    }

    #[tokio::test]
    async fn the_watcher_stops_at_shutdown() {
        let f = Fixture::start(ONE);
        f.shutdown.cancel();
        tokio::time::timeout(PATIENCE, f.watch.stopped())
            .await
            .expect("stopped in time");
    }
}
