//! The HTTP/1.1 server loop: accept, serve each connection with hyper, and
//! drain at shutdown.
//!
//! The gateway speaks plain HTTP/1.1 (TLS and HTTP/2 end at the reverse
//! proxy), so connections go straight to hyper's HTTP/1 state machine
//! instead of a protocol-sniffing builder: less work per connection and
//! less memory per open stream. Each request carries its peer address and
//! the instant its head was read as `ConnectInfo<Peer>`.
//!
//! What a client without a key meets here:
//! - at most [`Limits::max_connections`] connections are open (WebSocket
//!   streams included); one more is answered a fixed 503 and closed at
//!   once, unread, and counted, so that no number of idle or slow
//!   connections exhausts the process's file descriptors;
//! - a request head must arrive within [`Limits::header_read_timeout`]
//!   (which is also how long a keep-alive connection may sit idle) and fit
//!   in [`Limits::max_header_bytes`] (431 otherwise), so an unfinished head
//!   holds a small buffer for a short time.
//!
//! Draining, once `shutdown` completes:
//! 1. the listener stops: the connections the kernel had already completed
//!    are taken and served ([`GuardedListener::stop`]), then it closes;
//! 2. every answer from then on carries `Connection: close`: requests in
//!    progress complete, and a request that arrives on an open keep-alive
//!    connection (sent before its client could know; `/readyz` now tells
//!    it 503) is still answered, as that connection's last;
//! 3. once [`IDLE_LINGER`] has passed and no request is in progress, the
//!    connections still open (idle keep-alive ones, heads never finished)
//!    are closed.
//!
//! The function returns when every connection has ended (streams end
//! themselves at shutdown; WebSocket streams were handed off and are waited
//! for by the caller).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::listener::{Guarded, GuardedListener, Peer};

/// The limits of the HTTP side, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections, at most.
    pub max_connections: usize,
    /// How long a request head may take (and a keep-alive connection idle).
    pub header_read_timeout: Duration,
    /// The largest request head, in bytes.
    pub max_header_bytes: usize,
}

/// Descriptors kept back from connections for everything else the process
/// opens (journal files, Redis and provider connections, the runtime's own).
const RESERVED_FDS: u64 = 128;

/// `max_connections` as the process can hold it: lowered (with a warning)
/// to what its open-file limit leaves after [`RESERVED_FDS`], so that
/// connections are refused by the gateway instead of failing to be
/// accepted (and the journal failing to open a file).
pub fn fit_connections_to_fd_limit(max_connections: usize) -> usize {
    let Some(limit) = open_file_limit() else {
        return max_connections;
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX);
    if room < max_connections {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            using = room,
            "server.max_connections is more than the open-file limit (ulimit -n) allows; \
             raise the limit (LimitNOFILE=, docker --ulimit nofile=) or lower the setting"
        );
        return room;
    }
    max_connections
}

/// The soft limit on open files (`RLIMIT_NOFILE`), on Linux; `None` when
/// unlimited or unknown.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&limits)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    // "Max open files            1024                 524288               files"
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How long idle keep-alive connections stay open once draining starts: a
/// request already on its way on one is answered instead of cut off, which
/// its client could not tell from a lost request.
const IDLE_LINGER: Duration = Duration::from_millis(500);

/// How often a drain looks whether requests are still in progress.
const BUSY_POLL: Duration = Duration::from_millis(10);

/// Serves `app` on `listener` until `shutdown` completes, then drains.
pub async fn serve<S>(
    listener: GuardedListener,
    app: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    let drain = Arc::new(Drain::default());
    let global = Arc::clone(listener.global());
    let connections = TaskTracker::new();
    let refusing = AtomicBool::new(false);
    let admit = |io: Guarded, peer: SocketAddr| {
        // `io` is counted already. Only this task adds connections, so the
        // count can only have gone down since.
        let open = global.connections_open.load(Ordering::Relaxed);
        if open > limits.max_connections as u64 {
            if !refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "server.max_connections reached: refusing new connections"
                );
            }
            io.refuse();
            return;
        }
        refusing.store(false, Ordering::Relaxed);
        let conn = Arc::new(ConnState {
            busy: AtomicBool::new(false),
            drain: Arc::clone(&drain),
        });
        let service = {
            let (app, conn) = (app.clone(), Arc::clone(&conn));
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let peer = Peer {
                    addr: peer,
                    arrived: Instant::now(),
                };
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                conn.busy.store(true, Ordering::Relaxed);
                Answer {
                    inner: tower::ServiceExt::oneshot(app.clone(), request),
                    conn: Arc::clone(&conn),
                }
            })
        };
        let connection = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        // A peer that went away, timed out or sent garbage: hyper has
        // answered what it could; nothing to report per connection.
        connections.spawn(Draining::new(connection, conn));
    };
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        admit(io, peer);
    }
    drain.draining.store(true, Ordering::Release);
    for (io, peer) in listener.stop() {
        admit(io, peer);
    }
    connections.close();
    let all_done = connections.wait();
    tokio::pin!(all_done);
    let linger_end = tokio::time::Instant::now() + IDLE_LINGER;
    let mut lingered = false;
    loop {
        tokio::select! {
            () = &mut all_done => return,
            () = tokio::time::sleep_until(linger_end), if !lingered => lingered = true,
            () = tokio::time::sleep(BUSY_POLL), if lingered => {}
        }
        if lingered && !drain.any_busy() {
            break;
        }
    }
    drain.close();
    all_done.await;
}

/// What the server knows of one connection.
struct ConnState {
    /// A request is in the application (from its head to its answer).
    busy: AtomicBool,
    drain: Arc<Drain>,
}

/// The shutdown signal of every open connection.
///
/// Watching a shared signal with a future (a `Notify`, a watch channel, a
/// cancellation token) costs a lock on a process-wide mutex every time a
/// connection is polled, which is several times per request on every core.
/// Here a connection registers its task's waker once, reads one atomic flag
/// per poll, and is woken once when it is to close; an answer reads one
/// flag to know whether the drain has begun.
#[derive(Default)]
struct Drain {
    /// Answers carry `Connection: close`.
    draining: AtomicBool,
    /// Connections close once their request in progress, if any, is done.
    closing: AtomicBool,
    next_id: AtomicU64,
    /// Connections polled at least once, with their task's waker.
    open: Mutex<HashMap<u64, (Waker, Arc<ConnState>)>>,
}

impl Drain {
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        for (_, (waker, _)) in self.open.lock().drain() {
            waker.wake();
        }
    }

    fn any_busy(&self) -> bool {
        self.open
            .lock()
            .values()
            .any(|(_, conn)| conn.busy.load(Ordering::Relaxed))
    }
}

pin_project_lite::pin_project! {
    /// A request's answer; marks the connection idle again, and asks for
    /// the connection to close once draining has begun.
    struct Answer<F> {
        #[pin]
        inner: F,
        conn: Arc<ConnState>,
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        this.conn.busy.store(false, Ordering::Relaxed);
        // A protocol switch keeps its `Connection: upgrade`; the stream
        // it starts ends with the drain by itself.
        if this.conn.drain.draining.load(Ordering::Acquire)
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}

pin_project_lite::pin_project! {
    /// A connection that shuts down gracefully when the drain closes it.
    struct Draining<C> {
        #[pin]
        connection: C,
        conn: Arc<ConnState>,
        id: u64,
        registered: bool,
        shutting_down: bool,
    }

    impl<C> PinnedDrop for Draining<C> {
        fn drop(this: Pin<&mut Self>) {
            if this.registered {
                this.conn.drain.open.lock().remove(&this.id);
            }
        }
    }
}

impl<C> Draining<C> {
    fn new(connection: C, conn: Arc<ConnState>) -> Self {
        Draining {
            connection,
            id: conn.drain.next_id.fetch_add(1, Ordering::Relaxed),
            conn,
            registered: false,
            shutting_down: false,
        }
    }
}

/// What both HTTP/1 connection kinds offer.
trait GracefulConnection: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<C: GracefulConnection> Future for Draining<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if !*this.shutting_down {
            let drain = &this.conn.drain;
            if drain.closing.load(Ordering::Acquire) {
                // Finish the request in flight, then close (an idle
                // keep-alive connection closes at once).
                *this.shutting_down = true;
                this.connection.as_mut().graceful_shutdown();
            } else if !*this.registered {
                // A task's waker stays valid for the task's life.
                drain
                    .open
                    .lock()
                    .insert(*this.id, (cx.waker().clone(), Arc::clone(this.conn)));
                *this.registered = true;
                // Closing may have started between the check and now.
                if drain.closing.load(Ordering::Acquire) {
                    *this.shutting_down = true;
                    this.connection.as_mut().graceful_shutdown();
                }
            }
        }
        this.connection.poll(cx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63432                63432                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_file_limit(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_file_limit(unlimited), None);
    }
}
