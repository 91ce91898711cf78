//! The Redis test helpers (tests/common/redis.rs) do what the Redis backend's
//! tests rely on: a private server stops and starts again on the same socket,
//! both unix socket URL forms reach it, the gateway's Redis handle follows it
//! going away and coming back by itself, and cleanup removes exactly one
//! test's keys from the shared server.

mod common;

use std::time::{Duration, Instant};

use common::redis::{PrivateRedis, cleanup, connect, shared_url, unique_prefix};
use presence_gateway::cluster::{Redis, Unavailable};
use tokio::sync::watch;

async fn reachability(up: &mut watch::Receiver<bool>, want: bool, within: Duration) {
    tokio::time::timeout(within, up.wait_for(|up| *up == want))
        .await
        .unwrap_or_else(|_| panic!("redis reachability did not turn {want} within {within:?}"))
        .expect("the handle is alive");
}

#[tokio::test]
async fn private_redis_stops_and_starts_again_on_the_same_socket() {
    let mut server = PrivateRedis::start().await;
    let mut conn = connect(&server.url()).await;
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .exec_async(&mut conn)
        .await
        .expect("SET");

    server.stop().await;
    let client = redis::Client::open(server.url()).expect("valid url");
    let refused = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("fails at once");
    assert!(refused.is_err(), "nothing answers while stopped");

    server.start_again().await;
    let mut conn = connect(&server.url()).await;
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(value, None, "a fresh server keeps nothing");
}

#[tokio::test]
async fn both_unix_socket_url_forms_reach_a_private_redis() {
    let server = PrivateRedis::start().await;
    let plain = format!("unix://{}", server.socket().display());
    assert!(
        server.url().starts_with("redis+unix:///"),
        "{}",
        server.url()
    );
    for url in [server.url(), plain] {
        let mut conn = connect(&url).await;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .expect("PING");
        assert_eq!(pong, "PONG", "{url}");
    }
}

#[tokio::test]
async fn the_redis_handle_starts_without_redis_and_follows_it_coming_and_going() {
    let mut server = PrivateRedis::start().await;
    server.stop().await;
    let redis = Redis::new(&server.url(), "pg").expect("valid url");
    let mut up = redis.watch();

    let started = Instant::now();
    assert_eq!(redis.conn().await.err(), Some(Unavailable));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!redis.is_up());

    // Nothing but the handle's own background check notices the server.
    server.start_again().await;
    reachability(&mut up, true, Duration::from_secs(3)).await;

    let mut conn = redis.conn().await.expect("up");
    let set = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .exec_async(&mut conn)
        .await;
    assert_eq!(redis.observe(set), Ok(()));

    // Gone: the next command fails and says so.
    server.stop().await;
    let get = redis::cmd("GET")
        .arg("k")
        .query_async::<Option<String>>(&mut conn)
        .await;
    assert_eq!(redis.observe(get), Err(Unavailable));
    reachability(&mut up, false, Duration::ZERO).await;

    server.start_again().await;
    reachability(&mut up, true, Duration::from_secs(3)).await;
    let mut conn = redis.conn().await.expect("up again");
    let get = redis::cmd("GET")
        .arg("k")
        .query_async::<Option<String>>(&mut conn)
        .await;
    assert_eq!(redis.observe(get), Ok(None));
}

#[tokio::test]
async fn cleanup_removes_the_keys_under_one_prefix_and_no_others() {
    let url = shared_url();
    let mut conn = connect(&url).await;
    let mine = unique_prefix("cleanup-mine");
    let other = unique_prefix("cleanup-other");
    let mine_keys = [format!("{mine}:a"), format!("{mine}:b:c")];
    let other_key = format!("{other}:a");
    for key in mine_keys.iter().chain([&other_key]) {
        redis::cmd("SET")
            .arg(key)
            .arg("v")
            .exec_async(&mut conn)
            .await
            .expect("SET");
    }

    cleanup(&url, &mine).await;
    let left: u64 = redis::cmd("EXISTS")
        .arg(&mine_keys)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(left, 0);
    let kept: u64 = redis::cmd("EXISTS")
        .arg(&other_key)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(kept, 1);

    cleanup(&url, &other).await;
}
