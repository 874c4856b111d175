//! The workload: publishers that wait for every ack and subscribers that
//! reconnect and resume, all through the load balancer, each recording what
//! it sent and saw for the checker.
//!
//! - A publisher sends `pub` with an id to a random one of the topics, data
//!   `{"p": publisher, "c": counter}` (a counter per publisher, never
//!   reused, so every message is unique), and waits for the `ok` or `err`
//!   before it sends the next. No reply within [`ACK_WAIT`] (or a broken
//!   session) ends the session; it reconnects. Nothing is ever sent twice.
//! - A subscriber holds one session with an exact `sub` per topic. It pings
//!   every second and takes a session that shows nothing for [`STALL`] (a
//!   paused or cut-off node) as dead. On any end of a session it reconnects
//!   through the load balancer with backoff and subscribes again with
//!   `since` and `epoch` where it knows them (see [`TopicState`]). A `sub`
//!   answered with `err` is retried on the same session.
//! - A *flapping* subscriber does the same, and also leaves on its own
//!   every few seconds (a clean close) and comes back a moment later with
//!   `since` and `epoch`: recovery is exercised all the time, not only when
//!   a fault ends a session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use cluster_tests::ws::{WsClient, WsConnect};

/// How long a publisher waits for the reply to one `pub`: longer than any
/// fault is held, so that a `pub` stuck on a paused or cut-off node is
/// answered (or not) after the heal, as a patient client would see it.
pub const ACK_WAIT: Duration = Duration::from_secs(12);
/// A subscriber session with no frame for this long (despite pings) is dead.
pub const STALL: Duration = Duration::from_secs(3);
/// A `sub` not answered within this long ends the session.
const SUB_WAIT: Duration = Duration::from_secs(8);
/// Subscriber ping interval.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Delay before a `sub` refused with `err` is sent again.
const SUB_RETRY: Duration = Duration::from_millis(500);
/// Reconnect backoff: first and longest delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Ids of subscriber pings (well above `sub` ids).
const PING_IDS: u64 = 1 << 48;
/// A flapping subscriber's session lasts this long (ms, seeded)...
const FLAP_SESSION_MS: std::ops::RangeInclusive<u64> = 3_000..=8_000;
/// ...and it stays away this long (ms, seeded).
const FLAP_AWAY_MS: std::ops::RangeInclusive<u64> = 500..=3_000;
/// The `Ended` reason of a session a flapping subscriber left.
pub const LEFT: &str = "left on purpose";

/// What became of one `pub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubOutcome {
    Acked {
        seq: u64,
        epoch: String,
    },
    /// An `err` reply (`unavailable` is expected while an owner is away).
    Refused {
        code: String,
    },
    /// No reply: timed out, or the session ended first. It may or may not
    /// have been sequenced.
    NoReply {
        reason: String,
    },
}

/// One `pub` a publisher sent.
#[derive(Debug, Clone)]
pub struct PubRecord {
    pub publisher: u32,
    pub counter: u64,
    pub topic: String,
    /// When it was sent, since the run's origin.
    pub sent: Duration,
    /// When the reply came (`None` for [`PubOutcome::NoReply`]).
    pub replied: Option<Duration>,
    pub outcome: PubOutcome,
}

/// Everything one publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublisherLog {
    pub id: u32,
    pub records: Vec<PubRecord>,
    pub sessions: u32,
    pub connect_failures: u32,
}

/// What a subscriber saw, in the order it saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubEvent {
    Connected {
        session: u32,
        at: Duration,
    },
    /// The `ok` to a `sub`, with the `since` and `epoch` the `sub` carried.
    Ok {
        session: u32,
        at: Duration,
        topic: String,
        seq: u64,
        epoch: String,
        since: Option<u64>,
        sent_epoch: Option<String>,
        recovered: Option<bool>,
    },
    SubErr {
        session: u32,
        at: Duration,
        topic: String,
        code: String,
    },
    Msg {
        session: u32,
        at: Duration,
        topic: String,
        seq: u64,
        publisher: u32,
        counter: u64,
    },
    /// A frame the subscriber could not make sense of.
    Bad {
        session: u32,
        at: Duration,
        what: String,
    },
    Ended {
        session: u32,
        at: Duration,
        reason: String,
    },
}

/// Everything one subscriber saw.
#[derive(Debug, Clone, Default)]
pub struct SubscriberLog {
    pub id: u32,
    pub events: Vec<SubEvent>,
    /// When it stopped, since the run's origin.
    pub stopped: Duration,
    pub connect_failures: u32,
}

/// What a subscriber knows of one topic, to subscribe again with `since`
/// and `epoch`.
///
/// `msg` carries no epoch: the subscriber knows the epoch of its last `ok`
/// and trusts that later messages belong to it while seq rises. A seq that
/// does not rise (a restart) proves that the topic is in another epoch,
/// whose name the subscriber does not know: from then on it keeps the last
/// seq it saw *in the known epoch* as its `since`, so that it never claims
/// to hold messages of that epoch that it did not get. A jump forward is
/// taken as a gap in the same epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicState {
    known_epoch: Option<String>,
    /// The last seq seen in `known_epoch`.
    certain_seq: Option<u64>,
    /// The last seq seen at all.
    last_seq: Option<u64>,
    /// No restart seen since the last `ok`.
    certain: bool,
    /// After `recovered: false` in the same epoch, the replay of what
    /// history still holds starts below `ok.seq`.
    expect_first: bool,
}

impl TopicState {
    /// `since` and `epoch` for the next `sub` (none before the first `ok`).
    pub fn resume_from(&self) -> (Option<u64>, Option<String>) {
        match &self.known_epoch {
            Some(epoch) => (self.certain_seq, Some(epoch.clone())),
            None => (None, None),
        }
    }

    pub fn on_ok(
        &mut self,
        seq: u64,
        epoch: &str,
        recovered: Option<bool>,
        since: Option<u64>,
        sent_epoch: Option<&str>,
    ) {
        let same_epoch = sent_epoch == Some(epoch);
        self.known_epoch = Some(epoch.to_owned());
        self.certain = true;
        self.expect_first = false;
        match recovered {
            Some(true) => {
                self.certain_seq = since;
                self.last_seq = since;
            }
            other => {
                self.certain_seq = Some(seq);
                self.last_seq = Some(seq);
                self.expect_first = other == Some(false) && same_epoch;
            }
        }
    }

    pub fn on_msg(&mut self, seq: u64) {
        if self.expect_first {
            self.expect_first = false;
        } else if self.last_seq.is_some_and(|last| seq <= last) {
            self.certain = false;
        }
        self.last_seq = Some(seq);
        if self.certain {
            self.certain_seq = Some(seq);
        }
    }
}

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct Shape {
    pub publishers: usize,
    pub subscribers: usize,
    /// Flapping subscribers, in addition to `subscribers`.
    pub flappers: usize,
    pub topics: Vec<String>,
    /// Pause between one publisher's `pub`s (after the reply).
    pub publish_interval: Duration,
}

/// The running workload.
pub struct Workload {
    stop_pubs: watch::Sender<bool>,
    stop_subs: watch::Sender<bool>,
    pubs: Vec<JoinHandle<PublisherLog>>,
    subs: Vec<JoinHandle<SubscriberLog>>,
}

impl Workload {
    /// Starts every publisher and subscriber against `lb`.
    pub fn start(lb: SocketAddr, shape: &Shape, seed: u64, origin: Instant) -> Workload {
        let (stop_pubs, pub_rx) = watch::channel(false);
        let (stop_subs, sub_rx) = watch::channel(false);
        let topics = Arc::new(shape.topics.clone());
        let subs = (0..(shape.subscribers + shape.flappers) as u32)
            .map(|id| {
                let flap = (id as usize >= shape.subscribers).then(|| {
                    ChaCha8Rng::seed_from_u64(
                        seed ^ (u64::from(id) + 101).wrapping_mul(0xA24B_AED4_963E_E407),
                    )
                });
                let s = Subscriber {
                    id,
                    lb,
                    topics: topics.clone(),
                    origin,
                    stop: sub_rx.clone(),
                    flap,
                };
                tokio::spawn(s.run())
            })
            .collect();
        let pubs = (0..shape.publishers as u32)
            .map(|id| {
                let p = Publisher {
                    id,
                    lb,
                    topics: topics.clone(),
                    interval: shape.publish_interval,
                    rng: ChaCha8Rng::seed_from_u64(
                        seed ^ (u64::from(id) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ),
                    origin,
                    stop: pub_rx.clone(),
                };
                tokio::spawn(p.run())
            })
            .collect();
        Workload {
            stop_pubs,
            stop_subs,
            pubs,
            subs,
        }
    }

    /// Stops the publishers and returns their logs.
    pub async fn stop_publishers(&mut self) -> Vec<PublisherLog> {
        let _ = self.stop_pubs.send(true);
        let mut logs = Vec::new();
        for handle in self.pubs.drain(..) {
            // A publisher notices the stop within ACK_WAIT (a pending reply).
            match tokio::time::timeout(ACK_WAIT + Duration::from_secs(10), handle).await {
                Ok(Ok(log)) => logs.push(log),
                Ok(Err(e)) => eprintln!("chaos: a publisher task failed: {e}"),
                Err(_) => eprintln!("chaos: a publisher did not stop"),
            }
        }
        logs
    }

    /// Stops the subscribers and returns their logs.
    pub async fn stop_subscribers(&mut self) -> Vec<SubscriberLog> {
        let _ = self.stop_subs.send(true);
        let mut logs = Vec::new();
        for handle in self.subs.drain(..) {
            match tokio::time::timeout(Duration::from_secs(20), handle).await {
                Ok(Ok(log)) => logs.push(log),
                Ok(Err(e)) => eprintln!("chaos: a subscriber task failed: {e}"),
                Err(_) => eprintln!("chaos: a subscriber did not stop"),
            }
        }
        logs
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.stop_pubs.send(true);
        let _ = self.stop_subs.send(true);
        for h in &self.pubs {
            h.abort();
        }
        for h in &self.subs {
            h.abort();
        }
    }
}

/// Sleeps for `d` unless `stop` turns true first; returns whether stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Connects through the load balancer, retrying with exponential backoff
/// and counting the failures; `None` once told to stop.
async fn connect_or_stop(
    lb: SocketAddr,
    stop: &mut watch::Receiver<bool>,
    failures: &mut u32,
) -> Option<WsClient> {
    let mut backoff = BACKOFF_MIN;
    while !*stop.borrow() {
        match WsConnect::new(lb).connect().await {
            Ok(ws) => return Some(ws),
            Err(_) => {
                *failures += 1;
                if sleep_or_stop(backoff, stop).await {
                    return None;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    None
}

struct Publisher {
    id: u32,
    lb: SocketAddr,
    topics: Arc<Vec<String>>,
    interval: Duration,
    rng: ChaCha8Rng,
    origin: Instant,
    stop: watch::Receiver<bool>,
}

impl Publisher {
    async fn run(mut self) -> PublisherLog {
        let mut log = PublisherLog {
            id: self.id,
            ..PublisherLog::default()
        };
        let mut counter = 0u64;
        'sessions: while !*self.stop.borrow() {
            let Some(mut ws) =
                connect_or_stop(self.lb, &mut self.stop, &mut log.connect_failures).await
            else {
                break;
            };
            log.sessions += 1;
            loop {
                if *self.stop.borrow() {
                    let _ = ws.close().await;
                    break 'sessions;
                }
                let topic = self.topics[self.rng.random_range(0..self.topics.len())].clone();
                counter += 1;
                let sent = self.origin.elapsed();
                let frame = json!({
                    "op": "pub",
                    "id": counter,
                    "topic": topic,
                    "data": {"p": self.id, "c": counter},
                });
                let (outcome, replied) = match ws.send_json(frame).await {
                    Err(e) => (
                        PubOutcome::NoReply {
                            reason: format!("send failed: {e:#}"),
                        },
                        None,
                    ),
                    Ok(()) => wait_reply(&mut ws, counter, self.origin).await,
                };
                let broken = matches!(outcome, PubOutcome::NoReply { .. });
                log.records.push(PubRecord {
                    publisher: self.id,
                    counter,
                    topic,
                    sent,
                    replied,
                    outcome,
                });
                if broken {
                    // The session may be stuck (a paused node): start over.
                    continue 'sessions;
                }
                if sleep_or_stop(self.interval, &mut self.stop).await {
                    let _ = ws.close().await;
                    break 'sessions;
                }
            }
        }
        log
    }
}

/// Waits for the `ok` or `err` with this id.
async fn wait_reply(ws: &mut WsClient, id: u64, origin: Instant) -> (PubOutcome, Option<Duration>) {
    let deadline = Instant::now() + ACK_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws.recv_timeout(left).await {
            Ok(v) if v["id"] == json!(id) && v["op"] == "ok" => {
                let at = Some(origin.elapsed());
                return match (v["seq"].as_u64(), v["epoch"].as_str()) {
                    (Some(seq), Some(epoch)) => (
                        PubOutcome::Acked {
                            seq,
                            epoch: epoch.to_owned(),
                        },
                        at,
                    ),
                    _ => (
                        PubOutcome::Refused {
                            code: format!("malformed ok: {v}"),
                        },
                        at,
                    ),
                };
            }
            Ok(v) if v["id"] == json!(id) && v["op"] == "err" => {
                let code = v["code"].as_str().unwrap_or("?").to_owned();
                return (PubOutcome::Refused { code }, Some(origin.elapsed()));
            }
            Ok(_) => continue,
            Err(_) => {
                let reason = match ws.ended() {
                    Some(ended) => format!("session ended: {ended:?}"),
                    None => format!("no reply within {ACK_WAIT:?}"),
                };
                return (PubOutcome::NoReply { reason }, None);
            }
        }
    }
}

struct Subscriber {
    id: u32,
    lb: SocketAddr,
    topics: Arc<Vec<String>>,
    origin: Instant,
    stop: watch::Receiver<bool>,
    /// Set for a flapping subscriber.
    flap: Option<ChaCha8Rng>,
}

/// A `sub` waiting for its reply.
struct PendingSub {
    topic: usize,
    since: Option<u64>,
    epoch: Option<String>,
    sent: Instant,
}

impl Subscriber {
    async fn run(mut self) -> SubscriberLog {
        let mut log = SubscriberLog {
            id: self.id,
            ..SubscriberLog::default()
        };
        let index: HashMap<String, usize> = self
            .topics
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        let mut states = vec![TopicState::default(); self.topics.len()];
        let mut session = 0u32;
        while !*self.stop.borrow() {
            let Some(mut ws) =
                connect_or_stop(self.lb, &mut self.stop, &mut log.connect_failures).await
            else {
                break;
            };
            session += 1;
            log.events.push(SubEvent::Connected {
                session,
                at: self.origin.elapsed(),
            });
            let reason = self
                .session(&mut ws, session, &index, &mut states, &mut log.events)
                .await;
            let stopping = reason.is_none();
            log.events.push(SubEvent::Ended {
                session,
                at: self.origin.elapsed(),
                reason: reason.unwrap_or_else(|| "stopped".to_owned()),
            });
            if stopping {
                let _ = ws.close().await;
                break;
            }
            let left =
                matches!(log.events.last(), Some(SubEvent::Ended { reason, .. }) if reason == LEFT);
            let away = match &mut self.flap {
                Some(rng) if left => {
                    // A clean close, as a client that leaves would.
                    let _ = ws.close().await;
                    Duration::from_millis(rng.random_range(FLAP_AWAY_MS))
                }
                _ => {
                    drop(ws);
                    BACKOFF_MIN
                }
            };
            if sleep_or_stop(away, &mut self.stop).await {
                break;
            }
        }
        log.stopped = self.origin.elapsed();
        log
    }

    /// Runs one session; returns why it ended (`None`: told to stop).
    async fn session(
        &mut self,
        ws: &mut WsClient,
        session: u32,
        index: &HashMap<String, usize>,
        states: &mut [TopicState],
        events: &mut Vec<SubEvent>,
    ) -> Option<String> {
        let now = Instant::now();
        let mut due: Vec<(Instant, usize)> = (0..self.topics.len()).map(|t| (now, t)).collect();
        let mut pending: HashMap<u64, PendingSub> = HashMap::new();
        let mut next_id = 1u64;
        let mut next_ping = now + PING_EVERY;
        let mut ping_id = PING_IDS;
        let mut last_frame = now;
        let leave_at = self
            .flap
            .as_mut()
            .map(|rng| now + Duration::from_millis(rng.random_range(FLAP_SESSION_MS)));
        loop {
            if *self.stop.borrow() {
                return None;
            }
            let now = Instant::now();
            if leave_at.is_some_and(|t| now >= t) {
                return Some(LEFT.to_owned());
            }
            let mut i = 0;
            while i < due.len() {
                if due[i].0 > now {
                    i += 1;
                    continue;
                }
                let (_, topic) = due.swap_remove(i);
                let (since, epoch) = states[topic].resume_from();
                let mut sub = json!({"op": "sub", "id": next_id, "topic": self.topics[topic]});
                if let (Some(since), Some(epoch)) = (since, &epoch) {
                    sub["since"] = json!(since);
                    sub["epoch"] = json!(epoch);
                }
                if let Err(e) = ws.send_json(sub).await {
                    return Some(format!("sending sub: {e:#}"));
                }
                pending.insert(
                    next_id,
                    PendingSub {
                        topic,
                        since,
                        epoch,
                        sent: now,
                    },
                );
                next_id += 1;
            }
            if now >= next_ping {
                ping_id += 1;
                if let Err(e) = ws.send_json(json!({"op": "ping", "id": ping_id})).await {
                    return Some(format!("sending ping: {e:#}"));
                }
                next_ping = now + PING_EVERY;
            }
            if now.duration_since(last_frame) > STALL {
                return Some(format!("stalled: no frame for {STALL:?}"));
            }
            if pending
                .values()
                .any(|p| now.duration_since(p.sent) > SUB_WAIT)
            {
                return Some(format!("a sub got no reply within {SUB_WAIT:?}"));
            }
            let v = match ws.recv_timeout(Duration::from_millis(100)).await {
                Ok(v) => v,
                Err(_) => match ws.ended() {
                    Some(ended) => return Some(format!("{ended:?}")),
                    None => continue,
                },
            };
            last_frame = Instant::now();
            let at = self.origin.elapsed();
            match v["op"].as_str() {
                Some("msg") => {
                    let topic = v["topic"].as_str().unwrap_or_default();
                    let fields = (
                        index.get(topic),
                        v["seq"].as_u64(),
                        v["data"]["p"].as_u64().and_then(|p| u32::try_from(p).ok()),
                        v["data"]["c"].as_u64(),
                    );
                    match fields {
                        (Some(&t), Some(seq), Some(publisher), Some(counter)) => {
                            states[t].on_msg(seq);
                            events.push(SubEvent::Msg {
                                session,
                                at,
                                topic: topic.to_owned(),
                                seq,
                                publisher,
                                counter,
                            });
                        }
                        _ => events.push(SubEvent::Bad {
                            session,
                            at,
                            what: format!("malformed msg: {v}"),
                        }),
                    }
                }
                Some("ok") if v["id"].as_u64().is_some_and(|id| pending.contains_key(&id)) => {
                    let id = v["id"].as_u64().unwrap_or_default();
                    let Some(p) = pending.remove(&id) else {
                        continue;
                    };
                    let (Some(seq), Some(epoch)) = (v["seq"].as_u64(), v["epoch"].as_str()) else {
                        events.push(SubEvent::Bad {
                            session,
                            at,
                            what: format!("sub ok without seq and epoch: {v}"),
                        });
                        due.push((Instant::now() + SUB_RETRY, p.topic));
                        continue;
                    };
                    let recovered = v.get("recovered").and_then(Value::as_bool);
                    states[p.topic].on_ok(seq, epoch, recovered, p.since, p.epoch.as_deref());
                    events.push(SubEvent::Ok {
                        session,
                        at,
                        topic: self.topics[p.topic].clone(),
                        seq,
                        epoch: epoch.to_owned(),
                        since: p.since,
                        sent_epoch: p.epoch,
                        recovered,
                    });
                }
                Some("err") if v["id"].as_u64().is_some_and(|id| pending.contains_key(&id)) => {
                    let id = v["id"].as_u64().unwrap_or_default();
                    let Some(p) = pending.remove(&id) else {
                        continue;
                    };
                    events.push(SubEvent::SubErr {
                        session,
                        at,
                        topic: self.topics[p.topic].clone(),
                        code: v["code"].as_str().unwrap_or("?").to_owned(),
                    });
                    due.push((Instant::now() + SUB_RETRY, p.topic));
                }
                Some("pong") if v["id"].as_u64().is_some_and(|id| id > PING_IDS) => {}
                _ => events.push(SubEvent::Bad {
                    session,
                    at,
                    what: format!("unexpected frame: {v}"),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TopicState;

    #[test]
    fn resume_position_follows_the_known_epoch() {
        let mut s = TopicState::default();
        assert_eq!(s.resume_from(), (None, None));
        s.on_ok(5, "E", None, None, None);
        for seq in 6..=9 {
            s.on_msg(seq);
        }
        assert_eq!(s.resume_from(), (Some(9), Some("E".to_owned())));
        // A jump is taken as a gap in the same epoch.
        s.on_msg(12);
        assert_eq!(s.resume_from(), (Some(12), Some("E".to_owned())));
        // A restart proves another epoch: the position in E stays.
        s.on_msg(1);
        s.on_msg(2);
        assert_eq!(s.resume_from(), (Some(12), Some("E".to_owned())));
        // recovered:true resumes from since; replay follows.
        s.on_ok(20, "E", Some(true), Some(12), Some("E"));
        s.on_msg(13);
        assert_eq!(s.resume_from(), (Some(13), Some("E".to_owned())));
        // recovered:false in another epoch: from ok.seq.
        s.on_ok(7, "F", Some(false), Some(13), Some("E"));
        assert_eq!(s.resume_from(), (Some(7), Some("F".to_owned())));
        s.on_msg(8);
        assert_eq!(s.resume_from(), (Some(8), Some("F".to_owned())));
        // recovered:false in the same epoch: a partial replay from below
        // ok.seq is not a restart.
        s.on_ok(900, "F", Some(false), Some(8), Some("F"));
        s.on_msg(300);
        s.on_msg(301);
        assert_eq!(s.resume_from(), (Some(301), Some("F".to_owned())));
    }
}
