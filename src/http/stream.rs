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

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::IntoResponse;
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use super::AppState;
use super::problem::Problem;
use crate::presence::{Change, PresenceRecord};
use crate::telemetry::{OpenStream, StreamKind};

/// Keep-alive comment interval.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a consumer asked for.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    sources: Vec<String>,
    principals: Vec<String>,
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
                "snapshot" => {
                    f.snapshot = match &*value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad("snapshot must be true or false")),
                    }
                }
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

    fn matches(&self, record: &PresenceRecord) -> bool {
        (self.sources.is_empty() || self.sources.iter().any(|s| **s == *record.source))
            && (self.principals.is_empty()
                || self.principals.iter().any(|p| **p == *record.principal))
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

/// The matching records as they were at one position of the change log,
/// in ascending `seq`, and that position.
///
/// The store is read page by page while webhooks keep changing it, so the
/// pages alone would mix older and newer states: a record changed after
/// the read began could show its new `seq` while another change before it
/// is in no page yet, and a consumer resuming from the highest id it saw
/// would skip that one. Every change committed during the read is therefore
/// laid over the pages (from the history), which makes the result exactly
/// the state at the returned position, and no record in it is newer.
pub(crate) fn snapshot(state: &AppState, filter: &Filter) -> (Vec<Arc<Change>>, u64) {
    let changes = state.store().changes();
    // A read during which more changes arrive than the history keeps is
    // read again; after that, the unmerged read and the position it began
    // at (live changes after it still follow).
    let mut attempts = 3;
    loop {
        let from = changes.last_seq();
        let mut records = read_store(state, filter);
        let during = match changes.since(from) {
            Ok(during) => during,
            Err(_gap) if attempts > 1 => {
                attempts -= 1;
                continue;
            }
            Err(_gap) => {
                records.sort_by_key(|c| c.record.seq);
                return (records, from);
            }
        };
        let at = during.last().map_or(from, |c| c.record.seq);
        // (The pages were read before this position was fixed, so none of
        // them is newer than it.)
        let mut latest: HashMap<(Arc<str>, Arc<str>), Arc<Change>> = HashMap::new();
        for change in during.into_iter().filter(|c| filter.matches(&c.record)) {
            let key = (
                Arc::clone(&change.record.source),
                Arc::clone(&change.record.principal),
            );
            latest.insert(key, change);
        }
        if !latest.is_empty() {
            for record in &mut records {
                let key = (
                    Arc::clone(&record.record.source),
                    Arc::clone(&record.record.principal),
                );
                if let Some(newer) = latest.remove(&key) {
                    *record = newer;
                }
            }
            // Principals first seen during the read.
            records.extend(latest.into_values());
        }
        // With a shared backend a replica's own write is in its records
        // before the feed brings it to the change log: such a record is
        // newer than the position, and the live changes after it deliver
        // it (sending it here too would send it twice).
        records.retain(|c| c.record.seq <= at);
        records.sort_by_key(|c| c.record.seq);
        return (records, at);
    }
}

/// Every matching record, page by page.
fn read_store(state: &AppState, filter: &Filter) -> Vec<Arc<Change>> {
    let sources: Vec<usize> = state
        .sources()
        .sorted_indexes()
        .iter()
        .copied()
        .filter(|&i| {
            filter.sources.is_empty()
                || state
                    .sources()
                    .by_index(i)
                    .is_some_and(|s| filter.sources.iter().any(|f| **f == *s.id))
        })
        .collect();
    let mut records = Vec::new();
    let mut cursor = None;
    loop {
        let page = state.store().page(&sources, cursor, 1000, |_| true);
        records.extend(
            page.items
                .into_iter()
                .filter(|r| filter.matches(r))
                .map(|r| Arc::new(Change::new(r))),
        );
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    records
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

/// One consumer's position: replay or snapshot first, then the live
/// fan-out, filtered.
pub(crate) struct Streamer {
    state: AppState,
    filter: Filter,
    rx: broadcast::Receiver<Arc<Change>>,
    pending: VecDeque<Item>,
    /// Live changes up to this `seq` are already covered by what was
    /// queued (the replay, the state a snapshot shows, or live changes
    /// received, whether they matched or not).
    covered: u64,
    on_lag: OnLag,
    open: OpenStream,
}

impl Streamer {
    /// A stream positioned as `filter` asks: after `last_event_id` (replay,
    /// or reset and snapshot when the history no longer reaches back), at
    /// the snapshot, or at the live end.
    pub(crate) fn start(state: &AppState, filter: Filter, on_lag: OnLag, open: OpenStream) -> Self {
        // Subscribe first: nothing committed after this point can be missed.
        let rx = state.store().changes().subscribe();
        let mut streamer = Streamer {
            state: state.clone(),
            filter,
            rx,
            pending: VecDeque::new(),
            covered: 0,
            on_lag,
            open,
        };
        streamer.position();
        streamer
    }

    fn position(&mut self) {
        match self.filter.last_event_id {
            Some(after) => match self.state.store().changes().since(after) {
                Ok(records) => {
                    // The history and the fan-out share one order:
                    // everything replayed is exactly what the fan-out must
                    // not repeat.
                    self.covered = records.last().map_or(after, |c| c.record.seq).max(after);
                    let filter = &self.filter;
                    self.pending.extend(
                        records
                            .into_iter()
                            .filter(|c| filter.matches(&c.record))
                            .map(Item::Record),
                    );
                }
                Err(_gap) => self.reset(Reset::History),
            },
            None if self.filter.snapshot => self.queue_snapshot(),
            None => self.covered = self.state.store().changes().last_seq(),
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
        self.pending.clear();
        self.filter.last_event_id = Some(after);
        self.position();
    }

    /// Queues the snapshot; live changes after its position follow.
    fn queue_snapshot(&mut self) {
        let (records, at) = snapshot(&self.state, &self.filter);
        self.covered = at;
        self.pending.extend(records.into_iter().map(Item::Record));
    }

    fn reset(&mut self, reason: Reset) {
        self.pending.push_back(Item::Reset(reason));
        self.queue_snapshot();
    }

    /// The next item, or `None` at shutdown.
    pub(crate) async fn next(&mut self) -> Option<Item> {
        loop {
            if self.state.store().changes().is_closed() {
                return None;
            }
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            match self.rx.recv().await {
                // Changes before this one never reached this replica (a
                // shared backend that lost them): what the consumer holds
                // can no longer be brought up to date change by change.
                Ok(change) if change.record.seq > self.covered + 1 && self.covered > 0 => {
                    self.reset(Reset::History);
                }
                Ok(change) if change.record.seq > self.covered => {
                    self.covered = change.record.seq;
                    if self.filter.matches(&change.record) {
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
}

/// The Server-Sent Events text of an item: one allocation, the record's
/// JSON shared with every other consumer of the change.
fn event(item: &Item) -> Bytes {
    match item {
        Item::Record(change) => {
            let json = change.json();
            let seq = change.record.seq;
            let mut frame = String::with_capacity(json.len() + 48);
            frame.push_str("event: presence\nid: ");
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

/// `GET /v1/stream`.
pub async fn sse(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> axum::response::Response {
    let filter = match Filter::parse(query.as_deref(), &headers) {
        Ok(f) => f,
        Err(problem) => return problem.into_response(),
    };
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

    /// A snapshot taken while another thread keeps changing the store is
    /// exactly the state at its position: laying every later change over
    /// it gives the final state, and no record in it is newer.
    #[test]
    fn a_snapshot_is_the_state_at_its_position_despite_concurrent_writes() {
        let state = crate::http::test_state(1 << 20);
        let store = state.store();
        for i in 0..20_000u64 {
            store
                .records()
                .apply(0, &update(format!("p{i}"), i), Millis(0));
        }
        let writing = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // Updates to old principals, and some new ones; bounded.
                for n in 20_000u64..120_000 {
                    let p = if n % 10 == 0 { n } else { (n * 7919) % 20_000 };
                    store
                        .records()
                        .apply(0, &update(format!("p{p}"), n), Millis(0));
                }
                writing.store(false, std::sync::atomic::Ordering::Relaxed);
            });
            let mut rounds = 0;
            while rounds < 3 || writing.load(std::sync::atomic::Ordering::Relaxed) && rounds < 20 {
                rounds += 1;
                let (records, at) = snapshot(&state, &Filter::default());
                assert!(records.iter().all(|c| c.record.seq <= at));
                assert!(
                    records
                        .windows(2)
                        .all(|w| w[0].record.seq < w[1].record.seq)
                );
                let mut view: HashMap<String, u64> = records
                    .iter()
                    .map(|c| (c.record.principal.to_string(), c.record.seq))
                    .collect();
                // Lay everything after the position over it.
                let later = store.changes().since(at).unwrap();
                for c in &later {
                    view.insert(c.record.principal.to_string(), c.record.seq);
                }
                let (now, _) = snapshot(&state, &Filter::default());
                let truth: HashMap<String, u64> = now
                    .iter()
                    .map(|c| (c.record.principal.to_string(), c.record.seq))
                    .collect();
                // Changes may land between `since` and the second read:
                // compare only up to the second read's position.
                let settled = later.last().map_or(at, |c| c.record.seq);
                for (principal, seq) in &truth {
                    if *seq <= settled {
                        assert_eq!(view.get(principal), Some(seq), "{principal}");
                    }
                }
            }
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
        assert_eq!(next.record.seq, 2);
        let mut far = next.record.clone();
        far.seq = 9;
        far.principal = "c".into();
        assert!(store.changes().commit_replicated(far));
        assert!(matches!(
            streamer.next().await,
            Some(Item::Reset(Reset::History))
        ));
        let mut snapshot = Vec::new();
        for _ in 0..2 {
            let Some(Item::Record(change)) = streamer.next().await else {
                panic!("the snapshot");
            };
            snapshot.push(change.record.seq);
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
