//! The change log: gateway-wide sequence numbers, bounded history and fan-out.
//!
//! Assigning a `seq`, appending to the history and broadcasting happen under one
//! short mutex, so the history and every subscriber see changes in exactly
//! `seq` order. The mutex is never held across an `.await`.
//!
//! Lagging receivers: fan-out uses `tokio::sync::broadcast`, which never blocks
//! the sender; a receiver that falls more than the channel's capacity behind
//! gets `RecvError::Lagged` and must recover from the history (or a snapshot).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::model::PresenceRecord;

/// Sequence numbers, history and subscribers of applied changes.
pub struct ChangeLog {
    inner: Mutex<LogInner>,
    tx: broadcast::Sender<Arc<PresenceRecord>>,
}

struct LogInner {
    /// The last `seq` handed out; 0 before the first change.
    last_seq: u64,
    history: VecDeque<Arc<PresenceRecord>>,
    capacity: usize,
}

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
            }),
            tx,
        }
    }

    /// Assigns the next `seq`, builds the record with it, keeps and publishes
    /// it. Returns the `seq`.
    pub fn commit(&self, make: impl FnOnce(u64) -> PresenceRecord) -> u64 {
        let mut inner = self.inner.lock();
        inner.last_seq += 1;
        let seq = inner.last_seq;
        let record = Arc::new(make(seq));
        if inner.capacity > 0 {
            if inner.history.len() == inner.capacity {
                inner.history.pop_front();
            }
            inner.history.push_back(Arc::clone(&record));
        }
        // No receivers is not an error worth reporting: nobody is listening.
        let _ = self.tx.send(record);
        seq
    }

    /// The last `seq` handed out (0 when nothing was applied yet).
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().last_seq
    }

    /// A receiver of every change committed after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PresenceRecord>> {
        self.tx.subscribe()
    }

    /// Every kept change with `seq > after`, in order, or [`HistoryGap`] when
    /// some of them are no longer kept or `after` is beyond the last `seq`
    /// (a position from before a restart).
    pub fn since(&self, after: u64) -> Result<Vec<Arc<PresenceRecord>>, HistoryGap> {
        let inner = self.inner.lock();
        if after == inner.last_seq {
            return Ok(Vec::new());
        }
        // A position this log never handed out (a previous run's): what
        // happened since is unknown.
        if after > inner.last_seq {
            return Err(HistoryGap);
        }
        let oldest = inner.history.front().map_or(inner.last_seq + 1, |r| r.seq);
        if after + 1 < oldest {
            return Err(HistoryGap);
        }
        let skip = (after + 1 - oldest) as usize;
        Ok(inner.history.iter().skip(skip).cloned().collect())
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

    #[test]
    fn history_replays_after_position_and_reports_gaps() {
        let log = ChangeLog::new(3, 16);
        for _ in 0..5 {
            log.commit(record);
        }
        assert_eq!(log.last_seq(), 5);
        let seqs = |v: Vec<Arc<PresenceRecord>>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(log.since(2).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(log.since(4).unwrap()), vec![5]);
        assert!(log.since(5).unwrap().is_empty());
        assert_eq!(log.since(6), Err(HistoryGap), "a previous run's position");
        assert_eq!(log.since(1), Err(HistoryGap));
    }

    #[tokio::test]
    async fn subscribers_receive_changes_in_seq_order() {
        let log = ChangeLog::new(0, 16);
        let mut rx = log.subscribe();
        log.commit(record);
        log.commit(record);
        assert_eq!(rx.recv().await.unwrap().seq, 1);
        assert_eq!(rx.recv().await.unwrap().seq, 2);
    }
}
