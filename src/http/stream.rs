//! `GET /v1/stream`: presence changes as Server-Sent Events, with resume.
//!
//! Each change is `event: presence`, `id: <seq>`, `data: <record>`. Filters:
//! `source` and `principal`, each repeatable (a record matches when it
//! matches every given filter kind). Without `Last-Event-ID` (header, or
//! `last_event_id` query parameter for clients that cannot set headers) the
//! stream starts with the current snapshot of the matching records, in
//! ascending `seq` (`snapshot=false` skips it); with it, every kept change
//! after that id that matches is replayed in order. When those changes are
//! no longer all kept, or the consumer falls behind the live fan-out, the
//! stream sends `event: reset` (`{"reason":"history"}` or `{"reason":
//! "lagged"}`) and then the snapshot, and goes on live. The gateway ends
//! every stream at shutdown.
//!
//! Opening a stream never stalls ingestion or the runtime: a snapshot is an
//! index shared by the consumers that open together, built off the async
//! workers ([`crate::presence::snapshot`]); its records, and a replay's
//! changes, are read a page at a time as the consumer takes them, each read
//! under a lock held for that page only, and every record sent uses up some
//! of the task's budget, so a long snapshot lets the worker serve others.
//! A stream holds a page, never a whole snapshot or history. Opens that
//! take a snapshot or a replay are limited per consumer ([`super::opens`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::IntoResponse;
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use super::AppState;
use super::client_addr::client_addr;
use super::listener::Peer;
use super::problem::Problem;
use crate::presence::changes::PAGE;
use crate::presence::snapshot::{Index, Snapshots, Taken};
use crate::presence::{Change, Event, PresenceRecord, Store};
use crate::telemetry::{OpenStream, StreamKind};

/// Keep-alive comment interval.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a consumer asked for.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    sources: Vec<String>,
    principals: Vec<String>,
    /// `person` (repeatable): these people's events.
    persons: Vec<String>,
    /// `people=true`: every person's events.
    people: bool,
    /// `presence=true|false`: whether presence events come too (default:
    /// yes, unless people are asked for without a source or principal).
    presence: Option<bool>,
    pub(crate) snapshot: bool,
    pub(crate) last_event_id: Option<u64>,
}

impl Filter {
    /// Reads `source`, `principal` (repeatable), `snapshot` and
    /// `last_event_id` from a query string; `access_token` is the
    /// authentication middleware's and is ignored here.
    pub(crate) fn parse(query: Option<&str>, headers: &HeaderMap) -> Result<Self, Problem> {
        let mut f = Filter {
            snapshot: true,
            ..Filter::default()
        };
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "source" => f.sources.push(value.into_owned()),
                "principal" => f.principals.push(value.into_owned()),
                "person" => f.persons.push(value.into_owned()),
                "people" => f.people = flag("people", &value)?,
                "presence" => f.presence = Some(flag("presence", &value)?),
                "snapshot" => f.snapshot = flag("snapshot", &value)?,
                "last_event_id" => f.last_event_id = Some(parse_id(&value)?),
                "access_token" => {}
                other => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        if let Some(id) = headers.get("last-event-id") {
            let id = id.to_str().map_err(|_| bad("Last-Event-ID is not text"))?;
            f.last_event_id = Some(parse_id(id)?);
        }
        Ok(f)
    }

    /// Whether person events are asked for.
    pub(crate) fn wants_people(&self) -> bool {
        self.people || !self.persons.is_empty()
    }

    /// Whether presence events are asked for.
    pub(crate) fn wants_presence(&self) -> bool {
        self.presence.unwrap_or(
            !self.wants_people() || !self.sources.is_empty() || !self.principals.is_empty(),
        )
    }

    fn matches(&self, change: &Change) -> bool {
        match &change.event {
            Event::Presence(record) => self.wants_presence() && self.matches_presence(record),
            Event::Person(person) => self.matches_person(&person.person),
        }
    }

    fn matches_presence(&self, record: &PresenceRecord) -> bool {
        (self.sources.is_empty() || self.sources.iter().any(|s| **s == *record.source))
            && (self.principals.is_empty()
                || self.principals.iter().any(|p| **p == *record.principal))
    }

    fn matches_person(&self, id: &str) -> bool {
        self.people || self.persons.iter().any(|p| p == id)
    }
}

/// A `true`/`false` query parameter.
fn flag(name: &str, value: &str) -> Result<bool, Problem> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(&format!("{name} must be true or false"))),
    }
}

fn bad(detail: &str) -> Problem {
    Problem::bad_request("bad-query", detail)
}

fn parse_id(text: &str) -> Result<u64, Problem> {
    text.trim()
        .parse()
        .map_err(|_| bad("Last-Event-ID must be a sequence number"))
}

/// What a stream sends next.
pub(crate) enum Item {
    Record(Arc<Change>),
    /// The consumer must drop what it holds: a snapshot follows.
    Reset(Reset),
    /// The consumer fell behind the fan-out; what it was sent reflects
    /// every change up to `after`, the position to resume from (only for
    /// streams that close instead of resetting).
    Lagged {
        after: u64,
    },
}

/// Why a stream starts over from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reset {
    /// The changes after the consumer's position are no longer all kept.
    History,
    /// The consumer fell behind the live fan-out.
    Lagged,
}

/// What happens when a consumer falls behind the live fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnLag {
    /// `reset` and a fresh snapshot (Server-Sent Events).
    Reset,
    /// [`Item::Lagged`]; the transport closes and the consumer resumes by
    /// seq (WebSocket).
    Close,
}

/// The snapshot being obtained (kept across polls of [`Streamer::next`],
/// which `select!` drops on every keep-alive tick).
type Taking = Pin<Box<dyn Future<Output = Option<Positioned>> + Send>>;

/// A snapshot, the position it is for, and a receiver of every change
/// after that position.
struct Positioned {
    rx: broadcast::Receiver<Arc<Change>>,
    at: u64,
    taken: Taken,
}

/// The snapshot as of now, for a stream that takes nothing live until it
/// has it.
///
/// The stream subscribes afresh here, right before its position is read:
/// whatever the old receiver missed or will miss while the snapshot is
/// obtained is in the snapshot, so waiting for a build never makes a
/// stream lag. With Redis, the change log first catches up with what this
/// replica has written or seen (a snapshot positioned behind the feed would
/// then take the rest from the fan-out, which keeps only so many).
async fn position_snapshot(store: Arc<Store>) -> Option<Positioned> {
    store.catch_up(0).await;
    let rx = store.changes().subscribe();
    let at = store.changes().last_seq();
    let taken = Snapshots::take(store, at).await?;
    Some(Positioned { rx, at, taken })
}

/// What a stream sends before the live changes, in order; each part is
/// produced as the consumer takes it, so a stream holds a page of
/// records at most, not the whole snapshot or replay.
enum Part {
    Item(Item),
    /// The snapshot, being obtained (see [`position_snapshot`]).
    Take(Option<Taking>),
    /// The records of an index from entry `next` on, those with `seq <=
    /// upto`.
    Index {
        index: Arc<Index>,
        next: usize,
        upto: u64,
    },
    /// Changes ready to send.
    Changes(VecDeque<Arc<Change>>),
    /// The kept changes after `after` up to `until`, read a page at a time.
    Replay {
        after: u64,
        until: u64,
    },
}

/// What the parts gave.
enum Step {
    Item(Item),
    /// Nothing before the live changes.
    Done,
    /// The runtime is shutting down.
    Gone,
}

/// One consumer's position: replay or snapshot first, then the live
/// fan-out, filtered.
pub(crate) struct Streamer {
    state: AppState,
    filter: Filter,
    /// The indexes of the sources the filter names (`None`: every source).
    sources: Option<Vec<usize>>,
    rx: broadcast::Receiver<Arc<Change>>,
    parts: VecDeque<Part>,
    /// Live changes up to this `seq` are already covered by what was
    /// queued (the replay, the state a snapshot shows, or live changes
    /// received, whether they matched or not).
    covered: u64,
    /// Items sent before the live changes since the receiver was last
    /// looked at (see [`Streamer::spill`]).
    unchecked: u32,
    on_lag: OnLag,
    open: OpenStream,
}

/// How often (in items sent before the live changes) a stream looks at how
/// full its fan-out receiver is.
const SPILL_CHECK: u32 = 256;

impl Streamer {
    /// A stream positioned as `filter` asks: after `last_event_id` (replay,
    /// or reset and snapshot when the history no longer reaches back), at
    /// the snapshot, or at the live end.
    pub(crate) fn start(state: &AppState, filter: Filter, on_lag: OnLag, open: OpenStream) -> Self {
        // Subscribe first: nothing committed after this point can be missed.
        let rx = state.store().changes().subscribe();
        let sources = (!filter.sources.is_empty()).then(|| {
            filter
                .sources
                .iter()
                .filter_map(|id| state.store().records().source_index(id))
                .collect()
        });
        let mut streamer = Streamer {
            state: state.clone(),
            filter,
            sources,
            rx,
            parts: VecDeque::new(),
            covered: 0,
            unchecked: 0,
            on_lag,
            open,
        };
        streamer.position();
        streamer
    }

    fn position(&mut self) {
        let changes = self.state.store().changes();
        match self.filter.last_event_id {
            Some(after) => {
                // The history and the fan-out share one order: everything
                // up to `until` is replayed, and exactly that is what the
                // fan-out must not repeat.
                let until = changes.last_seq();
                // The first page now: a position the history no longer
                // reaches is a reset at once.
                match changes.page(after, PAGE) {
                    Ok(first) => {
                        self.covered = until.max(after);
                        let next = first.last().map_or(after, |c| c.seq());
                        self.queue_changes(first, until);
                        if next < until {
                            self.parts.push_back(Part::Replay { after: next, until });
                        }
                    }
                    Err(_gap) => self.reset(Reset::History),
                }
            }
            None if self.filter.snapshot => self.queue_snapshot(),
            None => self.covered = changes.last_seq(),
        }
    }

    /// The gateway's state this stream reads.
    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }

    /// Starts over after `after`, as a new stream with `last_event_id` would
    /// (a WebSocket consumer's resume message).
    pub(crate) fn resume(&mut self, after: u64) {
        self.rx = self.state.store().changes().subscribe();
        self.parts.clear();
        self.filter.last_event_id = Some(after);
        self.position();
    }

    /// Queues the snapshot; live changes after it follow.
    fn queue_snapshot(&mut self) {
        let at = self.state.store().changes().last_seq();
        self.covered = at;
        if !self.filter.wants_presence() {
            // People only: their records after `at` come as live changes.
            if let Some(people) = self.people_snapshot(at) {
                self.parts.push_back(people);
            }
        } else if self.filter.principals.is_empty() {
            // The people's records follow the presence snapshot (see the
            // `Take` part).
            self.parts.push_back(Part::Take(None));
        } else {
            // A few principals: looked up one by one, no index needed.
            let store = self.state.store();
            let sources = match &self.sources {
                Some(sources) => sources.clone(),
                None => (0..store.source_count()).collect(),
            };
            let mut principals: Vec<&str> =
                self.filter.principals.iter().map(String::as_str).collect();
            principals.sort_unstable();
            principals.dedup();
            let mut records: Vec<PresenceRecord> = sources
                .iter()
                .flat_map(|&source| principals.iter().filter_map(move |p| store.get(source, p)))
                // Newer than the position: it comes as a live change.
                .filter(|r| r.seq <= at)
                .collect();
            records.sort_unstable_by_key(|r| r.seq);
            let changes = records.into_iter().map(|r| Arc::new(Change::new(r)));
            self.parts.push_back(Part::Changes(changes.collect()));
            if let Some(people) = self.people_snapshot(at) {
                self.parts.push_back(people);
            }
        }
    }

    /// The current records of the people the filter asks for whose `seq`
    /// is at most `at`, in `seq` order (later ones come as live changes);
    /// `None` when no person is asked for or none has a record.
    fn people_snapshot(&self, at: u64) -> Option<Part> {
        if !self.filter.wants_people() {
            return None;
        }
        let people = self.state.store().people();
        let records = if self.filter.people {
            people.snapshot(None, at)
        } else {
            people.snapshot(Some(&self.filter.persons), at)
        };
        let changes: VecDeque<Arc<Change>> = records
            .into_iter()
            .map(|p| Arc::new(Change::of(Event::Person(p))))
            .collect();
        (!changes.is_empty()).then_some(Part::Changes(changes))
    }

    /// Queues the changes of `changes` with `seq <= until` that match.
    fn queue_changes(&mut self, changes: Vec<Arc<Change>>, until: u64) {
        let filter = &self.filter;
        let matching: VecDeque<Arc<Change>> = changes
            .into_iter()
            .take_while(|c| c.seq() <= until)
            .filter(|c| filter.matches(c))
            .collect();
        if !matching.is_empty() {
            self.parts.push_back(Part::Changes(matching));
        }
    }

    fn reset(&mut self, reason: Reset) {
        self.parts.clear();
        self.parts.push_back(Part::Item(Item::Reset(reason)));
        self.queue_snapshot();
    }

    /// The next item, or `None` at shutdown.
    pub(crate) async fn next(&mut self) -> Option<Item> {
        loop {
            if self.state.store().changes().is_closed() {
                return None;
            }
            match self.next_queued().await {
                Step::Item(item) => return Some(item),
                Step::Gone => return None,
                Step::Done => {}
            }
            match self.rx.recv().await {
                // Changes before this one never reached this replica (a
                // shared backend that lost them): what the consumer holds
                // can no longer be brought up to date change by change.
                Ok(change) if change.seq() > self.covered + 1 && self.covered > 0 => {
                    self.reset(Reset::History);
                }
                Ok(change) if change.seq() > self.covered => {
                    self.covered = change.seq();
                    if self.filter.matches(&change) {
                        return Some(Item::Record(change));
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.open.lagged();
                    match self.on_lag {
                        OnLag::Reset => self.reset(Reset::Lagged),
                        OnLag::Close => {
                            return Some(Item::Lagged {
                                after: self.covered,
                            });
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// While a stream sends a snapshot or a replay it takes nothing from
    /// the fan-out, whose receiver keeps only `consumers.stream_buffer`
    /// changes: a long snapshot under steady writes would overflow it and
    /// start over (20 consumers reading 300 k records each on one core
    /// took a minute, at 400 changes a second). So once the receiver is
    /// half full, the stream subscribes afresh and takes the changes up to
    /// there from the history after what it is sending (a reset only if
    /// the history no longer has them by then). A consumer that falls
    /// behind the live changes themselves still lags as before.
    fn spill(&mut self) {
        self.unchecked += 1;
        if self.unchecked < SPILL_CHECK {
            return;
        }
        self.unchecked = 0;
        let capacity = self.state.store().records().limits().stream_buffer;
        if self.rx.len() < capacity / 2 {
            return;
        }
        let changes = self.state.store().changes();
        self.rx = changes.subscribe();
        let until = changes.last_seq();
        if until <= self.covered {
            return;
        }
        match self.parts.back_mut() {
            Some(Part::Replay { until: end, .. }) if *end == self.covered => *end = until,
            _ => self.parts.push_back(Part::Replay {
                after: self.covered,
                until,
            }),
        }
        self.covered = until;
    }

    /// The next item before the live changes. Cancel-safe: every `.await`
    /// comes before the part it serves is advanced. Each record looked at
    /// uses up some of the task's budget, so a long snapshot or replay
    /// (also one whose records are mostly filtered out) lets the worker
    /// serve others between pages.
    async fn next_queued(&mut self) -> Step {
        loop {
            let Some(part) = self.parts.front_mut() else {
                return Step::Done;
            };
            if matches!(
                part,
                Part::Index { .. } | Part::Changes(_) | Part::Replay { .. }
            ) {
                self.spill();
            }
            let Some(part) = self.parts.front_mut() else {
                return Step::Done;
            };
            match part {
                Part::Item(_) => {
                    if let Some(Part::Item(item)) = self.parts.pop_front() {
                        return Step::Item(item);
                    }
                }
                Part::Take(taking) => {
                    let store = self.state.store_arc();
                    let taking = taking.get_or_insert_with(|| Box::pin(position_snapshot(store)));
                    let Some(Positioned { rx, at, taken }) = taking.as_mut().await else {
                        return Step::Gone;
                    };
                    self.parts.pop_front();
                    self.rx = rx;
                    // An index built after `at` moves the position up to
                    // its own (nothing live was taken since `at`: the
                    // changes in between are in the index); one built
                    // before it comes with the changes up to `at`.
                    let upto = taken.index.at();
                    self.covered = at.max(upto);
                    let filter = &self.filter;
                    let then: VecDeque<_> = taken
                        .then
                        .into_iter()
                        .filter(|c| filter.matches(c))
                        .collect();
                    if let Some(people) = self.people_snapshot(self.covered) {
                        self.parts.push_front(people);
                    }
                    if !then.is_empty() {
                        self.parts.push_front(Part::Changes(then));
                    }
                    self.parts.push_front(Part::Index {
                        index: taken.index,
                        next: 0,
                        upto,
                    });
                }
                Part::Index { index, next, upto } => {
                    tokio::task::coop::consume_budget().await;
                    let Some((seq, slot)) = index.get(*next).filter(|&(seq, _)| seq <= *upto)
                    else {
                        self.parts.pop_front();
                        continue;
                    };
                    *next += 1;
                    if self
                        .sources
                        .as_ref()
                        .is_some_and(|s| !s.contains(&slot.source()))
                    {
                        continue;
                    }
                    // Changed since: that change follows the snapshot.
                    let Some(record) = self.state.store().records().at_slot(slot, seq) else {
                        continue;
                    };
                    if self.filter.matches_presence(&record) {
                        return Step::Item(Item::Record(Arc::new(Change::new(record))));
                    }
                }
                Part::Changes(changes) => match changes.pop_front() {
                    Some(change) => {
                        tokio::task::coop::consume_budget().await;
                        return Step::Item(Item::Record(change));
                    }
                    None => {
                        self.parts.pop_front();
                    }
                },
                Part::Replay { after, until } => {
                    tokio::task::coop::consume_budget().await;
                    let (after, until) = (*after, *until);
                    match self.state.store().changes().page(after, PAGE) {
                        Ok(page) if !page.is_empty() && after < until => {
                            let next = page.last().map_or(until, |c| c.seq());
                            self.parts.pop_front();
                            if next < until {
                                self.parts.push_front(Part::Replay { after: next, until });
                            }
                            let filter = &self.filter;
                            let matching: VecDeque<_> = page
                                .into_iter()
                                .take_while(|c| c.seq() <= until)
                                .filter(|c| filter.matches(c))
                                .collect();
                            if !matching.is_empty() {
                                self.parts.push_front(Part::Changes(matching));
                            }
                        }
                        Ok(_) => {
                            self.parts.pop_front();
                        }
                        // The history moved past what this consumer has
                        // read of it.
                        Err(_gap) => self.reset(Reset::History),
                    }
                }
            }
        }
    }
}

/// The Server-Sent Events text of an item: one allocation, the record's
/// JSON shared with every other consumer of the change.
fn event(item: &Item) -> Bytes {
    match item {
        Item::Record(change) => {
            let json = change.json();
            let seq = change.seq();
            let mut frame = String::with_capacity(json.len() + 48);
            frame.push_str("event: ");
            frame.push_str(change.event.name());
            frame.push_str("\nid: ");
            frame.push_str(itoa_u64(seq, &mut [0u8; 20]));
            frame.push_str("\ndata: ");
            frame.push_str(json);
            frame.push_str("\n\n");
            Bytes::from(frame)
        }
        Item::Reset(Reset::History) => {
            Bytes::from_static(b"event: reset\ndata: {\"reason\":\"history\"}\n\n")
        }
        Item::Reset(Reset::Lagged) => {
            Bytes::from_static(b"event: reset\ndata: {\"reason\":\"lagged\"}\n\n")
        }
        // Server-Sent Events reset instead (OnLag::Reset).
        Item::Lagged { .. } => Bytes::from_static(b": lagged\n\n"),
    }
}

/// `n` in decimal, written into `buf`.
pub(crate) fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Counts an open that starts with a snapshot or a replay against its
/// consumer's allowance (see [`super::opens`]): the 429 answer once that
/// is used up. Opens with `snapshot=false` and no id are free.
pub(crate) fn admit(
    state: &AppState,
    filter: &Filter,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    headers: &HeaderMap,
    query: Option<&str>,
    kind: StreamKind,
) -> Result<(), Problem> {
    if filter.last_event_id.is_none() && !filter.snapshot {
        return Ok(());
    }
    let peer = peer.map_or(
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        |Extension(ConnectInfo(peer))| peer.addr.ip(),
    );
    let client = client_addr(peer, headers, state.trusted_proxies());
    // The token only when tokens are checked: on an open API any made-up
    // token would be a fresh allowance.
    let token = if state.consumer_auth().is_open() {
        None
    } else {
        presented_token(headers, query)
    };
    let limit = state.stream_opens().limit();
    state
        .stream_opens()
        .take(client, token.as_deref(), tokio::time::Instant::now())
        .map_err(|wait| {
            state.global().streams_refused[kind as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%client, wait, "stream open refused: too many for this consumer");
            Problem::too_many_requests(
                "too-many-stream-opens",
                format!(
                    "at most {} stream opens with a snapshot or a replay at once per consumer, \
                     then {} a minute; retry in {wait} s",
                    limit.burst, limit.per_minute
                ),
                wait,
            )
        })
}

/// The consumer token of a request: the bearer token, or `access_token`
/// in the query (checked already by [`super::consumers::require_token`]).
fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<Vec<u8>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().as_bytes().to_vec())
        });
    bearer.or_else(|| {
        form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.as_bytes().to_vec())
    })
}

/// `GET /v1/stream`.
pub async fn sse(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let filter = match Filter::parse(query.as_deref(), &headers) {
        Ok(f) => f,
        Err(problem) => return problem.into_response(),
    };
    if let Err(problem) = admit(
        &state,
        &filter,
        peer,
        &headers,
        query.as_deref(),
        StreamKind::Sse,
    ) {
        return problem.into_response();
    }
    state
        .store()
        .catch_up(filter.last_event_id.unwrap_or(0))
        .await;
    let open = OpenStream::new(state.global_arc(), StreamKind::Sse);
    let streamer = Streamer::start(&state, filter, OnLag::Reset, open);
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold(
        (streamer, keep_alive),
        |(mut s, mut keep_alive)| async move {
            let frame = tokio::select! {
                item = s.next() => event(&item?),
                _ = keep_alive.tick() => Bytes::from_static(b":\n\n"),
            };
            Some((Ok::<_, Infallible>(frame), (s, keep_alive)))
        },
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // Tells nginx not to buffer the stream.
            (
                axum::http::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Availability, Millis, PresenceUpdate};
    use std::borrow::Cow;
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    fn update(principal: String, n: u64) -> PresenceUpdate<'static> {
        let availability = [
            Availability::Busy,
            Availability::Away,
            Availability::Available,
        ][(n % 3) as usize];
        PresenceUpdate {
            principal: Cow::Owned(principal),
            availability,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Some(Millis(n as i64 + 1)),
            event_id: None,
        }
    }

    /// Every record: the snapshot, then live changes.
    fn all() -> Filter {
        Filter {
            snapshot: true,
            ..Filter::default()
        }
    }

    /// An SSE stream on `state`.
    fn streamer(state: &AppState, filter: Filter) -> Streamer {
        let open = OpenStream::new(state.global_arc(), StreamKind::Sse);
        Streamer::start(state, filter, OnLag::Reset, open)
    }

    /// What a stream queued before the live changes (snapshot or replay),
    /// and its position.
    async fn queued(streamer: &mut Streamer) -> (Vec<Arc<Change>>, u64) {
        let mut out = Vec::new();
        loop {
            match streamer.next_queued().await {
                Step::Item(Item::Record(change)) => out.push(change),
                Step::Item(_) => panic!("only records expected"),
                Step::Done => return (out, streamer.covered),
                Step::Gone => panic!("the runtime is there"),
            }
        }
    }

    /// The final state of every record, as principal -> seq.
    fn truth(state: &AppState) -> HashMap<String, u64> {
        let mut truth = HashMap::new();
        state.store().records().for_each(|_, p, presence| {
            truth.insert(p.to_owned(), presence.seq);
        });
        truth
    }

    /// A snapshot taken while another thread keeps changing the store
    /// leaves nothing out: laying every later change over it gives the
    /// final state, it is in ascending `seq`, and no record in it is newer
    /// than its position.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_is_the_state_at_its_position_despite_concurrent_writes() {
        let state = crate::http::test_state(1 << 20);
        let store = state.store_arc();
        for i in 0..20_000u64 {
            store
                .records()
                .apply(0, &update(format!("p{i}"), i), Millis(0));
        }
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer = {
            let (store, writing) = (Arc::clone(&store), Arc::clone(&writing));
            std::thread::spawn(move || {
                // Updates to old principals, and some new ones; bounded.
                for n in 20_000u64..120_000 {
                    let p = if n % 10 == 0 { n } else { (n * 7919) % 20_000 };
                    store
                        .records()
                        .apply(0, &update(format!("p{p}"), n), Millis(0));
                }
                writing.store(false, Ordering::Relaxed);
            })
        };
        let mut taken = Vec::new();
        while taken.len() < 3 || writing.load(Ordering::Relaxed) && taken.len() < 20 {
            let (records, at) = queued(&mut streamer(&state, all())).await;
            assert!(records.iter().all(|c| c.seq() <= at));
            assert!(records.windows(2).all(|w| w[0].seq() < w[1].seq()));
            taken.push((records, at));
        }
        writer.join().unwrap();
        let truth = truth(&state);
        for (records, at) in taken {
            let mut view: HashMap<String, u64> = records
                .iter()
                .map(|c| (c.presence().unwrap().principal.to_string(), c.seq()))
                .collect();
            for c in store.changes().since(at).unwrap() {
                view.insert(c.presence().unwrap().principal.to_string(), c.seq());
            }
            assert_eq!(view, truth, "snapshot at {at}");
        }
    }

    /// What one consumer received, checked against the contract: in
    /// ascending `seq` since the last reset, each at most once, and, laid
    /// over each other in order, exactly the final state.
    #[derive(Default)]
    struct Consumer {
        view: HashMap<String, u64>,
        last: u64,
        resets: usize,
    }

    impl Consumer {
        fn take(&mut self, item: Item) {
            match item {
                Item::Record(change) => {
                    let seq = change.seq();
                    assert!(seq > self.last, "{seq} after {}", self.last);
                    self.last = seq;
                    self.view
                        .insert(change.presence().unwrap().principal.to_string(), seq);
                }
                Item::Reset(_) => {
                    self.view.clear();
                    self.last = 0;
                    self.resets += 1;
                }
                Item::Lagged { .. } => panic!("SSE streams reset instead"),
            }
        }

        /// Reads until the change with `seq` (the last one made) arrived.
        async fn read_to(&mut self, streamer: &mut Streamer, seq: u64) {
            while self.last < seq {
                self.take(streamer.next().await.expect("open"));
            }
        }
    }

    /// A replay of a long history read part of the way holds no lock:
    /// commits made meanwhile (on this very thread, which a held lock would
    /// deadlock) go through, and the consumer then gets the rest of the
    /// replay and those commits live, each once, in order.
    #[tokio::test]
    async fn a_commit_goes_through_while_a_replay_is_half_read() {
        let state = crate::http::test_state(100_000);
        let records = state.store().records();
        for n in 0..5_000u64 {
            records.apply(0, &update(format!("p{}", n % 700), n), Millis(0));
        }
        let filter = Filter {
            last_event_id: Some(0),
            ..Filter::default()
        };
        let mut s = streamer(&state, filter);
        let mut consumer = Consumer::default();
        for _ in 0..(PAGE + 10) {
            consumer.take(s.next().await.unwrap());
        }
        // (Fewer than the 64 live changes a consumer may fall behind.)
        for n in 5_000..5_050u64 {
            records.apply(0, &update(format!("p{}", n % 1000), n), Millis(0));
        }
        let last = state.store().changes().last_seq();
        assert_eq!(last, 5_050, "every one a change");
        consumer.read_to(&mut s, last).await;
        assert_eq!(consumer.resets, 0);
        assert_eq!(consumer.view, truth(&state));
    }

    /// The same for a snapshot: records sent already, records not sent
    /// yet and new records change while it is half sent; the consumer
    /// still ends with exactly the final state, never seeing a `seq` twice
    /// or out of order.
    #[tokio::test]
    async fn a_commit_goes_through_while_a_snapshot_is_half_sent() {
        let state = crate::http::test_state(100_000);
        let records = state.store().records();
        for n in 0..5_000u64 {
            records.apply(0, &update(format!("p{n}"), n), Millis(0));
        }
        let mut s = streamer(&state, all());
        let mut consumer = Consumer::default();
        for _ in 0..2_000 {
            consumer.take(s.next().await.unwrap());
        }
        // Early ones (sent), late ones (not yet), and new ones.
        for n in 0..60u64 {
            let p = match n % 3 {
                0 => n,
                1 => 4_000 + n,
                _ => 10_000 + n,
            };
            records.apply(0, &update(format!("p{p}"), 10_001 + n), Millis(0));
        }
        let last = state.store().changes().last_seq();
        assert_eq!(last, 5_060, "every one a change");
        consumer.read_to(&mut s, last).await;
        assert_eq!(consumer.resets, 0);
        assert_eq!(consumer.view, truth(&state));
    }

    /// A snapshot sent slowly while changes keep coming, many more than
    /// the 64 the fan-out keeps for a consumer: the stream takes them from
    /// the history after the snapshot instead of lagging and starting over.
    #[tokio::test]
    async fn a_long_snapshot_under_steady_writes_does_not_start_over() {
        let state = crate::http::test_state(100_000);
        let records = state.store().records();
        for n in 0..5_000u64 {
            records.apply(0, &update(format!("p{n}"), n), Millis(0));
        }
        let mut s = streamer(&state, all());
        let mut consumer = Consumer::default();
        for round in 0..50u64 {
            for _ in 0..100 {
                consumer.take(s.next().await.unwrap());
            }
            for n in 0..20 {
                let p = (round * 20 + n) * 7 % 6_000;
                records.apply(0, &update(format!("p{p}"), 10_001 + round), Millis(0));
            }
        }
        consumer
            .read_to(&mut s, state.store().changes().last_seq())
            .await;
        assert_eq!(consumer.resets, 0);
        assert_eq!(consumer.view, truth(&state));
    }

    /// A principal filter reads those principals only, as of the opening.
    #[tokio::test]
    async fn a_principal_filter_snapshot_is_looked_up_directly() {
        let state = crate::http::test_state(16);
        let records = state.store().records();
        for (n, p) in ["a", "b", "c"].into_iter().enumerate() {
            records.apply(0, &update(p.into(), n as u64), Millis(0));
        }
        let filter = Filter::parse(
            Some("principal=c&principal=a&principal=a"),
            &HeaderMap::new(),
        );
        let mut s = streamer(&state, filter.unwrap());
        records.apply(0, &update("a".into(), 10), Millis(0));
        let (snapshot, at) = queued(&mut s).await;
        assert_eq!(at, 3);
        let seqs: Vec<u64> = snapshot.iter().map(|c| c.seq()).collect();
        assert_eq!(seqs, [1, 3], "a as it was at the opening, then c");
        let Some(Item::Record(live)) = s.next().await else {
            panic!("the change after the opening");
        };
        assert_eq!((live.seq(), &*live.presence().unwrap().principal), (4, "a"));
    }

    /// A stream whose consumer takes a snapshot or replay one item now and
    /// then (each `next` given one poll, and dropped when not ready, as the
    /// keep-alive does) while webhooks keep coming: whatever the
    /// interleaving, it ends with exactly the final state, in order.
    #[test]
    fn any_interleaving_of_commits_and_reads_keeps_the_contract() {
        use futures_util::FutureExt;
        use proptest::prelude::*;
        let ops = proptest::collection::vec((any::<bool>(), 0..40u64), 1..300);
        let start = (any::<bool>(), 0..200u64);
        proptest!(ProptestConfig::with_cases(64), |(ops in ops, start in start)| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let state = crate::http::test_state(150);
                let records = state.store().records();
                for n in 0..100u64 {
                    records.apply(0, &update(format!("p{}", n % 31), n), Millis(0));
                }
                let (resume, after) = start;
                let filter = Filter {
                    last_event_id: resume.then_some(after.min(100)),
                    ..all()
                };
                let mut s = streamer(&state, filter);
                // A consumer resuming holds what it was sent up to there.
                let mut consumer = Consumer::default();
                if let Some(after) = s.filter.last_event_id {
                    for c in state.store().changes().between(0, after).unwrap() {
                        consumer.take(Item::Record(c));
                    }
                }
                for (n, (write, principal)) in ops.into_iter().enumerate() {
                    if write {
                        let u = update(format!("p{principal}"), 1_000 + n as u64);
                        records.apply(0, &u, Millis(0));
                    } else if let Some(item) = s.next().now_or_never() {
                        consumer.take(item.expect("open"));
                    }
                    tokio::task::yield_now().await;
                }
                consumer.read_to(&mut s, state.store().changes().last_seq()).await;
                assert_eq!(consumer.view, truth(&state));
            });
        });
    }

    /// A live change whose predecessors never arrived (a shared backend
    /// lost them) resets the stream instead of skipping them silently.
    #[tokio::test]
    async fn a_gap_in_the_live_changes_resets_the_stream() {
        let state = crate::http::test_state(16);
        let store = state.store();
        store.records().apply(0, &update("a".into(), 0), Millis(0));
        let filter = Filter {
            snapshot: false,
            ..Filter::default()
        };
        let open = OpenStream::new(state.global_arc(), StreamKind::Sse);
        let mut streamer = Streamer::start(&state, filter, OnLag::Reset, open);
        store.records().apply(0, &update("b".into(), 1), Millis(0));
        let Some(Item::Record(next)) = streamer.next().await else {
            panic!("the next change");
        };
        assert_eq!(next.seq(), 2);
        let mut far = next.presence().unwrap().clone();
        far.seq = 9;
        far.principal = "c".into();
        assert!(
            store
                .changes()
                .commit_replicated(crate::presence::Event::Presence(far))
        );
        assert!(matches!(
            streamer.next().await,
            Some(Item::Reset(Reset::History))
        ));
        let mut snapshot = Vec::new();
        for _ in 0..2 {
            let Some(Item::Record(change)) = streamer.next().await else {
                panic!("the snapshot");
            };
            snapshot.push(change.seq());
        }
        assert_eq!(snapshot, vec![1, 2]);
    }

    #[test]
    fn decimal_digits() {
        for n in [0, 7, 10, 1_234_567_890, u64::MAX] {
            assert_eq!(itoa_u64(n, &mut [0u8; 20]), n.to_string());
        }
    }
}
