//! Load generator for `benches/load/run.sh`: drives a webhook receiver with
//! signed presence notifications over a fixed number of keep-alive HTTP/1.1
//! connections (closed loop), and reports throughput and latency. `--kind`
//! picks the sender: Mitel (`x-notify-signature`, the default) or Standard
//! Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
//!
//! Every request is a fresh event (status cycling, principal round-robin
//! over `--principals`), so the gateway really verifies, parses and applies
//! each one instead of short-cutting duplicates or stale events: event ids
//! carry a tag of this run (another run against the same gateway, such as
//! the next round of `benches/load/run.sh`, sends other ids), and events are
//! stamped with the wall clock in milliseconds (later than the previous
//! run's, and never ahead of the gateway's clock). Two events of one
//! principal less than a millisecond apart carry the same time; the gateway
//! applies those in arrival order.
//!
//! A Standard Webhooks request is signed over its id, the current Unix
//! second and the body. What does not change from one request to the next
//! is prepared once: the key's HMAC state (cloned per request instead of
//! keyed again) and the timestamp texts (rendered again when the second
//! changes, so they stay current for any duration). The RESULT line shows
//! what the client itself costs: `build_us`, the time to write one request
//! (body, signature, head) measured before the run, and `client_cpu_us`, the
//! generator's CPU time per request over the measured part.
//! Loopback only; bounded by `--duration` and `--max-requests` (whichever
//! comes first: the run ends early once every connection has stopped at the
//! cap, which is how `benches/state/run.sh` writes an exact number of
//! records). `--rate` paces the connections to a total request rate
//! instead of sending back to back, for latency at a given load rather than
//! at saturation (`benches/edge/run.sh`).
//!
//! `startup` measures the time from spawning the gateway to `/readyz` 200.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Parser, Subcommand, ValueEnum};
use hmac::{Hmac, KeyInit, Mac};
use presence_gateway::verify::hmac_hex::sign_hex;
use presence_gateway::verify::standard;
use sha2::Sha256;

#[path = "support/http1.rs"]
mod http1;
use http1::exchange;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

type HmacSha256 = Hmac<Sha256>;

/// Which sender the requests imitate.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Mitel: the hex HMAC-SHA256 of the body in `x-notify-signature`.
    Mitel,
    /// Standard Webhooks: `v1,<base64>` of HMAC-SHA256 over
    /// `id.timestamp.body`.
    Standard,
}

#[derive(Subcommand)]
enum Mode {
    /// Closed-loop load against one receiver.
    Load {
        /// Name printed with the result.
        #[arg(long)]
        label: String,
        /// Receiver address (loopback).
        #[arg(long)]
        addr: SocketAddr,
        /// Request path.
        #[arg(long, default_value = "/webhooks/mitel")]
        path: String,
        /// The sender to imitate.
        #[arg(long, value_enum, default_value_t = Kind::Mitel)]
        kind: Kind,
        /// Signing key: the Mitel applicationId, or the Standard Webhooks
        /// secret (`whsec_<base64>`).
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds measured, after the warm-up.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds of load before measuring.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 10_000)]
        principals: u64,
        /// Hard cap on requests sent.
        #[arg(long, default_value_t = 20_000_000)]
        max_requests: u64,
        /// Requests per second over all connections (0: as fast as answers
        /// come back).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Spawn the gateway and time the first `/readyz` 200.
    Startup {
        #[arg(long)]
        bin: PathBuf,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Give up on a start after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
        /// Append the gateway's output here (default: discarded).
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

fn main() {
    let args = Args::parse();
    match args.command {
        Mode::Load {
            label,
            addr,
            path,
            kind,
            key,
            connections,
            duration,
            warmup,
            principals,
            max_requests,
            rate,
        } => {
            assert!(addr.ip().is_loopback(), "load targets loopback only");
            // One thread: the harness pins the generator to one CPU.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let signer = match kind {
                Kind::Mitel => Signer::Mitel(key.into_bytes()),
                Kind::Standard => {
                    let key = standard::decode_secret(key.as_bytes())
                        .unwrap_or_else(|e| panic!("--key: {e}"));
                    check_standard_signer(&key);
                    Signer::Standard(
                        <HmacSha256 as KeyInit>::new_from_slice(&key)
                            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
                    )
                }
            };
            let plan = Plan {
                addr,
                path,
                signer,
                run: run_tag(),
                principals: principals.max(1),
                max_requests,
                pace: (rate > 0)
                    .then(|| Duration::from_secs_f64(connections.max(1) as f64 / rate as f64)),
                warmup: Duration::from_secs(warmup),
                duration: Duration::from_secs(duration),
            };
            let build_us = build_cost(&plan);
            let report = runtime.block_on(load(Arc::new(plan), connections));
            report.print(&label, build_us);
        }
        Mode::Startup {
            bin,
            config,
            addr,
            runs,
            timeout_secs,
            log,
        } => startup(
            &bin,
            &config,
            addr,
            runs,
            Duration::from_secs(timeout_secs),
            log.as_deref(),
        ),
    }
}

struct Plan {
    addr: SocketAddr,
    path: String,
    signer: Signer,
    /// Tags this run's event ids (see [`run_tag`]).
    run: u64,
    principals: u64,
    max_requests: u64,
    /// Time between two requests of one connection, when paced.
    pace: Option<Duration>,
    warmup: Duration,
    duration: Duration,
}

/// How requests are signed, with what was prepared for it.
enum Signer {
    /// The Mitel applicationId.
    Mitel(Vec<u8>),
    /// The Standard Webhooks key, already keyed into an HMAC state.
    Standard(HmacSha256),
}

/// 48 bits that tell this run's event ids from another run's: the wall
/// clock in nanoseconds, and the process id for two runs started at once.
fn run_tag() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    (nanos ^ (u64::from(std::process::id()) << 32)) & 0xffff_ffff_ffff
}

/// Which of four statuses the `n`th request reports: the next one on every
/// round over the principals, so every event changes its record.
fn status_index(n: u64, principals: u64) -> usize {
    ((n / principals) % 4) as usize
}

/// The `n`th notification into `out`: a Mitel presence envelope of about
/// 450 bytes, stamped `at_ms`.
fn mitel_envelope(out: &mut String, n: u64, run: u64, principals: u64, at_ms: u64) {
    let p = n % principals;
    let status = ["Available", "Busy", "Away", "DoNotDisturb"][status_index(n, principals)];
    let _ = write!(
        out,
        concat!(
            r#"{{"publicationId":"{n:08x}-2f7d-4d0a-9b43-{run:012x}","topic":"platform-api-presence","method":"PUT","#,
            r#""subject":"/presentities/{p32:08x}-5a9e-4a57-9d1e-{p:012x}","content":{{"eventId":"{n:08x}-8f1a-4e3b-a6d2-{run:012x}","#,
            r#""timestamp":{ts},"presence":"{status}","note":""}},"publisher":{{"accountId":"acc-10042"}},"#,
            r#""subscription":{{"subscriptionId":"5c2e7a90-1d3f-4b8e-8c6a-7e9f0a1b2c3d"}},"#,
            r#""notification":{{"createdOn":"2026-11-24T10:15:30.140Z"}}}}"#
        ),
        n = n,
        run = run,
        p32 = p as u32,
        p = p,
        ts = at_ms,
        status = status,
    );
}

/// The `n`th event into `out`: a Standard Webhooks presence event in the
/// shape of tests/fixtures/standard-presence.json (about 180 bytes) for the
/// same principals as the Mitel envelopes, sent at `date` (RFC 3339) and
/// stamped `at_ms`.
fn standard_envelope(out: &mut String, n: u64, principals: u64, date: &str, at_ms: u64) {
    let p = n % principals;
    let status = ["available", "busy", "away", "do_not_disturb"][status_index(n, principals)];
    let _ = write!(
        out,
        concat!(
            r#"{{"type":"presence.updated","timestamp":"{date}","data":{{"#,
            r#""user_id":"{p32:08x}-5a9e-4a57-9d1e-{p:012x}","#,
            r#""status":"{status}","message":"","changed_at":{ts}}}}}"#
        ),
        date = date,
        p32 = p as u32,
        p = p,
        status = status,
        ts = at_ms,
    );
}

/// The `webhook-signature` entry's base64 (44 characters) into `out`:
/// HMAC-SHA256 over `id.timestamp.body` from the prepared key state.
fn sign_standard<'o>(
    key: &HmacSha256,
    id: &str,
    timestamp: &str,
    body: &[u8],
    out: &'o mut [u8; 44],
) -> &'o str {
    let mut mac = key.clone();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let n = BASE64
        .encode_slice(mac.finalize().into_bytes(), out)
        .unwrap_or_else(|_| unreachable!("32 bytes are 44 base64 characters"));
    std::str::from_utf8(&out[..n]).unwrap_or_else(|_| unreachable!("base64 is ASCII"))
}

/// The prepared signer must sign exactly as the gateway's own `sign`
/// (which the verifier's unit tests pin to the published test vector);
/// otherwise every request would be a 401.
fn check_standard_signer(key: &[u8]) {
    let prepared = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let (id, timestamp, body) = ("msg_check", 1_764_000_930, br#"{"type":"x"}"#);
    let mut out = [0u8; 44];
    let fast = sign_standard(&prepared, id, &timestamp.to_string(), body, &mut out);
    assert_eq!(
        format!("v1,{fast}"),
        standard::sign(key, id, timestamp, body),
        "the load generator's Standard Webhooks signature differs from the gateway's"
    );
}

/// Writes the requests of one connection, reusing its buffers.
#[derive(Default)]
struct RequestWriter {
    body: String,
    id: String,
    /// The Unix second the texts below are of (0: none yet).
    second: u64,
    /// `second` in decimal: the `webhook-timestamp`.
    second_text: String,
    /// `second` in RFC 3339: the event's `timestamp`.
    date_text: String,
}

impl RequestWriter {
    /// Writes the `n`th request (head and body) into `out`, signed now.
    fn write(&mut self, plan: &Plan, n: u64, out: &mut Vec<u8>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at_ms = now.as_millis() as u64;
        self.body.clear();
        out.clear();
        match &plan.signer {
            Signer::Mitel(key) => {
                mitel_envelope(&mut self.body, n, plan.run, plan.principals, at_ms);
                let signature = sign_hex(key, self.body.as_bytes());
                let _ = write!(
                    out,
                    "POST {} HTTP/1.1\r\nhost: loadgen\r\ncontent-type: application/json\r\n\
                     x-notify-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
                    plan.path,
                    self.body.len()
                );
            }
            Signer::Standard(key) => {
                self.set_second(now.as_secs());
                standard_envelope(&mut self.body, n, plan.principals, &self.date_text, at_ms);
                self.id.clear();
                let _ = write!(self.id, "msg_{:012x}{n:012x}", plan.run);
                let mut encoded = [0u8; 44];
                let signature = sign_standard(
                    key,
                    &self.id,
                    &self.second_text,
                    self.body.as_bytes(),
                    &mut encoded,
                );
                let _ = write!(
                    out,
                    "POST {} HTTP/1.1\r\nhost: loadgen\r\ncontent-type: application/json\r\n\
                     webhook-id: {}\r\nwebhook-timestamp: {}\r\nwebhook-signature: v1,{signature}\r\n\
                     content-length: {}\r\n\r\n",
                    plan.path,
                    self.id,
                    self.second_text,
                    self.body.len()
                );
            }
        }
        out.extend_from_slice(self.body.as_bytes());
    }

    /// Renders the timestamp texts again when the second has changed.
    fn set_second(&mut self, second: u64) {
        if second == self.second {
            return;
        }
        self.second = second;
        self.second_text.clear();
        let _ = write!(self.second_text, "{second}");
        self.date_text.clear();
        let date = i64::try_from(second)
            .ok()
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let _ = write!(self.date_text, "{date}");
    }
}

/// Microseconds to write one request, over a few thousand written before
/// the run (nothing is sent): what the client spends per request before the
/// socket, signing included.
fn build_cost(plan: &Plan) -> f64 {
    const WRITES: u32 = 20_000;
    let mut writer = RequestWriter::default();
    let mut out = Vec::with_capacity(1024);
    let started = Instant::now();
    for n in 0..u64::from(WRITES) {
        writer.write(plan, n, &mut out);
        std::hint::black_box(&out);
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(WRITES)
}

/// CPU time (user and system, every thread) this process has used, from
/// /proc (Linux); `None` where that is not available.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces: utime and stime are the 14th and 15th of the line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // Clock ticks; 100 per second on every Linux this runs on (USER_HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

#[derive(Default)]
struct Report {
    latencies_us: Vec<u32>,
    errors: u64,
    measured: Duration,
    body_bytes: usize,
    /// The generator's CPU time over the measured part.
    client_cpu: Option<Duration>,
}

impl Report {
    fn percentile(&self, p: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        self.latencies_us[rank]
    }

    fn print(&self, label: &str, build_us: f64) {
        let rps = self.latencies_us.len() as f64 / self.measured.as_secs_f64();
        let client_cpu = match self.client_cpu {
            Some(cpu) if !self.latencies_us.is_empty() => format!(
                " client_cpu_us={:.2}",
                cpu.as_secs_f64() * 1e6 / self.latencies_us.len() as f64
            ),
            _ => String::new(),
        };
        println!(
            "RESULT label={label} rps={rps:.0} p50_us={} p99_us={} p999_us={} errors={} requests={} body_bytes={} build_us={build_us:.2}{client_cpu}",
            self.percentile(50.0),
            self.percentile(99.0),
            self.percentile(99.9),
            self.errors,
            self.latencies_us.len(),
            self.body_bytes
        );
    }
}

async fn load(plan: Arc<Plan>, connections: usize) -> Report {
    let counter = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // Cancelled when the last connection has stopped (at `max_requests`).
    let running = Arc::new(AtomicUsize::new(connections));
    let all_stopped = CancellationToken::new();
    if connections == 0 {
        all_stopped.cancel();
    }
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let plan = Arc::clone(&plan);
            let counter = Arc::clone(&counter);
            let measuring = Arc::clone(&measuring);
            let stop = Arc::clone(&stop);
            let running = Arc::clone(&running);
            let all_stopped = all_stopped.clone();
            tokio::spawn(async move {
                let result = connection(plan, counter, measuring, stop).await;
                if running.fetch_sub(1, Ordering::AcqRel) == 1 {
                    all_stopped.cancel();
                }
                result
            })
        })
        .collect();
    tokio::select! {
        () = tokio::time::sleep(plan.warmup) => {}
        () = all_stopped.cancelled() => {}
    }
    measuring.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let cpu_before = process_cpu();
    tokio::select! {
        () = tokio::time::sleep(plan.duration) => {}
        () = all_stopped.cancelled() => {}
    }
    stop.store(true, Ordering::SeqCst);
    let measured = started.elapsed();
    let client_cpu = cpu_before
        .zip(process_cpu())
        .map(|(a, b)| b.saturating_sub(a));
    let mut sample = Vec::new();
    let mut writer = RequestWriter::default();
    writer.write(&plan, 0, &mut sample);
    let mut report = Report {
        measured,
        body_bytes: writer.body.len(),
        client_cpu,
        ..Report::default()
    };
    for task in tasks {
        if let Ok((lat, errors)) = task.await {
            report.latencies_us.extend(lat);
            report.errors += errors;
        }
    }
    report.latencies_us.sort_unstable();
    report
}

/// One keep-alive connection sending requests back to back.
///
/// HTTP/1.1 is written and read by hand on the socket (request head and
/// body in one write, response head parsed for status and length): the
/// generator must stay cheaper than the fastest server it measures, or the
/// comparison measures the generator.
async fn connection(
    plan: Arc<Plan>,
    counter: Arc<AtomicU64>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> (Vec<u32>, u64) {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0u64;
    let mut request = Vec::with_capacity(1024);
    let mut writer = RequestWriter::default();
    let mut response = vec![0u8; 16 * 1024];
    'reconnect: while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = tokio::net::TcpStream::connect(plan.addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut next = tokio::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if let Some(pace) = plan.pace {
                // A connection that fell behind does not catch up in a
                // burst: its schedule restarts from now.
                next = (next + pace).max(tokio::time::Instant::now());
                tokio::time::sleep_until(next).await;
            }
            let n = counter.fetch_add(1, Ordering::Relaxed);
            if n >= plan.max_requests {
                break 'reconnect;
            }
            writer.write(&plan, n, &mut request);
            let sent = Instant::now();
            let status = match exchange(&mut stream, &request, &mut response).await {
                Some(status) => status,
                None => {
                    errors += 1;
                    continue 'reconnect;
                }
            };
            let took = sent.elapsed();
            if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                if (200..300).contains(&status) {
                    latencies.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                } else {
                    errors += 1;
                }
            }
        }
    }
    (latencies, errors)
}

/// Spawns the gateway `runs` times and prints the time to the first
/// `/readyz` 200 (polled every 200 µs); the gateway is killed once ready.
fn startup(
    bin: &Path,
    config: &Path,
    addr: SocketAddr,
    runs: usize,
    timeout: Duration,
    log: Option<&Path>,
) {
    let mut times = Vec::new();
    for _ in 0..runs {
        let output = || match log {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_or_else(|_| Stdio::null(), Stdio::from),
            None => Stdio::null(),
        };
        let started = Instant::now();
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect("spawn gateway");
        let deadline = started + timeout;
        let ready = loop {
            if ready(addr) {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let _ = child.kill();
        let _ = child.wait();
        match ready {
            Some(t) => times.push(t),
            None => {
                println!(
                    "RESULT label=startup error=not-ready-within-{}s",
                    timeout.as_secs()
                );
                return;
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let each: Vec<String> = times.iter().map(|t| format!("{:.1}", ms(*t))).collect();
    times.sort();
    println!(
        "RESULT label=startup runs={} median_ms={:.1} max_ms={:.1} each_ms={}",
        times.len(),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        each.join(",")
    );
}

fn ready(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(50)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if write!(
        stream,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
