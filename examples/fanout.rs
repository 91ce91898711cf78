//! Fan-out bench for `benches/fanout/run.sh`: opens `--clients` Server-Sent
//! Events streams on a running gateway, measures the gateway's memory per
//! idle stream (its RSS from `/proc/<pid>/status` before and after), then
//! applies one change at a time with a signed webhook and records, for every
//! client, the time from sending the webhook until that client has read the
//! event. Prints p50/p99/max per change and over all changes, and how long
//! each webhook took to be answered while the streams were open.
//!
//! Loopback only; bounded by `--changes` and a timeout per change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, mpsc};

#[derive(Parser)]
struct Args {
    /// Gateway address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// The gateway's process id, for its resident memory.
    #[arg(long)]
    pid: u32,
    /// Mitel signing key of the source `mitel`.
    #[arg(long)]
    key: String,
    /// Consumer token.
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Changes applied one after the other.
    #[arg(long, default_value_t = 5)]
    changes: usize,
}

/// The gateway's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Opens one stream and reports, for every `event: presence` it reads, the
/// moment it read it.
async fn client(
    addr: SocketAddr,
    token: Arc<str>,
    connected: Arc<Barrier>,
    seen: mpsc::UnboundedSender<(usize, Instant)>,
) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /v1/stream?snapshot=false HTTP/1.1\r\nhost: {addr}\r\n\
         authorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    // The response head: the stream is open once it is read.
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&head).into_owned(),
        ));
    }
    connected.wait().await;
    let mut change = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let now = Instant::now();
        // One event per change; keep-alive comments carry no "event:".
        let events = buf[..n]
            .windows(15)
            .filter(|w| *w == b"event: presence")
            .count();
        for _ in 0..events {
            let _ = seen.send((change, now));
            change += 1;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let token: Arc<str> = Arc::from(args.token.as_str());
    let before = rss_kib(args.pid);
    let connected = Arc::new(Barrier::new(args.clients + 1));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    // Connect in waves so the listen backlog never overflows.
    let mut tasks = Vec::with_capacity(args.clients);
    for wave in (0..args.clients).collect::<Vec<_>>().chunks(500) {
        for _ in wave {
            tasks.push(tokio::spawn(client(
                args.addr,
                Arc::clone(&token),
                Arc::clone(&connected),
                seen_tx.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(seen_tx);
    if tokio::time::timeout(Duration::from_secs(120), connected.wait())
        .await
        .is_err()
    {
        eprintln!("not every client connected within 120 s");
        std::process::exit(1);
    }
    println!(
        "connected {} streams in {:.1} s",
        args.clients,
        started.elapsed().as_secs_f64()
    );
    // Let allocations settle, then read the idle cost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(args.pid);
    let per_client = (idle.saturating_sub(before) as f64 * 1024.0) / args.clients as f64;
    println!(
        "RESULT idle_memory gateway_rss_before_kib={before} gateway_rss_idle_kib={idle} \
         per_client_bytes={per_client:.0} per_client_kib={:.2}",
        per_client / 1024.0
    );

    let poster = Poster { addr: args.addr };
    let mut all = Vec::with_capacity(args.clients * args.changes);
    for change in 0..args.changes {
        let body = format!(
            r#"{{"topic":"platform-api-presence","subject":"/presentities/fanout","content":{{"presence":"{}","timestamp":{}}}}}"#,
            if change % 2 == 0 { "Busy" } else { "Available" },
            1_700_000_000_000u64 + change as u64
        );
        let signature =
            presence_gateway::verify::hmac_hex::sign_hex(args.key.as_bytes(), body.as_bytes());
        let sent = Instant::now();
        poster.post(&body, &signature).await;
        // How long the webhook itself took with every stream open.
        let answered = sent.elapsed();
        let mut delays = Vec::with_capacity(args.clients);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while delays.len() < args.clients {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some((c, at))) if c == change => delays.push(at.duration_since(sent)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        delays.sort();
        println!(
            "RESULT change={change} webhook_ms={:.2} delivered={}/{} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
            ms(answered),
            delays.len(),
            args.clients,
            ms(percentile(&delays, 50.0)),
            ms(percentile(&delays, 99.0)),
            ms(delays.last().copied().unwrap_or_default()),
        );
        all.extend(delays);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    all.sort();
    println!(
        "RESULT all_changes clients={} changes={} delivered={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        args.clients,
        args.changes,
        all.len(),
        ms(percentile(&all, 50.0)),
        ms(percentile(&all, 99.0)),
        ms(all.last().copied().unwrap_or_default()),
    );
    for task in tasks {
        task.abort();
    }
}

/// One webhook POST over a fresh connection (no client library needed).
struct Poster {
    addr: SocketAddr,
}

impl Poster {
    async fn post(&self, body: &str, signature: &str) {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let request = format!(
            "POST /webhooks/mitel HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             x-notify-signature: {signature}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("answer");
        assert!(
            answer.starts_with(b"HTTP/1.1 204"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}
