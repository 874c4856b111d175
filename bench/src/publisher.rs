//! The fan-out publisher: N messages at a fixed rate or as fast as the
//! broker confirms them.
//!
//! At most `window` messages are unconfirmed at any time. Herald confirms
//! each `pub` with an `ok` (its id is the message index + 1; the `ok`
//! carries the `seq`). NATS has no acknowledgements, so a `PING` follows
//! every `window / 4` messages and its `PONG` confirms them (the server
//! handles a connection's operations in order, so by then they were fanned
//! out). The send timestamp is taken when a message is encoded, so time
//! spent waiting for the window or the schedule is not hidden from latency.

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
    pub topic: String,
    pub messages: u64,
    pub payload_bytes: usize,
    /// Messages per second; 0 for as fast as the window allows.
    pub rate: f64,
    pub window: usize,
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
    /// The highest `seq` in Herald's acknowledgements.
    pub final_seq: Option<u64>,
    pub server_errors: u64,
    pub first_error: Option<String>,
    /// How far the publisher fell behind its schedule at worst (rate mode).
    pub max_behind_ns: u64,
}

#[derive(Default)]
struct AckState {
    confirmed: AtomicU64,
    max_seq: AtomicU64,
    saw_seq: AtomicU64,
    server_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// NATS: messages covered by each outstanding PING, oldest first.
    ping_batches: Mutex<VecDeque<u64>>,
}

impl AckState {
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
    let acks = Arc::new(AckState::default());
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
    if acks.saw_seq.load(Ordering::Relaxed) > 0 {
        report.final_seq = Some(acks.max_seq.load(Ordering::Relaxed));
    }
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
    let mut herald_encoder = PubEncoder::new(plan.codec, &plan.topic, plan.payload_bytes);
    let mut nats_payload = Vec::with_capacity(plan.payload_bytes + 64);
    let ping_every = (plan.window as u64 / 4).max(1);
    let mut unpinged = 0u64;
    let interval_ns = if plan.rate > 0.0 {
        (1e9 / plan.rate) as u64
    } else {
        0
    };
    let start = Instant::now();
    let mut unflushed = 0u64;
    for index in 0..plan.messages {
        if interval_ns > 0 {
            let due = start + Duration::from_nanos(index * interval_ns);
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
        if index == 0 {
            report.first_send_ns = sent_ns;
        }
        report.last_send_ns = sent_ns;
        let frame = match plan.target {
            Target::Herald => herald_encoder.encode(index + 1, index, sent_ns),
            Target::Nats => {
                let mut pl = Vec::with_capacity(plan.payload_bytes + 32);
                payload::encode(index, sent_ns, plan.payload_bytes, &mut pl);
                nats_payload.clear();
                nats::encode_pub(&plan.topic, &pl, &mut nats_payload);
                unpinged += 1;
                if unpinged == ping_every || index + 1 == plan.messages {
                    acks.ping_batches
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_back(unpinged);
                    unpinged = 0;
                    nats_payload.extend_from_slice(nats::PING);
                }
                Message::binary(nats_payload.clone())
            }
        };
        sink.feed(frame).await.context("sending publish")?;
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
                Reply::Ok { id: Some(_), seq } => {
                    acks.confirmed.fetch_add(1, Ordering::Relaxed);
                    if let Some(seq) = seq {
                        acks.max_seq.fetch_max(seq, Ordering::Relaxed);
                        acks.saw_seq.store(1, Ordering::Relaxed);
                    }
                    window.add_permits(1);
                }
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
                Ok(Some(NatsEvent::Pong)) => {
                    let covered = acks
                        .ping_batches
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .pop_front()
                        .unwrap_or(0);
                    acks.confirmed.fetch_add(covered, Ordering::Relaxed);
                    window.add_permits(covered as usize);
                }
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
