//! Helpers for the unit tests that talk to the shared Redis (127.0.0.1:6379,
//! or `PG_TEST_REDIS_URL`): each test works under a key prefix of its own and
//! deletes its keys when it ends, panicking or not. A missing server fails
//! the test with a message that says how to start one; it never skips.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The shared test server: `PG_TEST_REDIS_URL`, else the one CI starts.
fn shared_url() -> String {
    std::env::var("PG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// `pgtest-<pid>-<nanos>-<name>`: unique across tests and runs.
fn unique_prefix(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("pgtest-{}-{nanos}-{name}", std::process::id())
}

/// Panics with instructions unless the server at `url` answers `PING`.
async fn require_redis(url: &str) {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(_)) => {}
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
        "these tests need a Redis server at {server} ({why}); start one with \
         `redis-server --port 6379 --save '' --appendonly no` (.ci/run does) \
         or point PG_TEST_REDIS_URL at one"
    )
}

/// A test's key prefix on the shared server; deletes `prefix:*` on drop.
pub(crate) struct TestKeys {
    url: String,
    prefix: String,
}

impl TestKeys {
    /// Checks that the shared server answers (panicking if not) and picks a
    /// prefix for test `name`.
    pub(crate) async fn new(name: &str) -> TestKeys {
        let url = shared_url();
        require_redis(&url).await;
        TestKeys {
            url,
            prefix: unique_prefix(name),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for TestKeys {
    // Blocking I/O in Drop so the keys go even when the test panics.
    fn drop(&mut self) {
        let cleaned = redis::Client::open(self.url.as_str())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut conn| {
                let pattern = format!("{}:*", glob_escape(&self.prefix));
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
            });
        if let Err(e) = cleaned {
            eprintln!("could not delete the test keys {}:*: {e}", self.prefix);
        }
    }
}

/// `prefix` with the characters SCAN MATCH treats specially escaped.
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
