//! Soak test for `benches/soak/run.sh`: hours of a provider's life in
//! minutes, against a running gateway on loopback.
//!
//! 1. Opens `--consumers` Server-Sent Events streams (`snapshot=false`, so
//!    every event is a change and `seq` must go up by exactly one): most
//!    read at once, `--slow` of them read a little every 50 ms (they fall
//!    behind and are cut off or reset, as the contract says, and reconnect
//!    with `Last-Event-ID`), and `--reconnecting` of them close and resume
//!    with `Last-Event-ID` every `--reconnect-secs`.
//! 2. Measures the maximum webhook rate with them attached (closed loop,
//!    `--calibrate-secs`), unless `--rate` is given.
//! 3. Sends webhooks at `--load-percent` of that rate, paced, for
//!    `--duration` seconds: 70 % valid changes, 10 % duplicates (an earlier
//!    request again), 10 % stale (an older timestamp for a known
//!    principal), 10 % with a bad signature. Expected: 204, 204, 204, 401.
//! 4. Every `--interval` seconds prints the webhooks' p50/p99/max, the
//!    gateway's RSS (`--pid`), and the consumers' events, resets and
//!    reconnections; at the end one `RESULT` line with the verdicts:
//!    unexpected answers, stream gaps (a `seq` that is not the next one
//!    without a `reset` before it), RSS growth after the warm-up, and the
//!    spread of the per-interval p99.
//!
//! Loopback only; bounded by `--duration`; stops by itself.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use parking_lot::Mutex;

#[path = "support/http1.rs"]
mod http1;

#[derive(Parser)]
struct Args {
    /// Gateway address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// Mitel source id and signing key.
    #[arg(long, default_value = "mitel")]
    source: String,
    #[arg(long)]
    key: String,
    /// Consumer token, when the gateway has tokens.
    #[arg(long)]
    token: Option<String>,
    /// The gateway's process id, for its RSS.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 100)]
    consumers: usize,
    #[arg(long, default_value_t = 10)]
    slow: usize,
    #[arg(long, default_value_t = 20)]
    reconnecting: usize,
    #[arg(long, default_value_t = 30)]
    reconnect_secs: u64,
    /// Requests per second; 0: measure the maximum first.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 80)]
    load_percent: u64,
    #[arg(long, default_value_t = 10)]
    calibrate_secs: u64,
    /// Seconds of soak (after calibration).
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Seconds counted as warm-up: RSS growth is measured after it (the
    /// replay history fills first: 65 536 changes by default).
    #[arg(long, default_value_t = 120)]
    warmup: u64,
    #[arg(long, default_value_t = 30)]
    interval: u64,
    #[arg(long, default_value_t = 10_000)]
    principals: u64,
    /// Webhook connections.
    #[arg(long, default_value_t = 32)]
    connections: u64,
}

/// Epoch ms the timestamps start from (after 2000 and in the past, so
/// neither the skew rule nor the staleness rule applies by accident).
const BASE_MS: u64 = 1_764_000_000_000;

/// What a request is, by its number.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Valid,
    Duplicate,
    Stale,
    Forged,
}

impl Kind {
    fn of(n: u64) -> Kind {
        match n % 10 {
            0 => Kind::Duplicate,
            1 => Kind::Stale,
            2 => Kind::Forged,
            _ => Kind::Valid,
        }
    }

    fn expected(self) -> u16 {
        match self {
            Kind::Forged => 401,
            _ => 204,
        }
    }
}

/// The `v`th valid notification: principal `v % principals`, a status that
/// differs from that principal's previous one, a later timestamp.
fn envelope(v: u64, principals: u64, timestamp: u64) -> String {
    let p = v % principals;
    let status = ["Available", "Busy", "Away", "DoNotDisturb"][((v / principals) % 4) as usize];
    format!(
        concat!(
            r#"{{"publicationId":"{v:08x}-2f7d-4d0a-9b43-5f2e8c1d7a10","topic":"platform-api-presence","method":"PUT","#,
            r#""subject":"/presentities/{p:08x}-5a9e-4a57-9d1e-{p:012x}","content":{{"eventId":"soak-{v}-{timestamp}","#,
            r#""timestamp":{timestamp},"presence":"{status}","note":""}},"publisher":{{"accountId":"acc-1"}},"#,
            r#""subscription":{{"subscriptionId":"5c2e7a90-1d3f-4b8e-8c6a-7e9f0a1b2c3d"}}}}"#
        ),
        v = v,
        p = p,
        timestamp = timestamp,
        status = status,
    )
}

/// Per-interval webhook figures, and the whole run's verdict counters.
#[derive(Default)]
struct Load {
    latencies_us: Mutex<Vec<u32>>,
    sent: AtomicU64,
    unexpected: AtomicU64,
    failed_connections: AtomicU64,
}

/// What the consumers saw.
#[derive(Default)]
struct Streams {
    events: AtomicU64,
    resets: AtomicU64,
    gaps: AtomicU64,
    reconnects: AtomicU64,
    refused: AtomicU64,
    last_seq: AtomicU64,
}

fn main() {
    let args = Arc::new(Args::parse());
    assert!(
        args.addr.ip().is_loopback(),
        "the soak targets loopback only"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(soak(args));
}

async fn soak(args: Arc<Args>) {
    let streams = Arc::new(Streams::default());
    let stop = Arc::new(AtomicBool::new(false));
    presence_gateway::upstream::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    for i in 0..args.consumers {
        let style = if i < args.slow {
            Style::Slow
        } else if i < args.slow + args.reconnecting {
            Style::Reconnecting
        } else {
            Style::Reading
        };
        tokio::spawn(consumer(
            client.clone(),
            Arc::clone(&args),
            style,
            Arc::clone(&streams),
            Arc::clone(&stop),
        ));
    }

    let rate = if args.rate > 0 {
        args.rate
    } else {
        let load = Arc::new(Load::default());
        let measured = run_load(
            &args,
            &load,
            None,
            Duration::from_secs(args.calibrate_secs),
            0,
        )
        .await;
        let max = measured / args.calibrate_secs.max(1);
        println!(
            "calibration: {max} requests/s with {} consumers attached",
            args.consumers
        );
        max * args.load_percent / 100
    };
    println!("soak: {rate} requests/s for {} s", args.duration);

    let load = Arc::new(Load::default());
    let first = 100_000_000;
    let soak = tokio::spawn({
        let args = Arc::clone(&args);
        let load = Arc::clone(&load);
        async move {
            run_load(
                &args,
                &load,
                Some(rate),
                Duration::from_secs(args.duration),
                first,
            )
            .await
        }
    });
    let started = Instant::now();
    let mut p99s = Vec::new();
    let mut rss_after_warmup = None;
    let mut rss_last = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(args.interval));
    ticker.tick().await;
    while !soak.is_finished() {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        }
        let mut lat = std::mem::take(&mut *load.latencies_us.lock());
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((p / 100.0) * lat.len().saturating_sub(1) as f64).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let rss = args.pid.and_then(rss_kib).unwrap_or(0);
        let elapsed = started.elapsed().as_secs();
        if elapsed >= args.warmup {
            rss_after_warmup.get_or_insert(rss);
            p99s.push(pct(99.0));
        }
        rss_last = rss;
        let mut line = String::new();
        let _ = write!(
            line,
            "t={elapsed}s rps={} p50_us={} p99_us={} max_us={} rss_kib={rss} events={} resets={} reconnects={} gaps={} unexpected={}",
            lat.len() as u64 / args.interval.max(1),
            pct(50.0),
            pct(99.0),
            lat.last().copied().unwrap_or(0),
            streams.events.load(Ordering::Relaxed),
            streams.resets.load(Ordering::Relaxed),
            streams.reconnects.load(Ordering::Relaxed),
            streams.gaps.load(Ordering::Relaxed),
            load.unexpected.load(Ordering::Relaxed),
        );
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
    let sent = soak.await.unwrap_or(0);
    // Let the streams take the last changes before judging them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let (lo, hi) = (
        p99s.iter().copied().min().unwrap_or(0),
        p99s.iter().copied().max().unwrap_or(0),
    );
    let growth = rss_after_warmup.map_or(0, |w| rss_last as i64 - w as i64);
    println!(
        "RESULT soak rate={rate} duration_s={} sent={sent} unexpected={} connection_failures={} \
         consumers={} events={} gaps={} resets={} reconnects={} refused={} last_seq={} \
         rss_after_warmup_kib={} rss_end_kib={rss_last} rss_growth_kib={growth} p99_us_min={lo} p99_us_max={hi}",
        args.duration,
        load.unexpected.load(Ordering::Relaxed),
        load.failed_connections.load(Ordering::Relaxed),
        args.consumers,
        streams.events.load(Ordering::Relaxed),
        streams.gaps.load(Ordering::Relaxed),
        streams.resets.load(Ordering::Relaxed),
        streams.reconnects.load(Ordering::Relaxed),
        streams.refused.load(Ordering::Relaxed),
        streams.last_seq.load(Ordering::Relaxed),
        rss_after_warmup.unwrap_or(0),
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sends webhooks for `duration` over `--connections` keep-alive
/// connections: paced to `rate` per second, or back to back (`None`).
/// Request numbers start at `first`. Returns how many were answered.
async fn run_load(
    args: &Arc<Args>,
    load: &Arc<Load>,
    rate: Option<u64>,
    duration: Duration,
    first: u64,
) -> u64 {
    let counter = Arc::new(AtomicU64::new(first));
    let deadline = Instant::now() + duration;
    let connections = args.connections.max(1);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let args = Arc::clone(args);
            let load = Arc::clone(load);
            let counter = Arc::clone(&counter);
            let gap = rate.map(|r| Duration::from_secs_f64(connections as f64 / r.max(1) as f64));
            tokio::spawn(async move { sender(args, load, counter, gap, deadline).await })
        })
        .collect();
    let mut answered = 0;
    for task in tasks {
        answered += task.await.unwrap_or(0);
    }
    answered
}

async fn sender(
    args: Arc<Args>,
    load: Arc<Load>,
    counter: Arc<AtomicU64>,
    gap: Option<Duration>,
    deadline: Instant,
) -> u64 {
    let mut answered = 0;
    let mut request = Vec::with_capacity(1024);
    let mut response = vec![0u8; 16 * 1024];
    let mut pace = gap.map(|gap| {
        let mut t = tokio::time::interval(gap);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let path = format!("/webhooks/{}", args.source);
    'reconnect: while Instant::now() < deadline {
        let Ok(mut stream) = tokio::net::TcpStream::connect(args.addr).await else {
            load.failed_connections.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        while Instant::now() < deadline {
            if let Some(pace) = &mut pace {
                pace.tick().await;
            }
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let kind = Kind::of(n);
            // Valid requests (7 in every 10) number their own sequence, so
            // each principal's status changes every time; the others
            // derive theirs from the valid ones around them.
            let v = n / 10 * 7 + (n % 10).saturating_sub(3);
            let body = match kind {
                Kind::Valid => envelope(v, args.principals, BASE_MS + v),
                // The request `principals` valid ones ago, byte for byte.
                Kind::Duplicate => {
                    let earlier = v.saturating_sub(args.principals);
                    envelope(earlier, args.principals, BASE_MS + earlier)
                }
                // A new event id, but older than what the principal has.
                Kind::Stale => envelope(v + 3 * args.principals, args.principals, BASE_MS),
                Kind::Forged => envelope(v, args.principals, BASE_MS + v),
            };
            let key: &[u8] = if kind == Kind::Forged {
                b"not-the-key"
            } else {
                args.key.as_bytes()
            };
            let signature = presence_gateway::verify::hmac_hex::sign_hex(key, body.as_bytes());
            request.clear();
            let _ = write!(
                request,
                "POST {path} HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n\
                 x-notify-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            request.extend_from_slice(body.as_bytes());
            let sent = Instant::now();
            let Some(status) = http1::exchange(&mut stream, &request, &mut response).await else {
                load.failed_connections.fetch_add(1, Ordering::Relaxed);
                continue 'reconnect;
            };
            answered += 1;
            load.sent.fetch_add(1, Ordering::Relaxed);
            if status != kind.expected() {
                load.unexpected.fetch_add(1, Ordering::Relaxed);
            }
            if kind == Kind::Valid {
                let us = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                load.latencies_us.lock().push(us);
            }
        }
    }
    answered
}

#[derive(Clone, Copy, PartialEq)]
enum Style {
    Reading,
    Slow,
    Reconnecting,
}

/// One stream consumer, reconnecting with `Last-Event-ID` until `stop`.
async fn consumer(
    client: reqwest::Client,
    args: Arc<Args>,
    style: Style,
    streams: Arc<Streams>,
    stop: Arc<AtomicBool>,
) {
    let mut last: Option<u64> = None;
    let url = format!("http://{}/v1/stream?snapshot=false", args.addr);
    let mut connected_once = false;
    while !stop.load(Ordering::Relaxed) {
        let mut request = client.get(&url);
        if let Some(token) = &args.token {
            request = request.bearer_auth(token);
        }
        if let Some(last) = last {
            request = request.header("last-event-id", last.to_string());
        }
        let response = match request.send().await {
            Ok(r) if r.status() == 200 => r,
            Ok(r) => {
                // A resume limit or overload: wait as told, then again.
                streams.refused.fetch_add(1, Ordering::Relaxed);
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if connected_once {
            streams.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_once = true;
        let until = (style == Style::Reconnecting)
            .then(|| Instant::now() + Duration::from_secs(args.reconnect_secs));
        let mut body = response.bytes_stream();
        let mut pending = Vec::new();
        // A reset means: what follows starts a new sequence.
        let mut after_reset = false;
        loop {
            if stop.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() > u) {
                break;
            }
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            };
            let Some(Ok(chunk)) = chunk else { break };
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let mut id = None;
                let mut kind = "message";
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = if v.trim() == "reset" {
                            "reset"
                        } else {
                            "other"
                        };
                    }
                }
                if kind == "reset" {
                    // A snapshot follows (records in `seq` order, not one
                    // apart), then the live changes: no gap can be told from
                    // the ids until this connection ends.
                    streams.resets.fetch_add(1, Ordering::Relaxed);
                    after_reset = true;
                    continue;
                }
                let Some(id) = id else { continue };
                streams.events.fetch_add(1, Ordering::Relaxed);
                streams.last_seq.fetch_max(id, Ordering::Relaxed);
                if let Some(prev) = last
                    && id != prev + 1
                    && !after_reset
                {
                    streams.gaps.fetch_add(1, Ordering::Relaxed);
                }
                last = Some(id);
            }
            if style == Style::Slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
