//! Redis for black-box tests of `[store] backend = "redis"`: the shared
//! server (127.0.0.1:6379, or `PG_TEST_REDIS_URL`) under a key prefix of the
//! test's own, and [`PrivateRedis`], a `redis-server` of the test's own on a
//! unix socket, which a test may stop and start again (Redis going away and
//! coming back) without disturbing anyone else.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

/// The shared test server: `PG_TEST_REDIS_URL`, else the one `.ci/run`
/// starts on 127.0.0.1:6379.
pub fn shared_url() -> String {
    std::env::var("PG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// `pgtest-<pid>-<nanos>-<name>`: a key prefix no other test or run uses.
pub fn unique_prefix(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("pgtest-{}-{nanos}-{name}", std::process::id())
}

/// A connection to the server at `url`; panics saying how to start one if
/// nothing answers (the tests fail rather than skip without Redis).
pub async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("{}", missing(url, &e)),
        Err(_) => panic!("{}", missing(url, &"no answer within 3 s")),
    }
}

fn missing(url: &str, why: &dyn std::fmt::Display) -> String {
    // The server's address only: a test URL may carry a password too.
    let server = redis::Client::open(url)
        .map(|client| client.get_connection_info().addr().to_string())
        .unwrap_or_else(|_| "an unparsable URL".to_owned());
    format!(
        "this test needs a Redis server at {server} ({why}); start one with \
         `redis-server --port 6379 --save '' --appendonly no` (.ci/run does) \
         or point PG_TEST_REDIS_URL at one"
    )
}

/// Deletes every key `{prefix}:*` on the server at `url`.
pub async fn cleanup(url: &str, prefix: &str) {
    let mut conn = connect(url).await;
    let pattern = format!("{}:*", glob_escape(prefix));
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .exec_async(&mut conn)
                .await
                .expect("DEL");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// [`cleanup`] for places that cannot await (a `Drop`), with the blocking
/// client; errors are returned, never panicked on.
pub fn cleanup_blocking(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(3))?;
    let pattern = format!("{}:*", glob_escape(prefix));
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut conn)?;
        if !keys.is_empty() {
            redis::cmd("DEL").arg(&keys).exec(&mut conn)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// `prefix` with the characters `SCAN MATCH` treats specially escaped.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `redis-server` of the test's own: no TCP port, a unix socket in a fresh
/// temporary directory, nothing persisted. Killed (and its directory
/// removed) on drop.
pub struct PrivateRedis {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts the server and waits until it answers `PING`.
    pub async fn start() -> PrivateRedis {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Short: a socket path must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!("pg-redis-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let socket = dir.join("redis.sock");
        let mut redis = PrivateRedis {
            dir,
            socket,
            child: None,
        };
        redis.start_again().await;
        redis
    }

    /// `redis+unix:///…/redis.sock`, for the gateway and the redis crate
    /// (which also take `unix:///…`).
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills the server (SIGKILL, as in a crash) and waits for it to be
    /// gone; everything it held is lost.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts a fresh server on the same socket (stopping the running one
    /// first, if any) and waits until it answers `PING`.
    pub async fn start_again(&mut self) {
        self.stop().await;
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&self.socket)
            .args(["--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}); install it \
                     (apt-get install redis-server; .ci/run does)"
                )
            });
        self.child = Some(child);
        self.wait_for_pong(&log).await;
    }

    async fn wait_for_pong(&mut self, log: &Path) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if ping(&self.socket).await {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!(
                    "redis-server did not answer on {}: {exited:?}\n{log}",
                    self.socket.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut reply)).await,
        Ok(Ok(_))
    ) && &reply == b"+PONG\r\n"
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
