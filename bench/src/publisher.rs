//! A publisher connection: messages to one or more topics at a fixed rate or
//! as fast as the broker confirms them.
//!
//! A connection publishing to several topics sends them round robin: message
//! `i` of every topic, then message `i + 1` of every topic that has one, and so
//! on; each topic's payload indices run from 0.
//!
//! At most `window` messages are unconfirmed at any time, confirmed as
//! [`Confirm`] says. With `ack` (Herald only), each `pub` carries an id
//! `slot << 32 | (index + 1)`, where `slot` is the topic's place in the plan,
//! so the `ok` (which carries the topic's `seq`) can be tied to its topic.
//! With `ping` (NATS always, having no acknowledgements), a ping follows
//! every `window / 4` messages and its pong confirms them: the server
//! handles a connection's operations in order, so by then it took them. The
//! send timestamp is taken when a message is encoded, so time spent waiting
//! for the window or the schedule is not hidden from latency.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::clock::now_ns;
use crate::herald::{self, FrameParser, PubEncoder, Reply};
use crate::load::Confirm;
use crate::nats::{self, NatsEvent, NatsParser};
use crate::payload;
use crate::session::{Codec, ParseMode, Target};
use crate::ws::{self, BufferProfile, Ws};

/// Frames fed before a flush is forced.
const FLUSH_EVERY: u64 = 64;

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub target: Target,
    pub codec: Codec,
    pub url: String,
    /// Topics this connection publishes to (its slots).
    pub topics: Vec<String>,
    /// Messages for each topic, indices `0..count`.
    pub counts: Vec<u64>,
    pub payload_bytes: usize,
    /// Messages per second; 0 for as fast as the window allows.
    pub rate: f64,
    pub window: usize,
    pub confirm: Confirm,
    /// Longest wait for a confirmation before giving up.
    pub confirm_timeout: Duration,
}

/// How publishing went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishReport {
    pub sent: u64,
    pub confirmed: u64,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    /// When the last confirmation arrived.
    pub confirmed_ns: u64,
    /// The highest `seq` in Herald's acknowledgements for the first topic.
    pub final_seq: Option<u64>,
    /// The highest acknowledged `seq` of each topic, by slot (Herald).
    #[serde(skip)]
    pub final_seqs: Vec<Option<u64>>,
    pub server_errors: u64,
    pub first_error: Option<String>,
    /// How far the publisher fell behind its schedule at worst (rate mode).
    pub max_behind_ns: u64,
}

struct AckState {
    confirmed: AtomicU64,
    /// Highest acknowledged `seq` by slot; 0 when none (Herald's first seq is 1).
    max_seqs: Vec<AtomicU64>,
    server_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Messages covered by each outstanding ping, oldest first.
    ping_batches: Mutex<VecDeque<u64>>,
}

impl AckState {
    fn new(slots: usize) -> Self {
        AckState {
            confirmed: AtomicU64::new(0),
            max_seqs: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            server_errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            ping_batches: Mutex::new(VecDeque::new()),
        }
    }

    fn note_error(&self, error: String) {
        self.server_errors.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(error);
    }
}

/// Publishes according to `plan`.
pub async fn publish(plan: &PublishPlan) -> Result<PublishReport> {
    if plan.window == 0 {
        bail!("--window must be at least 1");
    }
    if plan.topics.is_empty() || plan.topics.len() != plan.counts.len() {
        bail!("a publish plan needs one count per topic");
    }
    if plan.topics.len() as u64 > u64::from(u32::MAX) || plan.counts.iter().any(|&c| c >= 1 << 32) {
        bail!("too many topics or messages for one publisher");
    }
    let subprotocol = match plan.target {
        Target::Herald => Some(herald::subprotocol(plan.codec)),
        Target::Nats => None,
    };
    let mut ws = ws::connect(&plan.url, subprotocol, BufferProfile::Throughput).await?;
    if plan.target == Target::Nats {
        ws.send(Message::binary(nats::CONNECT))
            .await
            .context("sending CONNECT")?;
    }
    let (sink, stream) = ws.split();
    let window = Arc::new(Semaphore::new(plan.window));
    let acks = Arc::new(AckState::new(plan.topics.len()));
    let reader = match plan.target {
        Target::Herald => tokio::spawn(read_herald_acks(
            stream,
            FrameParser {
                codec: plan.codec,
                mode: ParseMode::Full,
            },
            window.clone(),
            acks.clone(),
        )),
        Target::Nats => tokio::spawn(read_nats_pongs(stream, window.clone(), acks.clone())),
    };
    let result = send_all(plan, sink, &window, &acks).await;
    reader.abort();
    let mut report = result?;
    report.confirmed = acks.confirmed.load(Ordering::Relaxed);
    report.final_seqs = acks
        .max_seqs
        .iter()
        .map(|seq| Some(seq.load(Ordering::Relaxed)).filter(|&s| s > 0))
        .collect();
    report.final_seq = report.final_seqs.first().copied().flatten();
    report.server_errors = acks.server_errors.load(Ordering::Relaxed);
    report.first_error = acks
        .first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(report)
}

async fn send_all(
    plan: &PublishPlan,
    mut sink: SplitSink<Ws, Message>,
    window: &Semaphore,
    acks: &AckState,
) -> Result<PublishReport> {
    let mut report = PublishReport::default();
    let mut herald_encoders: Vec<PubEncoder> = match plan.target {
        Target::Herald => plan
            .topics
            .iter()
            .map(|topic| PubEncoder::new(plan.codec, topic, plan.payload_bytes))
            .collect(),
        Target::Nats => Vec::new(),
    };
    let total: u64 = plan.counts.iter().sum();
    let mut nats_payload = Vec::with_capacity(plan.payload_bytes + 64);
    let ping_every = (plan.window as u64 / 4).max(1);
    let pings = plan.target == Target::Nats || plan.confirm == Confirm::Ping;
    let mut unpinged = 0u64;
    let interval_ns = if plan.rate > 0.0 {
        (1e9 / plan.rate) as u64
    } else {
        0
    };
    let start = Instant::now();
    let mut unflushed = 0u64;
    for (k, (slot, index)) in Schedule::new(&plan.counts).enumerate() {
        let k = k as u64;
        if interval_ns > 0 {
            let due = start + Duration::from_nanos(k * interval_ns);
            let now = Instant::now();
            if due > now {
                if unflushed > 0 {
                    sink.flush().await.context("flushing publishes")?;
                    unflushed = 0;
                }
                tokio::time::sleep_until(due).await;
            } else {
                report.max_behind_ns = report.max_behind_ns.max((now - due).as_nanos() as u64);
            }
        }
        match window.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                if unflushed > 0 {
                    sink.flush().await.context("flushing publishes")?;
                    unflushed = 0;
                }
                tokio::time::timeout(plan.confirm_timeout, window.acquire())
                    .await
                    .with_context(|| format!("no confirmation within {:?}", plan.confirm_timeout))?
                    .context("window closed")?
                    .forget();
            }
        }
        let sent_ns = now_ns();
        if k == 0 {
            report.first_send_ns = sent_ns;
        }
        report.last_send_ns = sent_ns;
        let ping_now = pings && {
            unpinged += 1;
            unpinged == ping_every || k + 1 == total
        };
        if ping_now {
            acks.ping_batches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(unpinged);
            unpinged = 0;
        }
        let frame = match plan.target {
            Target::Herald => {
                let id = (!pings).then_some(((slot as u64) << 32) | (index + 1));
                herald_encoders[slot].encode(id, index, sent_ns)
            }
            Target::Nats => {
                let mut pl = Vec::with_capacity(plan.payload_bytes + 32);
                payload::encode(index, sent_ns, plan.payload_bytes, &mut pl);
                nats_payload.clear();
                nats::encode_pub(&plan.topics[slot], &pl, &mut nats_payload);
                if ping_now {
                    nats_payload.extend_from_slice(nats::PING);
                }
                Message::binary(nats_payload.clone())
            }
        };
        sink.feed(frame).await.context("sending publish")?;
        if ping_now && plan.target == Target::Herald {
            sink.feed(herald::encode_ping(plan.codec, k))
                .await
                .context("sending ping")?;
        }
        report.sent += 1;
        unflushed += 1;
        if unflushed >= FLUSH_EVERY {
            sink.flush().await.context("flushing publishes")?;
            unflushed = 0;
        }
    }
    sink.flush().await.context("flushing publishes")?;
    // Every permit back means every message was confirmed.
    let all = u32::try_from(plan.window).unwrap_or(u32::MAX);
    match tokio::time::timeout(plan.confirm_timeout, window.acquire_many(all)).await {
        Ok(Ok(permits)) => permits.forget(),
        Ok(Err(_)) => bail!("window closed"),
        Err(_) => eprintln!(
            "publisher: only {} of {} messages confirmed within {:?}",
            acks.confirmed.load(Ordering::Relaxed),
            report.sent,
            plan.confirm_timeout
        ),
    }
    report.confirmed_ns = now_ns();
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    Ok(report)
}

/// The order a publisher sends in: `(slot, index)` pairs, round robin over
/// the slots, each slot's indices rising from 0 to its count.
struct Schedule<'a> {
    counts: &'a [u64],
    round: u64,
    slot: usize,
    rounds: u64,
}

impl<'a> Schedule<'a> {
    fn new(counts: &'a [u64]) -> Self {
        Schedule {
            counts,
            round: 0,
            slot: 0,
            rounds: counts.iter().copied().max().unwrap_or(0),
        }
    }
}

impl Iterator for Schedule<'_> {
    type Item = (usize, u64);

    fn next(&mut self) -> Option<(usize, u64)> {
        while self.round < self.rounds {
            while self.slot < self.counts.len() {
                let slot = self.slot;
                self.slot += 1;
                if self.round < self.counts[slot] {
                    return Some((slot, self.round));
                }
            }
            self.slot = 0;
            self.round += 1;
        }
        None
    }
}

async fn read_herald_acks(
    mut stream: SplitStream<Ws>,
    parser: FrameParser,
    window: Arc<Semaphore>,
    acks: Arc<AckState>,
) {
    let mut deliveries = Vec::new();
    let mut replies = Vec::new();
    while let Some(message) = stream.next().await {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                acks.note_error(format!("publisher connection: {e}"));
                break;
            }
        };
        let frame: &[u8] = match &message {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
            Message::Close(frame) => {
                acks.note_error(format!("publisher connection closed: {frame:?}"));
                break;
            }
            _ => continue,
        };
        replies.clear();
        deliveries.clear();
        if let Err(e) = parser.parse(frame, &mut deliveries, &mut replies) {
            acks.note_error(format!("{e:#}"));
            continue;
        }
        for reply in replies.drain(..) {
            match reply {
                Reply::Ok { id: Some(id), seq } => {
                    acks.confirmed.fetch_add(1, Ordering::Relaxed);
                    if let (Some(seq), Some(max)) = (seq, acks.max_seqs.get((id >> 32) as usize)) {
                        max.fetch_max(seq, Ordering::Relaxed);
                    }
                    window.add_permits(1);
                }
                Reply::Pong => confirm_ping(&acks, &window),
                Reply::Err { id, code, message } => {
                    acks.note_error(format!("pub {id:?}: {code}: {message}"));
                    if id.is_some() {
                        // No ok will come for this one.
                        window.add_permits(1);
                    }
                }
                _ => {}
            }
        }
    }
}

/// A pong confirms the messages its ping followed.
fn confirm_ping(acks: &AckState, window: &Semaphore) {
    let covered = acks
        .ping_batches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop_front()
        .unwrap_or(0);
    acks.confirmed.fetch_add(covered, Ordering::Relaxed);
    window.add_permits(covered as usize);
}

async fn read_nats_pongs(mut stream: SplitStream<Ws>, window: Arc<Semaphore>, acks: Arc<AckState>) {
    let mut parser = NatsParser::default();
    while let Some(message) = stream.next().await {
        let bytes = match message {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Text(t)) => bytes::Bytes::copy_from_slice(t.as_bytes()),
            Ok(Message::Close(frame)) => {
                acks.note_error(format!("publisher connection closed: {frame:?}"));
                break;
            }
            Ok(_) => continue,
            Err(e) => {
                acks.note_error(format!("publisher connection: {e}"));
                break;
            }
        };
        parser.feed(&bytes);
        loop {
            match parser.next_event() {
                Ok(Some(NatsEvent::Pong)) => confirm_ping(&acks, &window),
                Ok(Some(NatsEvent::Err(e))) => acks.note_error(e),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    acks.note_error(format!("{e:#}"));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn schedule_is_round_robin_over_uneven_counts() {
        let order: Vec<_> = Schedule::new(&[3, 1, 2]).collect();
        assert_eq!(order, vec![(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]);
        assert_eq!(Schedule::new(&[0, 0]).count(), 0);
        assert_eq!(Schedule::new(&[5]).count(), 5);
    }
}
