//! Metrics and logs.
//!
//! Counters live as atomics next to what they count
//! ([`SourceStats`](crate::sources::SourceStats)); this
//! module only renders them in the Prometheus/OpenMetrics text format when
//! `/metrics` is scraped, through a `prometheus_client` collector. The hot
//! path therefore never touches a metrics registry or a label map.
//!
//! Scrapes get OpenMetrics, or the classic Prometheus text format (0.0.4)
//! when they prefer it ([`Format::negotiate`]); every metric has HELP text,
//! so both lint clean (`promtool check metrics` reads the classic one).

mod process;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::presence::{Availability, Store};
use crate::sources::{Rejection, Sources};

/// A latency histogram of atomics: observing is three relaxed additions,
/// where `prometheus_client`'s histogram takes a mutex shared by every
/// request of a source.
#[derive(Debug)]
pub struct LatencyHistogram {
    /// Upper bounds in nanoseconds; the last bucket (+Inf) has none.
    bounds_ns: Box<[u64]>,
    bounds_s: Box<[f64]>,
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Buckets with these upper bounds (seconds, ascending) and +Inf.
    pub fn new(bounds_s: &[f64]) -> Self {
        LatencyHistogram {
            bounds_ns: bounds_s.iter().map(|s| (s * 1e9) as u64).collect(),
            bounds_s: bounds_s.iter().copied().chain([f64::INFINITY]).collect(),
            buckets: (0..=bounds_s.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: std::time::Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds_ns.partition_point(|&b| b < ns);
        if let Some(b) = self.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds_s
            .iter()
            .zip(self.buckets.iter())
            .map(|(&le, n)| (le, load(n)))
            .collect();
        // Buckets are read one by one while requests go on: the count is
        // their sum, so the exposition stays consistent.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = load(&self.sum_ns) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Lets a repeated log line through at most once per interval, so that a
/// condition that repeats with every event (a provider's clock set wrong, a
/// full store) says so without flooding the log.
#[derive(Debug)]
pub struct LogEvery {
    interval_ms: i64,
    /// When a line last went through (epoch ms).
    last: std::sync::atomic::AtomicI64,
}

impl LogEvery {
    /// At most one line per `interval_ms`; the first always goes through.
    pub const fn new(interval_ms: i64) -> Self {
        LogEvery {
            interval_ms,
            last: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    /// Whether a line may be logged at `now_ms` (then the next one waits
    /// an interval).
    pub fn ready(&self, now_ms: i64) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= self.interval_ms
            && self
                .last
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Counters that belong to no source.
#[derive(Debug, Default)]
pub struct GlobalStats {
    /// Webhook requests for a source id that is not configured.
    pub unknown_source: AtomicU64,
    /// Consumer API requests without a valid bearer token.
    pub consumer_unauthorized: AtomicU64,
    /// Connections closed because the peer took no bytes for `write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Open client connections (WebSocket streams included).
    pub connections_open: AtomicU64,
    /// Connections refused because `server.max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Open streams, Server-Sent Events and WebSocket.
    pub streams: [AtomicU64; 2],
    /// Stream consumers that fell behind the fan-out (SSE reset, WebSocket
    /// closed), Server-Sent Events and WebSocket.
    pub streams_lagged: [AtomicU64; 2],
    /// Stream opens refused because their consumer opened too many with a
    /// snapshot or replay, Server-Sent Events and WebSocket.
    pub streams_refused: [AtomicU64; 2],
}

/// Index into [`GlobalStats::streams`] and [`GlobalStats::streams_lagged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Sse = 0,
    WebSocket = 1,
}

impl StreamKind {
    const ALL: [StreamKind; 2] = [StreamKind::Sse, StreamKind::WebSocket];

    fn label(self) -> &'static str {
        match self {
            StreamKind::Sse => "sse",
            StreamKind::WebSocket => "websocket",
        }
    }
}

/// Counts an open stream until dropped.
#[derive(Debug)]
pub struct OpenStream {
    global: Arc<GlobalStats>,
    kind: StreamKind,
}

impl OpenStream {
    pub fn new(global: Arc<GlobalStats>, kind: StreamKind) -> Self {
        global.streams[kind as usize].fetch_add(1, Ordering::Relaxed);
        OpenStream { global, kind }
    }

    /// Counts a fall behind the fan-out.
    pub fn lagged(&self) {
        self.global.streams_lagged[self.kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.global.streams[self.kind as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Renders every metric of the daemon.
pub struct Metrics {
    registry: Registry,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry reading the given state (and the process' figures) on
    /// every scrape.
    pub fn new(sources: Arc<Sources>, store: Arc<Store>, global: Arc<GlobalStats>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(GatewayCollector {
            sources,
            store,
            global,
        }));
        registry.register_collector(Box::new(process::ProcessCollector));
        Metrics { registry }
    }

    /// The text exposition in `format`.
    pub fn render(&self, format: Format) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => out,
            Format::Classic => to_classic(&out),
        })
    }
}

/// A text format of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, what Prometheus asks for first.
    OpenMetrics,
    /// The classic Prometheus text format, version 0.0.4.
    Classic,
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: the classic one when
    /// `text/plain` (version 0.0.4, or none given) is preferred, by quality,
    /// over `application/openmetrics-text`; OpenMetrics otherwise, also for
    /// no header and wildcards (what `/metrics` has always answered).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut classic, mut openmetrics) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let (mut q, mut version) = (1.0f32, None);
            for param in parts {
                let (key, value) = param.split_once('=').unwrap_or((param, ""));
                let value = value.trim().trim_matches('"');
                if key.trim().eq_ignore_ascii_case("q") {
                    q = value.parse().unwrap_or(0.0);
                } else if key.trim().eq_ignore_ascii_case("version") {
                    version = Some(value);
                }
            }
            if media.eq_ignore_ascii_case("text/plain") && matches!(version, None | Some("0.0.4")) {
                classic = classic.max(q);
            } else if media.eq_ignore_ascii_case("application/openmetrics-text") {
                openmetrics = openmetrics.max(q);
            }
        }
        if classic > 0.0 && classic > openmetrics {
            Format::Classic
        } else {
            Format::OpenMetrics
        }
    }
}

/// Rewrites the OpenMetrics text of this registry in the classic format:
/// a counter family is named with its `_total` suffix there (as its
/// samples are), `unknown` is `untyped`, and there are no `# UNIT` or
/// `# EOF` lines. (Exemplars and `_created` samples, which the classic
/// format lacks, are never written here.)
fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

struct GatewayCollector {
    sources: Arc<Sources>,
    store: Arc<Store>,
    global: Arc<GlobalStats>,
}

impl fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayCollector")
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl GatewayCollector {
    /// Managed subscriptions: state, expiry, the provider's counts and
    /// consecutive failures, labelled by source, kind and (fingerprinted) id.
    fn encode_subscriptions(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        type Value = fn(&crate::upstream::manager::SubscriptionView) -> Option<f64>;
        let gauges: [(&str, &str, Value); 5] = [
            (
                "presence_gateway_subscription_expiry_timestamp_seconds",
                "Unix time a managed subscription expires (0: unknown).",
                |v| Some(v.expires_at.map_or(0.0, |m| m.0 as f64 / 1000.0)),
            ),
            (
                "presence_gateway_subscription_posts",
                "Posts the provider reports for a managed subscription.",
                |v| v.posts_count.map(|c| c as f64),
            ),
            (
                "presence_gateway_subscription_errors",
                "Errors the provider reports for a managed subscription.",
                |v| v.error_count.map(|c| c as f64),
            ),
            (
                "presence_gateway_subscription_failures",
                "Consecutive failed calls for a managed subscription.",
                |v| Some(f64::from(v.failures)),
            ),
            (
                "presence_gateway_subscription_reconnects",
                "Times a socket or event channel was re-established.",
                |v| Some(v.reconnects as f64),
            ),
        ];
        let mut state = encoder.encode_descriptor(
            "presence_gateway_subscription_state",
            "1 for the state each managed subscription is in.",
            None,
            MetricType::Gauge,
        )?;
        for source in self.sources.iter_sorted() {
            for view in source.subscriptions.snapshot() {
                let word = view
                    .state
                    .split([':', ' '])
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let id = view.id.clone().unwrap_or_default();
                let labels = [
                    ("source", &*source.id),
                    ("kind", view.kind.as_str()),
                    ("subscription", id.as_str()),
                    ("state", word.as_str()),
                ];
                ConstGauge::new(1).encode(state.encode_family(&labels)?)?;
            }
        }
        // Several replicas (Redis backend): which one manages each source.
        let mut leases = encoder.encode_descriptor(
            "presence_gateway_lease_held",
            "1 when this replica holds the source's lease (manages its subscriptions).",
            None,
            MetricType::Gauge,
        )?;
        for source in self.sources.iter_sorted() {
            if let Some(lease) = source.lease.get() {
                let held = i64::from(lease.borrow().held_here);
                ConstGauge::new(held).encode(leases.encode_family(&[("source", &*source.id)])?)?;
            }
        }
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for source in self.sources.iter_sorted() {
                for view in source.subscriptions.snapshot() {
                    let Some(v) = value(&view) else { continue };
                    let id = view.id.clone().unwrap_or_default();
                    let labels = [
                        ("source", &*source.id),
                        ("kind", view.kind.as_str()),
                        ("subscription", id.as_str()),
                    ];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }

    /// One counter family with a `source` label and a second label.
    fn per_source_counter<'s>(
        &'s self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        label: &'static str,
        values: impl Fn(&'s crate::sources::Source) -> Vec<(&'static str, u64)>,
    ) -> fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for source in self.sources.iter_sorted() {
            for (value, count) in values(source) {
                let labels = [("source", &*source.id), (label, value)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.per_source_counter(
            &mut encoder,
            "presence_gateway_webhook_requests",
            "Webhook requests by source and outcome.",
            "outcome",
            |s| {
                let rejected = Rejection::ALL.iter().map(|&r| s.stats.rejected(r)).sum();
                vec![
                    ("accepted", load(&s.stats.requests_accepted)),
                    ("rejected", rejected),
                ]
            },
        )?;
        self.per_source_counter(
            &mut encoder,
            "presence_gateway_webhook_rejections",
            "Rejected webhook requests by source and reason.",
            "reason",
            |s| {
                Rejection::ALL
                    .iter()
                    .map(|&r| (r.as_str(), s.stats.rejected(r)))
                    .collect()
            },
        )?;
        self.per_source_counter(
            &mut encoder,
            "presence_gateway_verification_failures",
            "Webhook requests that failed verification, by source and reason.",
            "reason",
            |s| {
                Rejection::ALL
                    .iter()
                    .filter_map(|&r| r.verify_error().map(|e| (e.as_str(), s.stats.rejected(r))))
                    .collect()
            },
        )?;
        self.per_source_counter(
            &mut encoder,
            "presence_gateway_events",
            "Authentic events by source and what the store did with them.",
            "result",
            |s| {
                let st = &s.stats;
                let changed = load(&st.changed);
                vec![
                    ("changed", changed),
                    ("refreshed", load(&st.accepted).saturating_sub(changed)),
                    ("duplicate", load(&st.duplicate)),
                    ("stale", load(&st.stale)),
                    ("ignored", load(&st.ignored)),
                    ("clock_skew", load(&st.clock_skew)),
                ]
            },
        )?;

        let mut records = encoder.encode_descriptor(
            "presence_gateway_store_records",
            "Presence records held, by source and availability.",
            None,
            MetricType::Gauge,
        )?;
        for source in self.sources.iter_sorted() {
            let counts = self.store.availability_counts(source.index);
            for a in Availability::ALL {
                let labels = [("source", &*source.id), ("availability", a.as_str())];
                ConstGauge::new(counts[a as usize] as i64)
                    .encode(records.encode_family(&labels)?)?;
            }
        }

        let max_records = encoder.encode_descriptor(
            "presence_gateway_store_max_records",
            "store.max_records: records held before new principals are refused (0: no limit).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(self.store.max_records()).unwrap_or(i64::MAX))
            .encode(max_records)?;
        let held = encoder.encode_descriptor(
            "presence_gateway_store_records_held",
            "Records held, all sources (Redis backend: in this replica's mirror); compare with store.max_records.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(self.store.record_count()).unwrap_or(i64::MAX))
            .encode(held)?;
        let refused = encoder.encode_descriptor(
            "presence_gateway_store_refused_principals",
            "Events of new principals refused (503) because the store held store.max_records records.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.store.refused_new()).encode(refused)?;

        if let Some(status) = self.store.people().status() {
            let people = encoder.encode_descriptor(
                "presence_gateway_people",
                "People of the mapping in use, and those formed by equal principals.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(status.people).unwrap_or(i64::MAX)).encode(people)?;
            let version = encoder.encode_descriptor(
                "presence_gateway_people_mapping_version",
                "Version of the people mapping in use (goes up with every reload that changed it).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(status.version).unwrap_or(i64::MAX)).encode(version)?;
            let failing = encoder.encode_descriptor(
                "presence_gateway_people_reload_failing",
                "1 while the last reload of the people file was refused (the previous mapping stays in use).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(status.last_error.is_some())).encode(failing)?;
            let events = encoder.encode_descriptor(
                "presence_gateway_person_events",
                "Person events this process committed (a derived record that changed).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(self.store.people().events()).encode(events)?;
        }

        let last_seq = encoder.encode_descriptor(
            "presence_gateway_store_last_seq",
            "The last sequence number assigned to a change.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.store.changes().last_seq() as i64).encode(last_seq)?;

        let mut last_event = encoder.encode_descriptor(
            "presence_gateway_last_event_timestamp_seconds",
            "Unix time of the last authentic request per source (0: never).",
            None,
            MetricType::Gauge,
        )?;
        for source in self.sources.iter_sorted() {
            let at = source
                .stats
                .last_event_at()
                .map_or(0.0, |m| m.0 as f64 / 1000.0);
            ConstGauge::new(at).encode(last_event.encode_family(&[("source", &*source.id)])?)?;
        }

        let mut latency = encoder.encode_descriptor(
            "presence_gateway_webhook_request_duration_seconds",
            "Time from the arrival of an accepted webhook request (its head read) to its answer, by source.",
            None,
            MetricType::Histogram,
        )?;
        for source in self.sources.iter_sorted() {
            source
                .stats
                .latency
                .encode(latency.encode_family(&[("source", &*source.id)])?)?;
        }

        self.encode_subscriptions(&mut encoder)?;

        let unknown = encoder.encode_descriptor(
            "presence_gateway_unknown_source_requests",
            "Webhook requests for a source id that is not configured.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(load(&self.global.unknown_source)).encode(unknown)?;

        let unauthorized = encoder.encode_descriptor(
            "presence_gateway_consumer_unauthorized_requests",
            "Consumer API requests without a valid bearer token.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(load(&self.global.consumer_unauthorized)).encode(unauthorized)?;

        let timeouts = encoder.encode_descriptor(
            "presence_gateway_write_timeouts",
            "Connections closed because the peer took no bytes for server.write_timeout_secs.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(load(&self.global.write_timeouts)).encode(timeouts)?;

        let open = encoder.encode_descriptor(
            "presence_gateway_connections_open",
            "Open client connections, WebSocket streams included.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(load(&self.global.connections_open)).unwrap_or(i64::MAX))
            .encode(open)?;
        let refused = encoder.encode_descriptor(
            "presence_gateway_connections_refused",
            "Connections answered 503 and closed at once because server.max_connections were open.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(load(&self.global.connections_refused)).encode(refused)?;

        let mut open = encoder.encode_descriptor(
            "presence_gateway_stream_consumers",
            "Open consumer streams.",
            None,
            MetricType::Gauge,
        )?;
        for kind in StreamKind::ALL {
            ConstGauge::new(
                i64::try_from(load(&self.global.streams[kind as usize])).unwrap_or(i64::MAX),
            )
            .encode(open.encode_family(&[("transport", kind.label())])?)?;
        }
        let mut lagged = encoder.encode_descriptor(
            "presence_gateway_stream_lagged",
            "Stream consumers that fell behind the fan-out (reset for SSE, closed for WebSocket).",
            None,
            MetricType::Counter,
        )?;
        for kind in StreamKind::ALL {
            ConstCounter::new(load(&self.global.streams_lagged[kind as usize]))
                .encode(lagged.encode_family(&[("transport", kind.label())])?)?;
        }
        let mut refused = encoder.encode_descriptor(
            "presence_gateway_stream_opens_refused",
            "Stream opens answered 429: their consumer opened too many with a snapshot or replay.",
            None,
            MetricType::Counter,
        )?;
        for kind in StreamKind::ALL {
            ConstCounter::new(load(&self.global.streams_refused[kind as usize]))
                .encode(refused.encode_family(&[("transport", kind.label())])?)?;
        }
        Ok(())
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process-wide `tracing` subscriber (filter from `RUST_LOG`,
/// default `info`). Called by the binary; tests install their own.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: container and journal logs show escape
    // codes as noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    // A second initialisation (only possible in tests) keeps the first one.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod histogram_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn observations_land_in_inclusive_buckets_and_render_cumulatively() {
        let h = LatencyHistogram::new(&[0.000_05, 0.001]);
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(1)); // le is inclusive
        h.observe(Duration::from_secs(2));
        let counts: Vec<u64> = h.buckets.iter().map(load).collect();
        assert_eq!(counts, [1, 1, 1]);
        assert_eq!(h.count(), 3);

        struct One(&'static LatencyHistogram);
        impl fmt::Debug for One {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("One")
            }
        }
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
                let metric = encoder.encode_descriptor("t", "test", None, MetricType::Histogram)?;
                self.0.encode(metric)
            }
        }
        // A collector is 'static: leak one for the test.
        let leaked: &'static LatencyHistogram =
            Box::leak(Box::new(LatencyHistogram::new(&[0.000_05, 0.001])));
        leaked.observe(Duration::from_micros(30));
        leaked.observe(Duration::from_secs(2));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(One(leaked)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("t_count 2"), "{text}");
    }
}

#[cfg(test)]
mod log_every_tests {
    use super::LogEvery;

    #[test]
    fn lets_one_line_through_per_interval() {
        let every = LogEvery::new(60_000);
        assert!(every.ready(1_000), "the first line goes through");
        assert!(!every.ready(1_001));
        assert!(!every.ready(60_999));
        assert!(every.ready(61_000));
        assert!(!every.ready(61_000));
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn the_classic_format_only_when_a_scrape_prefers_it() {
        let classic = [
            "text/plain; version=0.0.4",
            "text/plain;version=0.0.4;charset=utf-8",
            "text/plain",
            "TEXT/PLAIN; Version=\"0.0.4\"",
            "application/openmetrics-text;q=0.4, text/plain;version=0.0.4;q=0.5",
        ];
        for accept in classic {
            assert_eq!(Format::negotiate(Some(accept)), Format::Classic, "{accept}");
        }
        let openmetrics = [
            None,
            Some(""),
            Some("*/*"),
            Some("text/*"),
            Some("application/json"),
            Some("text/plain; version=1.0.0"),
            Some("text/plain; q=0"),
            Some("application/openmetrics-text; version=1.0.0"),
            // What Prometheus sends: OpenMetrics first.
            Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            ),
            Some("text/plain;version=0.0.4;q=0.5, application/openmetrics-text;q=0.5"),
        ];
        for accept in openmetrics {
            assert_eq!(Format::negotiate(accept), Format::OpenMetrics, "{accept:?}");
        }
    }

    #[test]
    fn classic_text_names_counters_with_total_and_has_no_openmetrics_lines() {
        let openmetrics = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
             a_requests_total{source=\"m\"} 3\n# HELP a_size Size.\n# TYPE a_size gauge\n\
             # UNIT a_size bytes\na_size 7\n# HELP a_other Other.\n# TYPE a_other unknown\n\
             a_other 1\n# EOF\n";
        assert_eq!(
            to_classic(openmetrics),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{source=\"m\"} 3\n# HELP a_size Size.\n# TYPE a_size gauge\n\
             a_size 7\n# HELP a_other Other.\n# TYPE a_other untyped\na_other 1\n"
        );
    }
}
