//! Cross-replica delivery bench for `benches/replicas/run.sh`: two gateways
//! share one Redis store (DESIGN §8). It opens `--clients` Server-Sent Events
//! streams on replica B (and `--local` on replica A, for comparison), then
//! applies one change at a time with a signed webhook posted to A and
//! records, for every stream, the time from starting the request until that
//! stream has read the change.
//!
//! Each change carries its number in the status text (`note`), so a stream
//! event is matched to its change by content, not by counting. Prints, per
//! change, when A answered and when the first and the last of B's streams
//! had it, then p50/p99/max over all changes.
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
    /// Replica A: webhooks are posted here.
    #[arg(long)]
    a: SocketAddr,
    /// Replica B: the streams are opened here.
    #[arg(long)]
    b: SocketAddr,
    /// Mitel signing key of the source `mitel`.
    #[arg(long)]
    key: String,
    /// Consumer token.
    #[arg(long)]
    token: String,
    /// Streams on B.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Streams on A (the same change seen without crossing replicas).
    #[arg(long, default_value_t = 1)]
    local: usize,
    /// Changes applied one after the other.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Pause between changes, once every stream has the previous one.
    #[arg(long, default_value_t = 20)]
    gap_ms: u64,
}

/// What a stream reports: which stream (`< clients`: on B), which change,
/// when it was read.
type Seen = (usize, usize, Instant);

/// Opens one stream and reports every change it reads (and counts resets
/// as change `usize::MAX`, which no change has).
async fn client(
    addr: SocketAddr,
    index: usize,
    token: Arc<str>,
    connected: Arc<Barrier>,
    seen: mpsc::UnboundedSender<Seen>,
) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /v1/stream?snapshot=false HTTP/1.1\r\nhost: {addr}\r\n\
         authorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    // The response head: the stream is open once it is read.
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&pending, b"\r\n\r\n") {
            if !pending.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&pending).into_owned(),
                ));
            }
            pending.drain(..end + 4);
            break;
        }
    }
    connected.wait().await;
    loop {
        // Whole events end with a blank line; the body is chunked, so chunk
        // sizes sit between them and are ignored (they hold no "event:").
        while let Some(end) = find(&pending, b"\n\n") {
            let event = &pending[..end];
            if find(event, b"event: reset").is_some() {
                let _ = seen.send((index, usize::MAX, Instant::now()));
            } else if find(event, b"event: presence").is_some()
                && let Some(change) = change_of(event)
            {
                let _ = seen.send((index, change, Instant::now()));
            }
            pending.drain(..end + 2);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The change number in a record's `"status_text":"change-N"`.
fn change_of(event: &[u8]) -> Option<usize> {
    let marker = b"\"status_text\":\"change-";
    let at = find(event, marker)? + marker.len();
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
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

fn summary(label: &str, mut values: Vec<Duration>) {
    values.sort();
    println!(
        "RESULT {label} n={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        values.len(),
        ms(percentile(&values, 50.0)),
        ms(percentile(&values, 99.0)),
        ms(values.last().copied().unwrap_or_default()),
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        args.a.ip().is_loopback() && args.b.ip().is_loopback(),
        "loopback only"
    );
    let token: Arc<str> = Arc::from(args.token.as_str());
    let streams = args.clients + args.local;
    let connected = Arc::new(Barrier::new(streams + 1));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let started = Instant::now();
    // Connect in waves so the listen backlog never overflows.
    let mut tasks = Vec::with_capacity(streams);
    for wave in (0..streams).collect::<Vec<_>>().chunks(500) {
        for &index in wave {
            let addr = if index < args.clients { args.b } else { args.a };
            let (token, connected, seen) =
                (Arc::clone(&token), Arc::clone(&connected), seen_tx.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = client(addr, index, token, connected, seen).await {
                    eprintln!("stream {index} on {addr}: {e}");
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(seen_tx);
    if tokio::time::timeout(Duration::from_secs(120), connected.wait())
        .await
        .is_err()
    {
        eprintln!("not every stream connected within 120 s");
        std::process::exit(1);
    }
    println!(
        "connected {} streams on B and {} on A in {:.1} s",
        args.clients,
        args.local,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let poster = Poster { addr: args.a };
    // Over every (change, stream on B): from the request's start, and from
    // A's answer (zero when the stream had it before the answer arrived).
    let mut b_all = Vec::with_capacity(args.clients * args.changes);
    let mut b_all_after_answer = Vec::with_capacity(args.clients * args.changes);
    // Per change: A's answer, B's first and last stream, A's own streams.
    let (mut answers, mut b_first, mut b_last, mut a_local) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut missing, mut resets) = (0usize, 0usize);
    for change in 0..args.changes {
        let body = format!(
            concat!(
                r#"{{"topic":"platform-api-presence","method":"PUT","subject":"/presentities/replicas","#,
                r#""content":{{"eventId":"replicas-{change}","presence":"{presence}","#,
                r#""note":"change-{change}","timestamp":{ts}}}}}"#
            ),
            change = change,
            presence = if change % 2 == 0 { "Busy" } else { "Available" },
            ts = 1_764_000_000_000u64 + change as u64,
        );
        let signature =
            presence_gateway::verify::hmac_hex::sign_hex(args.key.as_bytes(), body.as_bytes());
        let sent = Instant::now();
        poster.post(&body, &signature).await;
        let answered = sent.elapsed();
        answers.push(answered);
        let mut on_b = Vec::with_capacity(args.clients);
        let mut on_a = Vec::with_capacity(args.local);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while on_b.len() + on_a.len() < streams {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some((_, c, _))) if c == usize::MAX => resets += 1,
                Ok(Some((index, c, at))) if c == change => {
                    let took = at.duration_since(sent);
                    if index < args.clients {
                        on_b.push(took);
                    } else {
                        on_a.push(took);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missing += streams - on_b.len() - on_a.len();
        on_b.sort();
        if let (Some(first), Some(last)) = (on_b.first(), on_b.last()) {
            b_first.push(*first);
            b_last.push(*last);
        }
        a_local.extend(on_a.iter().copied());
        println!(
            "RESULT change={change} answered_ms={:.2} b_delivered={}/{} b_first_ms={:.2} b_p50_ms={:.2} b_last_ms={:.2} a_ms={}",
            ms(answered),
            on_b.len(),
            args.clients,
            ms(on_b.first().copied().unwrap_or_default()),
            ms(percentile(&on_b, 50.0)),
            ms(on_b.last().copied().unwrap_or_default()),
            on_a.iter()
                .map(|d| format!("{:.2}", ms(*d)))
                .collect::<Vec<_>>()
                .join(","),
        );
        b_all_after_answer.extend(on_b.iter().map(|d| d.saturating_sub(answered)));
        b_all.extend(on_b);
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    println!(
        "== {} changes, {} streams on B, {} on A; missing deliveries {missing}, resets {resets}",
        args.changes, args.clients, args.local
    );
    summary("webhook_answer_on_a", answers);
    summary("b_every_stream_from_request", b_all);
    summary("b_every_stream_from_answer", b_all_after_answer);
    summary("b_first_stream_per_change", b_first);
    summary("b_last_stream_per_change", b_last);
    if args.local > 0 {
        summary("a_local_streams_from_request", a_local);
    }
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
        stream.set_nodelay(true).expect("nodelay");
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
