//! `kind = "mitel_ws"`: Mitel notifications over MQTT (3.1.1) over WebSocket.
//!
//! The subscriptions themselves (transport `websocket`, `deviceId` = the MQTT
//! client id) are kept by the ordinary managers; this task holds the socket:
//! it asks the Notifications API for a pre-signed URL (`POST .../connections`,
//! valid about 60 s), connects at once with the client id (subprotocol
//! `mqtt`, TLS for `wss://`, the query string intact), subscribes to the
//! topic of every subscription id the managers hold, and hands each message
//! to the source's parser, exactly like a webhook body. When the socket
//! fails it starts over with a fresh URL after a backoff.
//!
//! A socket that closes right after CONNECT, or right after SUBSCRIBE, is
//! what missing permissions look like in the field: it is reported as such
//! (with the MQTT return code when there is one) in `/v1/sources` and the
//! logs, and retried with the same growing backoff, never in a tight loop.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, Transport};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::manager::{Board, Clock, IdSink};
use super::mitel::Mitel;
use super::schedule::{Backoff, jitter};
use crate::presence::Millis;

/// What to do with one message's payload (parse and apply it).
pub type Deliver = Arc<dyn Fn(&[u8]) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// A socket that fails within this long after CONNECT or SUBSCRIBE is
/// reported as a likely permissions problem.
const EARLY_CLOSE: Duration = Duration::from_secs(5);

/// The subscription ids the managers hold, as MQTT topics to subscribe to.
pub struct Topics {
    ids: Mutex<BTreeSet<String>>,
    tx: watch::Sender<BTreeSet<String>>,
}

impl Topics {
    pub fn new() -> Arc<Self> {
        let (tx, _) = watch::channel(BTreeSet::new());
        Arc::new(Topics {
            ids: Mutex::new(BTreeSet::new()),
            tx,
        })
    }

    fn publish(&self) {
        let ids = self.ids.lock().clone();
        self.tx.send_replace(ids);
    }
}

impl IdSink for Topics {
    fn add(&self, id: &str) {
        self.ids.lock().insert(id.to_owned());
        self.publish();
    }

    fn remove(&self, id: &str) {
        self.ids.lock().remove(id);
        self.publish();
    }
}

/// How the connection task runs.
pub struct Connection {
    pub api: Mitel,
    pub client_id: String,
    pub topics: Arc<Topics>,
    pub deliver: Deliver,
    pub board: Arc<Board>,
    pub backoff: Backoff,
    pub clock: Clock,
}

/// Why one socket ended.
enum Ended {
    Shutdown,
    /// With whether the socket had been up and subscribed for a while.
    Failed(String, bool),
}

/// Keeps the MQTT socket up until `shutdown`.
pub async fn run(mut c: Connection, slot: usize, shutdown: CancellationToken) {
    let mut topics = c.topics.tx.subscribe();
    loop {
        // Nothing to listen to until a subscription exists.
        if topics.borrow_and_update().is_empty() {
            c.board.update(slot, |v| v.state = "pending".into());
            tokio::select! {
                changed = topics.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            continue;
        }
        c.board.update(slot, |v| v.state = "connecting".into());
        let outcome = match c.api.websocket_url().await {
            Ok(url) => session(&c, slot, &url, &mut topics, &shutdown).await,
            Err(e) => Ended::Failed(format!("no WebSocket URL: {e}"), false),
        };
        let reason = match outcome {
            Ended::Shutdown => return,
            Ended::Failed(reason, healthy) => {
                if healthy {
                    c.backoff.reset();
                }
                reason
            }
        };
        let delay = c.backoff.next_delay(None, jitter());
        let failures = c.backoff.failures();
        tracing::warn!(client_id = %c.client_id, failures, retry_in_ms = delay, %reason, "MQTT connection lost; reconnecting with a fresh URL");
        c.board.update(slot, |v| {
            v.state = format!("failed: {reason}");
            v.last_error = Some(reason.clone());
            v.failures = failures;
            v.next_action_at = Some(Millis(c.clock.now_ms() + delay));
        });
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(delay as u64)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One socket's life: connect, subscribe, deliver, until it fails.
async fn session(
    c: &Connection,
    slot: usize,
    url: &str,
    topics: &mut watch::Receiver<BTreeSet<String>>,
    shutdown: &CancellationToken,
) -> Ended {
    // rumqttc takes the whole URL, query string included, as the request.
    let mut options = MqttOptions::new(c.client_id.clone(), url, 443);
    options.set_transport(if url.starts_with("wss://") {
        Transport::wss_with_default_config()
    } else {
        Transport::Ws
    });
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut events) = AsyncClient::new(options, 64);
    let mut subscribed: BTreeSet<String> = BTreeSet::new();
    let mut connected_at: Option<tokio::time::Instant> = None;
    let mut subscribe_sent_at: Option<tokio::time::Instant> = None;
    let early = |at: Option<tokio::time::Instant>| at.is_some_and(|t| t.elapsed() < EARLY_CLOSE);
    loop {
        let event = tokio::select! {
            event = events.poll() => event,
            changed = topics.changed(), if connected_at.is_some() => {
                if changed.is_err() {
                    return Ended::Shutdown;
                }
                let wanted = topics.borrow_and_update().clone();
                if let Err(e) = resubscribe(&client, &mut subscribed, &wanted).await {
                    return Ended::Failed(e, false);
                }
                subscribe_sent_at = Some(tokio::time::Instant::now());
                continue;
            }
            () = shutdown.cancelled() => {
                let _ = client.disconnect().await;
                return Ended::Shutdown;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    return Ended::Failed(
                        format!(
                            "broker refused the connection ({:?}); check the client id and the account's permissions",
                            ack.code
                        ),
                        false,
                    );
                }
                connected_at = Some(tokio::time::Instant::now());
                let wanted = topics.borrow_and_update().clone();
                if let Err(e) = resubscribe(&client, &mut subscribed, &wanted).await {
                    return Ended::Failed(e, false);
                }
                subscribe_sent_at = Some(tokio::time::Instant::now());
                tracing::info!(client_id = %c.client_id, topics = subscribed.len(), "MQTT connected");
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    return Ended::Failed(
                        "broker refused the subscription (SUBACK failure); likely missing permissions"
                            .into(),
                        false,
                    );
                }
                subscribe_sent_at = None;
                c.board.update(slot, |v| {
                    v.state = "connected".into();
                    v.id = Some(c.client_id.clone());
                    v.last_error = None;
                    v.failures = 0;
                    v.next_action_at = None;
                });
            }
            Ok(Event::Incoming(Packet::Publish(message))) => (c.deliver)(&message.payload).await,
            Ok(_) => {}
            Err(e) => {
                let reason = if subscribe_sent_at.is_some() && early(subscribe_sent_at) {
                    format!("socket closed right after SUBSCRIBE ({e}); likely missing permissions")
                } else if early(connected_at) {
                    format!(
                        "socket closed right after connecting ({e}); likely missing permissions"
                    )
                } else if connected_at.is_none()
                    && matches!(e, rumqttc::ConnectionError::MqttState(_))
                {
                    // The WebSocket opened, then closed before CONNACK.
                    format!(
                        "socket closed right after connecting, before CONNACK ({e}); likely missing permissions"
                    )
                } else if connected_at.is_none() {
                    format!("could not connect: {e}")
                } else {
                    format!("socket lost: {e}")
                };
                let healthy =
                    !early(connected_at) && connected_at.is_some() && subscribe_sent_at.is_none();
                return Ended::Failed(reason, healthy);
            }
        }
    }
}

/// Subscribes to the topics in `wanted` not yet subscribed, and
/// unsubscribes from those no longer wanted.
async fn resubscribe(
    client: &AsyncClient,
    subscribed: &mut BTreeSet<String>,
    wanted: &BTreeSet<String>,
) -> Result<(), String> {
    // One SUBSCRIBE for all new topics: one request in the client's queue
    // however many subscriptions there are.
    let new: Vec<String> = wanted.difference(subscribed).cloned().collect();
    if !new.is_empty() {
        let filters = new
            .iter()
            .map(|topic| rumqttc::SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce));
        client
            .subscribe_many(filters)
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        subscribed.extend(new);
    }
    for topic in subscribed.clone().difference(wanted) {
        client
            .unsubscribe(topic.as_str())
            .await
            .map_err(|e| format!("unsubscribe: {e}"))?;
        subscribed.remove(topic);
    }
    Ok(())
}
