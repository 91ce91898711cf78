//! The change log: gateway-wide sequence numbers, bounded history and fan-out.
//!
//! Assigning a `seq`, appending to the history and handing the change to the
//! fan-out happen under one short mutex, so the history and every subscriber
//! see changes in exactly `seq` order. The mutex is never held across an
//! `.await`.
//!
//! Fan-out: a relay task, started with the first subscriber, takes changes
//! from an unbounded queue in order and broadcasts them. Waking thousands of
//! waiting streams is the relay's work, not the webhook request's: a commit
//! costs one queue push whatever the number of consumers. (Measured with
//! 10 000 open streams: 4–11 ms per webhook when the request woke them
//! itself.) The queue holds only what the relay has not yet passed on.
//!
//! Lagging receivers: `tokio::sync::broadcast` never blocks the sender; a
//! receiver that falls more than the channel's capacity behind gets
//! `RecvError::Lagged` and must recover from the history (or a snapshot).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

use super::model::{PersonRecord, PresenceRecord};

/// Sequence numbers, history and subscribers of applied changes.
pub struct ChangeLog {
    inner: Mutex<LogInner>,
    /// Set by [`ChangeLog::close`].
    closed: AtomicBool,
}

struct LogInner {
    /// The last `seq` handed out; 0 before the first change.
    last_seq: u64,
    history: VecDeque<Arc<Change>>,
    capacity: usize,
    /// The fan-out; `None` once closed, which ends every subscriber.
    tx: Option<broadcast::Sender<Arc<Change>>>,
    /// The relay's queue, from the first subscription until closed.
    relay: Option<mpsc::UnboundedSender<Arc<Change>>>,
}

impl LogInner {
    /// Keeps a change in the history and hands it to the relay.
    fn keep_and_send(&mut self, change: Arc<Change>) {
        if self.capacity > 0 {
            if self.history.len() == self.capacity {
                self.history.pop_front();
            }
            self.history.push_back(Arc::clone(&change));
        }
        if let Some(relay) = &self.relay {
            // Fails only once the relay is gone (closed): nobody listens.
            let _ = relay.send(change);
        }
    }
}

/// What a change carries: a presence record, or a person's derived record
/// (DESIGN §9). Both are numbered from the one gateway-wide `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Presence(PresenceRecord),
    Person(Arc<PersonRecord>),
}

impl Event {
    pub fn seq(&self) -> u64 {
        match self {
            Event::Presence(r) => r.seq,
            Event::Person(p) => p.seq,
        }
    }

    /// The stream event name (`presence` or `person`).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Presence(_) => "presence",
            Event::Person(_) => "person",
        }
    }
}

/// A change as consumers receive it, with its JSON text made once, by the
/// first consumer that needs it, and shared by all the others (a change
/// fanned out to thousands of streams is serialized once, not per stream).
#[derive(Debug)]
pub struct Change {
    pub event: Event,
    json: OnceLock<Box<str>>,
}

impl Change {
    pub fn new(record: PresenceRecord) -> Self {
        Self::of(Event::Presence(record))
    }

    pub fn of(event: Event) -> Self {
        Change {
            event,
            json: OnceLock::new(),
        }
    }

    pub fn seq(&self) -> u64 {
        self.event.seq()
    }

    /// The presence record, when this is a presence change.
    pub fn presence(&self) -> Option<&PresenceRecord> {
        match &self.event {
            Event::Presence(r) => Some(r),
            Event::Person(_) => None,
        }
    }

    /// The person record, when this is a person change.
    pub fn person(&self) -> Option<&PersonRecord> {
        match &self.event {
            Event::Person(p) => Some(p),
            Event::Presence(_) => None,
        }
    }

    /// The record's JSON text.
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            // Records are strings, numbers and enums: they always serialize.
            match &self.event {
                Event::Presence(r) => serde_json::to_string(r),
                Event::Person(p) => serde_json::to_string(&**p),
            }
            .unwrap_or_default()
            .into_boxed_str()
        })
    }
}

/// Most changes copied out of the history under one hold of the lock (see
/// [`ChangeLog::since`]).
pub const PAGE: usize = 1024;

/// The requested position is older than the history keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryGap;

impl ChangeLog {
    /// A log keeping the last `history` changes for replay, whose
    /// subscribers may fall `fanout` changes behind before they lag.
    pub fn new(history: usize, fanout: usize) -> Self {
        let (tx, _) = broadcast::channel(fanout.max(1));
        ChangeLog {
            inner: Mutex::new(LogInner {
                last_seq: 0,
                history: VecDeque::with_capacity(history.min(65_536)),
                capacity: history,
                tx: Some(tx),
                relay: None,
            }),
            closed: AtomicBool::new(false),
        }
    }

    /// Assigns the next `seq`, builds the record with it, keeps and publishes
    /// it. Returns the `seq`.
    pub fn commit(&self, make: impl FnOnce(u64) -> PresenceRecord) -> u64 {
        let mut inner = self.inner.lock();
        inner.last_seq += 1;
        let seq = inner.last_seq;
        let change = Arc::new(Change::new(make(seq)));
        inner.keep_and_send(change);
        seq
    }

    /// [`ChangeLog::commit`] for any kind of change.
    pub fn commit_event(&self, make: impl FnOnce(u64) -> Event) -> u64 {
        let mut inner = self.inner.lock();
        inner.last_seq += 1;
        let seq = inner.last_seq;
        let change = Arc::new(Change::of(make(seq)));
        inner.keep_and_send(change);
        seq
    }

    /// Starts the log where a persisted one ended: `last_seq` and the kept
    /// changes, oldest first (at start-up, before any commit).
    pub fn restore(&self, last_seq: u64, history: impl IntoIterator<Item = Event>) {
        let mut inner = self.inner.lock();
        inner.history.clear();
        for event in history {
            inner.keep_and_send(Arc::new(Change::of(event)));
        }
        let newest = inner.history.back().map_or(0, |c| c.seq());
        inner.last_seq = last_seq.max(newest);
    }

    /// Publishes a change whose `seq` was assigned elsewhere (another
    /// replica, through the shared backend), in `seq` order: a `seq` at or
    /// below the last one is ignored (already published); one beyond the
    /// next starts the history afresh, since the changes in between are not
    /// known here (a resume from before them gets a reset). Returns whether
    /// it was published.
    pub fn commit_replicated(&self, event: Event) -> bool {
        let mut inner = self.inner.lock();
        let seq = event.seq();
        if seq <= inner.last_seq {
            return false;
        }
        if seq != inner.last_seq + 1 {
            inner.history.clear();
        }
        inner.last_seq = seq;
        inner.keep_and_send(Arc::new(Change::of(event)));
        true
    }

    /// The last `seq` handed out (0 when nothing was applied yet).
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().last_seq
    }

    /// A receiver of every change committed after this call (closed at
    /// once when the log is closed). The first call starts the relay, so it
    /// must run inside a Tokio runtime.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        let mut inner = self.inner.lock();
        let Some(tx) = inner.tx.clone() else {
            return broadcast::channel(1).1;
        };
        let receiver = tx.subscribe();
        if inner.relay.is_none() {
            let (relay, mut queue) = mpsc::unbounded_channel::<Arc<Change>>();
            inner.relay = Some(relay);
            tokio::spawn(async move {
                while let Some(change) = queue.recv().await {
                    // No receivers is not an error worth reporting.
                    let _ = tx.send(change);
                }
                // Closed: dropping the last sender ends every receiver
                // after what it was sent.
            });
        }
        receiver
    }

    /// Ends the fan-out (at shutdown): every subscriber receives what was
    /// sent before and then `Closed`. Changes are still numbered and kept.
    /// Streams learn of shutdown this way instead of each watching a signal
    /// on every wake-up.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut inner = self.inner.lock();
        inner.tx = None;
        inner.relay = None;
    }

    /// Whether [`ChangeLog::close`] was called (one atomic load).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Every kept change with `seq > after` up to the last one at the time
    /// of the call, in order, or [`HistoryGap`] when some of them are no
    /// longer kept or `after` is beyond the last `seq` (a position from
    /// before a restart).
    ///
    /// Copied [`PAGE`] changes at a time, each page under the lock on its
    /// own: a commit waits for at most one page, however long the history.
    /// (Copying a million changes in one hold stalled every webhook for
    /// 150–600 ms.) Changes that leave the history while it is read make
    /// the read a [`HistoryGap`], as if they had left before.
    pub fn since(&self, after: u64) -> Result<Vec<Arc<Change>>, HistoryGap> {
        self.between(after, u64::MAX)
    }

    /// [`ChangeLog::since`], only the changes with `seq <= until`.
    pub fn between(&self, after: u64, until: u64) -> Result<Vec<Arc<Change>>, HistoryGap> {
        let (mut out, last) = self.read(after, PAGE)?;
        let until = until.min(last);
        out.retain(|c| c.seq() <= until);
        while let Some(newest) = out.last().map(|c| c.seq())
            && newest < until
        {
            let (page, _) = self.read(newest, PAGE)?;
            if page.is_empty() {
                break;
            }
            out.extend(page.into_iter().take_while(|c| c.seq() <= until));
        }
        Ok(out)
    }

    /// Up to `limit` (at most [`PAGE`]) kept changes with `seq > after`, in
    /// order: one hold of the lock. Empty when `after` is the last `seq`;
    /// [`HistoryGap`] as for [`ChangeLog::since`].
    pub fn page(&self, after: u64, limit: usize) -> Result<Vec<Arc<Change>>, HistoryGap> {
        self.read(after, limit).map(|(page, _)| page)
    }

    /// [`ChangeLog::page`] and the last `seq` at the time.
    fn read(&self, after: u64, limit: usize) -> Result<(Vec<Arc<Change>>, u64), HistoryGap> {
        let inner = self.inner.lock();
        if after == inner.last_seq {
            return Ok((Vec::new(), inner.last_seq));
        }
        // A position this log never handed out (a previous run's): what
        // happened since is unknown.
        if after > inner.last_seq {
            return Err(HistoryGap);
        }
        // The history holds consecutive `seq`s (a gap in replicated changes
        // starts it afresh), so the position of `after + 1` is an offset.
        let oldest = inner
            .history
            .front()
            .map_or(inner.last_seq + 1, |c| c.seq());
        if after + 1 < oldest {
            return Err(HistoryGap);
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        let page = inner
            .history
            .range(skip.min(inner.history.len())..)
            .take(limit.clamp(1, PAGE))
            .cloned()
            .collect();
        Ok((page, inner.last_seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::model::{Availability, Millis};

    fn record(seq: u64) -> PresenceRecord {
        PresenceRecord {
            source: Arc::from("s"),
            principal: Arc::from("p"),
            availability: Availability::Busy,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Millis(0),
            received_at: Millis(0),
            seq,
        }
    }

    fn presence(seq: u64) -> Event {
        Event::Presence(record(seq))
    }

    #[test]
    fn history_replays_after_position_and_reports_gaps() {
        let log = ChangeLog::new(3, 16);
        for _ in 0..5 {
            log.commit(record);
        }
        assert_eq!(log.last_seq(), 5);
        let seqs = |v: Vec<Arc<Change>>| v.iter().map(|c| c.seq()).collect::<Vec<_>>();
        assert_eq!(seqs(log.since(2).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(log.since(4).unwrap()), vec![5]);
        assert!(log.since(5).unwrap().is_empty());
        assert_eq!(
            log.since(6).err(),
            Some(HistoryGap),
            "a previous run's position"
        );
        assert_eq!(log.since(1).err(), Some(HistoryGap));
    }

    /// A long history is copied a page at a time (each page one hold of
    /// the lock); a reader between pages holds nothing, so commits go on
    /// (here on the same thread), and a reader left behind by them finds
    /// out by a gap, never by a silent skip.
    #[test]
    fn long_histories_are_read_a_page_at_a_time() {
        let seqs = |v: Vec<Arc<Change>>| v.iter().map(|c| c.seq()).collect::<Vec<_>>();
        let log = ChangeLog::new(3 * PAGE, 16);
        for _ in 0..2 * PAGE + 5 {
            log.commit(record);
        }
        let first = log.page(0, usize::MAX).unwrap();
        assert_eq!(seqs(first), (1..=PAGE as u64).collect::<Vec<_>>());
        assert_eq!(log.page(7, 3).unwrap().len(), 3);
        let all = (1..=(2 * PAGE + 5) as u64).collect::<Vec<_>>();
        assert_eq!(seqs(log.since(0).unwrap()), all);
        assert_eq!(seqs(log.between(10, 2_000).unwrap()), all[10..2_000]);
        // Half-way through a replay, commits push its position out.
        let after = log.page(0, usize::MAX).unwrap().last().unwrap().seq();
        for _ in 0..PAGE - 5 {
            log.commit(record);
        }
        assert!(log.page(after, PAGE).is_ok(), "still kept");
        for _ in 0..=PAGE {
            log.commit(record);
        }
        assert_eq!(log.page(after, PAGE).err(), Some(HistoryGap));
    }

    #[test]
    fn replicated_changes_keep_order_and_a_gap_restarts_the_history() {
        let log = ChangeLog::new(10, 16);
        log.restore(3, [record(2), record(3)].map(Event::Presence));
        assert!(!log.commit_replicated(presence(3)), "already there");
        assert!(log.commit_replicated(presence(4)));
        let seqs = |v: Vec<Arc<Change>>| v.iter().map(|c| c.seq()).collect::<Vec<_>>();
        assert_eq!(seqs(log.since(1).unwrap()), vec![2, 3, 4]);
        // 5 and 6 never arrived: a resume from before them is a gap.
        assert!(log.commit_replicated(presence(7)));
        assert_eq!(log.last_seq(), 7);
        assert_eq!(log.since(4).err(), Some(HistoryGap));
        assert_eq!(seqs(log.since(6).unwrap()), vec![7]);
    }

    #[tokio::test]
    async fn closing_ends_subscribers_after_what_was_sent() {
        let log = ChangeLog::new(4, 16);
        let mut rx = log.subscribe();
        log.commit(record);
        log.close();
        log.commit(record);
        assert!(log.is_closed());
        assert_eq!(rx.recv().await.unwrap().seq(), 1);
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        let mut late = log.subscribe();
        assert!(late.recv().await.is_err());
        assert_eq!(log.since(0).unwrap().len(), 2, "still kept");
    }

    #[tokio::test]
    async fn subscribers_receive_changes_in_seq_order() {
        let log = ChangeLog::new(0, 16);
        let mut rx = log.subscribe();
        log.commit(record);
        log.commit(record);
        assert_eq!(rx.recv().await.unwrap().seq(), 1);
        let second = rx.recv().await.unwrap();
        assert_eq!(second.seq(), 2);
        let json: serde_json::Value = serde_json::from_str(second.json()).unwrap();
        assert_eq!(json["seq"], 2);
        assert!(std::ptr::eq(second.json(), second.json()), "made once");
    }
}
