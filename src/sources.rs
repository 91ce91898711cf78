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
use crate::presence::{ApplyOutcome, Millis, PresenceUpdate};
use crate::providers::Parser;
use crate::providers::fields::FieldsError;
use crate::providers::mitel::MitelParser;
use crate::providers::netsapiens::{Model, NetSapiensParser};
use crate::telemetry::LatencyHistogram;
use crate::upstream::manager::Board;
use crate::verify::{CorrelationIds, HmacHexVerifier, Verified, VerifyError};

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
}

impl Rejection {
    pub const ALL: [Rejection; 10] = [
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
    pub ignored: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// Receive time of the last authentic event, epoch ms; 0 for never.
    last_event_at: AtomicI64,
    pub latency: LatencyHistogram,
}

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
            ignored: AtomicU64::new(0),
            rejected: Default::default(),
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

    /// Counts the outcome of one applied event.
    pub fn applied(&self, outcome: ApplyOutcome) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            ApplyOutcome::Changed(_) => {
                self.changed.fetch_add(1, Ordering::Relaxed);
                &self.accepted
            }
            ApplyOutcome::Refreshed => &self.accepted,
            ApplyOutcome::Duplicate => &self.duplicate,
            ApplyOutcome::Stale => &self.stale,
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
    /// The source receives over a socket, not by webhook.
    NoWebhooks,
}

impl Verifier {
    /// The header that carries the proof.
    pub fn header(&self) -> &'static str {
        match self {
            Verifier::HmacHex { header, .. } | Verifier::Correlation { header, .. } => header,
            Verifier::NoWebhooks => "",
        }
    }

    /// Verifies a request's headers and body. Returns the verified body and,
    /// for correlation ids, the model of the subscription the id names.
    pub fn verify<'a>(
        &self,
        headers: &HeaderMap,
        body: &'a [u8],
    ) -> Result<(Verified<'a>, Option<Model>), VerifyError> {
        let presented = headers.get(self.header()).map(|v| v.as_bytes());
        match self {
            Verifier::HmacHex { verifier, .. } => Ok((verifier.verify(presented, body)?, None)),
            Verifier::Correlation { ids, .. } => {
                let (verified, model) = ids.verify(presented, body)?;
                Ok((verified, Some(model)))
            }
            Verifier::NoWebhooks => Err(VerifyError::Missing),
        }
    }
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
}

impl Source {
    /// Builds the runtime source from its validated config.
    pub fn new(index: usize, config: &SourceConfig) -> Result<Self, FieldsError> {
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

/// Whether a provider's timestamp may order a principal's events: not more
/// than `max_skew_ms` ahead of the gateway's clock (one event from a clock
/// set decades ahead would otherwise make every later real event of that
/// principal stale, DESIGN §2). (DESIGN's lower bound, timestamps before
/// 2000, is not applied yet: the test suites still stamp events near 1970.)
fn trusted_time(at: Millis, received_at: Millis, max_skew_ms: i64) -> bool {
    at.0 <= received_at.0.saturating_add(max_skew_ms)
}

/// Applies what a provider parsed from one authentic notification (a
/// webhook, or a message of a socket transport) to the store, and counts it.
///
/// Fails when the store cannot keep writes: then nothing of it was applied
/// unless the store failed part-way (a retry of the whole notification then
/// finds the applied part a duplicate or a refresh).
pub async fn apply(
    store: &crate::presence::Store,
    source: &Source,
    parsed: &crate::providers::Parsed<'_>,
) -> Result<(), crate::presence::StoreError> {
    store.check_writable()?;
    let received_at = Millis::now();
    source.stats.touch(received_at);
    for update in &parsed.updates {
        let trusted;
        let update = match update.observed_at {
            Some(at) if !trusted_time(at, received_at, store.max_future_skew_ms()) => {
                source.stats.clock_skew.fetch_add(1, Ordering::Relaxed);
                tracing::info!(source = %source.id, principal = %update.principal, observed_at = at.0, "provider timestamp not trusted; using the receive time");
                trusted = PresenceUpdate {
                    observed_at: None,
                    ..update.clone()
                };
                &trusted
            }
            _ => update,
        };
        let outcome = store.apply(source.index, update, received_at).await?;
        source.stats.applied(outcome);
        tracing::debug!(source = %source.id, principal = %update.principal, ?outcome, "event applied");
    }
    for call in &parsed.calls {
        let outcome = store.apply_call(source.index, call, received_at).await?;
        source.stats.applied(outcome);
        tracing::debug!(source = %source.id, principal = %call.principal, ?outcome, "call event applied");
    }
    if parsed.ignored > 0 {
        source.stats.ignored(parsed.ignored);
    }
    Ok(())
}
