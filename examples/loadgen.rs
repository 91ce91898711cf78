//! Load generator for `benches/load/run.sh`: drives a webhook receiver with
//! signed Mitel presence notifications over a fixed number of keep-alive
//! HTTP/1.1 connections (closed loop), and reports throughput and latency.
//!
//! Every request is a fresh envelope (new event id, later timestamp, status
//! cycling, principal round-robin over `--principals`), so the gateway really
//! verifies, parses and applies each one instead of short-cutting duplicates.
//! Loopback only; bounded by `--duration` and `--max-requests` (whichever
//! comes first: the run ends early once every connection has stopped at the
//! cap, which is how `benches/state/run.sh` writes an exact number of
//! records). `--rate` paces the connections to a total request rate
//! instead of sending back to back, for latency at a given load rather than
//! at saturation (`benches/edge/run.sh`).
//!
//! `startup` measures the time from spawning the gateway to `/readyz` 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[path = "support/http1.rs"]
mod http1;
use http1::exchange;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Mode,
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
        /// Signing key (Mitel applicationId).
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
            let plan = Plan {
                addr,
                path,
                key: key.into_bytes(),
                principals: principals.max(1),
                max_requests,
                pace: (rate > 0)
                    .then(|| Duration::from_secs_f64(connections.max(1) as f64 / rate as f64)),
                warmup: Duration::from_secs(warmup),
                duration: Duration::from_secs(duration),
            };
            let report = runtime.block_on(load(Arc::new(plan), connections));
            report.print(&label);
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
    key: Vec<u8>,
    principals: u64,
    max_requests: u64,
    /// Time between two requests of one connection, when paced.
    pace: Option<Duration>,
    warmup: Duration,
    duration: Duration,
}

/// Epoch ms the generated timestamps start from; each request adds 1 ms so
/// that no event is stale.
const BASE_MS: u64 = 1_764_000_000_000;

/// The `n`th notification: a Mitel presence envelope of about 450 bytes.
fn envelope(n: u64, principals: u64) -> String {
    let p = n % principals;
    let principal = format!("{:08x}-5a9e-4a57-9d1e-{:012x}", p as u32, p);
    let status = ["Available", "Busy", "Away", "DoNotDisturb"][((n / principals) % 4) as usize];
    format!(
        concat!(
            r#"{{"publicationId":"{n:08x}-2f7d-4d0a-9b43-5f2e8c1d7a10","topic":"platform-api-presence","method":"PUT","#,
            r#""subject":"/presentities/{principal}","content":{{"eventId":"{n:08x}-8f1a-4e3b-a6d2-93c1e5f7b208","#,
            r#""timestamp":{ts},"presence":"{status}","note":""}},"publisher":{{"accountId":"acc-10042"}},"#,
            r#""subscription":{{"subscriptionId":"5c2e7a90-1d3f-4b8e-8c6a-7e9f0a1b2c3d"}},"#,
            r#""notification":{{"createdOn":"2026-11-24T10:15:30.140Z"}}}}"#
        ),
        n = n,
        principal = principal,
        ts = BASE_MS + n,
        status = status,
    )
}

#[derive(Default)]
struct Report {
    latencies_us: Vec<u32>,
    errors: u64,
    measured: Duration,
    body_bytes: usize,
}

impl Report {
    fn percentile(&self, p: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        self.latencies_us[rank]
    }

    fn print(&self, label: &str) {
        let rps = self.latencies_us.len() as f64 / self.measured.as_secs_f64();
        println!(
            "RESULT label={label} rps={rps:.0} p50_us={} p99_us={} p999_us={} errors={} requests={} body_bytes={}",
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
    tokio::select! {
        () = tokio::time::sleep(plan.duration) => {}
        () = all_stopped.cancelled() => {}
    }
    stop.store(true, Ordering::SeqCst);
    let measured = started.elapsed();
    let mut report = Report {
        measured,
        body_bytes: envelope(0, plan.principals).len(),
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
            let body = envelope(n, plan.principals);
            let signature =
                presence_gateway::verify::hmac_hex::sign_hex(&plan.key, body.as_bytes());
            request.clear();
            let _ = write!(
                request,
                "POST {} HTTP/1.1\r\nhost: loadgen\r\ncontent-type: application/json\r\n\
                 x-notify-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
                plan.path,
                body.len()
            );
            request.extend_from_slice(body.as_bytes());
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
