//! The accept side: a TCP listener whose connections close when the peer
//! stops taking bytes.
//!
//! hyper has no write timeout: a client that never reads (a stalled stream
//! consumer, a slow-read attacker) keeps its connection, its buffers and, for
//! a stream, its place in the fan-out for as long as it likes. [`Guarded`]
//! arms a timer whenever a write would block and fails the write with
//! `TimedOut` when the socket has accepted nothing for the whole
//! `write_timeout`; hyper then closes the connection. A write that goes
//! through disarms the timer, so a peer that keeps reading is not cut off
//! (a write is retried when the kernel reports room, about a third of the
//! send buffer, so a peer draining less than that per `write_timeout` is),
//! and nothing is allocated or read from the clock while writes succeed.
//!
//! Accepted sockets get `TCP_NODELAY`: stream events are small writes that
//! must not wait for the acknowledgement of the previous one.
//!
//! Every accepted connection is counted in
//! [`GlobalStats::connections_open`] until its socket closes, which is
//! what `server.max_connections` is checked against.
//!
//! A peer that vanished without a FIN is not noticed by this timer while
//! only small writes (keep-alive comments) fit into the send buffer: on
//! Linux, accepted sockets also get `TCP_USER_TIMEOUT` = `write_timeout`,
//! so the kernel ends a connection whose sent data stays unacknowledged
//! that long (instead of after its retransmission timeout, ~15 minutes).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::telemetry::GlobalStats;

/// [`TcpListener`] handing out [`Guarded`] connections.
pub struct GuardedListener {
    inner: TcpListener,
    write_timeout: Duration,
    global: Arc<GlobalStats>,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, write_timeout: Duration, global: Arc<GlobalStats>) -> Self {
        GuardedListener {
            inner,
            write_timeout,
            global,
        }
    }
}

impl GuardedListener {
    /// The next connection. Errors (out of descriptors, a connection reset
    /// before accept) are logged and retried after a short pause.
    pub async fn accept(&self) -> (Guarded, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => return (self.guard(stream), peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The counters connections report to.
    pub fn global(&self) -> &Arc<GlobalStats> {
        &self.global
    }

    /// Stops taking connections: returns those the kernel has already
    /// completed (a client whose `connect` succeeded has been promised an
    /// answer), and closes the listener.
    ///
    /// Closing a listening socket resets every connection still in its
    /// queue, so the queue is emptied first: the backlog is shrunk to
    /// nothing (on Linux at most one more handshake completes, further SYNs
    /// are dropped, and their clients, retrying a second later, find the
    /// port closed: refused, not reset), then everything queued is taken
    /// with `accept` until it would block. The system call is made
    /// directly: tokio's `accept` reports a connection only after its
    /// reactor has seen the socket ready.
    pub fn stop(self) -> Vec<(Guarded, SocketAddr)> {
        let socket = socket2::SockRef::from(&self.inner);
        let _ = socket.listen(0);
        let mut queued = Vec::new();
        while let Ok((accepted, peer)) = socket.accept() {
            let stream = std::net::TcpStream::from(accepted);
            let Some(peer) = peer.as_socket() else {
                continue;
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Ok(stream) = TcpStream::from_std(stream) {
                queued.push((self.guard(stream), peer));
            }
        }
        queued
    }

    fn guard(&self, stream: TcpStream) -> Guarded {
        self.global.connections_open.fetch_add(1, Ordering::Relaxed);
        // Best effort: a socket that refuses still works.
        let _ = stream.set_nodelay(true);
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(self.write_timeout));
        Guarded {
            stream,
            write_timeout: self.write_timeout,
            stalled: None,
            global: Arc::clone(&self.global),
        }
    }
}

/// Where and when a request came in, as `ConnectInfo<Peer>` on every
/// request: the connection's peer address, and the instant its head had
/// been read (the earliest the gateway knows of the request; request
/// durations are measured from it, so that time spent waiting for a busy
/// runtime counts).
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub arrived: std::time::Instant,
}

impl Peer {
    /// A request from `addr` arriving now.
    pub fn now(addr: SocketAddr) -> Self {
        Peer {
            addr,
            arrived: std::time::Instant::now(),
        }
    }
}

/// A TCP connection with a write deadline.
pub struct Guarded {
    stream: TcpStream,
    write_timeout: Duration,
    /// Armed while a write is blocked: when the peer must have taken bytes.
    stalled: Option<Pin<Box<Sleep>>>,
    global: Arc<GlobalStats>,
}

/// The whole answer to a connection beyond `server.max_connections`.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/problem+json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 156\r\n\
\r\n\
{\"type\":\"urn:presence-gateway:problem:too-many-connections\",\"title\":\"Service Unavailable\",\
\"status\":503,\"detail\":\"the gateway has too many open connections\"}";

impl Guarded {
    /// Answers a connection the gateway will not serve with a fixed 503 and
    /// closes it, without reading anything and without waiting: the answer
    /// is written only if the socket takes it at once (a fresh socket's
    /// buffer does), and a request already sent may make the close a reset.
    pub fn refuse(self) {
        self.global
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.stream.try_write(REFUSED);
    }

    /// The kernel's side of the same limit (TCP_USER_TIMEOUT) may end the
    /// connection first; a read or a write then reports it.
    fn count_kernel_timeout(&self, e: &io::Error) {
        if e.kind() == io::ErrorKind::TimedOut {
            self.global.write_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wraps a write attempt: a blocked write arms the deadline (once), a
    /// completed one disarms it, and a deadline that passed fails the write.
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match attempt(Pin::new(&mut self.stream), cx) {
            Poll::Ready(result) => {
                self.stalled = None;
                if let Err(e) = &result {
                    self.count_kernel_timeout(e);
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.write_timeout;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(timer.as_mut().poll(cx));
                self.global.write_timeouts.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "peer took no bytes within the write timeout",
                )))
            }
        }
    }
}

/// A connection is counted from accept until its socket closes, wherever it
/// went meanwhile (a WebSocket stream takes it over from hyper).
impl Drop for Guarded {
    fn drop(&mut self) {
        self.global.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &polled {
            self.count_kernel_timeout(e);
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(timeout: Duration) -> (Guarded, TcpStream, Arc<GlobalStats>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let global = Arc::new(GlobalStats::default());
        let guarded = GuardedListener::new(listener, timeout, Arc::clone(&global));
        let client = TcpStream::connect(addr).await.unwrap();
        let (io, _) = guarded.accept().await;
        (io, client, global)
    }

    #[test]
    fn the_refusal_is_a_whole_problem_answer() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
    }

    #[tokio::test]
    async fn stopping_hands_over_the_connections_already_queued() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let guarded = GuardedListener::new(
            listener,
            Duration::from_secs(5),
            Arc::new(GlobalStats::default()),
        );
        // Completed by the kernel, never accepted by the server.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let queued = guarded.stop();
        assert_eq!(queued.len(), 3);
        let mut locals: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        let mut peers: Vec<SocketAddr> = queued.iter().map(|(_, peer)| *peer).collect();
        locals.sort();
        peers.sort();
        assert_eq!(locals, peers);
        // The listener is closed; the handed-over connections work.
        assert!(TcpStream::connect(addr).await.is_err());
        let (mut io, _) = queued.into_iter().next().unwrap();
        io.write_all(b"x").await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_abort_unacknowledged_data_after_the_write_timeout() {
        let (io, _client, _) = pair(Duration::from_secs(7)).await;
        let socket = socket2::SockRef::from(&io.stream);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(7))
        );
        assert!(socket.tcp_nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_is_timed_out() {
        let (mut io, _client, global) = pair(Duration::from_millis(200)).await;
        let chunk = vec![0u8; 64 * 1024];
        let error = loop {
            if let Err(e) = io.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(global.write_timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_timed_out() {
        // Reads every 20 ms; the timeout leaves room for a slow machine.
        let (mut io, mut client, global) = pair(Duration::from_secs(2)).await;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let chunk = vec![0u8; 64 * 1024];
        // Far more than the socket buffers hold: the writer blocks many times,
        // each time for less than the timeout.
        for _ in 0..40 {
            io.write_all(&chunk).await.unwrap();
        }
        drop(io);
        assert_eq!(reader.await.unwrap(), 40 * chunk.len());
        assert_eq!(global.write_timeouts.load(Ordering::Relaxed), 0);
    }
}
