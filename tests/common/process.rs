//! The real binary as a child process, for tests of what only a process
//! shows: a restart, a SIGKILL, several replicas that come and go.
//!
//! A test gives the config text for a listen address ([`Gateway::spawn`]
//! takes `Fn(SocketAddr) -> String`; [`with_listen`] puts the address into
//! any text). Each child runs `presence-gateway --config <file>` on a
//! listener the test bound on port 0 and passes as descriptor 3 with
//! `LISTEN_FDS=1` (socket activation, as systemd starts it): the port is
//! held from before the start, so no other process can take it. Stdout and
//! stderr go to a log file; its files live in a
//! [`TestDir`] of the test's own under the system temp dir, removed at the
//! end. Children are killed when dropped, so a failing test leaves none
//! behind; every wait is bounded.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TOKEN;

const BIN: &str = env!("CARGO_BIN_EXE_presence-gateway");
/// How long a start may take until `/readyz` answers 200.
pub const START_WITHIN: Duration = Duration::from_secs(30);
/// How long a stop (or a refused start) may take until the process exits.
pub const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// A directory of one test under the system temp dir (config files, logs
/// and a data_dir below it), removed on drop.
pub struct TestDir {
    path: PathBuf,
    files: AtomicU32,
}

impl TestDir {
    /// `pg-{name}-{pid}` under the system temp dir, empty.
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test directory");
        TestDir {
            path,
            files: AtomicU32::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A data_dir for the gateways of this test.
    pub fn data(&self) -> PathBuf {
        self.path.join("data")
    }

    /// A fresh number for the next config and log file.
    fn next(&self) -> u32 {
        self.files.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `text` with `listen = "{addr}"` in its `[server]` table (added when it
/// has none). The text must not set `listen` itself.
pub fn with_listen(text: &str, addr: SocketAddr) -> String {
    let listen = format!("listen = \"{addr}\"\n");
    match text.find("[server]\n") {
        Some(at) => {
            let end = at + "[server]\n".len();
            format!("{}{listen}{}", &text[..end], &text[end..])
        }
        None => format!("[server]\n{listen}\n{text}"),
    }
}

/// A `presence-gateway` child process; killed on drop if still running.
/// Dropped while a test panics, it prints the end of its log first (the
/// log goes with the [`TestDir`]).
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    pub client: reqwest::Client,
}

/// Lines of a child's log printed when a test fails.
const LOG_TAIL: usize = 80;

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let output = self.output();
            let lines: Vec<&str> = output.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            eprintln!(
                "--- presence-gateway on {} (pid {}), last {} lines ---\n{}",
                self.addr,
                self.child.id(),
                tail.len(),
                tail.join("\n")
            );
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Gateway {
    /// Starts the binary on a fresh listener with the config `config(addr)`
    /// makes for its address, with stdout and stderr in a log file of
    /// `dir`. Returns once the process serves the listener (not
    /// necessarily ready). Panics (with the log) when it exits.
    pub async fn spawn(dir: &TestDir, config: &dyn Fn(SocketAddr) -> String) -> Gateway {
        let mut gw = Self::launch(dir, config);
        if let Some(status) = gw.wait_listening().await {
            panic!("the gateway exited at start ({status}):\n{}", gw.output());
        }
        gw
    }

    /// [`Gateway::spawn`], then waits for `/readyz` 200.
    pub async fn start(dir: &TestDir, config: &dyn Fn(SocketAddr) -> String) -> Gateway {
        let gw = Self::spawn(dir, config).await;
        gw.wait_ready().await;
        gw
    }

    /// Runs the binary with a config it must refuse: returns its exit
    /// status and output once it exits (bounded).
    pub async fn run_refused(
        dir: &TestDir,
        config: &dyn Fn(SocketAddr) -> String,
    ) -> (ExitStatus, String) {
        let mut gw = Self::launch(dir, config);
        let status = gw.wait_exit().await;
        (status, gw.output())
    }

    /// Starts the child on a listener bound here on port 0, which it gets
    /// as descriptor 3 (`LISTEN_FDS=1`; no `LISTEN_PID`, which cannot be
    /// known before the fork and may be absent). This process's copy is
    /// closed once the child runs, so that the socket closes when the
    /// child closes it.
    fn launch(dir: &TestDir, config: &dyn Fn(SocketAddr) -> String) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener for the gateway");
        let addr = listener.local_addr().expect("local addr");
        let n = dir.next();
        let config_path = dir.path().join(format!("gateway-{n}.toml"));
        std::fs::write(&config_path, config(addr)).expect("write the config");
        let log = dir.path().join(format!("gateway-{n}.log"));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create the log file");
        let err = out.try_clone().expect("clone the log file");
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        pass_as_fd3(&mut command, &listener);
        let child = command.spawn().expect("start presence-gateway");
        drop(listener);
        presence_gateway::upstream::install_crypto_provider();
        Gateway {
            child,
            addr,
            log,
            client: reqwest::Client::new(),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits (bounded) until the child serves its listener; its exit
    /// status if it exited instead.
    async fn wait_listening(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            // Logged once `run` has the listener and serves it.
            if self.output().contains("presence-gateway listening") {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not serve its listener within {START_WITHIN:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `/readyz` (bounded) until it answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + START_WITHIN;
        while self.readyz().await != Some(200) {
            assert!(
                Instant::now() < deadline,
                "/readyz not 200 within {START_WITHIN:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `/readyz`'s status; `None` when nothing answers.
    pub async fn readyz(&self) -> Option<u16> {
        let response = self.client.get(self.url("/readyz")).send().await.ok()?;
        Some(response.status().as_u16())
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit within {EXIT_WITHIN:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// SIGTERM; asserts exit code 0 and returns the output.
    pub async fn stop(mut self) -> String {
        self.signal("-TERM");
        let status = self.wait_exit().await;
        let output = self.output();
        assert_eq!(status.code(), Some(0), "exit after SIGTERM:\n{output}");
        output
    }

    /// SIGKILL, as a crash would end it; returns once the process is gone,
    /// with its output.
    pub async fn kill9(mut self) -> String {
        self.signal("-9");
        let status = self.wait_exit().await;
        assert_eq!(status.code(), None, "killed by a signal");
        self.output()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET with the consumer token: status and JSON (Null if none).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Source `id` as `/v1/sources` shows it (Null if absent).
    pub async fn source(&self, id: &str) -> Value {
        let (_, sources) = self.get("/v1/sources").await;
        sources["sources"]
            .as_array()
            .and_then(|list| list.iter().find(|s| s["id"] == id))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The last `seq` handed out (`/metrics`).
    pub async fn last_seq(&self) -> u64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        super::metric_value(&text, "presence_gateway_store_last_seq")
            .unwrap_or_else(|| panic!("no last_seq in\n{text}")) as u64
    }

    /// Counter `name` of source `source` in `/v1/sources`.
    pub async fn counter(&self, source: &str, name: &str) -> u64 {
        let (_, sources) = self.get("/v1/sources").await;
        super::source_counter(&sources, source, name)
    }
}

/// Makes `file` (a listener, as socket activation passes it) descriptor 3
/// of the child `command` starts, open across its exec (where this process
/// keeps it closed on exec, so that no other child started meanwhile
/// inherits it).
pub fn pass_as_fd3(command: &mut Command, file: &impl AsRawFd) {
    let fd = file.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only dup2 and fcntl, which are async-signal-safe; `fd` stays open in
    // the parent until `spawn` returns, so the child has it.
    unsafe {
        command.pre_exec(move || {
            let done = if fd == 3 {
                // dup2 onto itself would leave close-on-exec set.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                // The new descriptor does not inherit close-on-exec.
                libc::dup2(fd, 3)
            };
            if done == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
