//! The runtime view of the configured sources: how each is verified and
//! parsed, and its counters.
//!
//! Built once from the config; request handlers look a source up by id and
//! then only read from it and bump atomics, so no lock is taken per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::{SourceConfig, SourceKind};
use crate::presence::{ApplyOutcome, Millis, PresenceUpdate, StoreError};
use crate::providers::fields::FieldsError;
use crate::providers::graph_rich::RichKey;
use crate::providers::mitel::MitelParser;
use crate::providers::netsapiens::{Model, NetSapiensParser};
use crate::providers::standard::StandardParser;
use crate::providers::{Parser, Proof};
use crate::telemetry::{LatencyHistogram, LogEvery};
use crate::upstream::graph as graph_upstream;
use crate::upstream::manager::Board;
use crate::verify::client_state::ClientState;
use crate::verify::standard as standard_webhooks;
use crate::verify::{CorrelationIds, HmacHexVerifier, StandardVerifier, Verified, VerifyError};

/// Mitel's signature header.
pub const MITEL_SIGNATURE: &str = "x-notify-signature";

/// NetSapiens' subscription id header.
pub const NETSAPIENS_CORRELATION: &str = "x-correlation-id";

/// Why a webhook request was rejected; one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    MethodNotAllowed,
    BodyTooLarge,
    IpNotAllowed,
    SignatureMissing,
    SignatureMalformed,
    SignatureMismatch,
    SignatureExpired,
    BadPayload,
    Overloaded,
    /// The store could not keep the write (journal failing, Redis down).
    StoreUnavailable,
    /// A new principal while the store holds `store.max_records` records.
    StoreFull,
}

impl Rejection {
    pub const ALL: [Rejection; 11] = [
        Rejection::MethodNotAllowed,
        Rejection::BodyTooLarge,
        Rejection::IpNotAllowed,
        Rejection::SignatureMissing,
        Rejection::SignatureMalformed,
        Rejection::SignatureMismatch,
        Rejection::SignatureExpired,
        Rejection::BadPayload,
        Rejection::Overloaded,
        Rejection::StoreUnavailable,
        Rejection::StoreFull,
    ];

    /// Stable label for metrics and `/v1/sources`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::IpNotAllowed => "ip_not_allowed",
            Rejection::SignatureMissing => "signature_missing",
            Rejection::SignatureMalformed => "signature_malformed",
            Rejection::SignatureMismatch => "signature_mismatch",
            Rejection::SignatureExpired => "signature_expired",
            Rejection::BadPayload => "bad_payload",
            Rejection::Overloaded => "overloaded",
            Rejection::StoreUnavailable => "store_unavailable",
            Rejection::StoreFull => "store_full",
        }
    }

    /// The problem `type` suffix (kebab-case) of this rejection.
    pub const fn slug(self) -> &'static str {
        match self {
            Rejection::MethodNotAllowed => "method-not-allowed",
            Rejection::BodyTooLarge => "body-too-large",
            Rejection::IpNotAllowed => "ip-not-allowed",
            Rejection::SignatureMissing => "signature-missing",
            Rejection::SignatureMalformed => "signature-malformed",
            Rejection::SignatureMismatch => "signature-mismatch",
            Rejection::SignatureExpired => "signature-expired",
            Rejection::BadPayload => "bad-payload",
            Rejection::Overloaded => "overloaded",
            Rejection::StoreUnavailable => "store-unavailable",
            Rejection::StoreFull => "store-full",
        }
    }

    /// The verification failure this rejection stands for, if it is one.
    pub const fn verify_error(self) -> Option<VerifyError> {
        match self {
            Rejection::SignatureMissing => Some(VerifyError::Missing),
            Rejection::SignatureMalformed => Some(VerifyError::Malformed),
            Rejection::SignatureMismatch => Some(VerifyError::Mismatch),
            Rejection::SignatureExpired => Some(VerifyError::Expired),
            _ => None,
        }
    }
}

impl From<&StoreError> for Rejection {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Rejection::StoreUnavailable,
            StoreError::Full { .. } => Rejection::StoreFull,
        }
    }
}

impl From<VerifyError> for Rejection {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Missing => Rejection::SignatureMissing,
            VerifyError::Malformed => Rejection::SignatureMalformed,
            VerifyError::Mismatch => Rejection::SignatureMismatch,
            VerifyError::Expired => Rejection::SignatureExpired,
        }
    }
}

/// Counters of one source. Events are counted once each: `received` equals
/// `accepted + duplicate + stale + ignored`, and `changed` is the part of
/// `accepted` that produced a new `seq`.
#[derive(Debug)]
pub struct SourceStats {
    pub requests_accepted: AtomicU64,
    pub received: AtomicU64,
    pub accepted: AtomicU64,
    pub changed: AtomicU64,
    pub duplicate: AtomicU64,
    pub stale: AtomicU64,
    /// Events whose provider timestamp was not trusted (far future, or
    /// before 2000): applied with the receive time instead.
    pub clock_skew: AtomicU64,
    /// Paces the log line about untrusted timestamps.
    clock_skew_logged: LogEvery,
    pub ignored: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// `accepted`, per minute of the last hour (the dashboard's sparkline).
    pub accepted_per_minute: MinuteRing,
    /// Receive time of the last authentic event, epoch ms; 0 for never.
    last_event_at: AtomicI64,
    pub latency: LatencyHistogram,
}

/// How often, at most, a source logs that a provider timestamp was not
/// trusted (a provider with a wrong clock sends every event so).
const CLOCK_SKEW_LOG_INTERVAL_MS: i64 = 60_000;

/// Request latency buckets, seconds: 50 µs to 1 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

impl Default for SourceStats {
    fn default() -> Self {
        SourceStats {
            requests_accepted: AtomicU64::new(0),
            received: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            changed: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            clock_skew: AtomicU64::new(0),
            clock_skew_logged: LogEvery::new(CLOCK_SKEW_LOG_INTERVAL_MS),
            ignored: AtomicU64::new(0),
            rejected: Default::default(),
            accepted_per_minute: MinuteRing::default(),
            last_event_at: AtomicI64::new(0),
            latency: LatencyHistogram::new(&LATENCY_BUCKETS),
        }
    }
}

impl SourceStats {
    /// Counts a rejected request.
    pub fn reject(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Rejections for one reason so far.
    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why as usize].load(Ordering::Relaxed)
    }

    /// Counts the outcome of one applied event, received at `at`.
    pub fn applied(&self, outcome: ApplyOutcome, at: Millis) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            ApplyOutcome::Changed(_) => {
                self.changed.fetch_add(1, Ordering::Relaxed);
                self.accepted_per_minute.bump(at);
                &self.accepted
            }
            ApplyOutcome::Refreshed => {
                self.accepted_per_minute.bump(at);
                &self.accepted
            }
            ApplyOutcome::Duplicate => &self.duplicate,
            ApplyOutcome::Stale => &self.stale,
            // Not an applied event: the store answers it as an error, which
            // the caller counts as a rejection.
            ApplyOutcome::Full => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts events that were authentic but not about presence.
    pub fn ignored(&self, count: u32) {
        self.received.fetch_add(u64::from(count), Ordering::Relaxed);
        self.ignored.fetch_add(u64::from(count), Ordering::Relaxed);
    }

    /// Notes that an authentic request arrived at `at`.
    pub fn touch(&self, at: Millis) {
        self.requests_accepted.fetch_add(1, Ordering::Relaxed);
        self.last_event_at.fetch_max(at.0, Ordering::Relaxed);
    }

    /// When the last authentic request arrived, if ever.
    pub fn last_event_at(&self) -> Option<Millis> {
        match self.last_event_at.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Millis(ms)),
        }
    }
}

/// Minutes a [`MinuteRing`] covers: the last hour.
pub const RING_MINUTES: usize = 60;

/// Events per minute over the last hour, bumped on the webhook hot path
/// without a lock.
///
/// One slot per minute of the hour (`minute % 60`), each an atomic holding
/// the minute it counts in its high half and the count in its low half. A
/// bump in a minute the slot already counts is one `fetch_add`; the first
/// bump of a new minute replaces whatever the slot held (an hour ago, or
/// longer) with a compare-and-swap. A reader keeps only the slots whose
/// minute falls in the hour it asks for, so idle minutes, gaps and hours
/// without any event read as 0 without anything having to clear them.
///
/// Time is always passed in ([`MinuteRing::bump`], [`MinuteRing::last_hour`]),
/// so tests choose the clock. A bump that races with the start of the next
/// minute may be counted in either minute.
#[derive(Debug)]
pub struct MinuteRing {
    slots: [AtomicU64; RING_MINUTES],
}

impl Default for MinuteRing {
    fn default() -> Self {
        MinuteRing {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl MinuteRing {
    /// The high half of a slot: which minute its count belongs to.
    const STAMP: u64 = !0 << 32;

    fn minute(at: Millis) -> i64 {
        at.0.div_euclid(60_000)
    }

    fn slot(&self, minute: i64) -> &AtomicU64 {
        // rem_euclid: in 0..60, whatever the sign.
        &self.slots[minute.rem_euclid(RING_MINUTES as i64) as usize]
    }

    /// The stamp of a minute: its number modulo 2^32 (8,000 years of
    /// minutes; only equality within one hour matters).
    fn stamp(minute: i64) -> u64 {
        (minute as u64) << 32
    }

    /// Counts one event at `at`.
    pub fn bump(&self, at: Millis) {
        let minute = Self::minute(at);
        let slot = self.slot(minute);
        let stamp = Self::stamp(minute);
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            if current & Self::STAMP == stamp {
                // Four billion events in one minute would carry into the
                // stamp; a source does not get near that.
                slot.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match slot.compare_exchange_weak(
                current,
                stamp | 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                // Another event started the minute first (or a spurious
                // failure): look again.
                Err(now) => current = now,
            }
        }
    }

    /// The counts of the hour up to `now`, a minute each, oldest first; the
    /// last is the minute `now` is in.
    pub fn last_hour(&self, now: Millis) -> Vec<u32> {
        let this = Self::minute(now);
        (this - (RING_MINUTES as i64 - 1)..=this)
            .map(|minute| {
                let value = self.slot(minute).load(Ordering::Relaxed);
                match value & Self::STAMP == Self::stamp(minute) {
                    true => value as u32,
                    false => 0,
                }
            })
            .collect()
    }
}

/// How a source proves authenticity.
#[derive(Debug)]
pub enum Verifier {
    /// Hex HMAC-SHA256 of the body in the named header.
    HmacHex {
        header: &'static str,
        verifier: HmacHexVerifier,
    },
    /// A subscription id in the named header; each id knows its model.
    Correlation {
        header: &'static str,
        ids: Arc<CorrelationIds<Model>>,
    },
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature`.
    Standard(StandardVerifier),
    /// Microsoft Graph: the `clientState` in every item of the body (the
    /// webhook checks it while it reads the batch, see `http::graph`).
    Graph(Box<GraphReceiver>),
    /// The source receives over a socket, not by webhook.
    NoWebhooks,
}

impl Verifier {
    /// The header that carries the proof.
    pub fn header(&self) -> &'static str {
        match self {
            Verifier::HmacHex { header, .. } | Verifier::Correlation { header, .. } => header,
            Verifier::Standard(_) => standard_webhooks::SIGNATURE_HEADER,
            Verifier::Graph(_) => "clientState",
            Verifier::NoWebhooks => "",
        }
    }

    /// Verifies a request's headers and body. Returns the verified body and
    /// what the proof established: for correlation ids the model of the
    /// subscription the id names, for Standard Webhooks the message id.
    pub fn verify<'a>(
        &self,
        headers: &'a HeaderMap,
        body: &'a [u8],
    ) -> Result<(Verified<'a>, Proof<'a>), VerifyError> {
        let header = |name: &str| headers.get(name).map(|v| v.as_bytes());
        match self {
            Verifier::HmacHex {
                verifier,
                header: name,
            } => Ok((verifier.verify(header(name), body)?, Proof::default())),
            Verifier::Correlation { ids, header: name } => {
                let (verified, model) = ids.verify(header(name), body)?;
                let proof = Proof {
                    model: Some(model),
                    ..Proof::default()
                };
                Ok((verified, proof))
            }
            Verifier::Standard(verifier) => {
                let presented = standard_webhooks::Headers {
                    id: header(standard_webhooks::ID_HEADER),
                    timestamp: header(standard_webhooks::TIMESTAMP_HEADER),
                    signature: header(standard_webhooks::SIGNATURE_HEADER),
                };
                let message = verifier.verify(presented, body, unix_now())?;
                let proof = Proof {
                    event_id: Some(message.id),
                    ..Proof::default()
                };
                Ok((message.body, proof))
            }
            // The proof is inside the body: `http::graph` checks it.
            Verifier::Graph(_) | Verifier::NoWebhooks => Err(VerifyError::Missing),
        }
    }
}

/// What a Graph source's webhook needs: the client state to check, the
/// key of rich notifications, and where to hand reads and lifecycle events.
#[derive(Debug)]
pub struct GraphReceiver {
    pub client_state: ClientState,
    pub rich: Option<Arc<RichKey>>,
    pub inbox: graph_upstream::Inbox,
    /// The source's status words (as its parser has them).
    pub statuses: crate::providers::StatusMap,
}

/// The gateway's clock in Unix seconds (Standard Webhooks timestamps).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One configured source, ready to receive.
#[derive(Debug)]
pub struct Source {
    pub id: Arc<str>,
    /// The source's index in the store.
    pub index: usize,
    pub kind: SourceKind,
    pub verifier: Verifier,
    pub parser: Parser,
    pub allow_ips: Vec<IpNet>,
    pub stats: SourceStats,
    /// State of the subscriptions the gateway manages for this source.
    pub subscriptions: Arc<Board>,
    /// Which replica manages the source (Redis backend, managed sources).
    pub lease: std::sync::OnceLock<tokio::sync::watch::Receiver<crate::cluster::lease::LeaseState>>,
    /// Graph: the receiving ends of the webhook's inbox, until the
    /// source's background tasks take them.
    pub graph_outbox: parking_lot::Mutex<Option<graph_upstream::Outbox>>,
    /// Graph: the state of its resyncs (`None` for other kinds).
    pub graph_resync: graph_upstream::ResyncStatus,
}

impl Source {
    /// Builds the runtime source from its validated config.
    pub fn new(index: usize, config: &SourceConfig) -> Result<Self, FieldsError> {
        let mut graph_outbox = None;
        let (verifier, parser) = match config.kind {
            SourceKind::Mitel => (
                Verifier::HmacHex {
                    header: MITEL_SIGNATURE,
                    verifier: HmacHexVerifier::new(config.signing_keys.iter().map(|k| k.expose())),
                },
                Parser::Mitel(MitelParser::new(
                    &config.fields,
                    &config.call_fields,
                    config.status_map(),
                )?),
            ),
            SourceKind::Ucwa => (Verifier::NoWebhooks, Parser::Ucwa(config.status_map())),
            SourceKind::MitelWs => (
                Verifier::NoWebhooks,
                Parser::Mitel(MitelParser::new(
                    &config.fields,
                    &config.call_fields,
                    config.status_map(),
                )?),
            ),
            SourceKind::Netsapiens => {
                let ids = CorrelationIds::new();
                for (id, model) in &config.correlation_ids {
                    ids.insert(id.expose(), *model);
                }
                (
                    Verifier::Correlation {
                        header: NETSAPIENS_CORRELATION,
                        ids: Arc::new(ids),
                    },
                    Parser::NetSapiens {
                        parser: NetSapiensParser::new(
                            &config.fields,
                            &config.call_fields,
                            config.status_map(),
                            config.timezone.clone(),
                        )?,
                        model: config.model,
                    },
                )
            }
            SourceKind::Graph => {
                let graph = config
                    .managed
                    .as_ref()
                    .and_then(|m| m.graph.as_ref())
                    .ok_or(FieldsError::Empty {
                        field: "subscription",
                    })?;
                let (inbox, outbox) = graph_upstream::Inbox::new();
                graph_outbox = Some(outbox);
                (
                    Verifier::Graph(Box::new(GraphReceiver {
                        client_state: ClientState::new(graph.client_state.expose()),
                        rich: graph.rich.clone(),
                        inbox,
                        statuses: config.status_map(),
                    })),
                    Parser::Graph(config.status_map()),
                )
            }
            SourceKind::Standard => {
                let settings = config.standard.as_ref().ok_or(FieldsError::Empty {
                    field: "signing_keys",
                })?;
                (
                    Verifier::Standard(StandardVerifier::new(
                        settings.keys.iter().map(|k| k.expose()),
                        settings.tolerance_secs,
                    )),
                    Parser::Standard(StandardParser::new(
                        &config.fields,
                        &settings.event_types,
                        config.status_map(),
                    )?),
                )
            }
        };
        Ok(Source {
            id: Arc::from(config.id.as_str()),
            index,
            kind: config.kind,
            verifier,
            parser,
            allow_ips: config.allow_ips.clone(),
            stats: SourceStats::default(),
            subscriptions: Arc::new(Board::default()),
            lease: std::sync::OnceLock::new(),
            graph_outbox: parking_lot::Mutex::new(graph_outbox),
            graph_resync: graph_upstream::ResyncStatus::default(),
        })
    }
}

/// All sources, by id and in listing order.
#[derive(Debug)]
pub struct Sources {
    list: Vec<Source>,
    by_id: HashMap<Arc<str>, usize>,
    /// Indexes sorted by id: the stable order of listings.
    sorted: Vec<usize>,
}

impl Sources {
    /// Builds every configured source.
    pub fn new(configs: &[SourceConfig]) -> Result<Self, FieldsError> {
        let list = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Source::new(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let by_id = list.iter().map(|s| (Arc::clone(&s.id), s.index)).collect();
        let mut sorted: Vec<usize> = (0..list.len()).collect();
        sorted.sort_by(|&a, &b| list[a].id.cmp(&list[b].id));
        Ok(Sources {
            list,
            by_id,
            sorted,
        })
    }

    /// The source with this id.
    pub fn get(&self, id: &str) -> Option<&Source> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }

    /// The source with this store index.
    pub fn by_index(&self, index: usize) -> Option<&Source> {
        self.list.get(index)
    }

    /// Every source, sorted by id.
    pub fn iter_sorted(&self) -> impl Iterator<Item = &Source> {
        self.sorted.iter().map(|&i| &self.list[i])
    }

    /// Store indexes of every source, sorted by id.
    pub fn sorted_indexes(&self) -> &[usize] {
        &self.sorted
    }

    /// The ids, in config order (store index order).
    pub fn ids(&self) -> Vec<Arc<str>> {
        self.list.iter().map(|s| Arc::clone(&s.id)).collect()
    }
}

/// The earliest provider timestamp trusted, 2000-01-01T00:00:00Z in epoch
/// ms: an earlier one is a clock that was never set, or a bug (DESIGN §2).
pub const EARLIEST_TRUSTED_MS: i64 = 946_684_800_000;

/// The longest principal id kept, in bytes (UTF-8). Provider ids are UUIDs,
/// `user@domain` and SIP addresses (at most 254 bytes as e-mail addresses).
pub const MAX_PRINCIPAL_BYTES: usize = 256;

/// The longest status word kept (the provider's raw status, and the
/// activity), in bytes. Provider words are short (`DoNotDisturb`,
/// `UrgentInterruptionsOnly`).
pub const MAX_STATUS_WORD_BYTES: usize = 64;

/// The longest status text (note, status message) kept, in bytes: room for
/// a few hundred characters in any script (Teams allows 280 characters,
/// which may take up to 1,120 bytes).
pub const MAX_STATUS_TEXT_BYTES: usize = 4096;

/// The longest call id kept, in bytes.
pub const MAX_CALL_ID_BYTES: usize = 256;

/// A field of an event longer than the gateway keeps (the event is
/// answered 400 and nothing of the notification is applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes long; the gateway keeps at most {max}")]
pub struct TooLong {
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

/// Why [`apply`] did not keep a notification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A field is longer than the gateway keeps: the notification is bad
    /// (400), and nothing of it was applied.
    #[error(transparent)]
    TooLong(#[from] TooLong),
    /// The store did not keep it (503; see [`apply`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks every field of a notification against the documented maximum
/// lengths, before anything of it is applied: a few comparisons, no
/// allocation.
pub fn check_lengths(parsed: &crate::providers::Parsed<'_>) -> Result<(), TooLong> {
    fn at_most(field: &'static str, text: &str, max: usize) -> Result<(), TooLong> {
        match text.len() {
            len if len > max => Err(TooLong { field, len, max }),
            _ => Ok(()),
        }
    }
    for u in &parsed.updates {
        at_most("principal", &u.principal, MAX_PRINCIPAL_BYTES)?;
        if let Some(word) = &u.raw_status {
            at_most("status", word, MAX_STATUS_WORD_BYTES)?;
        }
        if let Some(word) = &u.activity {
            at_most("activity", word, MAX_STATUS_WORD_BYTES)?;
        }
        if let Some(text) = &u.status_text {
            at_most("status text", text, MAX_STATUS_TEXT_BYTES)?;
        }
    }
    for call in &parsed.calls {
        at_most("principal", &call.principal, MAX_PRINCIPAL_BYTES)?;
        at_most("call id", &call.call_id, MAX_CALL_ID_BYTES)?;
    }
    Ok(())
}

/// Whether a provider's timestamp may order a principal's events: from 2000
/// on, and not more than `max_skew_ms` ahead of the gateway's clock. One
/// event from a clock set decades ahead would otherwise make every later
/// real event of that principal stale (DESIGN §2); one from a clock never
/// set would be stale against every real record.
fn trusted_time(at: Millis, received_at: Millis, max_skew_ms: i64) -> bool {
    at.0 >= EARLIEST_TRUSTED_MS && at.0 <= received_at.0.saturating_add(max_skew_ms)
}

/// Applies what a provider parsed from one authentic notification (a
/// webhook, or a message of a socket transport) to the store, and counts it.
/// Every transport applies through here, so the limits on what one event
/// may hold ([`check_lengths`]) and on its timestamp hold for all of them.
///
/// Fails with [`ApplyError::TooLong`] before anything is applied; with
/// [`ApplyError::Store`] when the store cannot keep writes or is full: then
/// nothing of it was applied unless the store failed part-way (a retry of
/// the whole notification then finds the applied part a duplicate or a
/// refresh).
pub async fn apply(
    store: &crate::presence::Store,
    source: &Source,
    parsed: &crate::providers::Parsed<'_>,
) -> Result<(), ApplyError> {
    check_lengths(parsed)?;
    store.check_writable()?;
    let received_at = Millis::now();
    source.stats.touch(received_at);
    for update in &parsed.updates {
        let trusted;
        let update = match update.observed_at {
            Some(at) if !trusted_time(at, received_at, store.max_future_skew_ms()) => {
                source.stats.clock_skew.fetch_add(1, Ordering::Relaxed);
                if source.stats.clock_skew_logged.ready(received_at.0) {
                    tracing::info!(
                        source = %source.id,
                        principal = %update.principal,
                        observed_at = at.0,
                        clock_skew_total = source.stats.clock_skew.load(Ordering::Relaxed),
                        "provider timestamp not trusted (before 2000, or more than \
                         store.max_future_skew_secs ahead); using the receive time \
                         (logged at most once a minute per source)"
                    );
                }
                trusted = PresenceUpdate {
                    observed_at: None,
                    ..update.clone()
                };
                &trusted
            }
            _ => update,
        };
        let outcome = store.apply(source.index, update, received_at).await?;
        source.stats.applied(outcome, received_at);
        tracing::debug!(source = %source.id, principal = %update.principal, ?outcome, "event applied");
    }
    for call in &parsed.calls {
        let outcome = store.apply_call(source.index, call, received_at).await?;
        source.stats.applied(outcome, received_at);
        tracing::debug!(source = %source.id, principal = %call.principal, ?outcome, "call event applied");
    }
    if parsed.ignored > 0 {
        source.stats.ignored(parsed.ignored);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::presence::store::StoreLimits;
    use crate::presence::{Availability, CallUpdate, Store};
    use crate::providers::Parsed;

    const NOW: Millis = Millis(1_764_000_000_000);

    #[test]
    fn timestamps_from_2000_up_to_the_skew_ahead_are_trusted() {
        let skew = 300_000;
        for (at, trusted) in [
            (EARLIEST_TRUSTED_MS - 1, false),
            (EARLIEST_TRUSTED_MS, true),
            (0, false),
            (-1, false),
            (i64::MIN, false),
            (NOW.0, true),
            (NOW.0 + skew, true),
            (NOW.0 + skew + 1, false),
            (i64::MAX, false),
        ] {
            assert_eq!(trusted_time(Millis(at), NOW, skew), trusted, "{at}");
        }
        assert_eq!(
            Millis(EARLIEST_TRUSTED_MS).to_string(),
            "2000-01-01T00:00:00.000Z"
        );
    }

    fn update(principal: &str) -> PresenceUpdate<'_> {
        PresenceUpdate {
            principal: Cow::Borrowed(principal),
            availability: Availability::Busy,
            activity: Some(Cow::Borrowed("in_a_call")),
            status_text: Some(Cow::Borrowed("On a call")),
            raw_status: Some(Cow::Borrowed("Busy")),
            observed_at: Some(NOW),
            event_id: None,
        }
    }

    fn call<'a>(principal: &'a str, id: &'a str) -> CallUpdate<'a> {
        CallUpdate {
            principal: Cow::Borrowed(principal),
            call_id: Cow::Borrowed(id),
            state: Some(crate::presence::CallState::Connected),
            observed_at: None,
        }
    }

    #[test]
    fn every_field_may_be_as_long_as_documented_and_no_longer() {
        let long: &'static str = "x".repeat(MAX_STATUS_TEXT_BYTES + 1).leak();
        type Edit = fn(&mut PresenceUpdate<'static>, &'static str);
        let cases: [(&str, usize, Edit); 4] = [
            ("principal", MAX_PRINCIPAL_BYTES, |u, t| {
                u.principal = Cow::Borrowed(t)
            }),
            ("status", MAX_STATUS_WORD_BYTES, |u, t| {
                u.raw_status = Some(Cow::Borrowed(t))
            }),
            ("activity", MAX_STATUS_WORD_BYTES, |u, t| {
                u.activity = Some(Cow::Borrowed(t))
            }),
            ("status text", MAX_STATUS_TEXT_BYTES, |u, t| {
                u.status_text = Some(Cow::Borrowed(t))
            }),
        ];
        for (field, max, edit) in cases {
            let mut fits = update("p");
            edit(&mut fits, &long[..max]);
            let mut over = update("p");
            edit(&mut over, &long[..max + 1]);
            // The long one second: a notification is checked whole.
            let parsed = Parsed {
                updates: vec![fits.clone(), over],
                ..Parsed::default()
            };
            assert_eq!(
                check_lengths(&parsed),
                Err(TooLong {
                    field,
                    len: max + 1,
                    max
                }),
                "{field}"
            );
            let parsed = Parsed {
                updates: vec![fits],
                ..Parsed::default()
            };
            assert_eq!(check_lengths(&parsed), Ok(()), "{field}");
        }
        // Multi-byte text is measured in bytes.
        let text = "é".repeat(MAX_PRINCIPAL_BYTES / 2 + 1);
        let parsed = Parsed {
            updates: vec![update(&text)],
            ..Parsed::default()
        };
        assert!(check_lengths(&parsed).is_err());
        let calls = |principal: &'static str, id: &'static str| Parsed {
            calls: vec![call(principal, id)],
            ..Parsed::default()
        };
        assert_eq!(
            check_lengths(&calls(&long[..MAX_PRINCIPAL_BYTES], "c")),
            Ok(())
        );
        assert!(check_lengths(&calls(&long[..MAX_PRINCIPAL_BYTES + 1], "c")).is_err());
        assert!(check_lengths(&calls("p", &long[..MAX_CALL_ID_BYTES + 1])).is_err());
    }

    fn source_and_store(max_records: usize) -> (Source, Store) {
        let text = "[[sources]]\nid = \"m\"\nkind = \"mitel\"\nsigning_keys = [\"k\"]\n";
        let config =
            crate::Config::parse_with_env(text, std::path::Path::new("t.toml"), Vec::new(), |_| {
                None
            })
            .expect("test config");
        let source = Source::new(0, &config.sources[0]).expect("source");
        let limits = StoreLimits {
            history: 16,
            dedup_window_ms: 60_000,
            dedup_capacity: 16,
            stream_buffer: 16,
            max_future_skew_ms: 300_000,
        };
        let store = Store::new(&[Arc::clone(&source.id)], limits).with_max_records(max_records);
        (source, store)
    }

    /// A time `minutes` whole minutes and `secs` seconds after a minute
    /// boundary (any fixed instant would do; none depends on today).
    fn at(minutes: i64, secs: i64) -> Millis {
        Millis(1_700_000_040_000 + minutes * 60_000 + secs * 1000)
    }

    #[test]
    fn the_minute_ring_counts_each_minute_and_rolls_over_at_the_boundary() {
        let ring = MinuteRing::default();
        assert_eq!(ring.last_hour(at(0, 0)), vec![0; RING_MINUTES]);
        ring.bump(at(0, 0));
        ring.bump(at(0, 59));
        ring.bump(at(1, 0));
        let hour = ring.last_hour(at(1, 30));
        assert_eq!(hour.len(), RING_MINUTES);
        assert_eq!(&hour[RING_MINUTES - 2..], &[2, 1]);
        assert_eq!(hour.iter().sum::<u32>(), 3);
        // Read later in the same minute, or from a minute on: the counts
        // move left as the hour moves on.
        assert_eq!(ring.last_hour(at(1, 59)), hour);
        let later = ring.last_hour(at(2, 0));
        assert_eq!(&later[RING_MINUTES - 3..], &[2, 1, 0]);
    }

    #[test]
    fn the_minute_ring_reads_gaps_of_several_minutes_as_zero() {
        let ring = MinuteRing::default();
        ring.bump(at(10, 5));
        for _ in 0..4 {
            ring.bump(at(15, 1));
        }
        let hour = ring.last_hour(at(15, 2));
        assert_eq!(&hour[RING_MINUTES - 6..], &[1, 0, 0, 0, 0, 4]);
        assert_eq!(hour.iter().sum::<u32>(), 5);
    }

    #[test]
    fn the_minute_ring_forgets_what_is_more_than_an_hour_old() {
        let ring = MinuteRing::default();
        ring.bump(at(0, 0));
        ring.bump(at(59, 0));
        // The minute of `at(0, 0)` is the oldest of the hour up to minute 59.
        let hour = ring.last_hour(at(59, 0));
        assert_eq!((hour[0], hour[RING_MINUTES - 1]), (1, 1));
        // One minute on it has left the hour, though its slot still holds it.
        let hour = ring.last_hour(at(60, 0));
        assert_eq!(hour.iter().sum::<u32>(), 1);
        assert_eq!(hour[RING_MINUTES - 2], 1);
        // Idle for hours: nothing left, and the first event of a minute whose
        // slot held an old count starts that slot over.
        assert_eq!(ring.last_hour(at(300, 0)), vec![0; RING_MINUTES]);
        ring.bump(at(300, 10));
        let hour = ring.last_hour(at(300, 20));
        assert_eq!(hour.iter().sum::<u32>(), 1);
        assert_eq!(hour[RING_MINUTES - 1], 1);
    }

    #[test]
    fn the_minute_ring_works_before_1970_too() {
        let ring = MinuteRing::default();
        ring.bump(Millis(-1));
        ring.bump(Millis(0));
        let hour = ring.last_hour(Millis(0));
        assert_eq!(&hour[RING_MINUTES - 2..], &[1, 1]);
    }

    #[tokio::test]
    async fn accepted_events_are_counted_in_the_minute_they_arrive() {
        let (source, store) = source_and_store(0);
        let one = |u: PresenceUpdate<'static>| Parsed {
            updates: vec![u],
            ..Parsed::default()
        };
        let mut dup = update("p");
        dup.event_id = Some(Cow::Borrowed("e-1"));
        apply(&store, &source, &one(dup.clone())).await.unwrap();
        // A duplicate is not accepted; a refresh is.
        apply(&store, &source, &one(dup)).await.unwrap();
        apply(&store, &source, &one(update("p"))).await.unwrap();
        let accepted = source.stats.accepted.load(Ordering::Relaxed);
        assert_eq!(accepted, 2);
        let hour = source.stats.accepted_per_minute.last_hour(Millis::now());
        // The test may have crossed a minute boundary: the hour holds both.
        assert_eq!(hour.iter().map(|&n| u64::from(n)).sum::<u64>(), accepted);
    }

    #[tokio::test]
    async fn a_notification_with_a_field_too_long_applies_nothing() {
        let (source, store) = source_and_store(0);
        let long = "p".repeat(MAX_PRINCIPAL_BYTES + 1);
        let parsed = Parsed {
            updates: vec![update("fine"), update(&long)],
            ..Parsed::default()
        };
        let err = apply(&store, &source, &parsed).await.unwrap_err();
        assert!(matches!(
            err,
            ApplyError::TooLong(TooLong {
                field: "principal",
                ..
            })
        ));
        assert!(store.is_empty());
        assert_eq!(store.changes().last_seq(), 0);
        assert_eq!(source.stats.received.load(Ordering::Relaxed), 0);
        assert_eq!(source.stats.last_event_at(), None);
    }

    #[tokio::test]
    async fn untrusted_times_are_applied_with_the_receive_time_and_counted() {
        let (source, store) = source_and_store(0);
        for (i, at) in [0, -1, EARLIEST_TRUSTED_MS - 1, i64::MAX]
            .into_iter()
            .enumerate()
        {
            let principal = format!("p{i}");
            let mut u = update(&principal);
            u.observed_at = Some(Millis(at));
            let parsed = Parsed {
                updates: vec![u],
                ..Parsed::default()
            };
            apply(&store, &source, &parsed).await.unwrap();
            let record = store.get(0, &principal).unwrap();
            assert_eq!(record.observed_at, record.received_at, "{at}");
        }
        assert_eq!(source.stats.clock_skew.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_full_store_refuses_new_principals_and_updates_known_ones() {
        let (source, store) = source_and_store(1);
        let one = |u: PresenceUpdate<'static>| Parsed {
            updates: vec![u],
            ..Parsed::default()
        };
        apply(&store, &source, &one(update("known"))).await.unwrap();
        let err = apply(&store, &source, &one(update("new")))
            .await
            .unwrap_err();
        assert_eq!(err, ApplyError::Store(StoreError::Full { max: 1 }));
        assert_eq!(
            Rejection::from(&StoreError::Full { max: 1 }),
            Rejection::StoreFull
        );
        assert_eq!(StoreError::Full { max: 1 }.retry_after_secs(), 60);
        let calls = Parsed {
            calls: vec![call("new", "c-1")],
            ..Parsed::default()
        };
        assert!(apply(&store, &source, &calls).await.is_err());
        assert_eq!(store.refused_new(), 2);
        let mut away = update("known");
        away.availability = Availability::Away;
        apply(&store, &source, &one(away)).await.unwrap();
        assert_eq!(
            store.get(0, "known").unwrap().availability,
            Availability::Away
        );
        assert_eq!((store.record_count(), store.get(0, "new")), (1, None));
    }
}
