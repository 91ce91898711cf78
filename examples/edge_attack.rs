//! Hostile clients for `benches/edge/run.sh`: many connections that each
//! cost the attacker almost nothing and try to hold a share of the
//! gateway, without any key.
//!
//! - `slow-body`: a webhook head with a fake signature and a
//!   `Content-Length`, then one body byte every `--interval-ms` (the body
//!   never completes);
//! - `slow-headers` (slowloris): a request head, one header line every
//!   `--interval-ms`, never finished;
//! - `big-headers`: `--header-bytes` of an unfinished head sent at once,
//!   then nothing.
//!
//! Every connection that the gateway answers or closes is opened again
//! (after `--reconnect-ms`), so the attack keeps its size until
//! `--duration` ends. Connections are
//! spread over `--addresses` source addresses 127.0.0.2, 127.0.0.3, ...
//! (all loopback on Linux), as a botnet's would be over its members.
//! Loopback only, bounded by `--duration`; the result is one `RESULT` line:
//! connections opened, answers by status (a 503 that comes before the
//! request was read is the gateway refusing a connection beyond
//! `server.max_connections`), connections closed without an answer, and
//! how many were open at most at once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    SlowBody,
    SlowHeaders,
    BigHeaders,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Gateway address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "/webhooks/mitel")]
    path: String,
    /// Connections kept open at once.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Source addresses the connections are spread over (127.0.0.2 on).
    #[arg(long, default_value_t = 1)]
    addresses: u8,
    /// Pause between two bytes (slow-body) or header lines (slow-headers).
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// Size of the unfinished head (big-headers).
    #[arg(long, default_value_t = 300 * 1024)]
    header_bytes: usize,
    /// Pause before a connection the gateway ended is opened again.
    #[arg(long, default_value_t = 0)]
    reconnect_ms: u64,
    /// Seconds the attack lasts.
    #[arg(long, default_value_t = 20)]
    duration: u64,
}

#[derive(Default)]
struct Tally {
    opened: AtomicU64,
    connect_failed: AtomicU64,
    open_now: AtomicU64,
    max_open: AtomicU64,
    closed_unanswered: AtomicU64,
    answers: Mutex<BTreeMap<u16, u64>>,
}

impl Tally {
    fn answered(&self, status: u16) {
        *self.answers.lock().entry(status).or_default() += 1;
    }
}

fn main() {
    let args = Arc::new(Args::parse());
    assert!(args.addr.ip().is_loopback(), "loopback targets only");
    assert!(args.addresses >= 1, "--addresses must be at least 1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    runtime.block_on(async {
        let end = Instant::now() + Duration::from_secs(args.duration);
        let mut tasks = Vec::with_capacity(args.connections);
        for i in 0..args.connections {
            let (args, tally) = (Arc::clone(&args), Arc::clone(&tally));
            tasks.push(tokio::spawn(async move {
                attacker(i, &args, &tally, end).await
            }));
            // Ramp up in steps, so the listen backlog does not overflow (the
            // SYNs it would drop are retried only a second later).
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    let answers: Vec<String> = tally
        .answers
        .lock()
        .iter()
        .map(|(status, n)| format!("answered_{status}={n}"))
        .collect();
    println!(
        "RESULT mode={:?} connections={} addresses={} opened={} connect_failed={} max_open={} closed_unanswered={} {}",
        args.mode,
        args.connections,
        args.addresses,
        tally.opened.load(Ordering::Relaxed),
        tally.connect_failed.load(Ordering::Relaxed),
        tally.max_open.load(Ordering::Relaxed),
        tally.closed_unanswered.load(Ordering::Relaxed),
        answers.join(" ")
    );
}

/// One attacking connection, reopened whenever the gateway ends it.
async fn attacker(i: usize, args: &Args, tally: &Tally, end: Instant) {
    let from = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % usize::from(args.addresses)) as u8,
    ));
    while Instant::now() < end {
        let Some(mut stream) = connect(from, args.addr).await else {
            tally.connect_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let open = tally.open_now.fetch_add(1, Ordering::Relaxed) + 1;
        tally.max_open.fetch_max(open, Ordering::Relaxed);
        let outcome = tokio::time::timeout_at(end, hold(&mut stream, args)).await;
        tally.open_now.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Err(_) => return, // the attack is over
            Ok(Some(status)) => tally.answered(status),
            Ok(None) => {
                tally.closed_unanswered.fetch_add(1, Ordering::Relaxed);
            }
        }
        let pause = Instant::now() + Duration::from_millis(args.reconnect_ms);
        tokio::time::sleep_until(pause.min(end)).await;
    }
}

async fn connect(from: IpAddr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    socket.connect(to).await.ok()
}

/// Sends the mode's bytes until the gateway answers (its status) or closes
/// the connection (`None`).
async fn hold(stream: &mut TcpStream, args: &Args) -> Option<u16> {
    let (head, mut drip): (Vec<u8>, Box<dyn FnMut() -> Vec<u8> + Send>) = match args.mode {
        Mode::SlowBody => (
            format!(
                "POST {} HTTP/1.1\r\nhost: attack\r\ncontent-type: application/json\r\n\
                 x-notify-signature: {}\r\ncontent-length: 100000\r\n\r\n{{",
                args.path,
                "0".repeat(64)
            )
            .into_bytes(),
            Box::new(|| b" ".to_vec()),
        ),
        Mode::SlowHeaders => {
            let mut n = 0u64;
            (
                format!("GET {} HTTP/1.1\r\nhost: attack\r\n", args.path).into_bytes(),
                Box::new(move || {
                    n += 1;
                    format!("x-slow-{n}: {n}\r\n").into_bytes()
                }),
            )
        }
        Mode::BigHeaders => {
            let mut head =
                format!("GET {} HTTP/1.1\r\nhost: attack\r\nx-big: ", args.path).into_bytes();
            head.resize(head.len() + args.header_bytes, b'a');
            (head, Box::new(Vec::new))
        }
    };
    let mut buf = [0u8; 512];
    let mut read = 0;
    // A gateway that answers while the head is still being written (431,
    // or a refusal) makes the write fail; what it sent is still read.
    let _ = stream.write_all(&head).await;
    let interval = Duration::from_millis(args.interval_ms);
    loop {
        tokio::select! {
            n = stream.read(&mut buf[read..]) => match n {
                Ok(0) | Err(_) => return status(&buf[..read]),
                Ok(n) => {
                    read += n;
                    if let Some(status) = status(&buf[..read]) {
                        return Some(status);
                    }
                    if read == buf.len() {
                        return None;
                    }
                }
            },
            () = tokio::time::sleep(interval) => {
                let bytes = drip();
                if !bytes.is_empty() && stream.write_all(&bytes).await.is_err() {
                    // Closed on us; an answer may still be in the buffer.
                    let _ = tokio::time::timeout(Duration::from_millis(200), async {
                        while let Ok(n) = stream.read(&mut buf[read..]).await {
                            if n == 0 || read + n == buf.len() {
                                break;
                            }
                            read += n;
                        }
                    })
                    .await;
                    return status(&buf[..read]);
                }
            }
        }
    }
}

/// The status of an `HTTP/1.1 NNN` line at the start of `bytes`.
fn status(bytes: &[u8]) -> Option<u16> {
    let line = bytes.strip_prefix(b"HTTP/1.1 ")?;
    std::str::from_utf8(line.get(..3)?).ok()?.parse().ok()
}
