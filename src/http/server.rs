//! The HTTP/1.1 server loop: accept, serve each connection with hyper, and
//! drain at shutdown.
//!
//! The gateway speaks plain HTTP/1.1 (TLS and HTTP/2 end at the reverse
//! proxy), so connections go straight to hyper's HTTP/1 state machine
//! instead of a protocol-sniffing builder: less work per connection and
//! less memory per open stream. Each request carries the peer address as
//! `ConnectInfo<Peer>`. Once `shutdown` completes the listener closes, idle
//! keep-alive connections close, and the function returns when every
//! in-flight request has finished (streams end themselves at shutdown).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::listener::{GuardedListener, Peer};

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` completes, then drains.
pub async fn serve<S>(listener: GuardedListener, app: S, shutdown: impl Future<Output = ()>)
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let drain = Arc::new(Drain::default());
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(Peer(peer)));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let connection = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        // A peer that went away, timed out or sent garbage: hyper has
        // answered what it could; nothing to report per connection.
        connections.spawn(Draining::new(connection, &drain));
    }
    drop(listener);
    drain.start();
    connections.close();
    connections.wait().await;
}

/// The shutdown signal of every open connection.
///
/// Watching a shared signal with a future (a `Notify`, a watch channel, a
/// cancellation token) costs a lock on a process-wide mutex every time a
/// connection is polled, which is several times per request on every core.
/// Here a connection registers its task's waker once, reads one atomic flag
/// per poll, and is woken once when draining starts.
#[derive(Default)]
struct Drain {
    started: AtomicBool,
    next_id: AtomicU64,
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Drain {
    fn start(&self) {
        self.started.store(true, Ordering::Release);
        for (_, waker) in self.wakers.lock().drain() {
            waker.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection that shuts down gracefully when draining starts.
    struct Draining<C> {
        #[pin]
        connection: C,
        drain: Arc<Drain>,
        id: u64,
        registered: bool,
        shutting_down: bool,
    }

    impl<C> PinnedDrop for Draining<C> {
        fn drop(this: Pin<&mut Self>) {
            if this.registered {
                this.drain.wakers.lock().remove(&this.id);
            }
        }
    }
}

impl<C> Draining<C> {
    fn new(connection: C, drain: &Arc<Drain>) -> Self {
        Draining {
            connection,
            id: drain.next_id.fetch_add(1, Ordering::Relaxed),
            drain: Arc::clone(drain),
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
            if this.drain.started.load(Ordering::Acquire) {
                // Finish the request in flight, then close (an idle
                // keep-alive connection closes at once).
                *this.shutting_down = true;
                this.connection.as_mut().graceful_shutdown();
            } else if !*this.registered {
                // A task's waker stays valid for the task's life.
                this.drain
                    .wakers
                    .lock()
                    .insert(*this.id, cx.waker().clone());
                *this.registered = true;
                // Draining may have started between the check and now.
                if this.drain.started.load(Ordering::Acquire) {
                    *this.shutting_down = true;
                    this.connection.as_mut().graceful_shutdown();
                }
            }
        }
        this.connection.poll(cx).map(|_| ())
    }
}
