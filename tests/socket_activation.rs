//! Socket activation, as systemd starts a service (README, "Under systemd"):
//! with `LISTEN_FDS=1` the binary serves the listening socket it was given
//! as descriptor 3 and never binds `server.listen`; variables meant for
//! another process (`LISTEN_PID`) are ignored; whatever it cannot serve
//! stops the start with an error that names it.
//!
//! The tests of `tests/common/process.rs` start every child this way; these
//! check what they take for granted, and the refusals.

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::process::{TestDir, pass_as_fd3};

const BIN: &str = env!("CARGO_BIN_EXE_presence-gateway");
const WITHIN: Duration = Duration::from_secs(30);

/// A child and the log file its stdout and stderr go to; killed on drop.
struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    /// Starts the binary with a config that listens on `listen`, the
    /// environment `env` (the activation variables are removed first), and
    /// `fd3` as descriptor 3 if given.
    fn start(
        dir: &TestDir,
        name: &str,
        listen: &str,
        env: &[(&str, &str)],
        fd3: Option<&dyn AsRawFd>,
    ) -> Run {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, format!("[server]\nlisten = \"{listen}\"\n"))
            .expect("write the config");
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("create the log");
        let err = out.try_clone().expect("clone the log");
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        match fd3 {
            Some(fd) => pass_as_fd3(&mut command, &fd.as_raw_fd()),
            // Nothing there, whatever this process inherited as 3.
            // SAFETY: close is async-signal-safe; its error (nothing was
            // open) is what is wanted.
            None => unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(|| {
                    libc::close(3);
                    Ok(())
                });
            },
        }
        let child = command.spawn().expect("start presence-gateway");
        Run { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the process exits.
    async fn exited(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (bounded) until the log has a line containing `what`, and
    /// returns that line.
    async fn logged(&mut self, what: &str) -> String {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(what)) {
                return line.to_owned();
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "exited ({status}) before logging {what:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "never logged {what:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- presence-gateway log ---\n{}", self.output());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port this test holds without listening: nothing else can
/// listen there, and a connection is refused.
fn held_port() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("an IP address");
    (socket, addr)
}

/// `GET /healthz` at `addr` answers 200 (bounded).
async fn healthy(addr: SocketAddr) {
    presence_gateway::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/healthz");
    common::wait_until("/healthz to answer 200", WITHIN, || async {
        client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn serves_the_passed_socket_and_never_binds_server_listen() {
    let dir = TestDir::new("activation-serves");
    // server.listen names a port the gateway could not bind.
    let (_held, held) = held_port();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let mut run = Run::start(
        &dir,
        "serves",
        &held.to_string(),
        &[("LISTEN_FDS", "1")],
        Some(&listener),
    );
    drop(listener);
    healthy(addr).await;
    let line = run.logged("presence-gateway listening").await;
    assert!(line.contains(&format!("addr={addr}")), "{line}");
    let output = run.output();
    assert!(
        output.contains("serving the socket passed by the service manager (LISTEN_FDS)"),
        "{output}"
    );
    assert!(!output.contains("cannot listen"), "{output}");
}

#[tokio::test]
async fn variables_meant_for_another_process_are_ignored() {
    let dir = TestDir::new("activation-other-pid");
    // PID 1 is never the gateway: it binds server.listen (port 0 here, the
    // address it got is in its log).
    let mut run = Run::start(
        &dir,
        "other",
        "127.0.0.1:0",
        &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")],
        None,
    );
    let line = run.logged("presence-gateway listening").await;
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    healthy(addr).await;
    let output = run.output();
    assert!(
        output.contains("LISTEN_FDS is meant for another process: binding server.listen"),
        "{output}"
    );
}

#[tokio::test]
async fn what_cannot_be_served_stops_the_start_and_says_why() {
    let dir = TestDir::new("activation-refused");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (not_listening, _) = held_port();
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let file = File::open(dir.path()).expect("open a directory");
    let cases: [(&str, &str, Option<&dyn AsRawFd>, &str); 7] = [
        (
            "two",
            "2",
            Some(&listener),
            "2 sockets were passed (LISTEN_FDS=2)",
        ),
        (
            "nan",
            "x",
            Some(&listener),
            "LISTEN_FDS=\"x\" is not a number",
        ),
        ("none", "1", None, "Bad file descriptor"),
        ("file", "1", Some(&file), "on non-socket"),
        ("udp", "1", Some(&udp), "not a stream socket"),
        (
            "bound",
            "1",
            Some(&not_listening),
            "bound but not listening",
        ),
        (
            "pid",
            "1",
            Some(&listener),
            "LISTEN_PID=\"me\" is not a process id",
        ),
    ];
    for (name, count, fd3, expected) in cases {
        let mut env = vec![("LISTEN_FDS", count)];
        if name == "pid" {
            env.push(("LISTEN_PID", "me"));
        }
        // server.listen would work: refusing is the gateway's choice.
        let mut run = Run::start(&dir, name, "127.0.0.1:0", &env, fd3);
        let status = run.exited().await;
        let output = run.output();
        assert_eq!(status.code(), Some(1), "{name}: {output}");
        assert!(
            output.contains("socket activation: ") && output.contains(expected),
            "{name}: expected {expected:?} in\n{output}"
        );
        assert!(
            !output.contains("presence-gateway listening"),
            "{name}: {output}"
        );
    }
}
