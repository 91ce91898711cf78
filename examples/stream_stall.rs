//! Stall probe for `benches/streams/run.sh`: opens `--consumers` stream
//! consumers at once on a gateway that holds many records (each reading
//! its whole snapshot, or with `--last-event-id` its whole replay, as fast
//! as it can), and meanwhile measures how long signed webhooks and
//! `/healthz` take to be answered: before (idle) and while the consumers
//! open and read.
//!
//! Webhooks: `--probes` keep-alive connections, each sending one signed
//! Mitel notification (a principal of its own, status alternating) every
//! `--interval-ms` after the previous answer; `/healthz` likewise on one
//! more connection. A consumer is done once it has read an event whose id
//! is at least the last `seq` before it opened (a snapshot and a replay
//! both end with it, in ascending `seq`); a `snapshot=false` stream opened
//! first tells the current `seq`.
//!
//! Loopback only; bounded by `--timeout-secs`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// Name printed with the results.
    #[arg(long)]
    label: String,
    /// Gateway address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// Mitel signing key of the source `mitel`.
    #[arg(long)]
    key: String,
    /// Consumer token.
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 20)]
    consumers: usize,
    /// Open the consumers with this `Last-Event-ID` (a replay) instead of
    /// without one (a snapshot).
    #[arg(long)]
    last_event_id: Option<u64>,
    /// Webhook probe connections.
    #[arg(long, default_value_t = 4)]
    probes: usize,
    /// Pause after each probe answer.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Seconds of probes before the consumers open (the idle figures).
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,
    /// Give up on the consumers after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// One probe answer: when it was sent (from the start) and how long it took.
#[derive(Clone, Copy)]
struct Sample {
    sent: Duration,
    took: Duration,
}

/// A probe notification: event ids unique to this run (the gateway may
/// have seen an earlier run's), stamped with the clock.
fn envelope(principal: &str, run: u128, n: u64) -> String {
    let status = ["Available", "Busy"][(n % 2) as usize];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        concat!(
            r#"{{"topic":"platform-api-presence","method":"PUT","#,
            r#""subject":"/presentities/{principal}","content":{{"eventId":"{principal}-{run}-{n}","#,
            r#""timestamp":{ts},"presence":"{status}","note":""}}}}"#
        ),
        principal = principal,
        run = run,
        n = n,
        ts = now_ms,
        status = status,
    )
}

/// Sends one request and reads its whole answer (status, content-length
/// body); the status, or `None` when the connection failed.
async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Option<u16> {
    stream.write_all(request).await.ok()?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).ok()?;
        let status: u16 = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
        let length: usize = head
            .split("\r\n")
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + 4 + length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Some(status);
    }
}

/// Sends `make(n)` requests back to back on one connection (pausing
/// `interval` after each answer) until `stop`; every answer's sample, and
/// the number of failed ones.
async fn probe(
    addr: SocketAddr,
    start: Instant,
    interval: Duration,
    stop: Arc<AtomicBool>,
    make: impl Fn(u64) -> Vec<u8>,
) -> (Vec<Sample>, u64) {
    let mut samples = Vec::new();
    let mut errors = 0;
    let mut buf = Vec::new();
    let mut n = 0;
    'connect: while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(interval).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        while !stop.load(Ordering::Relaxed) {
            let request = make(n);
            n += 1;
            let sent = Instant::now();
            match exchange(&mut stream, &request, &mut buf).await {
                Some(status) if (200..300).contains(&status) => samples.push(Sample {
                    sent: sent - start,
                    took: sent.elapsed(),
                }),
                Some(_) => errors += 1,
                None => {
                    errors += 1;
                    continue 'connect;
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
    (samples, errors)
}

/// The `seq` in the last complete `id: <seq>` line of `text`.
fn last_id(text: &[u8]) -> Option<u64> {
    let mut end = text.len();
    while let Some(at) = text[..end].windows(5).rposition(|w| w == b"\nid: ") {
        let digits = &text[at + 5..];
        let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        if len > 0 && digits.get(len) == Some(&b'\n') {
            return std::str::from_utf8(&digits[..len]).ok()?.parse().ok();
        }
        end = at;
    }
    None
}

/// Opens a stream and reads it; calls `seen` with the id of the last event
/// of every read that has one, and the bytes read. Returns once `seen`
/// says to stop or the stream ends.
async fn stream(
    addr: SocketAddr,
    token: &str,
    query: &str,
    last_event_id: Option<u64>,
    mut seen: impl FnMut(Option<u64>, usize) -> bool,
) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!(
        "GET /v1/stream{query} HTTP/1.1\r\nhost: {addr}\r\n\
         authorization: Bearer {token}\r\naccept: text/event-stream\r\n"
    );
    if let Some(id) = last_event_id {
        request.push_str(&format!("last-event-id: {id}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    if !head.starts_with(b"HTTP/1.1 200") {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        return Err(std::io::Error::other(
            String::from_utf8_lossy(line).into_owned(),
        ));
    }
    // The tail of the previous read, for an id line split between reads.
    let mut carry = head[body_start..].to_vec();
    if !seen(last_id(&carry), carry.len()) {
        return Ok(());
    }
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        // An event is a few hundred bytes: the last id line of a read is
        // in its last kilobyte, or began in the previous read.
        let keep = carry.len().min(64);
        carry.drain(..carry.len() - keep);
        carry.extend_from_slice(&buf[n.saturating_sub(1024)..n]);
        if !seen(last_id(&carry), n) {
            return Ok(());
        }
    }
}

/// What one consumer measured, from the moment all were started.
#[derive(Default)]
struct Consumer {
    first: Option<Duration>,
    done: Option<Duration>,
    bytes: usize,
    error: Option<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// p50, p99 and max of the samples that were in flight during
/// `[from, to]`.
fn summary(samples: &[Sample], from: Duration, to: Duration) -> String {
    let mut took: Vec<Duration> = samples
        .iter()
        .filter(|s| s.sent <= to && s.sent + s.took >= from)
        .map(|s| s.took)
        .collect();
    took.sort();
    format!(
        "n={} p50_ms={} p99_ms={} max_ms={}",
        took.len(),
        ms(percentile(&took, 50.0)),
        ms(percentile(&took, 99.0)),
        ms(took.last().copied().unwrap_or_default())
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(args.addr.ip().is_loopback(), "loopback only");
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_millis(args.interval_ms);
    let key: Arc<[u8]> = Arc::from(args.key.as_bytes());
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());

    // The current seq, from a live-only stream.
    let current = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (current, token) = (Arc::clone(&current), args.token.clone());
        let addr = args.addr;
        tokio::spawn(async move {
            let _ = stream(addr, &token, "?snapshot=false", None, |id, _| {
                current.fetch_max(id.unwrap_or(0), Ordering::Relaxed);
                true
            })
            .await;
        })
    };

    let webhooks: Vec<_> = (0..args.probes)
        .map(|c| {
            let (stop, key) = (Arc::clone(&stop), Arc::clone(&key));
            let addr = args.addr;
            tokio::spawn(async move {
                let principal = format!("stall-probe-{c}");
                probe(addr, start, interval, stop, move |n| {
                    let body = envelope(&principal, run, n);
                    let signature =
                        presence_gateway::verify::hmac_hex::sign_hex(&key, body.as_bytes());
                    let mut request = Vec::with_capacity(body.len() + 200);
                    let _ = write!(
                        request,
                        "POST /webhooks/mitel HTTP/1.1\r\nhost: probe\r\ncontent-type: application/json\r\n\
                         x-notify-signature: {signature}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    request
                })
                .await
            })
        })
        .collect();
    let health = {
        let stop = Arc::clone(&stop);
        let addr = args.addr;
        tokio::spawn(async move {
            probe(addr, start, interval, stop, |_| {
                b"GET /healthz HTTP/1.1\r\nhost: probe\r\n\r\n".to_vec()
            })
            .await
        })
    };

    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let target = current.load(Ordering::Relaxed);
    let opened = start.elapsed();
    let deadline = Duration::from_secs(args.timeout_secs);
    let consumers: Vec<_> = (0..args.consumers)
        .map(|_| {
            let token = args.token.clone();
            let (addr, last_event_id) = (args.addr, args.last_event_id);
            tokio::spawn(async move {
                let mut c = Consumer::default();
                let began = Instant::now();
                let read = stream(addr, &token, "", last_event_id, |id, bytes| {
                    c.bytes += bytes;
                    let Some(id) = id else { return true };
                    c.first.get_or_insert_with(|| began.elapsed());
                    if id >= target {
                        c.done = Some(began.elapsed());
                        return false;
                    }
                    true
                });
                let outcome = tokio::time::timeout(deadline, read).await;
                match outcome {
                    Ok(Ok(())) if c.done.is_some() => {}
                    Ok(Ok(())) => c.error = Some("the stream ended early".into()),
                    Ok(Err(e)) => c.error = Some(e.to_string()),
                    Err(_) => c.error = Some("timed out".into()),
                }
                c
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in consumers {
        results.push(c.await.unwrap_or_default());
    }
    let all_done = start.elapsed();
    // A second more of probes after the consumers, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hooks = Vec::new();
    let mut hook_errors = 0;
    for w in webhooks {
        let (samples, errors) = w.await.unwrap_or_default();
        hooks.extend(samples);
        hook_errors += errors;
    }
    let (healthz, health_errors) = health.await.unwrap_or_default();
    watcher.abort();

    let label = &args.label;
    let kind = match args.last_event_id {
        Some(id) => format!("replay-from-{id}"),
        None => "snapshot".into(),
    };
    let idle = (Duration::ZERO, opened);
    let busy = (opened, all_done);
    println!(
        "RESULT label={label} open={kind} phase=idle webhook {} | healthz {}",
        summary(&hooks, idle.0, idle.1),
        summary(&healthz, idle.0, idle.1)
    );
    println!(
        "RESULT label={label} open={kind} phase=consumers webhook {} | healthz {} | errors webhook={hook_errors} healthz={health_errors}",
        summary(&hooks, busy.0, busy.1),
        summary(&healthz, busy.0, busy.1)
    );
    let mut first: Vec<Duration> = results.iter().filter_map(|c| c.first).collect();
    let mut done: Vec<Duration> = results.iter().filter_map(|c| c.done).collect();
    first.sort();
    done.sort();
    let mb =
        results.iter().map(|c| c.bytes).sum::<usize>() as f64 / 1e6 / results.len().max(1) as f64;
    let failed: Vec<&str> = results.iter().filter_map(|c| c.error.as_deref()).collect();
    println!(
        "RESULT label={label} open={kind} consumers={} done={} first_byte_p50_ms={} first_byte_max_ms={} \
         all_read_p50_ms={} all_read_max_ms={} mb_each={mb:.0} up_to_seq={target} failed={:?}",
        results.len(),
        done.len(),
        ms(percentile(&first, 50.0)),
        ms(first.last().copied().unwrap_or_default()),
        ms(percentile(&done, 50.0)),
        ms(done.last().copied().unwrap_or_default()),
        failed
    );
}
