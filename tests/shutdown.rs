//! Graceful shutdown: a request in flight when shutdown starts still gets its
//! answer, new connections are refused, and the process exits 0.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, MITEL_KEY, fixture, sign};

/// Sends the head of a signed webhook with `Expect: 100-continue` and waits
/// for `100 Continue`: from then on the handler is reading the body, so the
/// request is in flight. Returns the connection and the body still to send.
fn start_request(addr: SocketAddr) -> (TcpStream, String) {
    let body = fixture("mitel-presence.json");
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /webhooks/mitel HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nx-notify-signature: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len(),
        sign(MITEL_KEY, body.as_bytes())
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).expect("100 Continue");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    (stream, body)
}

/// Sends the rest of the body and returns the status line of the answer.
fn finish_request(mut stream: TcpStream, body: &str) -> String {
    stream.write_all(body.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).expect("answer");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Waits (bounded) until `addr` refuses new connections.
fn wait_until_refused(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_completes_during_shutdown() {
    let mut gw = Gateway::start(&common::mitel_config("")).await;
    let addr = gw.addr;
    let (stream, body) = tokio::task::spawn_blocking(move || start_request(addr))
        .await
        .unwrap();

    gw.shutdown_token().cancel();
    let refused = tokio::task::spawn_blocking(move || wait_until_refused(addr))
        .await
        .unwrap();
    assert!(refused, "the listener closed");

    let status = tokio::task::spawn_blocking(move || finish_request(stream, &body))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 204 No Content");
    let result = tokio::time::timeout(Duration::from_secs(20), gw.take_task()).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "run returned cleanly");
}

/// Waits (bounded) until `GET /healthz` at `addr` answers 200, failing
/// early when `child` exits.
fn wait_healthy(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = (|| {
            let mut stream = TcpStream::connect(addr).ok()?;
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .ok()?;
            write!(
                stream,
                "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).ok()?;
            Some(head.starts_with(b"HTTP/1.1 200"))
        })();
        if answered == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "gateway did not start");
        assert!(child.try_wait().unwrap().is_none(), "gateway exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn process_drains_and_exits_zero_on_sigterm() {
    // Socket activation: the listener is bound here and passed as
    // descriptor 3, so the port is the child's from the start.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("pg-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\nshutdown_grace_secs = 20\n\n[[sources]]\nid = \"mitel\"\nkind = \"mitel\"\nsigning_keys = [\"{MITEL_KEY}\"]\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_presence-gateway"));
    command
        .args(["--config"])
        .arg(&config)
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::process::pass_as_fd3(&mut command, &listener);
    let mut child = command.spawn().unwrap();
    // Only the child's copy is left: the socket closes when it closes it.
    drop(listener);

    // Connections wait in the backlog until the gateway serves them.
    wait_healthy(addr, &mut child);

    let (stream, body) = start_request(addr);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        wait_until_refused(addr),
        "the listener closed after SIGTERM"
    );
    assert_eq!(finish_request(stream, &body), "HTTP/1.1 204 No Content");

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("draining"), "{logs}");
}
